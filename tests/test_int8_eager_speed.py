"""The eager paths of the converted layers: what each call runs, and that every path gives the same numbers.

``Int8Linear`` called eagerly quantises its input in place on one fresh tensor and dequantises its
int32 product with one fused multiply-add; under ``torch.compile``/``torch.export`` it keeps the
out-of-place formula inductor fuses. The integer product is ``torch._int_mm`` on the CPU at every row
count (no row threshold: measured, it beats every alternative at 1 row as at 64), and the float64
fallback where ``_int_mm`` has no kernel. A weight-only Linear ``LowBitLayer`` calls ``F.linear`` on
its cached weight, as ``nn.Linear`` does. Speed is measured in docs/quantization.md, never asserted
here; these tests pin the dispatch and the arithmetic.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate
from fake_device import FakeAccelerator, to_accelerator, to_cpu
from torch import nn

from lightning_compress.models import MLP
from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant
from lightning_compress.quantization.int8_linear import Int8Linear
from lightning_compress.quantization.lowbit import LowBitLayer


def _reference_int8(x: torch.Tensor, in_scale: torch.Tensor, in_zero: torch.Tensor) -> torch.Tensor:
    """The input quantisation as the fake-quant layer and the traced path write it."""
    return torch.clamp(torch.round(x / in_scale) + in_zero, -128, 127).to(torch.int8)


class _IntMMSpy:
    """Records the int8 inputs of every ``torch._int_mm`` call, then runs the real kernel."""

    def __init__(self, real: Callable[..., torch.Tensor]) -> None:
        self.real = real
        self.inputs: list[torch.Tensor] = []

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.inputs.append(a.clone())
        return self.real(a, b)


@pytest.fixture
def int_mm_spy(monkeypatch: pytest.MonkeyPatch) -> _IntMMSpy:
    spy = _IntMMSpy(torch._int_mm)
    monkeypatch.setattr(torch, "_int_mm", spy)
    return spy


def _converted(net: nn.Module, x: torch.Tensor, settings: QuantSettings) -> tuple[nn.Module, nn.Module]:
    """(fake-quant model calibrated on ``x``, its converted copy)."""
    prepare_fake_quant(net, settings)
    calibrate(net, x)
    return net, convert_fake_quant(net)


def _int8_layer(in_features: int, out_features: int, seed: int = 0) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    m = Int8Linear(in_features, out_features)
    m.weight_t.copy_(torch.randint(-127, 128, (in_features, out_features), dtype=torch.int8, generator=g))
    m.affine.copy_(torch.stack([torch.rand(out_features, generator=g) * 1e-3 + 1e-4, torch.randn(out_features, generator=g)]))
    m.input_qparams.copy_(torch.tensor([0.05, -3.0]))
    return m


@pytest.fixture(scope="module")
def lenet() -> dict[str, Any]:
    """LeNet-300-100 as the library converts it: int8 inputs and weights, and weight-only int8."""
    torch.manual_seed(0)
    float_net = MLP(784, (300, 100), 10).eval()
    x = torch.rand(256, 1, 28, 28)
    fq8, int8 = _converted(copy.deepcopy(float_net), x, QuantSettings(bits=8))
    fqw, w8 = _converted(copy.deepcopy(float_net), x, QuantSettings(bits=8, activation_bits=None))
    return {"float": float_net, "fq_int8": fq8, "int8": int8, "fq_w8": fqw, "w8": w8}


# ------------------------------------------------------------------------------------------ Int8Linear
@pytest.mark.parametrize("rows", [1, 2, 16, 17, 64])
def test_lenet_int8_eager_agrees_with_fake_quant_at_every_row_count(lenet: dict[str, Any], rows: int) -> None:
    """Both sides of any row count the CPU or CUDA rules care about (16/17), one row included."""
    x = torch.rand(rows, 1, 28, 28)
    with torch.no_grad():
        ref, out = lenet["fq_int8"](x), lenet["int8"](x)
    assert out.shape == (rows, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # the tolerance of the conversion tests
    for row in range(rows):  # no batch-size-dependent numerics: a row alone gives what it gives in the batch
        with torch.no_grad():
            torch.testing.assert_close(lenet["int8"](x[row : row + 1]), out[row : row + 1], atol=0, rtol=0)


def test_lenet_int8_runs_int_mm_on_every_layer_at_one_and_64_rows(lenet: dict[str, Any], int_mm_spy: _IntMMSpy) -> None:
    """The dispatch on the CPU: ``torch._int_mm`` for every layer and row count, with exactly the int8
    values of the reference quantisation (no padding, no other kernel at one row)."""
    model = lenet["int8"]
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(784, 300), (300, 100), (100, 10)]
    for rows in (1, 64):
        int_mm_spy.inputs.clear()
        x = torch.rand(rows, 1, 28, 28)
        inputs: list[torch.Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone())) for m in layers]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        assert len(int_mm_spy.inputs) == 3
        for layer, seen, xq in zip(layers, inputs, int_mm_spy.inputs):
            assert xq.shape == (rows, layer.in_features) and xq.dtype == torch.int8
            s, z = layer.input_qparams
            assert torch.equal(xq, _reference_int8(seen.reshape(rows, -1), s, z))


def test_eager_quantisation_is_bit_exact_at_ties_and_out_of_range(int_mm_spy: _IntMMSpy) -> None:
    """Halfway values round to even and out-of-range values clamp, as in the fake-quant layer."""
    layer = _int8_layer(12, 10)
    layer.input_qparams.copy_(torch.tensor([0.0625, -3.0]))  # a power of two: x / s is exact
    s, z = layer.input_qparams
    halves = (torch.arange(-20, 20, dtype=torch.float32) + 0.5) * s  # exactly k + 0.5 steps
    x = torch.cat([halves, torch.tensor([-1e6, 1e6, 0.0, -0.0, 6.3, -6.5, 6.4, -6.45])]).reshape(-1, 12)
    assert ((x / s).frac().abs() == 0.5).sum() >= 40
    with torch.no_grad():
        layer(x)
    assert torch.equal(int_mm_spy.inputs[-1], _reference_int8(x, s, z))
    assert int_mm_spy.inputs[-1].min() == -128 and int_mm_spy.inputs[-1].max() == 127


def test_eager_quantisation_divides_as_the_reference_near_halfway_points(int_mm_spy: _IntMMSpy) -> None:
    """Inputs within a few ulps of ``(k + 0.5) s`` for a scale that is no power of two: where ``x / s``
    and ``x * (1 / s)`` round to different integers, the layer must give the division's."""
    layer = _int8_layer(12, 10)
    s, z = layer.input_qparams  # 0.05
    mid = (torch.arange(-60, 60, dtype=torch.float32) + 0.5) * s
    near, up, down = [mid], mid, mid
    for _ in range(3):  # three ulps either side
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(float("-inf")))
        near += [up, down]
    x = torch.cat(near)
    x = x[: x.numel() // 12 * 12].reshape(-1, 12)
    by_reciprocal = torch.clamp(torch.round(x * (1 / s)) + z, -128, 127).to(torch.int8)
    reference = _reference_int8(x, s, z)
    assert not torch.equal(by_reciprocal, reference)  # the inputs tell the two apart
    with torch.no_grad():
        layer(x)
    assert torch.equal(int_mm_spy.inputs[-1], reference)


@pytest.mark.parametrize("shape", [(1, 12), (3, 12), (2, 5, 12), (12,), (40, 12), (0, 12)])
def test_eager_path_equals_traced_path_and_fallback(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
    """One row, a 3-D and a 1-D input, no rows, a 10-wide output: the eager path, the traced
    (compile/export) formula and the float64 fallback give the same numbers."""
    layer = _int8_layer(12, 10)
    x = torch.randn(*shape) * 3
    with torch.no_grad():
        eager = layer(x)
        traced = layer._traced_forward(x)
        monkeypatch.setattr(Int8Linear, "force_fallback", True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fallback = layer(x)
    assert eager.shape == traced.shape == fallback.shape == (*shape[:-1], 10)
    torch.testing.assert_close(fallback, eager, atol=0, rtol=0)  # same integers, same epilogue
    torch.testing.assert_close(traced, eager, atol=0, rtol=0)


def test_traced_path_is_what_compile_runs() -> None:
    """Under ``torch.compile`` the layer takes the out-of-place formula (here the ``eager`` backend, so
    the test needs no C++ compiler); the result is the eager one."""
    torch._dynamo.reset()
    model = nn.Sequential(_int8_layer(12, 16), nn.ReLU(), _int8_layer(16, 10, seed=1))
    x = torch.randn(5, 12)
    calls: list[int] = []
    real = Int8Linear._traced_forward

    def counting(self: Int8Linear, input: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(self, input)

    with torch.no_grad():
        eager = model(x)
        assert not calls  # eager calls never take the traced path
        Int8Linear._traced_forward = counting  # type: ignore[method-assign]
        try:
            compiled = torch.compile(model, backend="eager", fullgraph=False)(x)
        finally:
            Int8Linear._traced_forward = real  # type: ignore[method-assign]
            torch._dynamo.reset()
    assert calls  # traced while compiling
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def test_accelerator_without_int_mm_falls_back_once_per_layer() -> None:
    """A device with no ``_int_mm`` kernel takes the float64 fallback, with the host's numbers."""
    layer = _int8_layer(12, 10)
    x = torch.randn(3, 12)
    with torch.no_grad():
        host = layer(x)
        with FakeAccelerator():
            on_device = copy.deepcopy(layer).to("meta")
            with pytest.warns(UserWarning, match="no kernel for meta"):
                out = on_device(to_accelerator(x))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                again = on_device(to_accelerator(x))
        torch.testing.assert_close(to_cpu(out), host, atol=0, rtol=0)
        torch.testing.assert_close(to_cpu(again), host, atol=0, rtol=0)


def test_eager_path_keeps_dtype_layout_and_autograd() -> None:
    """bf16 inputs give bf16 outputs with the traced path's values; a non-contiguous input and an input
    that requires grad (in-place ops on a fresh tensor only) work."""
    layer = _int8_layer(12, 10)
    x = torch.randn(4, 12)
    with torch.no_grad():
        out16 = layer(x.bfloat16())
        assert out16.dtype == torch.bfloat16
        torch.testing.assert_close(out16, layer._traced_forward(x.bfloat16()), atol=0, rtol=0)
        wide = torch.randn(12, 4).t()  # (4, 12), not contiguous
        torch.testing.assert_close(layer(wide), layer(wide.contiguous()), atol=0, rtol=0)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)  # the integer path has no gradient; it must not fail on the in-place ops
    assert not y.requires_grad
    torch.testing.assert_close(y, layer(x).detach(), atol=0, rtol=0)
    assert torch.equal(xg, x)  # the input is never written


def test_eager_path_follows_changes_of_the_stored_buffer() -> None:
    layer = _int8_layer(12, 10)
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = layer(x)
        layer.affine[1].add_(1.0)  # in place: a new version of ``packed``
        torch.testing.assert_close(layer(x), before + 1.0)
        layer.packed = layer.packed.clone()  # replaced
        torch.testing.assert_close(layer(x), before + 1.0)
        swapped = torch.func.functional_call(layer, {"packed": torch.zeros_like(layer.packed)}, (x,))
        assert torch.equal(swapped, torch.zeros_like(swapped))


# ------------------------------------------------------------------------------------------ LowBitLayer
@pytest.mark.parametrize("rows", [1, 64])
def test_weight_only_linear_is_f_linear_on_the_cached_weight(lenet: dict[str, Any], rows: int) -> None:
    model = lenet["w8"]
    layers = [m for m in model.modules() if isinstance(m, LowBitLayer)]
    assert len(layers) == 3 and all(m.spec["bits"] == 8 and m.spec["activation_bits"] is None for m in layers)
    x = torch.rand(rows, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        h = x.flatten(1)
        for i, layer in enumerate(layers):
            h = F.linear(h, layer.weight, layer.bias)
            h = torch.relu(h) if i < 2 else h
        torch.testing.assert_close(out, h, atol=0, rtol=0)
        torch.testing.assert_close(out, lenet["fq_w8"](x), atol=1e-5, rtol=1e-5)


def test_lowbit_layers_off_the_fast_path_are_unchanged() -> None:
    """Inputs quantised by a LowBitLayer (4-bit weights, int8 inputs), a half-precision input and a conv
    keep their general path."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(6, 12)
    fq, q = _converted(net, x, QuantSettings(bits=4, activation_bits=8))
    assert isinstance(q[0], LowBitLayer)
    with torch.no_grad():
        torch.testing.assert_close(q(x), fq(x), atol=1e-5, rtol=1e-5)
        w8 = _converted(nn.Sequential(nn.Linear(12, 10)), x, QuantSettings(bits=8, activation_bits=None))[1]
        half = copy.deepcopy(w8).half()(x.half())
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), w8(x), atol=2e-2, rtol=2e-2)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    img = torch.randn(2, 3, 8, 8)
    fqc, qc = _converted(conv, img, QuantSettings(bits=8, activation_bits=None))
    with torch.no_grad():
        torch.testing.assert_close(qc(img), fqc(img), atol=1e-5, rtol=1e-5)
