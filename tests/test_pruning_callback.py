"""PruningCallback inside real (tiny) Trainer runs on the embedded digits data."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lightning_compress import ClassifierModule, DigitsDataModule
from lightning_compress.models import MLP, ResCNN
from lightning_compress.pruning import PruningCallback


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def mlp_module(hidden: tuple[int, ...] = (32,)) -> ClassifierModule:
    return ClassifierModule(MLP(64, hidden, 10), optimizer=sgd)


def make_trainer(tmp_path: Path, callbacks: list, max_epochs: int = 3, **kw: Any) -> Trainer:
    defaults = dict(limit_train_batches=6, limit_val_batches=2, num_sanity_val_steps=0)
    return Trainer(max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs(tmp_path, **{**defaults, **kw}))


def quiet(**kw: Any) -> dict[str, Any]:
    return {"verbose": False, **kw}


# --------------------------------------------------------------------------- core behaviour


def test_a_sparsity_map_is_dense_before_its_first_epoch(tmp_path: Path) -> None:
    """{2: 0.3, 3: 0.6} pruned 30% at step 0 (a map's value before its first key was that key's)."""
    seed_everything(0)
    cb = PruningCallback(target_sparsity=0.6, schedule={2: 0.3, 3: 0.6}, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=4).fit(mlp_module(), DigitsDataModule())
    history = cb.compression_summary()["history"]
    assert [(h["epoch"], round(h["target"], 4)) for h in history] == [(2, 0.3), (3, 0.6)]


def test_absolute_target_reached_and_pruned_weights_stay_zero(tmp_path: Path) -> None:
    seed_everything(0)
    module = mlp_module()
    cb = PruningCallback(target_sparsity=0.8, schedule="cubic", end_epoch=2, **quiet())
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    trainer.fit(module, DigitsDataModule())
    total = 32 * 64 + 10 * 32
    assert cb.nonzero == total - round(0.8 * total)
    assert cb.compression_state() == pytest.approx({"sparsity": 0.8, "target": 0.8}, abs=1 / total)
    # absolute targets along a cubic ramp: epoch 1 gets 0.8 * (1 - 0.5**3)
    assert [round(h["target"], 4) for h in cb.compression_summary()["history"]] == [0.7, 0.8]
    masks = cb.masks
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        buf = trainer.optimizers[0].state[params[name]]["momentum_buffer"]
        assert (buf[~mask] == 0).all(), "momentum of pruned entries must be zero"
    # the last epoch trained with masks in force: pruned entries did not grow back
    assert float((module.model.net[1].weight == 0).float().mean()) >= 1 - masks["model.net.1.weight"].float().mean() - 1e-6
    with pytest.raises(TypeError, match="does not support item assignment"):  # a read-only view
        masks["model.net.1.weight"] = torch.ones(1)  # type: ignore[index]
    assert cb.is_active()


class NoisySGD(torch.optim.SGD):
    """An optimizer that moves every weight (zeros included): masks must be re-applied after its steps."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.01)
        return out


class ZerosAfterEveryStep(Callback):
    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.checked = pruning, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            assert (params[name][~mask] == 0).all(), f"{name} revived at step {trainer.global_step}"
            self.checked += int((~mask).sum())


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
        lambda p: NoisySGD(p, lr=0.05),
    ],
    ids=["sgd-nesterov-wd", "adam-amsgrad-wd", "adamw", "rmsprop-centered", "custom-noisy"],
)
def test_pruned_weights_are_zero_after_every_optimizer_step(tmp_path: Path, make_opt: Any) -> None:
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=make_opt)
    cb = PruningCallback(0.7, schedule="linear", end_epoch=2, update_every_n_steps=3, **quiet())
    spy = ZerosAfterEveryStep(cb)
    make_trainer(tmp_path, [cb, spy], max_epochs=2).fit(module, DigitsDataModule())
    assert spy.checked > 0 and cb.sparsity == pytest.approx(0.7, abs=1e-3)


def test_per_layer_map_and_layer_scope(tmp_path: Path) -> None:
    module = ClassifierModule(MLP(64, (32, 16), 10), optimizer=sgd)
    cb = PruningCallback(target_sparsity={r"net\.1\.": 0.9, r"net\.3\.": 0.5}, schedule="one_shot", start_epoch=1, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    layers = cb.compression_summary()["layers"]
    assert layers["model.net.1.weight"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert layers["model.net.3.weight"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert layers["model.net.5.weight"]["sparsity"] == 0.0
    assert cb.scope == "layer"


def test_summary_has_storage_estimate_and_logger_gets_metrics(tmp_path: Path) -> None:
    cb = PruningCallback(0.9, schedule="linear", end_epoch=2, **quiet())
    logger = CSVLogger(tmp_path, name="log")
    make_trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(mlp_module(), DigitsDataModule())
    summary = cb.compression_summary()
    json.dumps(summary)  # JSON-ready for the report
    assert summary["storage"]["sparse_bytes"] < summary["storage"]["dense_bytes"] / 3
    assert all("sparse_bytes" in v for v in summary["layers"].values())
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert logged and logged[-1] == pytest.approx(0.9, abs=1e-3)
    assert any(r.get("pruning/sparsity/model.net.1.weight") for r in rows)
    assert any(r.get("pruning/nonzero") for r in rows)


def test_nm_granularity(tmp_path: Path) -> None:
    module = mlp_module()
    cb = PruningCallback(0.5, structure="2:4", schedule="linear", end_epoch=2, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=3).fit(module, DigitsDataModule())
    for name in ("net.1", "net.3"):
        w = dict(module.model.named_modules())[name].weight
        assert ((w != 0).reshape(-1, 4).sum(1) <= 2).all()
    assert cb.sparsity == pytest.approx(0.5)


def test_channel_granularity_couples_residual_and_batchnorm(tmp_path: Path) -> None:
    seed_everything(0)
    module = ClassifierModule(ResCNN(width=8), optimizer=sgd)
    cb = PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    net = module.model
    stem = net.stem[0].weight.flatten(1).abs().sum(1) > 0
    conv2 = net.block.conv2.weight.flatten(1).abs().sum(1) > 0
    assert torch.equal(stem, conv2), "channels coupled by the residual add are pruned together"
    assert int(stem.sum()) == 4
    for bn, conv in ((net.stem[1], net.stem[0]), (net.block.bn1, net.block.conv1), (net.down[1], net.down[0])):
        alive = conv.weight.flatten(1).abs().sum(1) > 0
        assert (bn.weight[~alive] == 0).all() and (bn.bias[~alive] == 0).all()
    assert (net.fc.weight.abs().sum(1) > 0).all(), "the output head's outputs are never channel-pruned"
    down = net.down[0].weight.flatten(1).abs().sum(1) > 0
    assert torch.equal(net.fc.weight.abs().sum(0) > 0, down), "its input columns go with the channels they read"
    assert cb.compression_summary()["channels"]["model.stem.0+model.block.conv2"] == {"kept": 4, "total": 8}


def test_step_updates_respect_gradient_accumulation(tmp_path: Path) -> None:
    cb = PruningCallback(0.6, schedule="linear", end_epoch=2, update_every_n_steps=2, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=8, accumulate_grad_batches=2).fit(
        mlp_module(), DigitsDataModule()
    )
    history = cb.compression_summary()["history"]
    # 4 optimizer steps per epoch -> an update every 2 steps, at fractional epochs
    assert [h["step"] for h in history] == [2, 4, 6, 8]
    assert [h["epoch"] for h in history] == [0.5, 1.0, 1.5, 2.0]
    assert cb.sparsity == pytest.approx(0.6, abs=1e-3)


class TwoOptimizers(ClassifierModule):
    """Manual optimisation with two optimizers: ``global_step`` grows by two per batch."""

    def __init__(self) -> None:
        super().__init__(MLP(64, (32,), 10))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        first, second = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(x), y)
        first.zero_grad(), second.zero_grad()
        self.manual_backward(loss)
        first.step(), second.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        layers = self.model.net
        return [torch.optim.SGD(layers[1].parameters(), lr=0.05), torch.optim.SGD(layers[3].parameters(), lr=0.05)]


def test_step_updates_follow_the_step_count_when_it_grows_by_more_than_one(tmp_path: Path) -> None:
    cb = PruningCallback(0.6, schedule="linear", end_epoch=2, update_every_n_steps=5, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=8).fit(TwoOptimizers(), DigitsDataModule())
    # 16 optimizer steps an epoch, two at a time: due once a multiple of 5 is passed (odd ones used to be
    # skipped); the schedule ends with training, so its last step comes at the end (step 32)
    assert [h["step"] for h in cb.compression_summary()["history"]] == [6, 10, 16, 20, 26, 30, 32]
    assert cb.sparsity == pytest.approx(0.6, abs=0.02)


class StopsAfterEpoch1(Callback):
    """What ``EarlyStopping`` does when it stops a fit: ``should_stop`` at the end of an epoch."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.should_stop = trainer.current_epoch >= 1


@pytest.mark.parametrize("stop", ["max_steps", "should_stop"])
def test_a_fit_stopped_early_is_not_pruned_further_at_its_end(tmp_path: Path, stop: str) -> None:
    seed_everything(0)
    module = mlp_module()
    cb = PruningCallback(0.9, schedule="linear", start_epoch=1, end_epoch=4, **quiet())
    if stop == "max_steps":  # 6 batches an epoch: stops half-way through epoch 1 (sparsity 0.3 there, 0.0 before)
        trainer = make_trainer(tmp_path, [cb], max_epochs=6, max_steps=9)
    else:  # stops after epoch 1 (0.3 due at epoch 2: the end used to prune to it)
        trainer = make_trainer(tmp_path, [cb, StopsAfterEpoch1()], max_epochs=6)
    with pytest.warns(UserWarning, match=r"training stopped after (1\.5|2) epochs .* before the schedule's end at epoch 4"):
        trainer.fit(module, DigitsDataModule())
    assert cb.sparsity == 0.0 and cb.compression_summary()["history"] == []  # linear from epoch 1: 0.0 at its start
    assert any("before the schedule's end at epoch 4" in note for note in cb.compression_summary()["notes"])


def test_fast_dev_run_is_named_when_it_sets_max_epochs(tmp_path: Path) -> None:
    cb = PruningCallback(0.5, start_epoch=2, end_epoch=4, **quiet())
    trainer = Trainer(max_epochs=10, fast_dev_run=True, callbacks=[cb], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"start_epoch=2 is not before max_epochs=1.*fast_dev_run=True runs one epoch.*start_epoch=0"):
        trainer.fit(mlp_module(), DigitsDataModule())


class WithTeacher(ClassifierModule):
    def __init__(self) -> None:
        super().__init__(MLP(64, (32,), 10), optimizer=sgd)
        self.teacher = MLP(64, (48,), 10).requires_grad_(False)


def test_teacher_is_never_pruned(tmp_path: Path) -> None:
    module = WithTeacher()
    before = copy.deepcopy(module.teacher.state_dict())
    cb = PruningCallback(0.9, schedule="one_shot", start_epoch=0, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=1).fit(module, DigitsDataModule())
    assert not any(n.startswith("teacher") for n in cb.masks)
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    assert cb.sparsity == pytest.approx(0.9, abs=1e-3)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_strictly_into_plain_module_and_is_compact(tmp_path: Path) -> None:
    module = mlp_module()
    keys = set(module.state_dict())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = PruningCallback(0.75, schedule="one_shot", start_epoch=1, **quiet())
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True).fit(module, DigitsDataModule())
    path = tmp_path / "ckpt" / "last.ckpt"
    data = torch.load(path, weights_only=True)
    assert set(data["state_dict"]) == keys, "no weight_orig / weight_mask keys"
    state = next(v for k, v in data["callbacks"].items() if k.startswith("PruningCallback"))
    bits = state["masks"]["model.net.1.weight"]["bits"]
    assert bits.dtype == torch.uint8 and bits.numel() == 32 * 64 // 8
    plain = ClassifierModule.load_from_checkpoint(path, model=MLP(64, (32,), 10), strict=True)
    assert float((plain.model.net[1].weight == 0).float().mean()) >= 0.74
    copy.deepcopy(plain)  # works: no pruning re-parametrisation


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on the epoch (Lightning calls ``set_epoch``), so resumes replay it."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class ReplayableDigits(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(self.train_set, batch_size=64, sampler=EpochSampler(len(self.train_set)))


def _fit_for_resume(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None) -> tuple[ClassifierModule, PruningCallback]:
    seed_everything(0)
    module = mlp_module()
    cb = PruningCallback(0.9, schedule="cubic", start_epoch=1, end_epoch=3, criterion="taylor", **quiet())
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer = make_trainer(tmp_path, [cb, ckpt], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(module, ReplayableDigits(), ckpt_path=ckpt_path)
    return module, cb


def test_resume_mid_schedule_is_bit_identical(tmp_path: Path) -> None:
    full, cb_full = _fit_for_resume(tmp_path / "a", max_epochs=4)
    # resume from the end of epoch 1 (sparsity part-way up the cubic ramp, Taylor scores accumulated)
    resumed, cb_res = _fit_for_resume(tmp_path / "b", max_epochs=4, ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert cb_full.compression_summary()["history"] == cb_res.compression_summary()["history"]
    assert all(torch.equal(cb_full.masks[n], cb_res.masks[n]) for n in cb_full.masks)


# --------------------------------------------------------------------------- guard, rewind, permanence


def test_accuracy_guard_restores_last_good_and_stops(tmp_path: Path) -> None:
    seed_everything(0)
    module = mlp_module()
    cb = PruningCallback(0.99, schedule="one_shot", start_epoch=2, monitor="val_acc", max_drop=0.02, **quiet())
    trainer = make_trainer(tmp_path, [cb], max_epochs=4, limit_train_batches=12, limit_val_batches=None)
    with pytest.warns(UserWarning, match="accuracy guard: val_acc=.* restored the last good masks"):
        trainer.fit(module, DigitsDataModule())
    summary = cb.compression_summary()
    assert summary["guard"]["stopped"] and len(summary["guard"]["events"]) == 1
    assert summary["guard"]["events"][0]["epoch"] == 2
    assert summary["notes"][0].startswith("accuracy guard at epoch 2: val_acc=")  # the report prints it
    assert cb.sparsity == 0.0, "restored the dense (last good) masks"
    assert float(trainer.callback_metrics["val_acc"]) > summary["guard"]["baseline"] - 0.05


def test_guard_does_not_trip_within_max_drop(tmp_path: Path) -> None:
    cb = PruningCallback(0.5, schedule="one_shot", start_epoch=1, monitor="val_loss", mode="min", max_drop=100.0, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2).fit(mlp_module(), DigitsDataModule())
    assert not cb.compression_summary()["guard"]["stopped"] and cb.sparsity == pytest.approx(0.5, abs=1e-3)


def test_guard_on_a_loss_says_it_rose(tmp_path: Path) -> None:
    seed_everything(0)
    cb = PruningCallback(0.99, schedule="one_shot", start_epoch=2, monitor="val_loss", mode="min", max_drop=0.01, **quiet())
    trainer = make_trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=12)
    with pytest.warns(UserWarning, match=r"accuracy guard: val_loss=\S+ rose \S+ from the baseline \S+ to \S+ \(max_drop=0.01\)"):
        trainer.fit(mlp_module(), DigitsDataModule())
    assert cb.compression_summary()["guard"]["stopped"]


class _StepCount(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


@pytest.mark.parametrize("plugin", ["pruning", "quantization"])
def test_monitor_never_logged_is_a_clear_error(tmp_path: Path, plugin: str) -> None:
    """A misspelt monitor close to a logged name is refused at the sanity check, before any training step and with the
    model put back (QuantizeCallback found it only when QAT began, after every float epoch). A name the sanity check
    does not tell (no close match: maybe a metric training logs once per epoch, after the first validation) is refused
    at the second validation."""
    from lightning_compress.quantization import QuantizeCallback, fake_quant_layers

    def build(monitor: str) -> Any:
        if plugin == "pruning":
            return PruningCallback(0.5, monitor=monitor, max_drop=0.01, **quiet())
        return QuantizeCallback(start_epoch=2, monitor=monitor, max_drop=0.01, latency="none")

    module, steps = mlp_module(), _StepCount()
    trainer = make_trainer(tmp_path, [build("val_accuracy"), steps], max_epochs=3, num_sanity_val_steps=1)
    with pytest.raises(ValueError, match=r"monitor='val_accuracy'.*never logged; logged keys: .*'val_acc'.* Did you mean 'val_acc'"):
        trainer.fit(module, DigitsDataModule())
    assert steps.steps == 0 and not fake_quant_layers(module)
    assert not any(isinstance(m, torch.nn.utils.parametrize.ParametrizationList) for m in module.modules())
    steps = _StepCount()
    with pytest.raises(ValueError, match=r"monitor='accuracy'.*never logged; logged keys: .*'val_acc'"):
        make_trainer(tmp_path, [build("accuracy"), steps], max_epochs=3, num_sanity_val_steps=1).fit(mlp_module(), DigitsDataModule())
    assert steps.steps == (6 if plugin == "pruning" else 12)  # its guard reads from the first validation on
    if plugin == "quantization":  # a training metric logged once per epoch, after the first validation: accepted
        quant = QuantizeCallback(start_epoch=1, monitor="train_loss", mode="min", max_drop=10.0, latency="none")
        make_trainer(tmp_path, [quant], max_epochs=3, num_sanity_val_steps=1).fit(mlp_module(), DigitsDataModule())
        assert quant.quantized_model is not None


def test_rewind_is_a_real_copy_of_the_initial_weights(tmp_path: Path) -> None:
    seed_everything(0)
    module = mlp_module()
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    # two mask updates (epochs 2 and 3), both rewinding to the weights at initialisation
    cb = PruningCallback(0.7, schedule="linear", start_epoch=1, end_epoch=3, rewind_epoch=0, **quiet())
    seen: dict[int, dict[str, torch.Tensor]] = {}
    masks: dict[int, dict[str, torch.Tensor]] = {}

    class Spy(Callback):  # runs right after the pruning callback's hook
        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            seen[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            masks[trainer.current_epoch] = {n: m.clone() for n, m in cb.masks.items()}

    make_trainer(tmp_path, [cb, Spy()], max_epochs=4).fit(module, DigitsDataModule())
    live = dict(module.named_parameters())
    assert masks[3] and all(int((~m).sum()) > int((~masks[2][n]).sum()) for n, m in masks[3].items())
    for name in masks[3]:
        # after each pruning step the survivors are back at their initial values, the rest zero; at epoch 3
        # too, although epoch 2 trained the live weights: the snapshot is a copy, not their storage
        assert not torch.equal(seen[2][name], init[name])
        for epoch in (2, 3):
            assert torch.equal(seen[epoch][name], init[name] * masks[epoch][name]), (epoch, name)
        assert not torch.equal(live[name], seen[3][name])  # and training went on from there


@pytest.mark.parametrize("permanent", [True, False])
def test_make_permanent_removes_hooks(tmp_path: Path, permanent: bool) -> None:
    module = ClassifierModule(ResCNN(width=4), optimizer=sgd)
    cb = PruningCallback(
        0.5, structure="channel", criterion="entropy", start_epoch=1, end_epoch=2, make_permanent=permanent, **quiet()
    )
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    assert cb.sparsity > 0.3
    hooks = sum(len(m._forward_hooks) for m in module.modules())  # the entropy criterion's activation hooks
    assert (hooks == 0) is permanent


@pytest.mark.parametrize("permanent", [True, False])
def test_make_permanent_lets_a_later_fit_train_freely(tmp_path: Path, permanent: bool) -> None:
    module = mlp_module()
    cb = PruningCallback(0.6, schedule="one_shot", start_epoch=1, make_permanent=permanent, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    pruned = {n: ~m for n, m in cb.masks.items()}
    params = dict(module.named_parameters())
    assert pruned and all(bool((params[n][m] == 0).all()) for n, m in pruned.items())
    # permanent: the callback lets go and a later fit trains the pruned weights again; otherwise it still masks them
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    regrown = any(bool((params[n][m] != 0).any()) for n, m in pruned.items())
    assert regrown is permanent
    # what the callback says is the weights' own: nonzero and the per-layer counts were the masks' (348 of 2,048 said
    # where 1,943 were non-zero), beside a sparsity that counted the real zeros
    summary = cb.compression_summary()
    real = sum(int((params[n] != 0).sum()) for n in pruned)
    assert cb.nonzero == summary["nonzero"] == real
    assert cb.sparsity == pytest.approx(1 - real / summary["total"])
    for n, layer in summary["layers"].items():
        assert layer["nonzero"] == int((params[n] != 0).sum())
    assert any("non-zero again" in note for note in summary.get("notes", [])) is permanent


def test_shrink_call_site(tmp_path: Path) -> None:
    module = ClassifierModule(ResCNN(width=8), optimizer=sgd)
    n_before = sum(p.numel() for p in module.parameters())
    cb = PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, **quiet())
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    assert module.model.stem[0].out_channels == 4 and module.model.block.conv1.out_channels == 4
    assert sum(p.numel() for p in module.parameters()) < 0.5 * n_before
    summary = cb.compression_summary()
    assert summary["shrunk"]["channels"]["model.stem.0"] == [8, 4]
    assert cb.compression_state()["sparsity"] > 0.4


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 1.0}, r"target_sparsity must be a number in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.1}, r"target_sparsity must be a number in \[0, 1\)"),
        ({"target_sparsity": {"fc": 1.5}}, r"target_sparsity\['fc'\] must be a number in \[0, 1\)"),
        ({"criterion": "l2"}, r"unknown criterion 'l2'; valid: \['bn_scale', 'entropy', 'magnitude', 'random', 'taylor', 'wanda'\]"),
        ({"structure": "block"}, r"unknown structure 'block'; valid: \['unstructured', 'channel'"),
        ({"schedule": "exponential"}, r"unknown schedule 'exponential'; valid names: \['constant', 'cubic'"),
        ({"start_epoch": 3, "end_epoch": 3}, r"end_epoch \(3\) must be after start_epoch \(3\)"),
        ({"start_epoch": 3, "end_epoch": 1}, r"end_epoch \(1\) must be after start_epoch \(3\)"),
        ({"structure": "4:4"}, r"needs 1 <= N < M"),
        ({"structure": "1:4"}, r"structure '1:4' keeps 1 of every 4 weights.*set target_sparsity=0.75"),
        ({"max_drop": 0.01}, r"max_drop=0.01 needs a monitor"),
        ({"monitor": "val_acc"}, r"monitor='val_acc' needs max_drop"),
        ({"criterion": "entropy"}, r"criterion 'entropy' does not apply to structure 'unstructured'; it supports \['channel'\]"),
        ({"criterion": "bn_scale", "structure": "2:4"}, r"criterion 'bn_scale' does not apply to structure '2:4'"),
        ({"shrink": True}, r"shrink=True .* needs structure='channel', 'heads', 'neurons' or 'heads\+neurons', got 'unstructured'"),
        ({"scope": "model"}, r"unknown scope 'model'; valid: \['global', 'layer'\]"),
        ({"scope": "row"}, r"scope 'row' compares within output rows, which criterion 'magnitude' with structure 'unstructured' does not"),
        ({"mode": "up", "monitor": "val_acc", "max_drop": 0.1}, r"unknown mode 'up'"),
        ({"update_every_n_steps": 0}, r"update_every_n_steps must be a positive integer"),
        ({"schedule": {0: 0.2, 2: 0.6}, "target_sparsity": 0.5}, r"schedule ends at sparsity 0.6 but target_sparsity=0.5"),
        # the map says when pruning starts: start_epoch beside it was silently ignored
        ({"schedule": {2: 0.5}, "target_sparsity": 0.5, "start_epoch": 2}, r"start_epoch=2 beside an \{epoch: sparsity\} map"),
        # 0.8 was never applied: the ramp is capped by its final value
        ({"schedule": {0: 0.8, 1: 0.5}, "target_sparsity": 0.5}, r"schedule must not decrease \(pruned weights stay pruned\), got \{0.0: 0.8, 1.0: 0.5\}"),
        ({"include": ["("]}, r"include pattern '\(' is not a valid regex"),
        ({"include": []}, r"include=\[\] selects nothing"),
        ({"log_per_layer": "x"}, r"log_per_layer must be True or False, got 'x'"),
        # a string is truthy: "false" removed the channels and kept the hooks
        ({"make_permanent": "false"}, r"make_permanent must be True or False, got 'false'"),
        ({"structure": "channel", "shrink": "no"}, r"shrink must be True or False, got 'no'"),
        ({"shrink": None}, r"shrink must be True or False, got None"),
        ({"exclude": 5}, r"exclude must be a regex string or a list of them \(module names\), got 5"),
        ({"seed": "x"}, r"seed must be an integer \(the random criterion's draws\), got 'x'"),
        ({"seed": True}, r"seed must be an integer \(the random criterion's draws\), got True"),
        # NaN compared false with start_epoch: channels were "removed" at epoch 0 with nothing pruned, then never pruned
        ({"structure": "channel", "shrink": True, "shrink_epoch": float("nan")}, r"shrink_epoch must be a finite number >= start_epoch \(0\), got nan"),
        ({"start_epoch": None}, r"start_epoch must be a finite number >= 0, got None"),
        ({"schedule_steps": -5}, r"schedule_steps \(the iterative schedule's jumps\) must be a positive integer, got -5"),
        ({"schedule": "iterative", "schedule_steps": True}, r"schedule_steps .* must be a positive integer, got True"),
    ],
)
def test_bad_input_in_init(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningCallback(**kwargs)


def test_a_former_option_name_is_said_and_never_overrides_the_new_one() -> None:
    """A printed config holds the former names too (granularity, monitor_mode): edited under one, the former name
    silently won (channel pruning ran where structure said 2:4) and its DeprecationWarning was hidden by Python's
    filters. Both set differently is an error; the former name alone works with a warning that shows."""
    from lightning_compress.quantization import QuantizeCallback

    with pytest.raises(ValueError, match=r"granularity='channel' and structure='2:4' set the same option .* set only structure"):
        PruningCallback(0.5, structure="2:4", granularity="channel")
    with pytest.raises(ValueError, match=r"monitor_mode='max' and mode='min'.*set only mode"):
        QuantizeCallback(monitor="val_loss", max_drop=0.1, mode="min", monitor_mode="max")
    with pytest.warns(FutureWarning, match=r"PruningCallback\(granularity='channel'\) is now structure='channel'"):
        assert PruningCallback(0.5, granularity="channel").structure == "channel"
    with pytest.warns(FutureWarning, match=r"monitor_mode='min'\) is now mode='min'"):
        assert QuantizeCallback(monitor="val_loss", max_drop=0.1, monitor_mode="min").mode == "min"
    assert PruningCallback(0.5, structure="2:4", granularity="2:4").structure == "2:4"  # the same value twice


@pytest.mark.parametrize(
    ("kwargs", "model", "match"),
    [
        ({"include": ["conv"]}, "mlp", r"include pattern 'conv' matches no weight to prune"),
        ({"exclude": ["conv"]}, "mlp", r"exclude pattern 'conv' matches none of the weights"),
        ({"target_sparsity": {"conv": 0.5}}, "mlp", r"target_sparsity regex 'conv' matches none of the weights"),
        ({"end_epoch": 5}, "mlp", r"end_epoch=5 is past max_epochs=2"),
        ({"start_epoch": 2, "end_epoch": 3}, "mlp", r"start_epoch=2 is not before max_epochs=2"),
        ({"structure": "2:4", "include": [r"net\.1"]}, "odd", r"has 63 inputs per output, not a multiple of 4; exclude it"),
        ({"structure": "channel", "criterion": "bn_scale"}, "mlp", r"criterion 'bn_scale' needs a BatchNorm .* have none"),
        (
            {"structure": "channel", "criterion": "entropy", "schedule": "one_shot"},
            "mlp",
            r"criterion 'entropy' scores channels from training activations.*start_epoch > 0",
        ),
    ],
)
def test_bad_input_in_setup_leaves_model_untouched(tmp_path: Path, kwargs: dict, model: str, match: str) -> None:
    net = MLP(63 if model == "odd" else 64, (32,), 10)
    module = ClassifierModule(net, optimizer=sgd)
    before = copy.deepcopy(module.state_dict())
    cb = PruningCallback(**quiet(**kwargs))
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [cb], max_epochs=2).fit(module, DigitsDataModule())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert not any(m._forward_hooks for m in module.modules())


class _ValidatedStates(Callback):  # listed before the pruning callback: runs before the guard acts
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.states[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_guard_restores_the_frozen_weights_it_pruned(tmp_path: Path, structure: str) -> None:
    """A frozen backbone under a trained head: the restore put back the trainable weights only, so the frozen
    layers kept the zeros of the pruning the guard undid, while the callback reported 0% sparsity."""
    seed_everything(0)
    module = mlp_module()
    module.model.net[1].requires_grad_(False)
    snapshots = _ValidatedStates()
    prune = PruningCallback(0.97, structure=structure, schedule="one_shot", start_epoch=2, monitor="val_acc", max_drop=0.02, **quiet())
    with pytest.warns(UserWarning, match="accuracy guard"):
        make_trainer(tmp_path, [snapshots, prune], max_epochs=3).fit(module, DigitsDataModule())
    assert [e["epoch"] for e in prune.compression_summary()["guard"]["events"]] == [2]
    assert any(not torch.equal(snapshots.states[1][k], snapshots.states[2][k]) for k in snapshots.states[1] if "net.1" in k)
    for key, value in snapshots.states[1].items():
        assert torch.equal(module.state_dict()[key], value), key


class _StopAfterEpoch(Callback):
    """Ends the fit after epoch ``epoch``'s validation, as EarlyStopping does."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_a_stop_asked_for_in_the_last_epoch_still_takes_the_last_step(tmp_path: Path) -> None:
    """should_stop stays set when the fit runs to max_epochs anyway: that is the planned end (a step with a warning that
    it gets no fine-tuning), not an early stop."""
    seed_everything(0)
    prune = PruningCallback(0.5, schedule="linear", start_epoch=1, end_epoch=3, **quiet())
    with pytest.warns(UserWarning, match=r"the schedule reaches its target only at epoch 3.0, the end of training"):
        make_trainer(tmp_path, [prune, _StopAfterEpoch(2)], max_epochs=3).fit(mlp_module(), DigitsDataModule())
    assert prune.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("ending", ["early stop", "guard"])
def test_a_last_pruning_step_no_validation_would_judge_is_not_taken(tmp_path: Path, ending: str) -> None:
    """An EarlyStopping that ended the fit right at end_epoch, or an update interval longer than the fit under a guard,
    pruned to the full target when training ended: no training and no validation followed (val_acc 0.13 against a
    baseline of 0.75, with no guard event). The model keeps the sparsity it was validated with."""
    seed_everything(0)
    module = mlp_module()
    if ending == "early stop":
        prune = PruningCallback(0.97, schedule="linear", start_epoch=1, end_epoch=3, **quiet())
        callbacks, epochs = [prune, _StopAfterEpoch(2)], 6
    else:
        prune = PruningCallback(0.9, schedule="linear", start_epoch=0, end_epoch=1, update_every_n_steps=100, monitor="val_acc",
                                max_drop=0.5, **quiet())
        callbacks, epochs = [prune], 2
    with pytest.warns(UserWarning, match=r"the schedule's last pruning step still due; it is not taken, since "
                      + ("training was stopped early" if ending == "early stop" else "the accuracy guard on 'val_acc' could not judge it")):
        make_trainer(tmp_path, callbacks, max_epochs=epochs).fit(module, DigitsDataModule())
    assert prune.sparsity < (0.9 if ending == "early stop" else 0.01)  # 0.97 (0.9) had been taken at the end


class _UnfreezeAtEpoch(Callback):
    """A backbone frozen at first and trained from ``epoch`` on, as BackboneFinetuning does."""

    def __init__(self, prefix: str, epoch: int) -> None:
        self.prefix, self.epoch = prefix, epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            for name, p in pl_module.named_parameters():
                if name.startswith(self.prefix):
                    p.requires_grad_(True)


def test_guard_restores_a_backbone_unfrozen_after_its_snapshot(tmp_path: Path) -> None:
    """The snapshot held the parameters trainable when it was taken: a backbone unfrozen later kept the weights it
    trained while the pruning the guard undid was in place, and the model returned (head restored, backbone not)
    was never validated."""
    seed_everything(0)
    module = mlp_module()
    module.model.net[1].requires_grad_(False)
    snapshots = _ValidatedStates()
    prune = PruningCallback(0.97, schedule="one_shot", start_epoch=2, include=[r"model\.net\.3"], monitor="val_acc",
                            max_drop=0.02, **quiet())
    with pytest.warns(UserWarning, match="accuracy guard"):
        make_trainer(tmp_path, [snapshots, _UnfreezeAtEpoch("model.net.1", 2), prune], max_epochs=3).fit(module, DigitsDataModule())
    assert [e["epoch"] for e in prune.compression_summary()["guard"]["events"]] == [2]
    assert not torch.equal(snapshots.states[1]["model.net.1.weight"], snapshots.states[2]["model.net.1.weight"])  # it trained
    for key, value in snapshots.states[1].items():
        assert torch.equal(module.state_dict()[key], value), key


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_guard_restores_the_whole_validated_model_biases_and_batchnorm_statistics_included(tmp_path: Path, precision: str) -> None:
    """The model a tripped guard returns is bit for bit the one its last passing validation measured; also
    where the strategy casts the module after setup (its buffers are new tensors then)."""

    seed_everything(0)
    module = ClassifierModule(ResCNN(width=8), optimizer=sgd)
    snapshots = _ValidatedStates()
    prune = PruningCallback(0.97, schedule="one_shot", start_epoch=2, monitor="val_acc", max_drop=0.02, **quiet())
    with pytest.warns(UserWarning, match="accuracy guard"):
        make_trainer(tmp_path, [snapshots, prune], max_epochs=3, precision=precision).fit(module, DigitsDataModule())
    assert [e["epoch"] for e in prune.compression_summary()["guard"]["events"]] == [2]
    good = snapshots.states[1]
    returned = module.state_dict()
    assert returned.keys() == good.keys()
    assert any(not torch.equal(good[k], snapshots.states[2][k]) for k in good if "bias" in k or "running_" in k)
    for key, value in good.items():
        assert torch.equal(returned[key], value), key


@pytest.mark.parametrize("averaging", ["EMAWeightAveraging", "StochasticWeightAveraging"])
def test_weight_averaging_is_refused_before_training(tmp_path: Path, averaging: str) -> None:
    """Its dense average would replace the pruned weights at the end of fit."""
    import lightning.pytorch.callbacks as callbacks

    if not hasattr(callbacks, averaging):
        pytest.skip(f"{averaging} is new in Lightning 2.6")
    cb = callbacks.EMAWeightAveraging() if averaging == "EMAWeightAveraging" else callbacks.StochasticWeightAveraging(swa_lrs=0.01)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=sgd)
    before = copy.deepcopy(module.state_dict())
    trainer = make_trainer(tmp_path, [PruningCallback(0.8, **quiet()), cb])
    with pytest.raises(ValueError, match=rf"PruningCallback cannot run with {averaging}: .*dense.*Remove {averaging}"):
        trainer.fit(module, DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_a_layer_pruned_whole_by_the_global_threshold_is_a_warning(tmp_path: Path) -> None:
    """Global magnitude at initialisation: the head's weights are all below the others' (a layer collapse)."""
    seed_everything(0)
    net = MLP(64, (64,), 10)
    with torch.no_grad():
        net.net[-1].weight.mul_(1e-3)  # the head's weights are the smallest of all
    prune = PruningCallback(0.8, schedule="one_shot", start_epoch=0, **quiet())
    with pytest.warns(UserWarning, match=r"\['model.net.3.weight'\] lost every weight .*scope='layer'"):
        make_trainer(tmp_path, [prune], max_epochs=1, limit_train_batches=2).fit(ClassifierModule(net, optimizer=sgd), DigitsDataModule())
    assert bool((net.net[-1].weight == 0).all())


class Jitter(Callback):
    """Another callback writing the weights after every step (noise, a custom regulariser)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(torch.randn_like(p) * 1e-3)


class PrunedAtValidation(Callback):
    """The pruned entries that are non-zero when each validation starts (after the pruning callback's hook)."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.revived = pruning, []

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        self.revived.append(sum(int(((params[n] != 0) & ~m).sum()) for n, m in self.pruning.masks.items()))


def test_weights_another_callback_revives_are_zero_at_every_validation(tmp_path: Path) -> None:
    """With an optimizer that keeps zeros zero the per-step multiply is skipped: a callback writing the weights
    revived 4,500 pruned entries for the rest of each epoch, validated and checkpointed as they were, while
    sparsity was reported. Each validation finds them zeroed, and once seen the masks apply after every step."""
    cb = PruningCallback(0.8, schedule="linear", end_epoch=2, make_permanent=False, **quiet())
    spy = PrunedAtValidation(cb)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    with pytest.warns(UserWarning, match=r"pruned weights were non-zero at this validation, so something besides the optimizer"):
        make_trainer(tmp_path, [cb, Jitter(), spy], val_check_interval=0.5).fit(module, DigitsDataModule())
    assert len(spy.revived) == 6 and not any(spy.revived)
    params = dict(module.named_parameters())
    assert cb._others_write and sum(int(((params[n] != 0) & ~m).sum()) for n, m in cb.masks.items()) == 0


class NoisyGradients(ClassifierModule):
    """Gradient noise added in the module's own hook (DP-SGD style), which Lightning calls after the callbacks'."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad) * 1e-2)


class PrunedAtBatch(PrunedAtValidation):
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.on_validation_start(trainer, pl_module)


def test_gradients_the_module_writes_after_the_masking_do_not_revive_pruned_weights(tmp_path: Path) -> None:
    """The module's own on_before_optimizer_step runs after the callback masked the gradients: with an optimizer
    that keeps zeros zero, all 998 pruned weights trained for the rest of each epoch and, without validation,
    nothing said so (a dense model trained, a sparse one returned). The first step's weights are checked."""
    cb = PruningCallback(0.6, schedule="one_shot", start_epoch=0, **quiet())
    spy = PrunedAtBatch(cb)
    module = NoisyGradients(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    with pytest.warns(UserWarning, match=r"pruned weights were non-zero after this fit's first optimizer step, so something"):
        make_trainer(tmp_path, [cb, spy], max_epochs=2, limit_val_batches=0).fit(module, DigitsDataModule())
    assert len(spy.revived) == 12 and not any(spy.revived), spy.revived
    assert cb.sparsity == pytest.approx(0.6, abs=0.01)


def test_a_loader_without_length_takes_fractional_epochs_from_its_second_epoch(tmp_path: Path) -> None:
    """An IterableDataset has no length: the epoch's fraction was taken as 0 in every epoch, so masks updated
    every n steps stayed put until each epoch's end (16 gradual updates became 2 jumps), silently. The first
    epoch's length now gives the later epochs' fractions, and the first epoch says it cannot."""
    from torch.utils.data import DataLoader, IterableDataset

    data = DigitsDataModule()
    data.setup("fit")
    x, y = data.train_set.tensors

    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(0, 32 * 12, 32):
                yield x[i : i + 32], y[i : i + 32]

    cb = PruningCallback(0.8, schedule="linear", start_epoch=0, end_epoch=2, update_every_n_steps=3, **quiet())
    module = ClassifierModule(MLP(64, (32,), 10))
    with pytest.warns(UserWarning, match=r"the training loader has no length, so the first epoch's fraction is unknown"):
        Trainer(max_epochs=3, callbacks=[cb], **trainer_kwargs(tmp_path, limit_val_batches=0)).fit(module, DataLoader(Stream(), batch_size=None))
    inside_epoch_1 = [h for h in cb._run.history if 1 < h["epoch"] < 2]
    assert len(inside_epoch_1) == 3 and [h["epoch"] for h in inside_epoch_1] == pytest.approx([1.25, 1.5, 1.75])
    assert cb.sparsity == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_taylor_over_frozen_and_trained_weights_says_the_scales_differ(tmp_path: Path, scope: str) -> None:
    """A frozen layer has no gradient: Taylor scored it by |w| and the trained head by sums of |w·grad|, far
    smaller, and one global ranking took 96.5% of the head (val_acc 0.72, against 0.98 by magnitude), silently."""
    seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=sgd)
    module.model.net[1].requires_grad_(False)
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=1, criterion="taylor", scope=scope, **quiet())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [prune], max_epochs=2).fit(module, DigitsDataModule())
    said = [str(w.message) for w in caught if "by |w|" in str(w.message)]
    if scope == "global":
        assert said == [
            "PruningCallback: criterion 'taylor' ranks ['model.net.1.weight'] (1 in all) by |w|: no optimizer step since the last "
            "update had a gradient for them (frozen, or not used by the loss), and |w| is not on the scale of the other "
            "weights' |w·grad|, so scope='global' prunes one group far more than the other; exclude them, or use "
            "scope='layer' or criterion='magnitude'"
        ]
    else:  # each weight ranked within itself: nothing to compare
        assert said == [] and prune.sparsity == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("start_epoch", [0, 1])
def test_taylor_before_any_step_says_it_scores_by_magnitude(tmp_path: Path, start_epoch: int) -> None:
    """A one-shot update at start_epoch=0 comes before any optimizer step: Taylor fell back to |w| and pruned exactly
    what magnitude prunes, without a word."""
    seed_everything(0)
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=start_epoch, criterion="taylor", **quiet())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [prune], max_epochs=2).fit(mlp_module(), DigitsDataModule())
    said = [str(w.message) for w in caught if "before any step" in str(w.message)]
    assert len(said) == (1 if start_epoch == 0 else 0) and prune.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all("as 'magnitude' does. Start pruning after some training" in m for m in said)


class _LoraLinear(nn.Module):
    """A LoRA-adapted Linear with peft's names: ``base_layer`` frozen, ``lora_A``/``lora_B`` trained."""

    def __init__(self, width: int, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = nn.Linear(width, width).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(width, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, width, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_pruning_under_lora_adapters_says_merging_fills_the_zeros(tmp_path: Path) -> None:
    """merge_and_unload adds B·A to the pruned layer: a 50% sparse query layer kept 7.2% zeros, with no word."""
    seed_everything(0)
    net = nn.Sequential(nn.Flatten(), _LoraLinear(64), nn.ReLU(), nn.Linear(64, 10))
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=1, **quiet())
    with pytest.warns(UserWarning, match=r"prunes LoRA adapters or the layers they adapt: \['model.1.base_layer.weight', "
                                         r"'model.1.lora_A.default.weight', 'model.1.lora_B.default.weight'\] \(3 in all\).*"
                                         r"peft's save_pretrained of the unmerged model writes the adapters alone.*"
                                         r"peft starts lora_B at zero.*exclude=\['lora_'\] prunes the base weights only"):
        make_trainer(tmp_path, [prune], max_epochs=2).fit(ClassifierModule(net, optimizer=sgd), DigitsDataModule())
    adapted = net[1]
    merged = adapted.base_layer.weight + adapted.lora_B["default"].weight @ adapted.lora_A["default"].weight
    assert float((adapted.base_layer.weight == 0).float().mean()) > 0.3 > float((merged == 0).float().mean())  # what it warns of


@pytest.mark.parametrize("reset", ["rewind", "guard"])
def test_weights_put_back_take_a_fresh_adam_step(tmp_path: Path, reset: str) -> None:
    """Rewinding and the guard's restore zeroed Adam's moments but kept its step count: the bias correction of a
    late step then made the first steps about 3x the learning rate (a fresh Adam's first is exactly 1x)."""
    lr = 1e-3
    seed_everything(0)
    # betas whose bias corrections have come near 1 after the few steps of this fit, as they have after thousands
    adam = lambda params: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.7))  # noqa: E731
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=adam)
    if reset == "rewind":
        prune = PruningCallback(0.5, schedule="one_shot", start_epoch=2, rewind_epoch=1, **quiet())
    else:  # a guard that trips at the first pruned validation
        prune = PruningCallback(0.99, schedule="one_shot", start_epoch=2, monitor="val_loss", mode="min", max_drop=0.0, **quiet())
    steps: list[float] = []

    class FirstStepAfter(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
            self.before = pl_module.model.net[1].weight.detach().clone()

        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.current_epoch == (2 if reset == "rewind" else 3) and batch_idx == 0:
                moved = (pl_module.model.net[1].weight.detach() - self.before).abs()
                steps.append(float(moved.max()) / lr)

    caught = pytest.warns(UserWarning, match="accuracy guard") if reset == "guard" else contextlib.nullcontext()
    with caught:
        make_trainer(tmp_path, [prune, FirstStepAfter()], max_epochs=4 if reset == "guard" else 3).fit(module, DigitsDataModule())
    assert len(steps) == 1 and steps[0] <= 1.0 + 1e-5, steps


def test_numpy_integers_are_taken_where_integers_go() -> None:
    """Config readers hand numpy integers; the schedule_steps check refused np.int64(4)."""
    import numpy as np

    cb = PruningCallback(0.5, schedule="iterative", schedule_steps=np.int64(4), start_epoch=np.int64(1), end_epoch=np.int64(5), **quiet())
    assert cb.options.schedule_steps == 4 and cb.options.plan(6)[1] == 5.0


def test_a_guard_restore_reaches_the_loggers_and_later_fits_still_log_the_sparsity(tmp_path: Path) -> None:
    """After the guard restored, the loggers kept the rejected sparsity and never got pruning/guard_tripped; a later fit
    of the finished run logged no pruning/* at all, so a ModelCheckpoint monitoring it failed."""
    import csv

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    prune = PruningCallback(0.98, schedule="linear", start_epoch=1, end_epoch=3, monitor="val_acc", max_drop=0.02, **quiet())
    trainer = Trainer(max_epochs=5, callbacks=[prune], **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path), log_every_n_steps=1, limit_train_batches=10))
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert prune.compression_summary()["guard"]["events"], "the guard did not act: the test needs a restore"
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    logged = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert logged[-1] == pytest.approx(prune.sparsity) and max(logged) > prune.sparsity + 0.1
    assert [float(r["pruning/guard_tripped"]) for r in rows if r.get("pruning/guard_tripped")] == [1.0]
    later = Trainer(max_epochs=1, callbacks=[prune, ModelCheckpoint(dirpath=tmp_path / "ck", monitor="pruning/sparsity", mode="max")],
                    **trainer_kwargs(tmp_path, limit_train_batches=3, enable_checkpointing=True))
    later.fit(module, DigitsDataModule(batch_size=32))
    assert float(later.callback_metrics["pruning/sparsity"]) == pytest.approx(prune.sparsity)


@pytest.mark.parametrize("rewind", [False, True])
def test_a_one_shot_at_the_start_leaves_no_exact_zero_second_moment(tmp_path: Path, rewind: bool) -> None:
    """Pruned before the optimizer's first step, a weight's Adam second moment was created at zero and stayed there:
    CPU square roots of exact zeros are ~10x slower (a half-pruned LeNet-300-100's step 1.8x with non-fused Adam). They
    are set after that first step; the pruned weights stay zero and their first moments zero. A rewind forgets the
    state it had: it is set again after the next step."""
    seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    options = {"start_epoch": 1, "rewind_epoch": 0.5} if rewind else {"start_epoch": 0}
    prune = PruningCallback(0.5, schedule="one_shot", **options, **quiet())
    Trainer(max_epochs=2 if rewind else 1, callbacks=[prune], **trainer_kwargs(tmp_path, limit_train_batches=4)).fit(module, DigitsDataModule(batch_size=32))
    weight = module.model.net[1].weight
    state = module.trainer.optimizers[0].state[weight]
    pruned = weight == 0
    assert float(pruned.float().mean()) == pytest.approx(0.5, abs=0.02)
    assert bool((state["exp_avg"][pruned] == 0).all()) and bool((state["exp_avg_sq"][pruned] > 0).all())


def test_a_later_fit_of_a_permanent_run_says_the_pruned_weights_can_grow_back(tmp_path: Path) -> None:
    """Fitting again with more epochs after a run made its 80% permanent ended at 5% sparsity, the report still showing
    the target, without a word. The later fit says so when training starts; make_permanent=False keeps the masks."""
    seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    for permanent in (True, False):
        prune = PruningCallback(0.5, schedule="one_shot", start_epoch=0, make_permanent=permanent, **quiet())
        trainer = Trainer(max_epochs=1, callbacks=[prune], **trainer_kwargs(tmp_path, limit_train_batches=3))
        trainer.fit(module, DigitsDataModule(batch_size=32))
        trainer.fit_loop.max_epochs = 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, DigitsDataModule(batch_size=32))
        said = [str(w.message) for w in caught if "can grow back" in str(w.message)]
        if permanent:
            assert len(said) == 1 and "reached 50.0% sparsity in an earlier fit" in said[0]
        else:
            assert said == [] and prune.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("setting", [{"limit_train_batches": 0}, {"max_steps": 0}, {"barebones": True}])
def test_fits_the_plugins_cannot_act_in_are_refused_before_anything_changes(tmp_path: Path, setting: dict) -> None:
    """limit_train_batches=0 or max_steps=0: Lightning skips the training loop and its hooks, and the fit ended with
    sparsity 0.0 and no word (PTQ said so only at fit end, after preparing its layers). barebones=True turns self.log off:
    a guard failed after the first epoch, saying to log the val_acc the module logs."""
    from lightning_compress import QuantizeCallback
    from lightning_compress.quantization import fake_quant_layers

    guard = {"monitor": "val_acc", "max_drop": 0.1} if "barebones" in setting else {}
    plugins = [
        lambda: PruningCallback(0.6, start_epoch=0, end_epoch=2, verbose=False, **guard),
        lambda: QuantizeCallback(weight_bits={0: 8, 1: 4}, **guard) if guard else QuantizeCallback(method="ptq"),
    ]
    for make in plugins:
        plugin = make()
        module = ClassifierModule(MLP(64, (32,), 10))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        kwargs = trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=2)
        if "barebones" in setting:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("enable_checkpointing", "logger", "enable_progress_bar",
                                                                      "enable_model_summary")}
        kwargs.update(setting)
        name = next(iter(setting))
        message = (r"monitor='val_acc'\): Trainer\(barebones=True\) turns self.log off" if name == "barebones"
                   else rf"needs training batches, but {name}=0 runs no training step")
        with pytest.raises(ValueError, match=message):
            Trainer(callbacks=[plugin], **kwargs).fit(module, DigitsDataModule())
        assert not fake_quant_layers(module) and all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    wanda = PruningCallback(0.5, criterion="wanda", verbose=False)
    assert wanda.scope == "row" and PruningCallback(0.5, criterion="wanda", scope=wanda.scope, verbose=False).scope == "row"



def test_a_guard_copy_read_from_a_checkpoint_holds_a_tied_weight_once() -> None:
    """Read back from a checkpoint, the copy did not know which parameters it held, and a tied head listed under its
    second name (the pruning state lists parameters with duplicates) was copied a second time."""
    from lightning_compress.guard_snapshot import GuardSnapshot

    embed, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
    head.weight = embed.weight
    params = {"embed.weight": embed.weight, "head.weight": head.weight}
    fresh = GuardSnapshot.take({"embed.weight": embed.weight}, {})
    read = GuardSnapshot.from_state(fresh.state(), params)
    for snapshot in (fresh, read):
        snapshot.add_missing(params)
        assert list(snapshot.weights) == ["embed.weight"]
