"""QuantizeCallback in real (tiny) Lightning runs on the digits data."""

from __future__ import annotations

import re

import copy
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import ClassifierModule, CompressionReport, DigitsDataModule
from lightning_compress.models import MLP
from lightning_compress.quantization import (
    QuantizeCallback,
    fake_quant_layers,
    load_quantized,
    save_quantized,
)
from lightning_compress.report import serialized_size


class OrderedDigits(DigitsDataModule):
    """Digits without shuffling, so an interrupted and an uninterrupted run see the same batches."""

    def train_dataloader(self):  # type: ignore[override]
        from torch.utils.data import DataLoader

        self.setup("fit")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


def _trainer(tmp_path, callbacks: list[Callback], max_epochs: int = 2, **kwargs: Any) -> Trainer:
    return Trainer(max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs(tmp_path, **kwargs))


def _module(seed: int = 0) -> ClassifierModule:
    seed_everything(seed)
    return ClassifierModule(MLP(64, (48,), 10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 1}, "weight_bits must be an integer from 2 to 8, got 1"),
        ({"weight_bits": 9}, "from 2 to 8, got 9"),
        ({"weight_bits": {0: 8, 2: 16}}, r"weight_bits\[2\] must be an integer from 2 to 8"),
        ({"activation_bits": 4}, "activation_bits must be 8 or None"),
        ({"freeze_observers_epoch": 1, "start_epoch": 2}, "freeze_observers_epoch=1 is before start_epoch=2"),
        ({"freeze_bn_epoch": 0, "start_epoch": 1}, "freeze_bn_epoch=0 is before start_epoch=1"),
        ({"method": "qtt"}, r"unknown method 'qtt'; valid choices: \['qat', 'ptq'\]"),
            ({"mode": "qtt"}, r"unknown mode 'qtt'; valid: \['max', 'min'\]"),
            ({"monitor": "val_acc", "max_drop": float("nan")}, "max_drop must be a finite number >= 0, got nan"),
            ({"start_epoch": 0.5, "freeze_bn_epoch": 0.25}, "freeze_bn_epoch=0.25 is before start_epoch=0.5"),
        ({"max_drop": 0.01}, r"max_drop=0.01 needs a monitor \(e.g. monitor='val_acc'\)"),
        ({"method": "ptq", "weight_bits": {0: 8, 1: 4}}, "method='ptq' takes a single weight_bits"),
        ({"granularity": "per_row"}, "unknown granularity 'per_row'"),
        ({"rounding": "up"}, r"unknown rounding 'up'; valid choices: \['nearest', 'floor', 'stochastic'\]"),
        ({"calibration_batches": 0}, "calibration_batches must be an integer >= 1"),
        ({"bn_reestimate_batches": -1}, r"bn_reestimate_batches must be an integer >= 0 \(0: off\), got -1"),
        ({"include": ["("]}, r"include pattern '\(' is not a valid regex"),
        ({"include": []}, r"include=\[\] selects nothing; leave include unset \(None\)"),
        ({"exclude": [""]}, "exclude must be non-empty regex strings"),
        ({"backend": "fbgemm"}, "unknown backend"),
        ({"save_to": "q.pt", "convert_on_fit_end": False}, "save_to/export_to write the converted model, which convert_on_fit_end=False"),
        ({"save_to": "q.safetensors", "backend": "torchao"}, r"save_to='q.safetensors': torchao layers .* use a \.pt path or backend='auto'"),
        ({"export_to": "q.safetensors", "backend": "torchao"}, r"export_to='q.safetensors': torchao .* use a \.pt2 path .* or backend='auto'"),
        ({"export_to": "q.pt"}, r"export_to='q.pt': the suffix picks the artifact; valid: \['\.pt2', '\.onnx', '\.safetensors'\]"),
        ({"export_to": "q.onnx", "onnx_tolerance": 0}, r"onnx_tolerance must be a number in \(0, 1\), got 0"),
        ({"export_to": "q.onnx", "onnx_tolerance": True}, r"onnx_tolerance must be a number in \(0, 1\), got True"),
        ({"save_to": "q.safetensors", "export_to": "./q.safetensors"}, r"save_to and export_to are the same file \('q.safetensors'\)"),
        ({"export_to": "q.pt2", "onnx_tolerance": 0.01}, r"onnx_tolerance=0.01 applies to an export_to ONNX file, but export_to is 'q.pt2'"),
        ({"save_to": ""}, r"save_to must be a file path \(relative to the run's log directory\) or None, got ''"),
        ({"export_dynamic_sequence": True}, r"export_dynamic_sequence=True applies to the export_to artifact, but export_to is not set"),
        ({"export_to": "q.pt2", "export_dynamic_sequence": "yes"}, r"export_dynamic_sequence must be True or False, got 'yes'"),
        # strings are truthy: "no" converted at fit end and "yes" was never refused
        ({"convert_on_fit_end": "no"}, r"convert_on_fit_end must be True or False, got 'no'"),
        ({"quantize_teacher": "yes"}, r"quantize_teacher must be True or False, got 'yes'"),
    ],
)
def test_bad_options_raise_in_init(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizeCallback(**kwargs)


def test_a_group_size_given_as_text_on_a_command_line_is_a_group_size() -> None:
    assert QuantizeCallback(granularity="32").granularity == QuantizeCallback(granularity=32).granularity == 32
    with pytest.raises(ValueError, match="unknown granularity '-3'"):
        QuantizeCallback(granularity="-3")


def test_ptq_refuses_to_calibrate_before_pruning_has_finished(tmp_path) -> None:
    """PTQ calibrated after 2 float epochs and ended the fit while pruning's schedule still had its last update due:
    the weights jumped from 45% to 90% sparsity after calibration, and the int8 model kept ranges of other weights."""
    from lightning_compress import PruningCallback

    def callbacks(start: int) -> list:
        return [PruningCallback(0.9, schedule="linear", end_epoch=2, verbose=False), QuantizeCallback(method="ptq", start_epoch=start, latency="none")]

    with pytest.raises(ValueError, match=r"PruningCallback changes the weights until epoch 2: .*\(start_epoch=3 or later"):
        _trainer(tmp_path, callbacks(2), max_epochs=4).fit(_module(), DigitsDataModule(batch_size=32))
    trainer = _trainer(tmp_path, prune_then := callbacks(3), max_epochs=4, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(_module(), DigitsDataModule(batch_size=32))
    assert prune_then[1].quantized_model is not None and prune_then[0].sparsity == pytest.approx(0.9, abs=0.01)
    # one-shot pruning changes the weights at its start_epoch only, whatever its default end would be
    one_shot = [PruningCallback(0.5, schedule="one_shot", start_epoch=0, verbose=False), QuantizeCallback(method="ptq", start_epoch=1, latency="none")]
    _trainer(tmp_path, one_shot, max_epochs=4, limit_train_batches=4, limit_val_batches=2).fit(_module(), DigitsDataModule(batch_size=32))
    assert one_shot[1].quantized_model is not None and one_shot[0].sparsity == pytest.approx(0.5, abs=0.01)


def test_setup_errors_leave_model_unchanged(tmp_path) -> None:
    module = _module()
    before = [type(m) for m in module.modules()]
    with pytest.raises(ValueError, match="include pattern 'encoder' matches no weight to quantise"):
        _trainer(tmp_path, [QuantizeCallback(include=["encoder"])]).fit(module, DigitsDataModule())
    assert [type(m) for m in module.modules()] == before
    bn = ClassifierModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)))
    with pytest.raises(ValueError, match=r"cannot quantise 'model.2.weight' \(BatchNorm1d\).*drop the include pattern that names it"):
        _trainer(tmp_path, [QuantizeCallback(include=["model", r"model\.2\.weight"])]).fit(bn, DigitsDataModule())
    assert type(bn.model[1]) is nn.Linear


def test_ptq_without_training_batches_errors(tmp_path) -> None:
    module = _module()
    with pytest.raises(ValueError, match="needs training batches"):
        _trainer(tmp_path, [QuantizeCallback(method="ptq")], limit_train_batches=0).fit(module, DigitsDataModule())
    assert not fake_quant_layers(module)


class RangeSpy(Callback):
    """Records observer state at points where it must not change."""

    def __init__(self) -> None:
        self.at_train_start: list[bool] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.at_train_start = [bool(m.quantizer.observer.initialized) for m in fake_quant_layers(pl_module).values()]


def _ranges(module: nn.Module) -> list[tuple[float, float]]:
    return [(float(m.quantizer.observer.min_val), float(m.quantizer.observer.max_val)) for m in fake_quant_layers(module).values()]


def test_qat_end_to_end_observers_only_in_training(tmp_path) -> None:
    module = _module()
    spy = RangeSpy()
    cb = QuantizeCallback(latency="none")
    trainer = _trainer(tmp_path, [cb, spy], max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(module, DigitsDataModule())
    assert spy.at_train_start == [False, False]  # the sanity check did not touch the observers
    ranges = _ranges(module)
    assert all(hi > lo for lo, hi in ranges)
    dm = DigitsDataModule()
    trainer.validate(module, dm, verbose=False)
    acc = trainer.test(module, dm, verbose=False)[0]["test_acc"]
    trainer.predict(module, dm)
    assert _ranges(module) == ranges  # validation, test and predict leave them alone
    assert acc > 0.8
    # the converted copy agrees with the fake-quant model; the module itself stays fake-quantised
    assert cb.quantized_model is not None and fake_quant_layers(module)
    x = dm.test_set.tensors[0]
    with torch.no_grad():
        agree = (cb.quantized_model(x).argmax(1) == module.eval()(x).argmax(1)).float().mean()
    assert agree >= 0.99
    summary = cb.compression_summary()
    assert summary["bits_per_layer"] == {"model.net.1": 8, "model.net.3": 8}
    assert summary["fraction_quantized"] == 1.0 and summary["size_ratio"] > 2.0  # tiny net: per-tensor file overhead; LeNet sizes are tested in test_quant_functional
    assert summary["size_ratio_safetensors"] > summary["size_ratio"]  # no per-tensor zip records
    assert summary["size_bytes_safetensors"]["quantized"] == serialized_size(cb.quantized_model, "safetensors")
    assert cb.compression_state() == {"weight_bits": 8.0, "fraction_quantized": 1.0}
    assert cb.is_active() and cb.compressed_artifact() is cb.quantized_model
    save_quantized(cb.quantized_model, str(tmp_path / "q.pt"))
    float_net = MLP(64, (48,), 10)
    reloaded = load_quantized(float_net, str(tmp_path / "q.pt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), cb.quantized_model(x))


def test_checkpoint_loads_strictly_and_test_with_ckpt_path(tmp_path) -> None:
    module = _module()
    cb = QuantizeCallback(weight_bits=4, latency="none")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, DigitsDataModule())
    path = ckpt.last_model_path
    keys = set(torch.load(path, weights_only=False)["state_dict"])
    assert keys == {f"model.{k}" for k in MLP(64, (48,), 10).state_dict()}  # no observer keys
    plain = ClassifierModule.load_from_checkpoint(path, model=MLP(64, (48,), 10))  # strict by default
    assert type(plain.model.net[1]) is nn.Linear
    fq_acc = trainer.test(module, DigitsDataModule(), verbose=False)[0]["test_acc"]
    ranges_end = _ranges(module)
    res = trainer.test(ckpt_path=path, datamodule=DigitsDataModule(), verbose=False)
    assert res[0]["test_acc"] == pytest.approx(fq_acc)  # still the fake-quant model, same state
    # an earlier checkpoint: its weights and its observer ranges come back for the test
    first = sorted(p for p in tmp_path.glob("epoch=0*.ckpt"))[0]
    saved = torch.load(first, weights_only=False)["callbacks"]["QuantizeCallback"]["layers"]
    trainer.test(ckpt_path=str(first), datamodule=DigitsDataModule(), verbose=False)
    assert _ranges(module) == [(float(v["min"]), float(v["max"])) for v in saved.values()]
    assert _ranges(module) != ranges_end


def _qat_run(tmp_path, max_epochs: int, ckpt_path: str | None = None, save: bool = False, weight_bits: Any = None, **kw: Any):
    module = _module()
    cb = QuantizeCallback(weight_bits=weight_bits or {0: 8, 2: 4}, freeze_observers_epoch=3, latency="none", convert_on_fit_end=False)
    callbacks: list[Callback] = [cb]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0))
    trainer = _trainer(
        tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=save, limit_train_batches=6, limit_val_batches=2, **kw
    )
    trainer.fit(module, OrderedDigits(), ckpt_path=ckpt_path)
    return module, cb


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_resume_mid_qat_is_bit_identical(tmp_path, precision: str) -> None:
    """bf16-true: Lightning casts the module after the checkpoint's ranges are restored; the float32 ranges must
    keep their values through that cast."""
    full, full_cb = _qat_run(tmp_path / "a", 4, precision=precision)
    _qat_run(tmp_path / "b", 2, save=True, precision=precision)
    resumed, resumed_cb = _qat_run(tmp_path / "c", 4, ckpt_path=str(tmp_path / "b" / "ck" / "last.ckpt"), precision=precision)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert _ranges(full) == _ranges(resumed)
    assert full_cb.state_dict()["current_bits"] == resumed_cb.state_dict()["current_bits"] == 4


def test_a_resume_with_other_quantisation_settings_says_so(tmp_path) -> None:
    """A checkpoint trained toward 4-bit weights resumed with weight_bits=2 went on at 2 bits without a word."""
    _qat_run(tmp_path / "b", 2, save=True)
    with pytest.warns(UserWarning, match=r"trained with other settings than this callback's \(weight_bits 4 -> 2\); this callback's apply from here"):
        _, cb = _qat_run(tmp_path / "c", 3, ckpt_path=str(tmp_path / "b" / "ck" / "last.ckpt"), weight_bits=2)
    assert cb.state_dict()["current_bits"] == 2


class _BitsSensitive(ClassifierModule):
    """Its validation accuracy is a known function of the weight bits in force."""

    ACC = {8: 0.90, 6: 0.895, 4: 0.85, 2: 0.50}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        bits = min(int(m.quantizer.bits) for m in fake_quant_layers(self).values())
        self.log("val_acc", self.ACC[bits])


def test_progressive_lowering_rolls_back_on_drop(tmp_path) -> None:
    cb = QuantizeCallback(weight_bits={0: 8, 1: 6, 2: 4, 3: 2}, monitor="val_acc", max_drop=0.02, latency="none")
    trainer = _trainer(tmp_path, [cb], max_epochs=5, limit_train_batches=2, limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"fell 0.05 from the baseline 0.9 to 0.85 \(max_drop=0.02\) at 4-bit weights; rolling back from 4 to 6 bits"):
        trainer.fit(module := _BitsSensitive(MLP(64, (16,), 10)), DigitsDataModule())
    # 8 bits: 0.90 (reference); 6 bits: 0.895 ok; 4 bits: 0.85 > 0.02 drop -> back to 6 and stay there (not 2)
    summary = cb.compression_summary()
    assert summary["locked_bits"] == 6
    assert [h["bits"] for h in summary["history"]] == [8, 6, 4, 6, 6]
    trainer.validate(module, DigitsDataModule(), verbose=False)  # measures; the guard acts in fit only (it recorded it)
    assert [h["bits"] for h in cb.compression_summary()["history"]] == [8, 6, 4, 6, 6]
    assert set(summary["bits_per_layer"].values()) == {6} and cb.state_dict()["current_bits"] == 6
    assert {v["format"] for v in cb.quantized_model.quantization_spec.values()} and all(
        v["bits"] == 6 for v in cb.quantized_model.quantization_spec.values()
    )
    restored = QuantizeCallback(weight_bits={0: 8, 1: 6, 2: 4, 3: 2}, monitor="val_acc", max_drop=0.02)
    restored.load_state_dict(cb.state_dict())
    assert restored.compression_summary()["locked_bits"] == 6


class _Scripted(ClassifierModule):
    """Logs a known value of ``monitor`` in validation: ``by_bits[bits in force]``, or ``by_epoch[epoch]``."""

    def __init__(self, monitor: str, by_bits: dict[int, float] | None = None, by_epoch: list[float] | None = None) -> None:
        super().__init__(MLP(64, (16,), 10))
        self.monitor, self.by_bits, self.by_epoch = monitor, by_bits, by_epoch

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        bits = min(int(m.quantizer.bits) for m in fake_quant_layers(self).values())
        self.log(self.monitor, self.by_bits[bits] if self.by_bits else self.by_epoch[self.current_epoch])


NOTHING_TO_ROLL_BACK = "4 bits passed the guard at an earlier epoch, so there is no wider width to roll back to: the weights stay at 4 bits"


@pytest.mark.parametrize(
    ("mode", "monitor", "script", "schedule", "message", "locked"),
    [
        # a loss that rises past max_drop at 4 bits: back to 6
        ("min", "val_loss", {"by_bits": {8: 0.30, 6: 0.305, 4: 0.35, 2: 0.8}}, {0: 8, 1: 6, 2: 4, 3: 2},
         "val_loss rose 0.05 from the baseline 0.3 to 0.35 (max_drop=0.02) at 4-bit weights; rolling back from 4 to 6 bits", 6),
        # 4 bits passed at epoch 1, then the metric got worse at epoch 2 with the same 4 bits: nothing wider to go back to
        ("max", "val_acc", {"by_epoch": [0.9, 0.9, 0.5]}, {0: 8, 1: 4},
         f"val_acc fell 0.4 from the baseline 0.9 to 0.5 (max_drop=0.02) at 4-bit weights; {NOTHING_TO_ROLL_BACK}", 4),
        ("min", "val_loss", {"by_epoch": [0.3, 0.3, 0.8]}, {0: 8, 1: 4},
         f"val_loss rose 0.5 from the baseline 0.3 to 0.8 (max_drop=0.02) at 4-bit weights; {NOTHING_TO_ROLL_BACK}", 4),
    ],
    ids=["min-rollback", "max-nothing-to-roll-back", "min-nothing-to-roll-back"],
)
def test_guard_warning_says_which_way_the_metric_moved_and_the_widths(tmp_path, mode, monitor, script, schedule, message, locked) -> None:
    cb = QuantizeCallback(weight_bits=schedule, monitor=monitor, mode=mode, max_drop=0.02, latency="none")
    trainer = _trainer(tmp_path, [cb], max_epochs=len(script.get("by_epoch", [])) or 5, limit_train_batches=2, limit_val_batches=1)
    with pytest.warns(UserWarning, match=re.escape(message)) as caught:
        trainer.fit(_Scripted(monitor, **script), DigitsDataModule())
    assert len([w for w in caught if "QuantizeCallback: val_" in str(w.message)]) == 1
    assert cb.compression_summary()["locked_bits"] == locked == cb.state_dict()["current_bits"]


def test_ptq_calibrates_without_changing_weights(tmp_path) -> None:
    module = _module()
    _trainer(tmp_path, [], max_epochs=3).fit(module, DigitsDataModule())
    before = copy.deepcopy(module.state_dict())
    float_acc = _trainer(tmp_path, []).test(module, DigitsDataModule(), verbose=False)[0]["test_acc"]
    cb = QuantizeCallback(method="ptq", calibration_batches=5, latency="none")
    trainer = _trainer(tmp_path, [cb], max_epochs=3)
    trainer.fit(module, DigitsDataModule())
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert cb.is_active() and all(hi > lo for lo, hi in _ranges(module))
    acc = trainer.test(module, DigitsDataModule(), verbose=False)[0]["test_acc"]
    assert acc >= float_acc - 0.03
    assert cb.quantized_model is not None


class DistillLike(ClassifierModule):
    def __init__(self) -> None:
        super().__init__(MLP(64, (32,), 10))
        self.teacher = MLP(64, (64,), 10).requires_grad_(False)


def test_teacher_left_alone_and_pruned_zeros_survive(tmp_path) -> None:
    seed_everything(0)
    module = DistillLike()
    mask = (torch.rand_like(module.model.net[1].weight) > 0.5).float()
    with torch.no_grad():
        module.model.net[1].weight.mul_(mask)

    class KeepMask(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            with torch.no_grad():
                module.model.net[1].weight.mul_(mask)

    cb = QuantizeCallback(latency="none")
    _trainer(tmp_path, [KeepMask(), cb], max_epochs=1).fit(module, DigitsDataModule())
    assert set(cb.compression_summary()["bits_per_layer"]) == {"model.net.1", "model.net.3"}
    assert set(fake_quant_layers(module)) == {"model.net.1", "model.net.3"}
    assert type(module.teacher.net[1]) is nn.Linear
    layer = cb.quantized_model.net[1]
    w = layer.weight_t.t().float()
    assert torch.all(w[mask == 0] == 0)


class Snapshot(Callback):
    """Observer ranges and BatchNorm statistics at the end of every training epoch."""

    def __init__(self) -> None:
        self.ranges: list[list[tuple[float, float]]] = []
        self.bn: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.ranges.append(_ranges(pl_module))
        self.bn.append(torch.cat([m.running_mean.clone() for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)]))


def test_freeze_observers_and_bn_and_logging(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_compress.models import ResCNN

    seed_everything(0)
    module = ClassifierModule(ResCNN(1, 10, width=4))
    snap = Snapshot()
    cb = QuantizeCallback(start_epoch=1, freeze_observers_epoch=2, freeze_bn_epoch=2, latency="none", convert_on_fit_end=False)
    trainer = _trainer(tmp_path, [cb, snap], max_epochs=3, limit_train_batches=4, limit_val_batches=1, logger=CSVLogger(tmp_path))
    trainer.fit(module, DigitsDataModule())
    assert snap.ranges[0] == [(0.0, 0.0)] * len(fake_quant_layers(module)) == [(0.0, 0.0)] * 5  # epoch 0: float, observers untouched
    assert snap.ranges[1] != snap.ranges[0]  # epoch 1: observing
    assert snap.ranges[2] == snap.ranges[1]  # epoch 2: frozen
    assert not torch.equal(snap.bn[1], snap.bn[0]) and torch.equal(snap.bn[2], snap.bn[1])
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    bits = [float(r["quant/weight_bits"]) for r in rows if r.get("quant/weight_bits")]
    assert bits == [32.0, 8.0, 8.0]  # float before start_epoch
    assert "quant/bits/model.fc" in rows[0] and "quant/act_range_max" in rows[0]


def test_ptq_after_float_epochs(tmp_path) -> None:
    module = _module()
    cb = QuantizeCallback(method="ptq", start_epoch=2, calibration_batches=3, latency="none")
    trainer = _trainer(tmp_path, [cb], max_epochs=10, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule())
    assert trainer.current_epoch == 2  # two float epochs, then calibration and stop
    assert cb.is_active() and cb.quantized_model is not None
    # the metrics the fit ends with say what it made (they said 32 bits and 0% quantised, the float epochs')
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("quant/")}
    assert metrics == {"quant/weight_bits": 8.0, "quant/fraction_quantized": 1.0}


def test_ptq_calibrates_before_the_last_validation_so_it_measures_the_calibrated_model(tmp_path) -> None:
    """Calibration runs after the last float batch, before that epoch's validation: the metrics the fit ends
    with (and the report's compressed ones) are those of the fake-quantised model, not of the float one."""
    module = _module()
    cb = QuantizeCallback(method="ptq", start_epoch=2, calibration_batches=3, latency="none")
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)
    trainer = _trainer(tmp_path, [cb, report], max_epochs=10)
    data = DigitsDataModule()
    trainer.fit(module, data)
    in_fit = float(trainer.callback_metrics["val_loss"])
    check = Trainer(**trainer_kwargs(tmp_path))
    assert check.validate(module, data, verbose=False)[0]["val_loss"] == pytest.approx(in_fit, rel=1e-6)
    for layer in fake_quant_layers(module).values():
        layer.quantizer.enabled = False
    assert check.validate(module, data, verbose=False)[0]["val_loss"] != pytest.approx(in_fit, rel=1e-6)
    assert report.report["compressed"]["metrics"]["val_loss"] == pytest.approx(in_fit) and "compressed_note" not in report.report
    assert report.report["compressed"]["metrics_epoch"] == 1 and report.report["baseline"]["metrics_epoch"] == 0


def test_a_later_fit_of_a_calibrated_ptq_callback_says_it_stops(tmp_path) -> None:
    """A second fit (no checkpoint) of a callback that has calibrated stopped before its first step, logged nothing and
    said nothing, while Trainer.fit reported it finished."""
    import warnings

    module = _module()
    cb = QuantizeCallback(method="ptq", start_epoch=1, calibration_batches=2, latency="none")
    _trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=3).fit(module, DigitsDataModule())
    weights = module.model.net[1].weight.detach().clone()
    later = _trainer(tmp_path, [cb], max_epochs=5, limit_train_batches=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        later.fit(module, DigitsDataModule())
    said = [str(w.message) for w in caught if "calibrated this model in an earlier fit" in str(w.message)]
    assert len(said) == 1 and "this fit stops before its first step" in said[0]
    assert later.global_step == 0 and torch.equal(module.model.net[1].weight, weights)
    assert said[0] in cb.compression_summary().get("notes", [])


def test_composes_with_pruning_callback(tmp_path) -> None:
    from lightning_compress.pruning import PruningCallback

    module = _module()
    prune = PruningCallback(0.6, "one_shot", start_epoch=0, exclude=[r"net\.3"])
    quant = QuantizeCallback(weight_bits=4, activation_bits=None, start_epoch=1, latency="none")
    _trainer(tmp_path, [prune, quant], max_epochs=3, limit_train_batches=6, limit_val_batches=1).fit(module, DigitsDataModule())
    weight = module.model.net[1].weight.detach()
    zeros = weight == 0
    assert zeros.float().mean() >= 0.59  # pruning still held through QAT
    layer = quant.quantized_model.net[1]
    assert torch.all(layer.dequantized_weight()[zeros] == 0)  # every pruned weight is an exact integer zero


def test_warns_when_converted_model_is_slower(monkeypatch) -> None:
    import lightning_compress.quantization.artifact as cbmod

    class Compiled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    def fake_latency(models: dict, example: torch.Tensor, **kwargs) -> dict:
        compiled = all(isinstance(m, Compiled) for m in models.values())
        quant_ms = 0.5 if compiled else 2.0
        return {"float": {"median_ms": 1.0}, "quantized": {"median_ms": quant_ms}}

    monkeypatch.setattr(cbmod, "measure_latency", fake_latency)
    monkeypatch.setattr(cbmod, "compile_for_cpu", Compiled)
    out, warnings = cbmod.measure_speed(MLP(4, (4,), 2), MLP(4, (4,), 2), torch.zeros(1, 4), "both", set())
    assert out["eager"]["speedup"] == 0.5 and out["compiled"]["speedup"] == 2.0
    assert len(warnings) == 1
    assert re.search(r"slower than float on CPU in eager mode \(0.50x.*compiled for CPU it is 2.00x.*compile_for_cpu", warnings[0])
    monkeypatch.setattr(cbmod, "compile_for_cpu", lambda m: m)  # compiled as slow as eager: said too (it was left out)
    out, warnings = cbmod.measure_speed(MLP(4, (4,), 2), MLP(4, (4,), 2), torch.zeros(1, 4), "both", set())
    assert len(warnings) == 1 and "compiled for CPU it is slower too (0.50x float)" in warnings[0], warnings


@pytest.mark.parametrize(
    ("formats", "expected"),
    [({"fc": "int8_linear"}, "fast under lightning_compress.compile_for_cpu"), ({"fc": "lowbit"}, "compute in float")],
)
def test_eager_only_slow_warning_names_the_right_remedy(monkeypatch, formats, expected) -> None:
    import lightning_compress.quantization.artifact as cbmod

    monkeypatch.setattr(cbmod, "measure_latency", lambda models, example, **kw: {"float": {"median_ms": 1.0}, "quantized": {"median_ms": 2.0}})
    _, warnings = cbmod.measure_speed(MLP(4, (4,), 2), MLP(4, (4,), 2), torch.zeros(1, 4), "eager", set(formats.values()))
    assert len(warnings) == 1 and expected in warnings[0]


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_qat_reestimates_batchnorm_statistics_at_the_end(tmp_path, freeze_bn: bool) -> None:
    from lightning_compress.models import ResCNN
    from lightning_compress.quantization import reestimate_batchnorm

    seed_everything(0)
    module = ClassifierModule(ResCNN(width=4), example_input_shape=(1, 8, 8))
    cb = QuantizeCallback(weight_bits=4, activation_bits=None, start_epoch=1, latency="none", bn_reestimate_batches=3,
                          freeze_bn_epoch=1 if freeze_bn else None)
    dm = DigitsDataModule(batch_size=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [cb, ckpt], max_epochs=2, limit_train_batches=4, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(module, dm)
    after_fit = _bn_stats(module)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    bn_names = [name for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    in_ckpt = [saved[f"{name}.{buf}"] for name in bn_names for buf in ("running_mean", "running_var")]
    assert all(torch.equal(a, b) for a, b in zip(after_fit, in_ckpt))  # the last checkpoint holds the final statistics
    # the same statistics again, recomputed by hand over the loader's first three batches
    redo = copy.deepcopy(module.model)
    assert reestimate_batchnorm(redo, trainer.train_dataloader, max_batches=3) == 3
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after_fit, _bn_stats(redo)))
    summary = cb.compression_summary()
    if freeze_bn:  # frozen statistics were trained against: left as they are
        assert not same and "bn_reestimated" not in summary
    else:
        assert same and summary["bn_reestimated"] == {"layers": 4, "batches": 3}
        assert any("re-estimated on 3 training batches" in n for n in summary["notes"])
        assert trainer.validate(module, dm, verbose=False)[0]["val_acc"] == pytest.approx(float(trainer.callback_metrics["val_acc"]))
        with torch.no_grad():  # the module and the converted model agree on the new statistics
            x = torch.randn(5, 1, 8, 8)
            torch.testing.assert_close(cb.quantized_model(x), module.model.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["qat", "ptq"])
def test_batches_run_outside_the_step_are_cast_as_the_loop_casts_them_under_bf16_true(tmp_path, method: str) -> None:
    """precision="bf16-true" casts the module after setup and each batch in the loop: PTQ calibration and
    the BatchNorm re-estimation at the end of QAT run their batches cast the same way, and the converted
    model computes what the fake-quantised one did."""
    seed_everything(0)
    module = ClassifierModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)))
    cb = QuantizeCallback(method=method, start_epoch=1, latency="none", calibration_batches=2, bn_reestimate_batches=2)
    trainer = _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=3, limit_val_batches=1, precision="bf16-true")
    trainer.fit(module, DigitsDataModule(batch_size=32))
    summary = cb.compression_summary()
    if method == "qat":
        assert summary["bn_reestimated"] == {"layers": 1, "batches": 2}, summary
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fake, real = module.model.eval()(x), cb.quantized_model.eval()(x)
    assert fake.dtype == real.dtype == torch.bfloat16
    assert (fake.argmax(-1) == real.argmax(-1)).float().mean() >= 0.75 and torch.allclose(fake.float(), real.float(), atol=0.1)


def test_reestimate_batchnorm_restores_modes_and_keeps_stats_without_batches() -> None:
    from lightning_compress.quantization import reestimate_batchnorm

    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm2d(3)))
    net.train()
    net[3].eval()  # a frozen BatchNorm stays in eval mode afterwards
    net[1].running_mean.fill_(0.5)
    before = _bn_stats(net)
    assert reestimate_batchnorm(net, []) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(net)))  # nothing seen: stats put back
    assert reestimate_batchnorm(net, [(torch.randn(8, 1, 5, 5), None)] * 2, skip=["3"]) == 2
    assert net.training and net[1].training and net[2].training and not net[3].training
    assert net[1].momentum == 0.1 and not torch.equal(net[1].running_mean, before[0])
    assert torch.equal(net[3][0].running_mean, before[2])  # skipped prefix untouched
    assert reestimate_batchnorm(net, [torch.randn(8, 1, 5, 5)], forward=lambda m, b: m(b), training_only=True) == 1
    assert torch.equal(net[3][0].running_mean, before[2])  # in eval mode: frozen on purpose, untouched
    with pytest.raises(TypeError, match="pass forward="):
        reestimate_batchnorm(net, [{"x": torch.randn(2, 1, 5, 5)}])
    kept = _bn_stats(net)
    with pytest.raises(TypeError, match="pass forward="):  # fails on the second batch: first batch's stats undone
        reestimate_batchnorm(net, [torch.randn(8, 1, 5, 5), {"x": 1}])
    assert all(torch.equal(a, b) for a, b in zip(kept, _bn_stats(net)))


def test_save_to_writes_the_converted_model_and_a_failed_export_only_warns(tmp_path, monkeypatch) -> None:
    import lightning_compress.quantization.artifact as cbmod

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torch.export could not capture MLP")

    monkeypatch.setattr(cbmod, "export", no_export)
    absolute = tmp_path / "elsewhere" / "q.pt"
    cb = QuantizeCallback(start_epoch=1, latency="none", save_to=str(absolute), export_to="q.pt2")
    trainer = _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=4, limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"export_to='q.pt2' not written: RuntimeError: torch.export could not capture MLP"):
        trainer.fit(_module(), DigitsDataModule(batch_size=32))
    summary = cb.compression_summary()
    assert summary["saved_to"] == {"path": str(absolute), "bytes": absolute.stat().st_size}
    assert "exported_to" not in summary and any("export_to='q.pt2' not written" in w for w in summary["warnings"])
    assert not (tmp_path / "q.pt2").exists()
    reloaded = load_quantized(MLP(64, (48,), 10), absolute)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), cb.quantized_model(x), atol=0, rtol=0)


class EveryKind(nn.Module):
    """One layer of each kind that conversion handles, on 8x8 digits: a Conv2d over the image, a Conv1d
    along its rows, an Embedding of each row's brightness level, self-attention over the rows, two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(32, 16, 3, padding=1)
        self.embed = nn.Embedding(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x)).transpose(2, 3).reshape(len(x), 32, 8)  # (channel, column) x row
        h = torch.relu(self.conv1d(h)).transpose(1, 2)  # (batch, row, 16)
        levels = (x[:, 0].mean(-1) * 4).round().clamp(-8, 7).long() + 8
        h = h + self.embed(levels)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc(h)).mean(1))


@pytest.mark.parametrize("rounding", ["floor", "stochastic"])
@pytest.mark.parametrize(("bits", "activation_bits"), [(8, 8), (4, None), (4, 8)])
def test_converted_model_computes_what_the_fake_quant_model_did_with_its_rounding(tmp_path, rounding, bits, activation_bits) -> None:
    """Floor rounding is kept by evaluation and conversion; stochastic rounding (training only) becomes
    rounding to nearest in both. Every converted kind (int8 Linear, packed low-bit Linear/Conv1d/Conv2d,
    Embedding and attention, with and without input quantisation) holds the integers the fake-quant
    model evaluated with, so the two give the same outputs."""
    seed_everything(0)
    module = ClassifierModule(EveryKind())
    cb = QuantizeCallback(weight_bits=bits, activation_bits=activation_bits, rounding=rounding, latency="none")
    _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4, limit_val_batches=1).fit(module, DigitsDataModule(batch_size=32))
    formats = {name: entry["format"] for name, entry in cb.quantized_model.quantization_spec.items()}
    linear = "int8_linear" if (bits, activation_bits) == (8, 8) else "lowbit"
    assert formats == {"conv2d": "lowbit", "conv1d": "lowbit", "embed": "lowbit", "attn": "lowbit_attention",
                       "attn.out_proj": "lowbit", "fc": linear, "head": linear}  # fmt: skip
    data = DigitsDataModule()
    data.setup("test")
    x = data.test_set.tensors[0][:128]
    with torch.no_grad():
        fake, real = module.model.eval()(x), cb.quantized_model(x)
    torch.testing.assert_close(real, fake, atol=1e-4 * float(fake.abs().max()), rtol=1e-4)


class TiedAutoencoder(LightningModule):
    """A decoder tied to the encoder: ``F.linear(h, enc.weight.t())`` reads the encoder's weight outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(64, 16)
        self.dec_bias = nn.Parameter(torch.zeros(64))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc(x.flatten(1)))
        return nn.functional.linear(h, self.enc.weight.t(), self.dec_bias)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), x.flatten(1))
        return loss + nn.functional.cross_entropy(self.head(torch.relu(self.enc(x.flatten(1)))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_weight_read_outside_its_layer_is_named_in_the_first_step(tmp_path) -> None:
    """QAT rounds a weight only inside its layer: the tied decoder would train on the float weight while the
    converted model reads the low-bit one. The first training step's forward is watched, and the weight and the way out named;
    excluding the layer silences it. Reads inside the layers that compute them (an attention module's
    out_proj, an embedding tied to a head) are not reported."""
    seed_everything(0)
    module = TiedAutoencoder()
    cb = QuantizeCallback(weight_bits=4, activation_bits=None, latency="none", convert_on_fit_end=False)
    trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match=re.escape("the model reads ['enc.weight'] outside the layers that hold them (first read by Tensor.t")) as caught:
        trainer.fit(module, DigitsDataModule())
    message = next(str(w.message) for w in caught if "outside the layers" in str(w.message))
    assert "exclude=['enc']" in message and "'head" not in message  # head is read inside itself only
    assert sorted(fake_quant_layers(module)) == ["enc", "head"]  # a warning: the fit went on

    module = TiedAutoencoder()
    excluded = QuantizeCallback(weight_bits=4, activation_bits=None, latency="none", exclude=["enc"], convert_on_fit_end=False)
    assert _reads_warnings(tmp_path, module, excluded) == []
    assert sorted(fake_quant_layers(module)) == ["head"]

    module = ClassifierModule(TiedHeadAndAttention())
    assert _reads_warnings(tmp_path, module, QuantizeCallback(latency="none", convert_on_fit_end=False)) == []


class TiedHeadAndAttention(nn.Module):
    """Weights read by other layers than their own, legitimately: a head tied to an embedding (both
    fake-quantised) and an attention module computing its ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.embed = nn.Embedding(10, 16)
        self.out = nn.Linear(16, 10, bias=False)
        self.out.weight = self.embed.weight
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))[:, None] + self.embed(torch.zeros(len(x), 1, dtype=torch.long))
        return self.out(self.attn(h, h, h, need_weights=False)[0][:, 0])


def test_a_compiled_network_is_looked_at_eagerly(tmp_path) -> None:
    """A compiled graph runs its ops outside the layers' hooks, so every weight would seem read outside its
    layer; the watched first step runs the network eagerly, and nothing is reported."""
    seed_everything(0)
    module = ClassifierModule(TiedHeadAndAttention())
    module.model.compile(backend="aot_eager", fullgraph=True)  # in place, as LanguageModelModule(compile=...) does
    assert _reads_warnings(tmp_path, module, QuantizeCallback(latency="none", convert_on_fit_end=False)) == []


def test_watching_the_first_step_leaves_the_fit_as_it_would_have_been(tmp_path, monkeypatch) -> None:
    """The first step's forward runs under the watch for weights read outside their layers (hooks, a torch
    function mode, eager): the trained weights are the same as without it."""
    from lightning_compress.quantization import callback as callback_module

    from torch.utils.data import DataLoader

    data = DigitsDataModule()
    data.setup("fit")

    def fit() -> dict[str, torch.Tensor]:
        module = _module()
        cb = QuantizeCallback(weight_bits=4, latency="none", convert_on_fit_end=False)
        loader = DataLoader(data.train_set, batch_size=32, shuffle=True)  # shuffled with the global generator
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3).fit(module, loader)
        return module.state_dict()

    looked = fit()
    monkeypatch.setattr(callback_module.QuantizeCallback, "_watch_weight_reads", lambda self, pl_module: None)
    unlooked = fit()
    assert looked.keys() == unlooked.keys() and all(torch.equal(looked[k], unlooked[k]) for k in looked)


class PenalisedClassifier(ClassifierModule):
    """An L2 penalty on every weight, computed in training_step after the network's forward."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss + 1e-4 * sum(p.pow(2).sum() for p in self.model.parameters())


def test_reads_after_the_networks_forward_are_not_the_models(tmp_path) -> None:
    """The watch closes when the network's forward returns: a penalty in training_step is not reported."""
    seed_everything(0)
    module = PenalisedClassifier(MLP(64, (48,), 10))
    assert _reads_warnings(tmp_path, module, QuantizeCallback(latency="none", convert_on_fit_end=False)) == []


class SkipsItsFirstStep(ClassifierModule):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if self.trainer.global_step == 0 and self.trainer.current_epoch == 0 else None  # skip epoch 0


def test_a_skipped_first_step_leaves_nothing_watching(tmp_path) -> None:
    """No backward and no batch end follow a skipped step: the watch still closes (at the epoch's end), so
    no torch function mode outlives the fit."""
    seed_everything(0)
    module = SkipsItsFirstStep(MLP(64, (48,), 10))
    cb = QuantizeCallback(latency="none", convert_on_fit_end=False)
    _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(module, DigitsDataModule())
    assert torch._C._len_torch_function_stack() == 0 and cb._reads.watch is None


def _reads_warnings(tmp_path, module: LightningModule, cb: QuantizeCallback) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, DigitsDataModule())
    assert fake_quant_layers(module)  # it ran
    return [str(w.message) for w in caught if "outside the layers" in str(w.message)]


def test_a_fit_that_ends_before_qat_starts_makes_no_converted_model(tmp_path) -> None:
    quant = QuantizeCallback(start_epoch=3, latency="none")
    trainer = _trainer(tmp_path, [quant], max_epochs=5, max_steps=6, limit_train_batches=4, limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"fit ended at step 6, before QAT started \(start_epoch=3\).*quantized_model stays None"):
        trainer.fit(_module(), DigitsDataModule())
    assert quant.quantized_model is None and not quant.is_active()
    assert "before QAT started" in quant.compression_summary()["warnings"][0]


def test_converting_layers_whose_input_range_was_never_observed_says_so() -> None:
    from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant

    model = MLP(64, (48,), 10)
    prepare_fake_quant(model, QuantSettings(bits=8, activation_bits=8))
    with pytest.warns(UserWarning, match=r"2 of 2 layers quantise their inputs but never observed an input range \['net.1', 'net.3'\] \(2 in all\)"):
        converted = convert_fake_quant(model)
    assert "int8 x int8" not in repr(converted)  # weight-only, as the warning says


def test_a_later_fit_that_makes_no_converted_model_drops_the_earlier_one(tmp_path) -> None:
    """Continued training in a new Trainer that ends before start_epoch: quantized_model kept the first fit's
    artifact (3.7 apart from the module in logits) while the warning said it stays None, and the report measured it.
    Such a fit is now refused in setup, as for a new callback, and the earlier artifact is dropped."""
    module = _module()
    cb = QuantizeCallback(weight_bits=4, start_epoch=2, latency="none")
    _trainer(tmp_path, [cb], max_epochs=3).fit(module, DigitsDataModule())
    assert cb.quantized_model is not None
    with pytest.raises(ValueError, match=r"start_epoch=2 is not before max_epochs=1"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(module, DigitsDataModule())
    assert cb.quantized_model is None and cb.compressed_artifact() is None
    summary = cb.compression_summary()  # and nothing of the first fit's artifact is reported
    assert "size_ratio" not in summary and "formats" not in summary


def test_weight_averaging_listed_first_is_refused_naming_the_order(tmp_path) -> None:
    """EMAWeightAveraging copies the model in its setup: listed before QuantizeCallback, its copy lacked the
    observers, and Lightning's positional pairing of buffers failed at the first validation (RuntimeError: output
    with shape [] doesn't match the broadcast shape [8]). Refused in setup, before the model changes; listed after, it runs."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging needs Lightning 2.6")
    from lightning_compress.models import ResCNN

    module = ClassifierModule(ResCNN(1, 10, width=8))
    quant = QuantizeCallback(start_epoch=1, latency="none", bn_reestimate_batches=0)
    with pytest.raises(ValueError, match=r"EMAWeightAveraging is listed before QuantizeCallback: .* List QuantizeCallback before"):
        _trainer(tmp_path, [callbacks.EMAWeightAveraging(decay=0.9), quant], limit_train_batches=4, limit_val_batches=2).fit(module, DigitsDataModule())
    assert not fake_quant_layers(module)
    _trainer(tmp_path, [quant, callbacks.EMAWeightAveraging(decay=0.9)], limit_train_batches=4, limit_val_batches=2).fit(module, DigitsDataModule())
    assert quant.quantized_model is not None


def test_an_evaluation_without_a_checkpoint_on_an_unfitted_model_says_it_runs_in_float(tmp_path) -> None:
    """trainer.validate(module) with a QuantizeCallback that never prepared the module measured the float model in
    silence (the callback restores its state from a checkpoint only)."""
    import warnings

    quant = QuantizeCallback(latency="none")
    trainer = Trainer(callbacks=[quant], **trainer_kwargs(tmp_path, limit_val_batches=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32), verbose=False)
    said = [str(w.message) for w in caught if "without ckpt_path" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("QuantizeCallback: trainer.validate without ckpt_path") and "runs in float" in said[0]


def test_a_width_that_changes_within_an_epoch_is_in_the_metrics_its_validation_reads(tmp_path) -> None:
    """start_epoch=0.5 and a bits milestone at 1.5: epoch 0's validation read 32 bits for a model running at 8, and a
    checkpoint named by quant/weight_bits was one epoch late."""

    class Seen(Callback):
        def __init__(self) -> None:
            self.bits: list[tuple[float, int]] = []

        def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if not trainer.sanity_checking:
                self.bits.append((float(trainer.callback_metrics["quant/weight_bits"]), quant._current_bits))

    quant = QuantizeCallback(weight_bits={0.5: 8, 1.5: 4}, start_epoch=0.5, activation_bits=None, latency="none")
    seen = Seen()
    _trainer(tmp_path, [quant, seen], max_epochs=3, limit_train_batches=4, limit_val_batches=2).fit(_module(), DigitsDataModule())
    assert seen.bits == [(8.0, 8), (4.0, 4), (4.0, 4)]


def test_ptq_ending_its_fit_after_an_unvalidated_epoch_says_so(tmp_path) -> None:
    """PTQ(start_epoch=1) with check_val_every_n_epoch=2 ended the fit after epoch 0, which is not validated: the report
    had no compressed metrics and its note blamed a missing validation loop."""
    import warnings

    cb = QuantizeCallback(method="ptq", start_epoch=1, calibration_batches=2, latency="none")
    trainer = _trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=3, check_val_every_n_epoch=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(), DigitsDataModule())
    said = [str(w.message) for w in caught if "does not validate that epoch" in str(w.message)]
    assert len(said) == 1 and "calibrates at the end of epoch 0" in said[0] and "multiple of 2" in said[0]
    assert cb.quantized_model is not None


def test_evaluating_a_checkpoint_with_other_settings_is_refused_and_a_quantised_model_is_not_called_float(tmp_path) -> None:
    """trainer.validate(ckpt_path=...) with a QuantizeCallback of another granularity measured a model that was neither
    the checkpoint's nor the callback's (val_acc 0.2185 for a 0.1889 checkpoint), with a warning that the callback's
    settings applied. It is refused before any batch. A new callback validating a model an earlier fit left
    fake-quantised said it ran in float; it measures the quantised model, as it is, without that warning."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0)
    module = ClassifierModule(MLP(64, (16,), 10))
    fit = Trainer(max_epochs=1, callbacks=[QuantizeCallback(weight_bits=2, latency="none"), ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
                  **trainer_kwargs(tmp_path, limit_train_batches=4, limit_val_batches=2, enable_checkpointing=True))
    fit.fit(module, DigitsDataModule(batch_size=32))
    fitted = float(fit.callback_metrics["val_loss"])
    last = tmp_path / "ck" / "last.ckpt"

    def validate(quant: QuantizeCallback, **kwargs: Any) -> tuple[float, list[str]]:
        trainer = Trainer(callbacks=[quant], **trainer_kwargs(tmp_path, limit_val_batches=2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = trainer.validate(kwargs.pop("model", None) or ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32), verbose=False, **kwargs)
        return result[0]["val_loss"], [str(w.message) for w in caught if "QuantizeCallback" in str(w.message)]

    assert validate(QuantizeCallback(weight_bits=2, latency="none"), ckpt_path=last)[0] == pytest.approx(fitted)
    with pytest.raises(ValueError, match=r"trainer.validate\(ckpt_path=.*\) with other settings than the checkpoint's run was trained with \(granularity per_channel -> per_tensor\)"):
        validate(QuantizeCallback(weight_bits=2, granularity="per_tensor", latency="none"), ckpt_path=last)
    value, said = validate(QuantizeCallback(weight_bits=2, latency="none"), model=module)
    assert value == pytest.approx(fitted) and not [m for m in said if "runs in float" in m]


def test_a_new_callback_on_layers_quantised_with_other_settings_is_refused(tmp_path: Any) -> None:
    """A second fit with a new QuantizeCallback kept the first one's layers as they were: weight-only 4-bit in
    groups of 8 trained and converted int8 inputs per channel, and a layer no longer selected stayed quantised,
    while the summary reported the new settings."""
    from lightning_compress.quantization import fake_quant_layers, strip_fake_quant

    def fit(**args: Any) -> None:
        cb = QuantizeCallback(convert_on_fit_end=False, latency="none", **args)
        Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1)).fit(
            module, DigitsDataModule()
        )

    seed_everything(0)
    module = ClassifierModule(MLP(64, (32, 16), 10))
    fit()
    before = {n: (m.quantizer.activation_bits, m.quantizer.granularity) for n, m in fake_quant_layers(module).items()}
    with pytest.raises(ValueError, match=r"fake-quantised earlier with other settings: model.net.1 has activation_bits=8 "
                       r"\(asked None\); model.net.1 has granularity='per_channel' \(asked 8\).*strip_fake_quant"):
        fit(weight_bits=4, activation_bits=None, granularity=8)
    with pytest.raises(ValueError, match=r"\['model.net.5'\] \(1 in all\) were fake-quantised earlier but this callback's include/exclude"):
        fit(exclude=[r"net\.5"])
    assert {n: (m.quantizer.activation_bits, m.quantizer.granularity) for n, m in fake_quant_layers(module).items()} == before
    fit()  # the same settings go on with the layers and their ranges
    strip_fake_quant(module)  # the way to other settings
    fit(weight_bits=4, activation_bits=None, granularity=8)
    assert {(m.quantizer.bits, m.quantizer.activation_bits, m.quantizer.granularity) for m in fake_quant_layers(module).values()} == {(4, None, 8)}


def test_layers_prepared_elsewhere_with_other_settings_are_left_alone(tmp_path: Any) -> None:
    """What the refusal of earlier layers must not catch: a fake-quantised teacher beside a student the callback
    quantises, and the public function preparing one region after another with their own settings."""
    from lightning_compress.distillation import DistillationModule
    from lightning_compress.quantization import QuantSettings, fake_quant_layers, prepare_fake_quant

    seed_everything(0)
    teacher = MLP(64, (16,), 10)
    prepare_fake_quant(teacher, QuantSettings(bits=4, activation_bits=None))
    module = DistillationModule(MLP(64, (16,), 10), teacher)
    cb = QuantizeCallback(convert_on_fit_end=False, latency="none")
    Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1)).fit(
        module, DigitsDataModule()
    )
    bits = {n: (m.quantizer.bits, m.quantizer.activation_bits) for n, m in fake_quant_layers(module).items()}
    assert bits == {"student.net.1": (8, 8), "student.net.3": (8, 8), "teacher.net.1": (4, None), "teacher.net.3": (4, None)}
    net = MLP(64, (16,), 10)
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=8), include=[r"net\.1"])
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None), include=[r"net\.3"])
    assert {n: m.quantizer.activation_bits for n, m in fake_quant_layers(net).items()} == {"net.1": 8, "net.3": None}


def test_ptq_before_any_training_step_says_the_fit_validated_nothing(tmp_path) -> None:
    """PTQ at start_epoch=0 calibrates and ends the fit before its first step, so no validation runs: this was said
    nowhere (no val_* metric, no compressed metrics in a report); it is said now, in the summary's notes too."""
    import lightning as L

    from lightning_compress import MLP, ClassifierModule, DigitsDataModule

    L.seed_everything(0)
    quant = QuantizeCallback(method="ptq", start_epoch=0, calibration_batches=4, latency="none")
    trainer = L.Trainer(max_epochs=2, callbacks=[quant], **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=r"start_epoch=0\) calibrated before any training step .* run trainer.validate"):
        trainer.fit(ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0 and not [k for k in trainer.callback_metrics if k.startswith("val_")]
    assert quant.quantized_model is not None
    assert any("no validation of this fit measured the calibrated model" in w for w in quant.compression_summary()["notes"])


@pytest.mark.parametrize("options", [{"weight_bits": 4}, {"weight_bits": {0: 8}}, {"method": "ptq"}])
def test_a_guard_with_no_lowering_to_act_on_is_said_on_construction(options: dict) -> None:
    """Accepted in silence, a guard that could never act: PTQ calibrates once, a constant width has nothing wider."""
    with pytest.warns(UserWarning, match=r"monitor='val_acc' guards the lowering of weight_bits over epochs, and .*there is "
                      r"no lowering to stop or roll back, so it will not act"):
        QuantizeCallback(monitor="val_acc", max_drop=0.01, **options)


def test_a_rollback_next_to_a_checkpoint_on_a_metric_says_what_the_file_holds(tmp_path) -> None:
    """Lightning's ModelCheckpoint runs after the guard: its file holds the rolled-back model under the score of the
    width the guard rejected."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0)
    module = _Scripted("val_loss", by_bits={8: 0.30, 6: 0.305, 4: 0.35, 2: 0.8})
    cb = QuantizeCallback(weight_bits={0: 8, 1: 6, 2: 4, 3: 2}, monitor="val_loss", mode="min", max_drop=0.02, latency="none")
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", mode="min", save_top_k=1)
    trainer = _trainer(tmp_path, [cb, best], max_epochs=3, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"rolling back from 4 to 6 bits.*A ModelCheckpoint monitoring val_loss saves after this "
                      r"validation: its file holds the model given back, under the score of the one rejected"):
        trainer.fit(module, DigitsDataModule(batch_size=64))


class _GuardedByBits(ClassifierModule):
    """A BatchNorm MLP that logs its real ``val_loss``/``val_acc`` and ``guarded``, a known function of the weight bits
    in force (so the guard trips at 2 bits whatever the training made of them)."""

    def __init__(self) -> None:
        seed_everything(0)
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        bits = min(int(m.quantizer.bits) for m in fake_quant_layers(self).values())
        self.log("guarded", {8: 0.9, 6: 0.9, 2: 0.5}[bits])


def _guarded_callback(weight_bits: dict[int, int] | None = None) -> QuantizeCallback:
    return QuantizeCallback(weight_bits=weight_bits or {0: 8, 2: 2}, monitor="guarded", max_drop=0.01, latency="none",
                            convert_on_fit_end=False)


class _Validations(Callback):
    """The metrics and a copy of the module's parameters and buffers at every validation of a fit, before the
    callbacks listed after it act on it."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, float], dict[str, torch.Tensor], list[tuple[float, float]]]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.seen.append((metrics, {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, _ranges(pl_module)))


def test_a_rollback_gives_back_the_model_of_the_last_accepted_validation(tmp_path) -> None:
    """The weights trained at the rejected width were kept at the restored one: a model no validation had measured
    (once 0.8185 at the restored 4 bits where 2 bits had scored 0.8815). Now the weights, the BatchNorm statistics and
    the activation ranges of the last accepted validation come back, and a validation of the result scores as it did."""
    seen = _Validations()
    cb = _guarded_callback()
    module = _GuardedByBits()
    trainer = _trainer(tmp_path, [seen, cb], max_epochs=3, limit_train_batches=30, limit_val_batches=4)
    with pytest.warns(UserWarning, match=r"at 2-bit weights; rolling back from 2 to 8 bits and stopping the lowering, with the "
                      r"weights, BatchNorm statistics and activation ranges of the last accepted validation put back"):
        trainer.fit(module, OrderedDigits())
    assert cb.compression_summary()["locked_bits"] == 8
    (accepted, accepted_state, accepted_ranges), (rejected, rejected_state, _) = seen.seen[1], seen.seen[2]
    assert rejected["val_loss"] != accepted["val_loss"]
    assert not torch.equal(rejected_state["model.2.running_mean"], accepted_state["model.2.running_mean"])
    for name, value in module.state_dict().items():  # the module as that validation measured it, BatchNorm included
        assert torch.equal(value, accepted_state[name]), name
    assert _ranges(module) == accepted_ranges
    again = trainer.validate(module, OrderedDigits(), verbose=False)[0]
    assert again["val_acc"] == accepted["val_acc"] and again["val_loss"] == accepted["val_loss"]


def _guarded_qat_run(tmp_path, max_epochs: int, ckpt_path: str | None = None, save: bool = False):
    module, cb = _GuardedByBits(), _guarded_callback()
    callbacks: list[Callback] = [cb]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0))
    trainer = _trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=save, limit_train_batches=30, limit_val_batches=4)
    trainer.fit(module, OrderedDigits(), ckpt_path=ckpt_path)
    return module, cb


@pytest.mark.filterwarnings("ignore:QuantizeCallback. guarded fell")
def test_a_resume_before_a_rollback_restores_the_same_model(tmp_path) -> None:
    """The copy of the last accepted model is in the callback's checkpoint state: a fit resumed from the epoch before
    the rollback gives it back as the uninterrupted fit does, and trains on from it identically."""
    full, full_cb = _guarded_qat_run(tmp_path / "a", 4)
    assert full_cb.compression_summary()["locked_bits"] == 8
    _guarded_qat_run(tmp_path / "b", 2, save=True)
    resumed, resumed_cb = _guarded_qat_run(tmp_path / "c", 4, ckpt_path=str(tmp_path / "b" / "ck" / "last.ckpt"))
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert _ranges(full) == _ranges(resumed)
    assert resumed_cb.compression_summary()["history"] == full_cb.compression_summary()["history"]


def test_a_rollback_keeps_the_zeros_pruning_made_since_the_accepted_validation(tmp_path) -> None:
    """The copy of the accepted model is dense where pruning zeroed weights after it: restored, those weights came
    back until pruning's next check, and the next epoch's first steps trained with them."""
    from lightning_compress import PruningCallback

    class ZerosAtEpochStart(Callback):
        def __init__(self) -> None:
            self.revived: list[int] = []

        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            self.revived.append(sum(int(((p != 0) & ~m).sum()) for n, p in pl_module.named_parameters() if (m := prune.masks.get(n)) is not None))

    seed_everything(0)
    prune = PruningCallback(0.6, schedule="one_shot", start_epoch=2, verbose=False)
    quant = _guarded_callback()
    probe = ZerosAtEpochStart()
    trainer = _trainer(tmp_path, [prune, quant, probe], max_epochs=4, limit_train_batches=30, limit_val_batches=4)
    with pytest.warns(UserWarning, match=r"with the weights, BatchNorm statistics and activation ranges of the last accepted validation put back") as caught:
        trainer.fit(_GuardedByBits(), OrderedDigits())
    assert quant.compression_summary()["locked_bits"] == 8
    assert probe.revived == [0, 0, 0, 0]
    assert not [w for w in caught if "pruned weights were non-zero" in str(w.message)]
    assert prune.sparsity == pytest.approx(0.6, abs=1e-3)


def test_a_rollback_after_channel_removal_rolls_back_the_width_and_says_why_the_weights_stay(tmp_path) -> None:
    """The copy of the last accepted model had the shapes from before a channel removal; restoring it crashed the
    fit in on_validation_end."""
    from lightning_compress import PruningCallback

    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=1, structure="channel", shrink=True, shrink_epoch=3, verbose=False)
    quant = _guarded_callback({0: 8, 3: 2})
    trainer = _trainer(tmp_path, [prune, quant], max_epochs=4, limit_train_batches=6, limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"rolling back from 2 to 8 bits and stopping the lowering; the weights stay as trained "
                      r"\(its copy of the last accepted model no longer fits the layers, which changed since"):
        trainer.fit(module := _GuardedByBits(), OrderedDigits())
    assert quant.compression_summary()["locked_bits"] == 8 and module.model[1].out_features == 16


class _GuardedBySparsity(_GuardedByBits):
    """``guarded`` also falls when more than 40% of the Linear weights are zero."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ClassifierModule.validation_step(self, batch, batch_idx)
        weights = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        bits = min(int(m.quantizer.bits) for m in fake_quant_layers(self).values())
        self.log("guarded", 0.5 if zeros > 0.4 or bits < 8 else 0.9)


@pytest.mark.parametrize("lowered_at", [3, 2], ids=["trips-a-validation-later", "trips-at-the-same-validation"])
@pytest.mark.parametrize("quant_first", [True, False])
def test_two_guards_give_back_the_model_both_accepted_whatever_their_order(tmp_path, quant_first: bool, lowered_at: int) -> None:
    """Listed before the pruning guard, the quantisation guard copied a validation that pruning then rejected, and its
    later rollback brought that model back: 60% zeros where the pruning guard had stopped at 30%. Tripping at the same
    validation, the pruning guard's copy took the restored weights after its rejected masks zeroed them (60% again)."""
    from lightning_compress import PruningCallback

    seen = _Validations()
    prune = PruningCallback(0.6, schedule={1: 0.3, 2: 0.6}, monitor="guarded", max_drop=0.01, verbose=False)
    quant = _guarded_callback({0: 8, lowered_at: 2})
    plugins = [quant, prune] if quant_first else [prune, quant]
    trainer = _trainer(tmp_path, [seen, *plugins], max_epochs=lowered_at + 1, limit_train_batches=6, limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"PruningCallback accuracy guard"):
        trainer.fit(module := _GuardedBySparsity(), OrderedDigits())
    assert quant.compression_summary()["locked_bits"] == 8 and prune.sparsity == pytest.approx(0.3, abs=0.01)
    for name, value in module.state_dict().items():  # validation 1's model: the last both guards accepted
        assert torch.equal(value, seen.seen[1][1][name]), name


def test_the_copy_is_kept_only_while_the_guard_can_trip(tmp_path) -> None:
    """A guard beside one width can never trip, yet every accepted validation copied the weights into memory and into
    each checkpoint; and the copy outlived the fit, beside the converted model."""

    class Held(Callback):
        def __init__(self, quant: QuantizeCallback) -> None:
            self.quant, self.held = quant, []

        def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if not trainer.sanity_checking:
                self.held.append(self.quant.state_dict()["accepted"] is not None)

    with pytest.warns(UserWarning, match="there is no lowering to stop or roll back"):
        constant = QuantizeCallback(weight_bits=8, monitor="guarded", max_drop=0.01, latency="none", convert_on_fit_end=False)
    lowering = QuantizeCallback(weight_bits={0: 8, 1: 6}, monitor="guarded", max_drop=0.5, latency="none", convert_on_fit_end=False)
    for quant, expected in ((constant, [False, False]), (lowering, [True, True])):
        held = Held(quant)
        _trainer(tmp_path, [quant, held], max_epochs=2, limit_train_batches=4, limit_val_batches=2).fit(_GuardedByBits(), OrderedDigits())
        assert held.held == expected
        assert quant.state_dict()["accepted"] is None  # dropped at the end of fit
