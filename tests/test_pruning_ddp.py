"""DDP on 2 CPU processes (gloo): every rank ends with the same masks and the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from lightning_compress import ClassifierModule, DigitsDataModule
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
