"""Device placement without a GPU: masks and int8 layers on a stand-in accelerator (``fake_device``).

On CUDA, channel pruning crashed with ``expected self and mask to be on the same device, but got mask
on cpu and self on cuda:0`` (the callback makes its keep-vectors in ``setup``, before Lightning moves
the model to the GPU), and a converted int8 model with a 10-wide layer crashed in ``torch._int_mm``.
Here the accelerator is ``fake_device``: real CPU arithmetic on tensors that say they are elsewhere,
and an error whenever an op mixes them with CPU tensors, as CUDA raises.
"""

from __future__ import annotations

import copy
import re
import types
import warnings

import pytest
import torch
from conftest import calibrate
from fake_device import FakeAccelerator, on_accelerator, to_accelerator, to_cpu
from torch import nn

from lightning_compress.measure import device_of
from lightning_compress.pruning.channel_masks import channel_masks, expand_channel_mask
from lightning_compress.pruning.mask_storage import pack_mask, unpack_mask
from lightning_compress.pruning.masks import (
    apply_masks,
    mask_gradients,
    nm_masks,
    unstructured_masks,
    zero_optimizer_state,
)
from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant
from lightning_compress.quantization.convert import Int8Linear


# ---------------------------------------------------------------------------------------- the harness
def test_harness_raises_like_cuda_on_mixed_devices() -> None:
    with FakeAccelerator():
        s = to_accelerator(torch.rand(8))
        with pytest.raises(RuntimeError, match="same device"):
            s.masked_fill(torch.ones(8, dtype=torch.bool), 0.0)
        assert on_accelerator(torch.zeros(3, device=s.device))  # a factory given the tensor's device
        assert not on_accelerator(torch.zeros(3))  # ... and one given none: the host
        assert on_accelerator(s * torch.tensor(2.0))  # 0-dim host tensors pass as scalars, as on CUDA
        with pytest.raises((TypeError, RuntimeError)):  # no host view of device memory
            s.numpy()


# ---------------------------------------------------------------------------------------------- masks
def _scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.rand(6, 8, generator=g), "b": torch.rand(4, 8, generator=g)}


def _held(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks in force, one entry already pruned per tensor (made on the host, as a callback's are)."""
    out = {}
    for n, s in scores.items():
        m = torch.ones_like(s, dtype=torch.bool)
        m.view(-1)[3] = False
        out[n] = m
    return out


def _element_masks(kind: str, scores, current, scope: str):
    if kind == "unstructured":
        return unstructured_masks(scores, {n: 0.5 for n in scores}, scope, current)
    return nm_masks(scores, 2, 4, {n: 0.5 for n in scores}, scope, current)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("kind", ["unstructured", "nm"])
def test_element_masks_follow_the_scores_device(kind: str, scope: str) -> None:
    scores = _scores()
    expected = _element_masks(kind, scores, _held(scores), scope)  # all on the host
    with FakeAccelerator():
        got = _element_masks(kind, {n: to_accelerator(s) for n, s in scores.items()}, _held(scores), scope)
        assert all(on_accelerator(m) for m in got.values())
        for n in scores:
            assert torch.equal(to_cpu(got[n]), expected[n])
        # masks in force on the accelerator, scores on the host: host masks
        back = _element_masks(kind, scores, {n: to_accelerator(m) for n, m in _held(scores).items()}, scope)
        assert not any(on_accelerator(m) for m in back.values())
        for n in scores:
            assert torch.equal(back[n], expected[n])


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("round_to", [None, 2])
def test_channel_masks_with_keep_vectors_made_before_the_move(scope: str, round_to: int | None) -> None:
    """The CUDA crash: scores on the GPU, keep-vectors in force still on the host."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, generator=g), torch.rand(6, generator=g)]
    current = [torch.ones(8, dtype=torch.bool), torch.ones(6, dtype=torch.bool)]
    current[0][2] = False
    expected = channel_masks(scores, [0.5, 0.5], scope, current, round_to)
    with FakeAccelerator():
        got = channel_masks([to_accelerator(s) for s in scores], [0.5, 0.5], scope, current, round_to)
        assert all(on_accelerator(k) for k in got)
        assert [to_cpu(k).tolist() for k in got] == [k.tolist() for k in expected]
        assert not bool(to_cpu(got[0])[2])  # pruned channels stay pruned


def test_global_selection_across_devices_returns_each_mask_on_its_own() -> None:
    """A model split over devices: one ranking, each mask back on its tensor's device."""
    scores = _scores()
    with FakeAccelerator():
        mixed = {"a": scores["a"], "b": to_accelerator(scores["b"])}
        masks = unstructured_masks(mixed, {"a": 0.5, "b": 0.5}, "global")
        assert not on_accelerator(masks["a"]) and on_accelerator(masks["b"])
        expected = unstructured_masks(scores, {"a": 0.5, "b": 0.5}, "global")
        assert torch.equal(to_cpu(masks["b"]), expected["b"]) and torch.equal(masks["a"], expected["a"])
        nm = nm_masks(mixed, 2, 4, {"a": 0.5, "b": 0.5}, "global")
        assert not on_accelerator(nm["a"]) and on_accelerator(nm["b"])
        keep = channel_masks([scores["a"][:, 0], to_accelerator(scores["b"][:, 0])], [0.5, 0.5], "global")
        assert not on_accelerator(keep[0]) and on_accelerator(keep[1])


def test_applying_masks_and_zeroing_state_with_host_masks() -> None:
    with FakeAccelerator():
        w = to_accelerator(torch.ones(4, 8))
        grad = to_accelerator(torch.ones(4, 8))
        momentum = to_accelerator(torch.ones(4, 8))
        mask = torch.ones(4, 8, dtype=torch.bool)
        mask[0] = False
        params = {"w": w}
        apply_masks(params, {"w": mask})
        w.grad = grad
        mask_gradients(params, {"w": mask})
        opt = types.SimpleNamespace(state={w: {"momentum_buffer": momentum, "step": torch.tensor(3.0)}})
        zero_optimizer_state([opt], params, {"w": mask})
        for t in (w, grad, momentum):
            assert on_accelerator(t) and to_cpu(t)[0].sum() == 0 and to_cpu(t)[1:].all()
        full = expand_channel_mask(to_accelerator(torch.tensor([True, False, True, True])), (4, 8))
        assert on_accelerator(full) and to_cpu(full).sum() == 24


def test_unpack_mask_from_bits_on_the_accelerator() -> None:
    """A checkpoint loaded with ``map_location`` onto the GPU holds its packed bits there."""
    mask = torch.rand(5, 7) > 0.5
    packed = pack_mask(mask)
    with FakeAccelerator():
        moved = {**packed, "bits": to_accelerator(packed["bits"])}
        assert torch.equal(unpack_mask(moved), mask)
        on_device = unpack_mask(packed, device=torch.device("meta"))
        assert on_accelerator(on_device) and torch.equal(to_cpu(on_device), mask)


# ----------------------------------------------------------------------------------------- Int8Linear
def _int8_layer(in_features: int, out_features: int) -> Int8Linear:
    g = torch.Generator().manual_seed(0)
    m = Int8Linear(in_features, out_features)
    m.weight_t.copy_(torch.randint(-128, 128, (in_features, out_features), dtype=torch.int8, generator=g))
    m.affine.copy_(torch.randn(2, out_features, generator=g))
    m.input_qparams.copy_(torch.tensor([0.05, 3.0]))
    return m


@pytest.mark.parametrize(
    ("device", "rows", "k", "n", "match"),
    [
        ("cpu", 1, 5, 10, None),
        ("cuda", 64, 64, 64, None),
        ("cuda", 17, 8, 8, None),
        ("cuda", 64, 64, 10, r"output width \(10\) to be a multiple of 8"),
        ("cuda", 64, 12, 16, r"input width \(12\) to be a multiple of 8"),
        ("cuda", 16, 64, 64, r"more than 16 rows \(got 16\)"),
        ("cuda", 1, 12, 10, r"more than 16 rows.*input width.*output width"),
        ("mps", 64, 64, 64, "no kernel for mps"),
    ],
)
def test_int_mm_rules(device: str, rows: int, k: int, n: int, match: str | None) -> None:
    reason = Int8Linear.int_mm_unsupported(torch.device(device), rows, k, n)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and re.search(match, reason), reason


@pytest.mark.parametrize("shape", [(3, 12), (2, 5, 12), (40, 12)])
def test_int8_fallback_forward_equals_int_mm(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
    """The fallback the forward runs gives exactly the ``torch._int_mm`` result (10-wide output)."""
    layer = _int8_layer(12, 10)
    x = torch.randn(*shape) * 3
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setattr(Int8Linear, "force_fallback", True)
        with pytest.warns(UserWarning, match=r"in_features=12, out_features=10\): Int8Linear.force_fallback"):
            slow = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per layer
            again = layer(x)
    assert slow.shape == fast.shape == (*shape[:-1], 10)
    torch.testing.assert_close(slow, fast, atol=0, rtol=0)
    torch.testing.assert_close(again, fast, atol=0, rtol=0)


def test_int8_fallback_under_bf16_autocast() -> None:
    """bf16-mixed: autocast must not round the integer product to bf16."""
    layer = _int8_layer(64, 10)
    x = torch.randn(20, 64)
    xq = torch.randint(-128, 128, (20, 64), dtype=torch.int8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(Int8Linear.int_matmul_fallback(xq, layer.weight_t), torch._int_mm(xq, layer.weight_t))
        y = layer(x)
    assert y.shape == (20, 10)


def test_converted_model_runs_on_an_accelerator_without_int_mm() -> None:
    """A whole conversion (a bias-free 10-class head included) on a device with no ``_int_mm`` kernel:
    every tensor stays on the device, one warning per layer, the same outputs as on the host."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10, bias=False))
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=8))
    x = torch.randn(32, 12)
    calibrate(net, x)
    host = convert_fake_quant(net)
    assert {v["format"] for v in host.quantization_spec.values()} == {"int8_linear"}
    with torch.no_grad(), FakeAccelerator():
        device_net = copy.deepcopy(net).to("meta")
        converted = convert_fake_quant(device_net)  # Int8Linear.from_layer on the device
        assert all(on_accelerator(b) for b in converted.buffers())
        with pytest.warns(UserWarning, match="no kernel for meta") as record:
            out = converted(to_accelerator(x))
        assert len([w for w in record if "Int8Linear" in str(w.message)]) == 2
        assert on_accelerator(out)
        torch.testing.assert_close(to_cpu(out), host(x), atol=0, rtol=0)


def test_device_of_a_converted_model_is_where_its_buffers_are() -> None:
    """A converted int8 model has no parameters: the report must not take it for a CPU model (it then ran
    a GPU model on CPU inputs) but copy it to the CPU to measure it."""
    model = nn.Sequential(Int8Linear(8, 10), nn.ReLU()).to("meta")
    assert list(model.parameters()) == []
    assert device_of(model) == torch.device("meta")
    assert device_of(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")
