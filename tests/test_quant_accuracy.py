"""The converted (real low-bit) model against the FLOAT original, and a distillation teacher under quantisation.

Tolerances, measured on the digits test split (540 samples) after 3 short float epochs, with a wide margin:
8-bit weights (with or without 8-bit activations) stay within 1.1% relative L2 error of the float logits
and agree on every prediction; 4-bit weight-only within 13% and 90% agreement. The bounds below are about
3x looser, still far from what a wrong scale, zero point, transposition or BatchNorm fold gives (~100%).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from lightning_compress import ClassifierModule, DigitsDataModule, DistillationModule
from lightning_compress.models import MLP, LeNet5, ResCNN
from lightning_compress.quantization import (
    QuantizeCallback,
    QuantSettings,
    convert_fake_quant,
    prepare_fake_quant,
    strip_fake_quant,
)

# (relative L2 error of the logits at most, fraction of equal predictions at least)
TOLERANCE = {8: (0.03, 0.98), 4: (0.3, 0.8)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_intra_op_thread: None) -> None:
    """Every test of this file runs with one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _trainer(root: Path, callbacks: list, max_epochs: int, **kw: Any) -> Trainer:
    return Trainer(max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs(root, **{"limit_val_batches": 1, **kw}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits: DigitsDataModule) -> dict[str, ClassifierModule]:
    """Float MLP and ResCNN (BatchNorm) classifiers, 3 short epochs (20 batches of 32) on digits."""
    out = {}
    for name, net in (("mlp", lambda: MLP(64, (48,), 10)), ("rescnn", lambda: ResCNN(width=8))):
        seed_everything(0)
        module = ClassifierModule(net())
        _trainer(tmp_path_factory.mktemp(name), [], 3, limit_train_batches=20).fit(module, digits)
        out[name] = module
    return out


def agreement(quantized: nn.Module, float_model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        q, f = quantized(x), float_model.eval()(x)
    assert q.shape == f.shape
    return float((q - f).norm() / f.norm()), float((q.argmax(1) == f.argmax(1)).float().mean())


@pytest.mark.parametrize(
    ("arch", "bits", "activation_bits", "backend"),
    [
        ("mlp", 8, 8, "auto"),  # static int8 Linear
        ("mlp", 8, 8, "torchao"),  # torchao dynamic-activation int8
        ("mlp", 4, None, "auto"),  # packed low-bit, weight-only
        ("rescnn", 8, 8, "auto"),  # convs with BatchNorm folded into the scales
        ("rescnn", 4, None, "auto"),
    ],
)
def test_ptq_converted_model_agrees_with_the_float_original(
    tmp_path: Path, digits: DigitsDataModule, trained: dict, arch: str, bits: int, activation_bits: int | None, backend: str
) -> None:
    original = copy.deepcopy(trained[arch].model).eval()  # never touched by the callback
    module = copy.deepcopy(trained[arch])
    cb = QuantizeCallback(
        method="ptq", weight_bits=bits, activation_bits=activation_bits, backend=backend, calibration_batches=8, latency="none"
    )
    _trainer(tmp_path, [cb], 1).fit(module, digits)
    assert cb.quantized_model is not None
    if arch == "rescnn":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in cb.quantized_model.modules())  # folded
    x, y = digits.test_set.tensors
    rel_err, agree = agreement(cb.quantized_model, original, x)
    max_err, min_agree = TOLERANCE[bits]
    assert rel_err <= max_err, f"relative L2 error {rel_err:.4f} > {max_err}"
    assert agree >= min_agree, f"agreement {agree:.3f} < {min_agree}"
    assert rel_err > 0, "the converted model computes with quantised weights, not the float ones"
    if bits == 8:
        with torch.no_grad():
            acc_q = float((cb.quantized_model(x).argmax(1) == y).float().mean())
            acc_f = float((original(x).argmax(1) == y).float().mean())
        assert acc_q >= acc_f - 0.02


def test_qat_converted_model_agrees_with_its_float_weights(tmp_path: Path, digits: DigitsDataModule, trained: dict) -> None:
    module = copy.deepcopy(trained["mlp"])
    cb = QuantizeCallback(weight_bits=8, latency="none")
    _trainer(tmp_path, [cb], 1, limit_train_batches=10).fit(module, digits)
    float_weights = copy.deepcopy(module.model)  # the trained weights, computing in float
    strip_fake_quant(float_weights)
    assert not any(torch.equal(a, b) for a, b in zip(float_weights.parameters(), trained["mlp"].model.parameters()))
    x = digits.test_set.tensors[0]
    rel_err, agree = agreement(cb.quantized_model, float_weights, x)
    assert 0 < rel_err <= TOLERANCE[8][0] and agree >= TOLERANCE[8][1]


@pytest.mark.parametrize(("arch", "bits"), [("mlp", 8), ("mlp", 4), ("rescnn", 8)])
def test_convert_fake_quant_agrees_with_the_float_original(digits: DigitsDataModule, trained: dict, arch: str, bits: int) -> None:
    """The pure function, no Trainer: weight-only fake quantisation needs no calibration."""
    original = copy.deepcopy(trained[arch].model).eval()
    prepared = copy.deepcopy(original)
    layers = prepare_fake_quant(prepared, QuantSettings(bits=bits, activation_bits=None))
    assert layers
    converted = convert_fake_quant(prepared)
    assert converted is not prepared and not converted.training
    x = digits.test_set.tensors[0]
    rel_err, agree = agreement(converted, original, x)
    max_err, min_agree = TOLERANCE[bits]
    assert 0 < rel_err <= max_err and agree >= min_agree
    # and it computes what the fake-quantised model computes
    with torch.no_grad():
        torch.testing.assert_close(converted(x), prepared.eval()(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- a distillation teacher


@pytest.mark.parametrize("quantize_teacher", [False, True])
def test_teacher_weights_unchanged_under_quantisation(tmp_path: Path, digits: DigitsDataModule, quantize_teacher: bool) -> None:
    seed_everything(0)
    module = DistillationModule(MLP(64, (16,), 10), LeNet5(image_size=8))
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    teacher_types = [type(m) for m in module.teacher.modules()]
    cb = QuantizeCallback(weight_bits=4, latency="none", quantize_teacher=quantize_teacher)
    _trainer(tmp_path, [cb], 2, limit_train_batches=4).fit(module, digits)
    after = module.teacher.state_dict()
    assert list(after) == list(teacher_before)
    for k, v in teacher_before.items():
        assert torch.equal(after[k], v), k  # frozen: not trained, not rounded in place, not moved
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())  # the student trained
    quantised = set(cb.compression_summary()["bits_per_layer"])
    on_teacher = {n for n in quantised if n.startswith("teacher.")}
    if quantize_teacher:
        assert on_teacher  # asked for: the teacher computes fake-quantised, its stored weights still the same
    else:
        assert not on_teacher and quantised
        assert [type(m) for m in module.teacher.modules()] == teacher_types


def test_a_module_the_student_shares_with_its_teacher_is_left_alone(tmp_path: Path, digits: DigitsDataModule) -> None:
    """A frozen head shared by student and teacher (`student.head = teacher.head`, as the docs allow) is listed first
    under the student's name: pruning zeroed half of it and QAT replaced it, changing the teacher's logits (0.12 off)
    in silence. It is left alone as the teacher is; teacher_dtype with a shared module is refused at construction."""
    from lightning_compress import PruningCallback

    seed_everything(0)
    teacher, student = MLP(64, (16,), 10), MLP(64, (16,), 10)
    student.net[3] = teacher.net[3].requires_grad_(False)
    module = DistillationModule(student, teacher)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    x = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        logits = teacher(x)
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=0, verbose=False)
    quant = QuantizeCallback(weight_bits=4, latency="none")
    with pytest.warns(UserWarning, match=r"left alone: \['student.net.3.weight'\].*which the teacher holds too"):
        _trainer(tmp_path, [prune, quant], 2, limit_train_batches=4).fit(module, digits)
    assert all(torch.equal(module.teacher.state_dict()[k], v) for k, v in before.items())
    assert type(module.teacher.net[3]) is nn.Linear and module.student.net[3] is module.teacher.net[3]
    with torch.no_grad():
        assert torch.equal(module.teacher(x), logits)
    assert set(quant.compression_summary()["bits_per_layer"]) == {"student.net.1"}
    assert float((module.student.net[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match=r"teacher_dtype='bfloat16' casts the teacher's tensors, and the student shares 2 of them \(e.g. \['net.3.weight', 'net.3.bias'\]\)"):
        DistillationModule(student, teacher, teacher_dtype="bfloat16")
    # a weight tied alone (two module objects) is the teacher's too; a parameter-less module shared is nothing to refuse
    tied_student = MLP(64, (16,), 10)
    tied_student.net[3].weight = teacher.net[3].weight
    tied = DistillationModule(tied_student, teacher)
    assert "student.net.3" not in select_layers_names(tied) and "student.net.1" in select_layers_names(tied)
    relu_shared = MLP(64, (16,), 10)
    relu_shared.net[2] = teacher.net[2]
    DistillationModule(relu_shared, teacher, teacher_dtype="bfloat16")
    # quantize_teacher=True quantises the shared layer with the teacher's
    assert "student.net.3" in select_layers_names(module, quantize_teacher=True)
    # excluding the shared weight by name (the way out before it was left alone) still works, in silence
    from lightning_compress.pruning.masks import select_parameters

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_parameters(tied, None, [r"student\.net\.3"]) == ["student.net.1.weight"]
    with pytest.raises(ValueError, match=r"leave no weight to prune but \['student.net.3.weight'\].*which the teacher holds too"):
        select_parameters(tied, [r"student\.net\.3"], None)


def select_layers_names(module: nn.Module, quantize_teacher: bool = False) -> list[str]:
    import warnings

    from lightning_compress.quantization.layer_selection import select_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [n for n, _ in select_layers(module, quantize_teacher=quantize_teacher)]
