"""DDP on 2 CPU processes (gloo): every rank ends with the same masks and the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from lightning_compress import ClassifierModule, CompressionReport, DigitsDataModule
from lightning_compress.models import MLP
from lightning_compress.pruning import PruningCallback

# A spawned worker can be killed by SIGABRT at interpreter exit ("terminate called without an active
# exception" from a gloo thread) after its work is done; rerun once on that signal only, never on a
# failed assertion or an exception raised inside a worker.
pytestmark = pytest.mark.flaky(reruns=1, only_rerun=["terminated with signal SIGABRT"])


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class DumpPerRank(Callback):
    """Save every rank's masks and weights at the end of training."""

    def __init__(self, folder: str, pruning: PruningCallback) -> None:
        self.folder = folder
        self.pruning = pruning

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        masks = {n: m.cpu() for n, m in self.pruning.masks.items()}
        weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters()}
        torch.save({"masks": masks, "weights": weights}, Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(
    ("criterion", "granularity"),
    [("entropy", "channel")],  # data-dependent scores: each rank sees different batches
)
def test_ddp_two_processes_identical_masks(tmp_path: Path, criterion: str, granularity: str) -> None:
    seed_everything(0)
    module = ClassifierModule(MLP(64, (32, 16), 10), optimizer=sgd)
    cb = PruningCallback(
        0.5, criterion=criterion, structure=granularity, start_epoch=1, end_epoch=2, update_every_n_steps=2, verbose=False
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        callbacks=[cb, DumpPerRank(str(tmp_path), cb)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DigitsDataModule())
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["masks"] and set(r0["masks"]) == set(r1["masks"])
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    pruned = sum(int((~m).sum()) for m in r0["masks"].values())
    assert pruned > 0
    for n in r0["weights"]:
        assert torch.equal(r0["weights"][n], r1["weights"][n]), n


def _rank_inputs(rank: int) -> torch.Tensor:
    """32 samples of 8 features; rank 0's first four features are 20x larger than its last four, rank 1's the
    other way round: scores from one rank's inputs alone rank the weights otherwise than from both."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(rank))
    scale = torch.tensor([20.0] * 4 + [1.0] * 4)
    return x * (scale if rank == 0 else scale.flip(0))


class RankData(LightningModule):
    """A tiny network that never changes (lr 0), each process training on its own inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        self.example_input_array = torch.zeros(1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(_rank_inputs(self.global_rank)), batch_size=16)


def _expected_masks(criterion: str, weights: dict[str, torch.Tensor], ranks: tuple[int, ...]) -> torch.Tensor:
    """The first layer's mask from the inputs of ``ranks``, computed here from the scores' definitions."""
    from lightning_compress.pruning.criteria import entropy_of_samples

    x = torch.cat([_rank_inputs(r) for r in ranks])
    w = weights["net.0.weight"]
    if criterion == "wanda":  # |w| times each input feature's norm, half of each row pruned
        scores = w.abs() * x.square().sum(0).sqrt()
        return scores.argsort(1).argsort(1) >= 4
    hidden = x @ w.T + weights["net.0.bias"]  # entropy of each output channel, the 3 lowest pruned
    low = entropy_of_samples(hidden).argsort()[:3]
    keep = torch.ones(6, 8, dtype=torch.bool)
    keep[low] = False
    return keep


class ReloadSums(Callback):
    """Each rank: Wanda's checkpointed input sums, loaded back, sum to the same (not once per process)."""

    def __init__(self, folder: str, pruning: PruningCallback) -> None:
        self.folder, self.pruning = folder, pruning

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch != 0:  # the first epoch's steps were recorded for the update at epoch 1
            return
        criterion = self.pruning.options.criterion
        saved = criterion.state_dict()
        criterion.load_state_dict(saved)
        again = criterion._summed()
        same = bool(saved["sq"]) and all(torch.equal(saved["sq"][k], again[k].cpu()) for k in saved["sq"])
        torch.save(same, Path(self.folder) / f"sums{trainer.global_rank}.pt")


class DumpReport(Callback):
    """Save every rank's report after the report's own teardown."""

    def __init__(self, folder: str, report: Any) -> None:
        self.folder, self.report = folder, report

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.save(self.report.report, Path(self.folder) / f"report{trainer.global_rank}.pt")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("criterion", ["wanda", "entropy"])
def test_data_dependent_scores_read_every_processes_inputs(tmp_path: Path, criterion: str) -> None:
    """Wanda's input norms and the entropy criterion's activations were rank 0's alone, whose masks were then
    broadcast: the masks came from half the data (30 entries of 2,048 off in a 2-process fit)."""
    seed_everything(0)
    module = RankData()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    if criterion == "wanda":
        cb = PruningCallback(0.5, criterion="wanda", schedule="one_shot", start_epoch=1, include=["net.0"], verbose=False)
        cb.options.criterion.calibration_batches = 2
    else:
        cb = PruningCallback(0.5, criterion="entropy", structure="channel", schedule="one_shot", start_epoch=1,
                             include=["net.0"], verbose=False)  # fmt: skip
    report = CompressionReport(batch_size=4, repeats=5, warmup=1, print_table=False, plot=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2,
        callbacks=[cb, DumpPerRank(str(tmp_path), cb), report, DumpReport(str(tmp_path), report)]
        + ([ReloadSums(str(tmp_path), cb)] if criterion == "wanda" else []),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    trainer.fit(module)
    masks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["masks"]["net.0.weight"] for r in (0, 1)]
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], _expected_masks(criterion, start, (0, 1)))
    if criterion == "wanda":  # the data tells the two apart
        assert not torch.equal(masks[0], _expected_masks(criterion, start, (0,)))
        # a resume counts the checkpoint's sums once (each process loaded all of them: they doubled)
        assert all(torch.load(tmp_path / f"sums{r}.pt", weights_only=True) for r in (0, 1))
    # the report's models are timed by rank 0 alone, which holds and writes the report (both ranks timed their copies
    # at once on the same cores)
    reports = [torch.load(tmp_path / f"report{r}.pt", weights_only=False) for r in (0, 1)]
    assert reports[0]["compressed"]["latency_ms"] > 0 and reports[1] is None
