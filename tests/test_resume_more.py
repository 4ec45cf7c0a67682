"""Resuming a fit from a checkpoint gives what the uninterrupted run gives, for every plugin setup.

Pattern of every test: an uninterrupted run writes a checkpoint at the end of each epoch; a second run
starts from one of them with ``Trainer.fit(..., ckpt_path=...)`` and must end bit-identical (weights,
buffers, masks, observer ranges, summaries). ``DigitsDataModule`` shuffles with a ``(seed, epoch)``
permutation, so a resumed epoch sees the batches the uninterrupted one saw.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import ClassifierModule, CompressionReport, DigitsDataModule, DistillationModule
from lightning_compress.models import MLP, LeNet5, ResCNN
from lightning_compress.pruning import PruningCallback
from lightning_compress.quantization import QuantizeCallback

# run "b" resumes from run "a"'s checkpoint folder: ModelCheckpoint says its dirpath changed, as it should
pytestmark = pytest.mark.filterwarnings("ignore:The dirpath has changed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_intra_op_thread: None) -> None:
    """Every test of this file runs with one intra-op thread (see conftest)."""


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def fit(
    root: Path,
    make_module: Callable[[], LightningModule],
    make_callbacks: Callable[[], list[Callback]],
    max_epochs: int,
    ckpt_path: Path | None = None,
    **kw: Any,
) -> tuple[LightningModule, list[Callback], Trainer]:
    """One run: fresh module and callbacks (same seed), a checkpoint at the end of every epoch."""
    seed_everything(0)
    module = make_module()
    callbacks = make_callbacks()
    ckpt = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    defaults = dict(limit_train_batches=5, limit_val_batches=2, num_sanity_val_steps=0, enable_checkpointing=True)
    trainer = Trainer(max_epochs=max_epochs, callbacks=[*callbacks, ckpt], **trainer_kwargs(root, **{**defaults, **kw}))
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return module, callbacks, trainer


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].shape == sb[name].shape, name
        assert torch.equal(sa[name], sb[name]), name


def assert_same_masks(a: PruningCallback, b: PruningCallback) -> None:
    assert set(a.masks) == set(b.masks)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name


def zero_fraction(module: nn.Module) -> float:
    weights = [m.weight for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return float(sum(int((w == 0).sum()) for w in weights)) / sum(w.numel() for w in weights)


# --------------------------------------------------------------------------- pruning


def _channel_module() -> ClassifierModule:
    return ClassifierModule(ResCNN(width=8), optimizer=sgd)


@pytest.mark.parametrize("resume_from", [1, 2])
def test_channel_pruning_resume_is_bit_identical(tmp_path: Path, resume_from: int) -> None:
    def callbacks() -> list[Callback]:
        return [PruningCallback(0.5, structure="channel", criterion="taylor", schedule="cubic", start_epoch=1, end_epoch=3, verbose=False)]

    full, (cb_full,), _ = fit(tmp_path / "a", _channel_module, callbacks, max_epochs=4)
    # resume part-way up the ramp (1: dense, Taylor scores accumulating; 2: channels already masked)
    resumed, (cb_res,), _ = fit(tmp_path / "b", _channel_module, callbacks, 4, ckpt_path=tmp_path / "a" / f"epoch={resume_from}.ckpt")
    assert_same_state(full, resumed)
    assert_same_masks(cb_full, cb_res)
    summary_full, summary_res = cb_full.compression_summary(), cb_res.compression_summary()
    assert summary_full["history"] == summary_res["history"] and len(summary_full["history"]) >= 2
    assert summary_full["channels"] == summary_res["channels"]
    assert cb_res.sparsity == cb_full.sparsity > 0.3
    stem = resumed.model.stem[0].weight.flatten(1).abs().sum(1) > 0
    assert int(stem.sum()) == 4  # the pruned channels stayed pruned through the rest of training


def test_a_fit_resumed_with_more_epochs_keeps_its_default_end_epoch(tmp_path: Path) -> None:
    """The default end_epoch follows max_epochs: resumed with max_epochs 8 -> 12, the run skipped its epoch-3 update
    and followed a ramp ending at 9 instead of 6, silently. It now keeps the end it was planned with, and says so."""
    def callbacks() -> list[Callback]:
        return [PruningCallback(0.8, schedule="cubic", start_epoch=0, verbose=False)]

    def mlp() -> ClassifierModule:
        return ClassifierModule(MLP(64, (32,), 10), optimizer=sgd)

    _, (cb_full,), _ = fit(tmp_path / "a", mlp, callbacks, max_epochs=8)
    with pytest.warns(UserWarning, match=r"reaches its target at epoch 6 \(the default end_epoch of its first fit\)"):
        _, (cb_res,), _ = fit(tmp_path / "b", mlp, callbacks, 12, ckpt_path=tmp_path / "a" / "epoch=2.ckpt")
    full, resumed = cb_full.compression_summary()["history"], cb_res.compression_summary()["history"]
    assert [(h["epoch"], h["sparsity"]) for h in resumed] == [(h["epoch"], h["sparsity"]) for h in full]
    assert full[-1]["epoch"] == 6.0 and full[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    with pytest.warns(UserWarning, match=r"reaches its target at epoch 6 .* after this fit's max_epochs=5: the schedule is planned again for this fit and ends at epoch 4"):
        _, (cb_short,), _ = fit(tmp_path / "c", mlp, callbacks, 5, ckpt_path=tmp_path / "a" / "epoch=2.ckpt")  # shorter: as before
    assert cb_short.compression_summary()["history"][-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_a_run_whose_channels_were_removed_resumes_without_a_schedule_warning(tmp_path: Path) -> None:
    """Once the channels are removed the schedule has nothing left to do: resumed with more epochs, the run said its
    default end_epoch was kept, which meant nothing there."""
    def callbacks() -> list[Callback]:
        return [PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)]

    def mlp() -> ClassifierModule:
        return ClassifierModule(MLP(64, (32,), 10), optimizer=sgd, example_input_shape=(1, 8, 8))

    _, (cb_full,), _ = fit(tmp_path / "a", mlp, callbacks, max_epochs=4)
    assert cb_full.compression_summary()["shrunk"]["channels"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, (cb_res,), _ = fit(tmp_path / "b", mlp, callbacks, 8, ckpt_path=tmp_path / "a" / "epoch=3.ckpt")
    assert not [w for w in caught if "end_epoch" in str(w.message)]
    assert resumed.model.net[1].out_features == 16 and cb_res.sparsity == cb_full.sparsity


class ScoreFallsWithSparsity(ClassifierModule):
    """Logs ``score``: 1.0 while fewer than half of the weights are zero, 0.0 beyond (a metric under our control)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("score", 1.0 if zero_fraction(self) < 0.5 else 0.0)


def _guarded_module() -> ClassifierModule:
    return ScoreFallsWithSparsity(MLP(64, (32,), 10), optimizer=sgd)


def _guarded_callbacks() -> list[Callback]:
    # linear ramp to 0.9 between epochs 1 and 4: 0.3 at epoch 2 (fine), 0.6 at epoch 3 (score falls: the guard trips)
    return [PruningCallback(0.9, schedule="linear", start_epoch=1, end_epoch=4, monitor="score", max_drop=0.1, verbose=False)]


@pytest.mark.parametrize("resume_from", [2, 3])  # just before the guard trips / just after
def test_resume_around_a_tripped_accuracy_guard(tmp_path: Path, resume_from: int) -> None:
    with pytest.warns(UserWarning, match="accuracy guard"):
        full, (cb_full,), _ = fit(tmp_path / "a", _guarded_module, _guarded_callbacks, max_epochs=5)
    guard = cb_full.compression_summary()["guard"]
    assert guard["stopped"] and [e["epoch"] for e in guard["events"]] == [3]
    assert cb_full.sparsity == pytest.approx(0.3, abs=1e-3)  # the last good masks

    ckpt = tmp_path / "a" / f"epoch={resume_from}.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, (cb_res,), trainer = fit(tmp_path / "b", _guarded_module, _guarded_callbacks, 5, ckpt_path=ckpt)
    tripped_again = [w for w in caught if "accuracy guard" in str(w.message)]
    # resumed before the trip: it trips in the resumed run, once; resumed after: it stays tripped, silently
    assert len(tripped_again) == (1 if resume_from < 3 else 0)
    assert_same_state(full, resumed)
    assert_same_masks(cb_full, cb_res)
    assert cb_res.compression_summary()["guard"] == guard
    assert cb_res.compression_summary()["history"] == cb_full.compression_summary()["history"]
    assert cb_res.sparsity == pytest.approx(0.3, abs=1e-3)  # sparsity did not rise again after the resume
    assert float(trainer.callback_metrics["score"]) == 1.0


def _rewind_callbacks() -> list[Callback]:
    return [PruningCallback(0.7, schedule="linear", start_epoch=1, end_epoch=3, rewind_epoch=1, verbose=False)]


class WeightsAfterUpdate(Callback):
    """The weights right after the pruning callback's update at the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.weights = epoch, {}

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("resume_from", [1, 2])  # after the rewind snapshot (epoch 1), before / after the first update
def test_rewind_resume_is_bit_identical(tmp_path: Path, resume_from: int) -> None:
    snapshot, after_update = WeightsAfterUpdate(1), WeightsAfterUpdate(3)

    def callbacks_full() -> list[Callback]:
        return [*_rewind_callbacks(), snapshot, after_update]

    full, (cb_full, *_), _ = fit(tmp_path / "a", lambda: ClassifierModule(MLP(64, (32,), 10), optimizer=sgd), callbacks_full, 4)
    # the surviving weights went back to their values at the rewind epoch (the snapshot outlived the checkpoint)
    for name, mask in cb_full.masks.items():
        assert torch.equal(after_update.weights[name], snapshot.weights[name] * mask), name
    resumed_spy = WeightsAfterUpdate(3)
    resumed, (cb_res, _), _ = fit(
        tmp_path / "b",
        lambda: ClassifierModule(MLP(64, (32,), 10), optimizer=sgd),
        lambda: [*_rewind_callbacks(), resumed_spy],
        4,
        ckpt_path=tmp_path / "a" / f"epoch={resume_from}.ckpt",
    )
    for name in cb_full.masks:
        assert torch.equal(resumed_spy.weights[name], after_update.weights[name]), name
    assert_same_state(full, resumed)
    assert_same_masks(cb_full, cb_res)
    assert cb_res.sparsity == pytest.approx(0.7, abs=1e-3)


def _shrink_callbacks() -> list[Callback]:
    return [PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, shrink_epoch=2, verbose=False)]


@pytest.mark.parametrize("resume_from", [1, 2])  # masked, not yet shrunk / already shrunk
def test_shrink_resume_is_bit_identical(tmp_path: Path, resume_from: int) -> None:
    full, (cb_full,), _ = fit(tmp_path / "a", _channel_module, _shrink_callbacks, max_epochs=4)
    assert full.model.stem[0].out_channels == 4
    resumed, (cb_res,), trainer = fit(tmp_path / "b", _channel_module, _shrink_callbacks, 4, ckpt_path=tmp_path / "a" / f"epoch={resume_from}.ckpt")
    assert resumed.model.stem[0].out_channels == 4 and resumed.model.block.conv1.out_channels == 4
    assert_same_state(full, resumed)
    # the optimizer trains the shrunk parameters themselves
    live = {id(p) for p in resumed.parameters()}
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert live == in_optimizer
    assert cb_res.compression_summary()["shrunk"] == cb_full.compression_summary()["shrunk"]
    # the schedule's record comes back too (it was emptied when resuming after removal), and the target it reached
    assert cb_res._run.history == cb_full._run.history and cb_res._run.updates == cb_full._run.updates == 1
    assert cb_res.compression_state()["target"] == cb_full.compression_state()["target"] > 0


def test_resume_from_a_step_checkpoint_at_an_epochs_last_batch_is_bit_identical(tmp_path: Path) -> None:
    """Lightning enters the next epoch of such a checkpoint without ``on_train_epoch_start``: the mask
    update and the channel removal due at that epoch boundary still run."""

    def callbacks() -> list[Callback]:
        linear = PruningCallback(0.5, structure="channel", scope="layer", schedule="linear", start_epoch=1, end_epoch=2, shrink=True, verbose=False)
        return [linear, ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=5, save_top_k=-1, filename="{step}")]

    def module() -> ClassifierModule:
        return ClassifierModule(MLP(64, (32,), 10), optimizer=sgd)

    full, (cb_full, _), _ = fit(tmp_path / "a", module, callbacks, max_epochs=3)
    # 5 batches an epoch: step 10 is the last batch of epoch 1; the channels are masked at epoch 1 and removed at epoch 2
    resumed, (cb_res, _), _ = fit(tmp_path / "b", module, callbacks, 3, ckpt_path=tmp_path / "steps" / "step=10.ckpt")
    assert full.model.net[1].out_features == 16
    assert_same_state(full, resumed)
    assert cb_res.compression_summary()["shrunk"] == cb_full.compression_summary()["shrunk"]


class StopsAfterEpoch1(Callback):
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.should_stop = trainer.current_epoch >= 1


def test_a_fit_resumed_from_an_early_stops_last_checkpoint_goes_on_pruning(tmp_path: Path) -> None:
    """The checkpoint written as the stopped fit ended holds a finished run: resumed, its masks hold again
    and the schedule goes on (the pruned weights used to grow back, 20% sparsity to 0.3%)."""

    def callbacks() -> list[Callback]:
        return [PruningCallback(0.6, schedule="linear", start_epoch=0, end_epoch=3, verbose=False)]

    def module() -> ClassifierModule:
        return ClassifierModule(MLP(64, (32,), 10), optimizer=sgd)

    full, (cb_full,), _ = fit(tmp_path / "a", module, callbacks, max_epochs=4)
    last = ModelCheckpoint(dirpath=tmp_path / "stopped", save_last=True, save_top_k=0, every_n_epochs=3)  # a state key of its own
    fit(tmp_path / "b", module, lambda: [*callbacks(), StopsAfterEpoch1(), last], max_epochs=4)
    resumed, (cb_res,), _ = fit(tmp_path / "c", module, callbacks, 4, ckpt_path=tmp_path / "stopped" / "last.ckpt")
    assert_same_state(full, resumed)
    assert cb_res.sparsity == cb_full.sparsity == pytest.approx(0.6, abs=1e-3)


# --------------------------------------------------------------------------- quantisation


def _bn_qat_callbacks() -> list[Callback]:
    return [
        QuantizeCallback(
            weight_bits={0: 8, 2: 4}, start_epoch=0, freeze_bn_epoch=2, bn_reestimate_batches=2, latency="none", convert_on_fit_end=False
        )
    ]


@pytest.mark.parametrize("resume_from", [1, 2])  # BatchNorm still training / already frozen
def test_qat_with_frozen_batchnorm_resume_is_bit_identical(tmp_path: Path, resume_from: int) -> None:
    def module() -> ClassifierModule:
        return ClassifierModule(ResCNN(width=4), optimizer=sgd)

    full, (cb_full,), _ = fit(tmp_path / "a", module, _bn_qat_callbacks, max_epochs=4)
    resumed, (cb_res,), _ = fit(tmp_path / "b", module, _bn_qat_callbacks, 4, ckpt_path=tmp_path / "a" / f"epoch={resume_from}.ckpt")
    assert_same_state(full, resumed)  # weights and BatchNorm running statistics
    summary_full, summary_res = cb_full.compression_summary(), cb_res.compression_summary()
    assert summary_res["observer_ranges"] == summary_full["observer_ranges"] and summary_full["observer_ranges"]
    assert summary_res["bits_per_layer"] == summary_full["bits_per_layer"] == {n: 4 for n in summary_full["bits_per_layer"]}
    # frozen from epoch 2 on: the running statistics are still those of the end of epoch 1 (re-estimated then)
    at_epoch_1 = torch.load(tmp_path / "a" / "epoch=1.ckpt", weights_only=False)["state_dict"]
    stats = {k: v for k, v in resumed.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert len(stats) == 8 and all(torch.equal(v, at_epoch_1[k]) for k, v in stats.items())


@pytest.fixture
def ptq_checkpoint(tmp_path: Path) -> dict[str, Any]:
    """Two float epochs, then PTQ calibration (its own fit); the calibrated run saved with ``save_checkpoint``."""
    fit(tmp_path / "float", lambda: ClassifierModule(MLP(64, (48,), 10), optimizer=sgd), list, max_epochs=2)
    seed_everything(0)
    module = ClassifierModule.load_from_checkpoint(tmp_path / "float" / "epoch=1.ckpt", model=MLP(64, (48,), 10), optimizer=sgd)
    float_weights = {k: v.clone() for k, v in module.state_dict().items()}
    cb = QuantizeCallback(method="ptq", weight_bits=4, calibration_batches=3, latency="none")
    trainer = Trainer(max_epochs=3, callbacks=[cb], **trainer_kwargs(tmp_path / "ptq", limit_val_batches=2))
    dm = DigitsDataModule(batch_size=32)
    trainer.fit(module, dm)
    ranges = cb.compression_summary()["observer_ranges"]
    assert ranges and all(hi > lo for lo, hi in ranges.values())
    acc = trainer.test(module, dm, verbose=False)[0]["test_acc"]
    path = tmp_path / "ptq.ckpt"
    trainer.save_checkpoint(path)
    return {"path": path, "trainer": trainer, "callback": cb, "module": module, "ranges": ranges, "acc": acc,
            "float_weights": float_weights, "dm": dm}


def _ptq() -> QuantizeCallback:
    return QuantizeCallback(method="ptq", weight_bits=4, calibration_batches=3, latency="none")


def test_ptq_checkpoint_then_test_with_ckpt_path_keeps_the_calibrated_ranges(ptq_checkpoint: dict[str, Any]) -> None:
    run = ptq_checkpoint
    with torch.no_grad():  # spoil the live weights: the test must run on what the checkpoint holds
        for p in run["module"].parameters():
            p.add_(torch.randn_like(p))
    spoiled = run["trainer"].test(run["module"], run["dm"], verbose=False)[0]["test_acc"]
    assert spoiled < run["acc"] - 0.2
    res = run["trainer"].test(ckpt_path=str(run["path"]), datamodule=run["dm"], verbose=False)
    assert res[0]["test_acc"] == pytest.approx(run["acc"])
    assert run["callback"].compression_summary()["observer_ranges"] == run["ranges"]
    assert run["callback"].is_active()


def test_ptq_checkpoint_reloaded_for_test_in_a_fresh_trainer(ptq_checkpoint: dict[str, Any], tmp_path: Path) -> None:
    run = ptq_checkpoint
    cb = _ptq()
    trainer = Trainer(callbacks=[cb], **trainer_kwargs(tmp_path / "fresh"))
    fresh = ClassifierModule(MLP(64, (48,), 10))
    res = trainer.test(fresh, run["dm"], ckpt_path=str(run["path"]), verbose=False)
    assert cb.compression_summary()["observer_ranges"] == run["ranges"]
    assert res[0]["test_acc"] == pytest.approx(run["acc"])
    # the layers were prepared under the test loop's inference mode: a second load into them, and training, still work
    again = trainer.validate(fresh, run["dm"], ckpt_path=str(run["path"]), verbose=False)
    assert again[0]["val_acc"] > 0.5
    assert not any(t.is_inference() for t in fresh.state_dict().values())


def test_ptq_resumed_from_a_calibrated_checkpoint_neither_recalibrates_nor_trains(ptq_checkpoint: dict[str, Any], tmp_path: Path) -> None:
    run = ptq_checkpoint
    seed_everything(1)
    fresh = ClassifierModule(MLP(64, (48,), 10), optimizer=sgd)
    cb = _ptq()
    trainer = Trainer(max_epochs=3, callbacks=[cb], **trainer_kwargs(tmp_path / "resumed", limit_val_batches=2))
    trainer.fit(fresh, run["dm"], ckpt_path=str(run["path"]))
    assert cb.compression_summary()["observer_ranges"] == run["ranges"] and cb.is_active()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, run["float_weights"][k]), k  # PTQ never updates weights, resumed or not
    assert trainer.test(fresh, run["dm"], verbose=False)[0]["test_acc"] == pytest.approx(run["acc"])


# --------------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed_everything(0)
    root = tmp_path_factory.mktemp("teacher")
    module = ClassifierModule(LeNet5(image_size=8), optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))
    Trainer(max_epochs=1, **trainer_kwargs(root, limit_val_batches=0)).fit(module, DigitsDataModule(batch_size=32))
    path = root / "teacher.pt"
    torch.save(module.model.state_dict(), path)
    return path


@pytest.mark.parametrize("resume_from", [0, 1])
def test_distillation_resume_is_bit_identical(tmp_path: Path, teacher_weights: Path, resume_from: int) -> None:
    def module() -> DistillationModule:
        return DistillationModule(
            MLP(64, (16,), 10), LeNet5(image_size=8), teacher_ckpt=str(teacher_weights),
            temperature={0: 4.0, 2: 2.0}, alpha=0.7, features={"net.2": "classifier.4"}, example_input_shape=(1, 8, 8),
        )

    full, _, t_full = fit(tmp_path / "a", module, list, max_epochs=3)
    teacher_before = {k: v.clone() for k, v in full.teacher.state_dict().items()}
    resumed, _, t_res = fit(tmp_path / "b", module, list, 3, ckpt_path=tmp_path / "a" / f"epoch={resume_from}.ckpt")
    assert_same_state(full.student, resumed.student)
    assert_same_state(full.projections, resumed.projections)
    assert_same_state(full.teacher, resumed.teacher)  # the teacher (not in the checkpoint) came from teacher_ckpt again
    assert all(torch.equal(v, teacher_before[k]) for k, v in resumed.teacher.state_dict().items())
    for key in ("temperature", "alpha", "val_acc", "val_agreement", "distill_loss"):
        assert float(t_res.callback_metrics[key]) == float(t_full.callback_metrics[key]), key
    assert float(t_res.callback_metrics["temperature"]) == 2.0


# --------------------------------------------------------------------------- the report


def test_compression_report_after_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    def callbacks() -> list[Callback]:
        return [
            PruningCallback(0.8, schedule="cubic", start_epoch=1, end_epoch=3, verbose=False),
            CompressionReport(print_table=False, plot=False, repeats=2, warmup=0),
        ]

    def module() -> ClassifierModule:
        return ClassifierModule(MLP(64, (32,), 10), optimizer=sgd, example_input_shape=(1, 8, 8))

    _, (_, rep_full), _ = fit(tmp_path / "a", module, callbacks, max_epochs=4)
    _, (_, rep_res), _ = fit(tmp_path / "b", module, callbacks, 4, ckpt_path=tmp_path / "a" / "epoch=1.ckpt")
    full, res = rep_full.report, rep_res.report
    assert full is not None and res is not None
    assert rep_res.report_path is not None and rep_res.report_path.is_file()
    # every epoch, including those before the resume (from the checkpoint), in order, with the same values
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2, 3]
    assert res["history"] == full["history"]
    # the dense reference is the last epoch before pruning changed the model (the cubic ramp is 0 at epoch 1),
    # although that epoch ran before the resume
    assert res["baseline"]["metrics_epoch"] == full["baseline"]["metrics_epoch"] == 1
    assert res["baseline"]["metrics"] == full["baseline"]["metrics"] and res["baseline"]["metrics"]
    for key in ("params", "nonzero_params", "sparsity", "size_bytes", "macs", "metrics"):
        assert res["compressed"][key] == full["compressed"][key], key
    assert res["compressed"]["sparsity"] > 0.7
    assert res["plugins"] == full["plugins"]


def test_a_qat_fit_resumed_from_its_last_steps_checkpoint_keeps_the_batchnorm_statistics(tmp_path: Path) -> None:
    """A checkpoint written at a QAT fit's last step (every_n_train_steps) holds the statistics re-estimated at that
    step; the resumed fit, with nothing left to train, re-estimated them again at its end on other batches (running
    means 0.024 off). The step of the last re-estimate is in the checkpoint; the resumed model equals the uninterrupted one."""

    def quant() -> QuantizeCallback:
        return QuantizeCallback(weight_bits=4, start_epoch=1, bn_reestimate_batches=3, latency="none")

    seed_everything(0)
    module = ClassifierModule(ResCNN(1, 10, width=8), optimizer=sgd)
    every = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    Trainer(max_epochs=2, callbacks=[quant(), every], **trainer_kwargs(tmp_path, limit_train_batches=4, limit_val_batches=1, enable_checkpointing=True)).fit(module, DigitsDataModule(batch_size=32))
    seed_everything(0)
    resumed = ClassifierModule(ResCNN(1, 10, width=8), optimizer=sgd)
    Trainer(max_epochs=2, callbacks=[quant()], **trainer_kwargs(tmp_path, limit_train_batches=4, limit_val_batches=1)).fit(
        resumed, DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ck" / "step=8.ckpt")
    expected = module.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())


def test_callbacks_added_to_a_resumed_dense_run_say_their_schedule_jumps(tmp_path: Path) -> None:
    """Resuming a dense run's checkpoint at epoch 2 with PruningCallback (cubic from epoch 0) and QuantizeCallback
    (8 bits, then 6 from epoch 1) newly added: the first mask update went straight to 77% and QAT began at 6 bits,
    with Lightning's generic notice only. Each says so; a resume with the callbacks' own state does not."""
    seed_everything(0)
    dense = ModelCheckpoint(dirpath=tmp_path / "dense", save_last=True)
    Trainer(max_epochs=2, callbacks=[dense], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)).fit(
        ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32))

    def resume(ckpt: Path, epochs: int = 4, gradual: bool = True) -> list[str]:
        plugins = (
            [PruningCallback(0.8, start_epoch=0, end_epoch=3, verbose=False), QuantizeCallback(weight_bits={0: 8, 1: 6}, latency="none")]
            if gradual else [PruningCallback(0.8, schedule="one_shot", start_epoch=0, verbose=False), QuantizeCallback(weight_bits=8, latency="none")]
        )  # fmt: skip
        callbacks = [*plugins, ModelCheckpoint(dirpath=tmp_path / "with", save_last=True)]
        trainer = Trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32), ckpt_path=ckpt)
        assert trainer.global_step == 2 * epochs  # it trained on
        return [str(w.message) for w in caught if "without this callback's state" in str(w.message)]

    said = resume(tmp_path / "dense" / "last.ckpt")
    assert sorted(m.split(":")[0] for m in said) == ["PruningCallback", "QuantizeCallback"]
    assert "resumes at epoch 2 from a checkpoint without this callback's state" in said[0]
    assert resume(tmp_path / "with" / "last.ckpt", epochs=5) == []
    assert resume(tmp_path / "dense" / "last.ckpt", gradual=False) == []  # no step of a schedule is skipped


class PeeksAtTrainingBatches(Callback):
    """Runs training batches outside the loop as each fit starts and in the middle of epoch 0, as the plugins'
    calibration and Wanda do."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_compress.batches import run_training_batches

        run_training_batches(pl_module, 2)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 2:
            from lightning_compress.batches import run_training_batches

            run_training_batches(pl_module, 4)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_from_a_checkpoint_in_the_middle_of_an_epoch_is_bit_identical(tmp_path: Path, num_workers: int) -> None:
    """The library's data modules resume mid-epoch: the resumed epoch trains on the batches the uninterrupted run had
    left (Lightning started the epoch's batches again from the first one, and said the loader was not resumable), so
    masks updated every 2 steps and the weights end bit-identical. With a worker process too (its iterator drew epoch
    0's order for a resumed epoch 1), with batches run outside the loop in the same epoch (they reset the count), and
    with dropout: the random generators are put back as the checkpoint left them, mid-epoch, at an epoch's last
    batch and at an epoch's end after its validation (Lightning restores none, so the resumed dropout masks differed;
    from an epoch-end checkpoint it does not give the loader its state, which the data module's own state carries)."""

    def callbacks() -> list[Callback]:
        prune = PruningCallback(0.6, schedule="linear", start_epoch=0, end_epoch=2, update_every_n_steps=2, verbose=False)
        return [prune, PeeksAtTrainingBatches(),
                ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}"),
                ModelCheckpoint(dirpath=tmp_path / "epochs", save_top_k=-1, filename="{epoch}")]

    def module() -> ClassifierModule:
        return ClassifierModule(MLP(64, (32,), 10, dropout=0.3), optimizer=sgd)

    def run(root: Path, ckpt_path: Path | None = None) -> tuple[LightningModule, list[Callback], Trainer]:
        seed_everything(0)
        made, cbs = module(), callbacks()
        trainer = Trainer(max_epochs=3, callbacks=cbs, **trainer_kwargs(
            root, limit_train_batches=5, limit_val_batches=2, num_sanity_val_steps=0, enable_checkpointing=True))
        trainer.fit(made, DigitsDataModule(batch_size=32, num_workers=num_workers), ckpt_path=ckpt_path)
        return made, cbs, trainer

    full, (cb_full, *_), _ = run(tmp_path / "a")
    # 5 batches an epoch: in the middle of epochs 0 and 1, at epoch 1's last batch, after epoch 0's validation
    for checkpoint in ("steps/step=3", "steps/step=9", "steps/step=10", "epochs/epoch=0"):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            resumed, (cb_res, *_), _ = run(tmp_path / checkpoint.replace("/", "_"), tmp_path / f"{checkpoint}.ckpt")
        assert not [w for w in said if "not resumable" in str(w.message)]
        assert_same_state(full, resumed)
        assert cb_res.compression_summary()["history"] == cb_full.compression_summary()["history"]


def test_a_checkpoint_evaluated_before_a_new_fit_does_not_resume_that_fit(tmp_path: Path) -> None:
    """The data module keeps its training loader's state for a fit resumed from a checkpoint only: a
    trainer.validate(ckpt_path=...) on the same data module, then a fit from the start, trains as a fit from the start
    (no batch skipped, no random state put back)."""

    def fit(data: DigitsDataModule, root: Path, ckpt_path: Path | None = None) -> LightningModule:
        seed_everything(0)
        module = ClassifierModule(MLP(64, (32,), 10, dropout=0.3), optimizer=sgd)
        keep = ModelCheckpoint(dirpath=tmp_path / "epochs", save_top_k=-1, filename="{epoch}")
        Trainer(max_epochs=1, callbacks=[keep], **trainer_kwargs(root, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=True)).fit(
            module, data, ckpt_path=ckpt_path)
        return module

    first = fit(DigitsDataModule(batch_size=32), tmp_path / "a")
    data = DigitsDataModule(batch_size=32)
    Trainer(**trainer_kwargs(tmp_path / "b", limit_val_batches=1)).validate(first, data, ckpt_path=tmp_path / "epochs" / "epoch=0.ckpt")
    assert_same_state(first, fit(data, tmp_path / "c"))


class CountsBatches(Callback):
    """The training batches each epoch runs, and how many batches a peek at training start got."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, int] = {}
        self.peeked: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_compress.batches import run_training_batches

        self.peeked = run_training_batches(pl_module, 2)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.per_epoch[trainer.current_epoch] = self.per_epoch.get(trainer.current_epoch, 0) + 1


def test_batches_peeked_before_a_resumed_epoch_and_a_learning_rate_search_leave_the_epochs_whole(tmp_path: Path) -> None:
    """The data module's copy of its loader's state serves the epoch after an epoch-end checkpoint only: a report's
    example batch and a peek at training start, taken before that epoch from whole epochs, skipped every batch the
    checkpoint's epoch had yielded (the report failed: "the training dataloader is empty"); the checkpoint Lightning's
    learning-rate finder restores made the real first epoch skip the batches of the search."""
    from lightning.pytorch.callbacks import LearningRateFinder

    class WithLearningRate(ClassifierModule):  # what the finder sets
        def __init__(self) -> None:
            super().__init__(MLP(64, (16,), 10, dropout=0.2))
            self.lr = 0.05

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    def fit(root: Path, callbacks: list[Callback], ckpt_path: Path | None = None) -> CountsBatches:
        seed_everything(0)
        counts = CountsBatches()
        keep = ModelCheckpoint(dirpath=tmp_path / "epochs", save_top_k=-1, filename="{epoch}")
        report = CompressionReport(print_table=False, plot=False, dirpath=root / "report", repeats=1, warmup=0)
        Trainer(max_epochs=2, callbacks=[counts, keep, report, *callbacks], **trainer_kwargs(
            root, limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=True)).fit(
            WithLearningRate(), DigitsDataModule(batch_size=256), ckpt_path=ckpt_path)
        return counts

    full = fit(tmp_path / "a", [])
    assert full.per_epoch == {0: 5, 1: 5} and full.peeked == 2  # 1,257 images in batches of 256
    resumed = fit(tmp_path / "b", [], tmp_path / "epochs" / "epoch=0.ckpt")
    assert resumed.per_epoch == {1: 5} and resumed.peeked == 2
    searched = fit(tmp_path / "c", [LearningRateFinder(num_training_steps=3, early_stop_threshold=None)])
    assert searched.per_epoch == {0: 5, 1: 5}
