"""QuantizeCallback's options as written in Python, YAML and on a command line: what they mean, and what is refused
in ``__init__``."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fit_quantize_config, trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassifierModule
from lightning_compress.quantization import QuantizeCallback, fake_quant_layers


class _BitsPerBatch(Callback):
    """The weight bits of every fake-quantised layer at each training batch (after QuantizeCallback applied them)."""

    def __init__(self) -> None:
        self.bits: list[set[int]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.bits.append({int(m.quantizer.bits) for m in fake_quant_layers(pl_module).values()})


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=8)


@pytest.mark.parametrize("schedule", [{0: 8, 1.5: 4}, {"0": 8, "1.5": 4}])
def test_a_fractional_bits_milestone_applies_within_its_epoch(tmp_path, schedule: dict) -> None:
    """``{0: 8, 1.5: 4}`` lowers the width half-way through epoch 1 (its key was truncated to 1 before); text keys, as
    YAML and JSON give them, are epochs too ("2.5" was taken for a module-name regex)."""
    seed_everything(0)
    recorder = _BitsPerBatch()
    quant = QuantizeCallback(weight_bits=schedule, latency="none")
    module = ClassifierModule(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)))
    Trainer(max_epochs=2, callbacks=[quant, recorder], **trainer_kwargs(tmp_path)).fit(module, _loader())
    assert recorder.bits == [{8}] * 4 + [{8}] * 2 + [{4}] * 2  # 4 batches an epoch: 1.5 is the third of epoch 1
    assert {e["bits"] for e in quant.quantized_model.quantization_spec.values()} == {4}


@pytest.mark.parametrize(
    ("weight_bits", "match"),
    [
        ({0: 8, -1: 4}, r"weight_bits schedule key -1 must be an epoch >= 0 \(fractional allowed, e\.g\. 2\.5\)"),
        ({"0": 8, "-1": 4}, r"weight_bits schedule key '-1' must be an epoch >= 0"),
        ({0: 8, float("inf"): 4}, r"weight_bits schedule key inf must be an epoch >= 0"),
        ({"2": 8, 2: 4}, r"weight_bits schedule keys \['2', 2\] are the same epoch 2; give each epoch once"),
        ({0: 8, "fc": 4}, r"mixes epochs and module-name regexes"),
        ({0: 8, 1.5: 9}, r"weight_bits\[1\.5\] must be an integer from 2 to 8, got 9"),
    ],
)
def test_bad_bits_schedules_are_refused_in_init(weight_bits: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizeCallback(weight_bits=weight_bits)


def test_a_fractional_milestone_in_a_yaml_config_reaches_the_schedule(tmp_path, monkeypatch) -> None:
    """The CLI typed the keys as integers and truncated ``1.5`` to ``1`` before the callback saw it."""
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    _, quant = fit_quantize_config(tmp_path, {"weight_bits": {0: 8, 1.5: 4}, "latency": "none"}, [16], max_epochs=2,
                                   limit_train_batches=2, limit_val_batches=1)
    assert quant.options.schedule.milestones() == [0.0, 1.5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": 8, "export_to": "m.onnx"}, r"export_to='m\.onnx' with granularity=8: ONNX stores one weight scale per output "
                                                     r"channel.*use granularity='per_channel' or 'per_tensor', or a \.pt2 or \.safetensors"),
        ({"granularity": "16", "weight_bits": 4, "export_to": "m.onnx"}, r"with granularity=16: ONNX stores one weight scale"),
        ({"backend": "torchao", "export_to": "m.onnx"}, r"export_to='m\.onnx': torchao layers hold tensor subclasses, which ONNX export "
                                                         r"does not take; use a \.pt2 path .* or backend='auto'"),
        ({"method": "qat", "mode": "ptq"}, r"QuantizeCallback: mode='ptq' and method='qat' set the same option \(mode is its former name\); set only method"),
        ({"method": "ptq", "mode": "qat"}, r"mode='qat' and method='ptq' set the same option \(mode is its former name\)"),
    ],
)
def test_export_and_method_combinations_are_refused_in_init(kwargs: dict, match: str) -> None:
    """Found only after training before (a failed export at the end of fit), or silently decided by the former name."""
    with pytest.raises(ValueError, match=match):
        QuantizeCallback(**kwargs)


def test_the_former_mode_alone_and_per_channel_onnx_are_still_taken() -> None:
    with pytest.warns(FutureWarning, match=r"QuantizeCallback\(mode='ptq'\) is now method='ptq'"):
        assert QuantizeCallback(mode="ptq").method == "ptq"
    assert QuantizeCallback().method == "qat" and QuantizeCallback(method="ptq").mode == "max"
    assert QuantizeCallback(granularity="per_channel", weight_bits=4, export_to="m.onnx").export_to == "m.onnx"


def test_numpy_integers_are_bits() -> None:
    quant = QuantizeCallback(weight_bits=np.int64(4))
    assert quant.weight_bits == 4 and type(quant.weight_bits) is int and quant.bits_at(0) == 4
    schedule = QuantizeCallback(weight_bits={np.int64(0): np.int64(8), np.float64(1.5): np.int32(4)})
    assert (schedule.bits_at(1), schedule.bits_at(1.5)) == (8, 4)
    assert QuantizeCallback(weight_bits={"fc": np.int64(4), ".*": 8}).options.layer_bits == {"fc": 4, ".*": 8}


@pytest.mark.parametrize(("freeze", "said"), [({"freeze_observers_epoch": 8}, True), ({"freeze_bn_epoch": 3}, True), ({"freeze_observers_epoch": 2}, False)])
def test_a_freeze_epoch_the_fit_never_reaches_is_said(tmp_path, freeze: dict, said: bool) -> None:
    """tuning.md's sweep overrides max_epochs to 6 on a config freezing the ranges at 8: nothing was frozen, silently."""
    import warnings

    quant = QuantizeCallback(latency="none", convert_on_fit_end=False, **freeze)
    trainer = Trainer(callbacks=[quant], **trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ClassifierModule(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))), _loader())
    told = [str(w.message) for w in caught if "nothing is frozen in this fit" in str(w.message)]
    key, value = next(iter(freeze.items()))
    assert told == ([f"QuantizeCallback: {key}={value} is at or after max_epochs=3; nothing is frozen in this fit. Lower it or raise max_epochs"] if said else [])
