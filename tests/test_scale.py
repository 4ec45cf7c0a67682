"""Memory and selection at scale: masks are 1 byte per weight while training and 1 bit in checkpoints,
the global threshold is found where the scores are (no concatenation, no host copy), and weight fake
quantisation builds no graph through the rounding."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from conftest import trainer_kwargs
from fake_device import FakeAccelerator, on_accelerator, to_accelerator, to_cpu
from lightning_compress.pruning.mask_storage import pack_mask, unpack_mask
from lightning_compress.pruning.masks import _kth_prune, _prune_lowest, unstructured_masks
from lightning_compress.pruning.state import PruningState
from lightning_compress.pruning.threshold import kth_smallest, lowest_k_masks
from lightning_compress.quantization.fake_quant import fake_quantize_weight, quantize_weight, dequantize_weight


def _random_scores(rng: random.Random, nan: bool) -> list[torch.Tensor]:
    out = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 60)
        t = torch.randint(0, 4, (n,)).float() if rng.random() < 0.3 else torch.randn(n)
        if rng.random() < 0.3:
            t[torch.rand(n) < 0.2] = -float("inf")  # already pruned
        if nan and rng.random() < 0.3:
            t[torch.rand(n) < 0.2] = float("nan")
        out.append(t)
    return out


@pytest.mark.parametrize("gather_limit", [1, 4, 1 << 20])
def test_lowest_k_masks_equal_a_stable_selection_of_the_concatenation(gather_limit: int) -> None:
    rng = random.Random(gather_limit)
    torch.manual_seed(gather_limit)
    for _ in range(150):
        scores = _random_scores(rng, nan=True)
        k = rng.randint(0, sum(t.numel() for t in scores))
        flat = torch.cat(scores)
        order = np.argsort(np.nan_to_num(flat.numpy(), nan=np.inf, posinf=np.finfo(np.float32).max), kind="stable")
        expected = np.ones(flat.numel(), dtype=bool)
        expected[order[:k]] = False
        got = torch.cat([m.flatten() for m in lowest_k_masks(scores, k, gather_limit=gather_limit)])
        assert got.tolist() == expected.tolist()
        assert torch.equal(got, _kth_prune(flat, k))  # the CPU path agrees, NaN included


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,), (torch.float16, torch.float32), (torch.float64,)])
def test_low_and_high_precision_scores_select_as_a_stable_sort_does(dtypes: tuple[torch.dtype, ...]) -> None:
    """bfloat16 scores with already-pruned entries (-inf) compared -inf with float32's largest number rounded to -inf:
    k=100 of 300 -inf entries pruned 300. float16 beside float32 compared in float16; float64 scores closer than
    float32's resolution were pruned as a block (k=100 pruned 5000)."""
    torch.manual_seed(0)
    if dtypes == (torch.float64,):
        scores = [(1 + torch.arange(10_000, dtype=torch.float64) * 1e-12)[torch.randperm(10_000)]]
    else:
        scores = [torch.randn(3_000).to(d) for d in dtypes]
        scores[0][:300] = -float("inf")
    flat = torch.cat([s.double() for s in scores])
    for k in (100, 300, 2_000):
        expected = np.ones(flat.numel(), dtype=bool)
        expected[np.argsort(flat.numpy(), kind="stable")[:k]] = False
        got = torch.cat([m.flatten() for m in lowest_k_masks(scores, k, gather_limit=16)])
        assert got.tolist() == expected.tolist(), k


def test_float32_beside_float64_scores_and_finite_values_below_float32_select_exactly() -> None:
    """A float32 score compared with a float64 k-th value rounded it to float32 (1.0 kept while 1 + 1e-12 went), and a
    finite float64 score below float32's range counted as -inf (k=1 pruned nothing)."""
    a, b = torch.tensor([1 + 1e-12, 1 + 1e-12, 7], dtype=torch.float64), torch.tensor([1.0, 0.5])
    assert [m.tolist() for m in lowest_k_masks([a, b], 3, gather_limit=1)] == [[False, True, True], [False, False]]
    c = torch.tensor([-1e300, -1e300, 0, 1, 2], dtype=torch.float64)
    assert kth_smallest([c], 1) == -1e300 and lowest_k_masks([c], 1, gather_limit=1)[0].tolist() == [False, True, True, True, True]


def test_kth_smallest_narrows_a_large_range_with_histograms() -> None:
    torch.manual_seed(0)
    parts = [torch.randn(300_000) * 10.0 ** e for e in (-3, 0, 2)]
    for k in (1, 12_345, 450_000, 899_999):
        expected = float(torch.sort(torch.cat(parts)).values[k - 1])
        assert kth_smallest(parts, k, gather_limit=1000) == expected


@pytest.mark.parametrize("where", ["bottom", "top"])
def test_a_k_th_value_with_many_ties_is_found_without_gathering_them(where: str, monkeypatch) -> None:
    """60% of the scores equal (exact zeros not yet in the masks): narrowing never separates them, so all of them were
    gathered and sorted, past ``gather_limit`` (3M of 4M in a larger run). Counts now find the value."""
    torch.manual_seed(0)
    spread = torch.randn(40_000).abs() * (1 if where == "bottom" else -1)  # the ties below or above the others
    scores = [spread[:25_000], torch.zeros(60_000), spread[25_000:]]
    k = 30_000 if where == "bottom" else 50_000
    flat = torch.cat(scores)
    expected = np.ones(flat.numel(), dtype=bool)
    expected[np.argsort(flat.numpy(), kind="stable")[:k]] = False
    sorted_sizes: list[int] = []
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda t, *a, **kw: sorted_sizes.append(t.numel()) or sort(t, *a, **kw))
    got = torch.cat([m.flatten() for m in lowest_k_masks(scores, k, gather_limit=1000)])
    assert got.tolist() == expected.tolist()
    assert all(n <= 1000 for n in sorted_sizes), sorted_sizes


def test_the_histogram_passes_are_deterministic_algorithms(monkeypatch) -> None:
    """``torch.histc`` raises on CUDA under ``torch.use_deterministic_algorithms`` (``Trainer(deterministic=True)``),
    which every global selection of more than ``gather_limit`` scores on a GPU ran into: the passes do not call it."""
    def refused(*args, **kwargs):
        raise RuntimeError("histc does not have a deterministic implementation (as on CUDA)")

    monkeypatch.setattr(torch, "histc", refused)
    torch.manual_seed(0)
    parts = [torch.randn(50_000) * 10.0 ** e for e in (-3, 0, 2)]
    flat = torch.cat(parts)
    with _deterministic():
        for k in (1, 12_345, 149_999):
            assert kth_smallest(parts, k, gather_limit=100) == float(torch.sort(flat).values[k - 1])


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def test_global_masks_are_chosen_on_the_accelerator_without_a_host_copy() -> None:
    torch.manual_seed(1)
    scores = {"a": torch.rand(40, 30), "b": torch.rand(25, 16)}
    expected = unstructured_masks(scores, {"a": 0.6, "b": 0.6}, "global")
    with FakeAccelerator():  # .numpy() or a CPU tensor meeting these raises here, as on CUDA
        on_dev = {n: to_accelerator(s) for n, s in scores.items()}
        got = unstructured_masks(on_dev, {"a": 0.6, "b": 0.6}, "global")
        assert all(on_accelerator(m) for m in got.values())
        assert all(torch.equal(to_cpu(got[n]), expected[n]) for n in scores)
        layer = _prune_lowest([on_dev["a"]], 100)[0]
        assert on_accelerator(layer) and int((~to_cpu(layer)).sum()) == 100


def test_masks_pack_to_numpys_bits_on_their_own_device() -> None:
    for n in (1, 7, 8, 9, 1001):
        mask = torch.rand(n) > 0.5
        assert np.array_equal(pack_mask(mask)["bits"].numpy(), np.packbits(mask.numpy()))
    mask = torch.rand(6, 5, 3) > 0.3
    with FakeAccelerator():
        packed = pack_mask(to_accelerator(mask))  # no .numpy() on the accelerator
        assert packed["bits"].device.type == "cpu" and packed["bits"].numel() == (mask.numel() + 7) // 8
        assert torch.equal(to_cpu(unpack_mask(packed, torch.device("meta"))), mask)


@pytest.mark.parametrize("large", [True, False])
def test_pruning_state_keeps_one_bool_per_weight_when_large(large: bool, monkeypatch) -> None:
    """Above FAST_MASK_BYTES the step-time masks are the bool masks (1 byte per weight); below it a copy in
    the weight's dtype is kept for the fused multiply. Either way the step zeroes exactly the pruned entries."""
    import lightning_compress.pruning.state as state_module

    monkeypatch.setattr(state_module, "FAST_MASK_BYTES", 0 if large else 1 << 30)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    state = PruningState("unstructured", params, dict(net.named_parameters()), {n: 0.5 for n in params})
    scores = {n: p.detach().abs() for n, p in params.items()}
    state.masks = unstructured_masks(scores, state.targets, "global", state.masks)
    state.apply()
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.masks.values()}
    held.update({m.untyped_storage().data_ptr(): m.untyped_storage().nbytes() for _, m in state._fast})
    weights = sum(p.numel() for p in params.values())
    assert sum(held.values()) == (weights if large else 5 * weights)  # bool only, or bool plus float32 copies
    packed = state.state_dict({})["masks"]
    assert sum(v["bits"].numel() for v in packed.values()) == sum((p.numel() + 7) // 8 for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    state.apply_fast()
    for n, p in params.items():
        assert torch.equal(p[~state.masks[n]], torch.zeros_like(p[~state.masks[n]]))
        assert torch.equal(p[state.masks[n]], before[n][state.masks[n]] + 1.0)


@pytest.mark.parametrize("granularity", ["per_channel", 16])
def test_weight_fake_quant_is_the_converted_grid_with_an_identity_gradient(granularity: object) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 32, requires_grad=True)
    out = fake_quantize_weight(w, 4, granularity)  # type: ignore[arg-type]
    q, s = quantize_weight(w, 4, granularity)  # type: ignore[arg-type]
    assert torch.equal(out.detach(), dequantize_weight(q, s, granularity))  # type: ignore[arg-type]
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_fake_quant_linear_under_bf16_autocast_rounds_once_into_bf16() -> None:
    from lightning_compress.quantization.layers import Quantizer, QuantSettings

    torch.manual_seed(0)
    quantizer = Quantizer(QuantSettings(bits=8, activation_bits=None), weight_only=True)
    w = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = quantizer.weight(w)
        y = torch.nn.functional.linear(torch.randn(4, 32), rounded)
        table = quantizer.weight(w, matmul=False)
    assert rounded.dtype == torch.bfloat16 and table.dtype == torch.float32
    assert torch.equal(rounded, fake_quantize_weight(w, 8).to(torch.bfloat16))
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


class _ScalarReads(TorchFunctionMode):
    """Records, per training step, every read of a tensor's value into Python (``bool``, ``item``,
    ``tolist``...: a device-to-host copy that makes the host wait for the GPU) made from the library's code."""

    READS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy"})

    def __init__(self, trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.steps: dict[int, set[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}lightning_compress{os.sep}" not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None:
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                self.steps.setdefault(self.trainer.global_step, set()).add(where)
        return func(*args, **(kwargs or {}))


class _RecordReads(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.mode = _ScalarReads(trainer)
        self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("plugin", ["magnitude", "wanda", "qat", "qat_weights"])
def test_training_steps_between_updates_read_nothing_back_from_the_device(plugin: str, tmp_path) -> None:
    """On a GPU every scalar read in a step makes the host wait for the device; a launch-bound step (many
    small layers) then loses the overlap of host and device. Between mask updates and epoch ends, no
    plugin reads anything back: 2 epochs of 8 steps, masks updated every 4th step."""
    from lightning_compress import PruningCallback, QuantizeCallback
    from lightning_compress.lm import GPTDecoder, LanguageModelModule

    if plugin in ("magnitude", "wanda"):
        callback = PruningCallback(
            target_sparsity=0.5, criterion=plugin, end_epoch=2, update_every_n_steps=4, verbose=False
        )
    else:
        callback = QuantizeCallback(activation_bits=8 if plugin == "qat" else None, latency="none")
    module = LanguageModelModule(GPTDecoder(d_model=32, n_layers=2, n_heads=4, max_len=16), example_seq_len=16)
    tokens = torch.randint(0, 256, (64, 17))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    reads = _RecordReads()
    Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[callback, reads], limit_val_batches=1)).fit(
        module, loader, loader
    )
    steps = reads.mode.steps
    between = {s: steps[s] for s in steps if s % 4 and s not in (1, 9)}  # 1 and 9: each epoch's first log
    assert between == {}, f"scalar reads in steady steps (step: where): {between}"
    if plugin in ("magnitude", "wanda"):
        assert {4, 12} <= set(steps), f"the mask updates' own reads were not seen: {steps}"  # the probe sees reads


def test_observer_remembers_it_is_initialised_until_its_buffer_changes() -> None:
    import copy

    from lightning_compress.quantization.fake_quant import MinMaxObserver

    obs = MinMaxObserver()
    assert not obs.is_initialized()
    obs.update(torch.tensor([-1.0, 2.0]))
    assert obs.is_initialized() and bool(obs.initialized)
    obs.initialized.fill_(False)  # what restoring a callback state written before any step does
    assert not obs.is_initialized()
    obs.initialized.fill_(True)
    twin = copy.deepcopy(obs)
    twin.initialized = torch.tensor(False)  # a replaced buffer is read afresh
    assert obs.is_initialized() and not twin.is_initialized()
    with torch.inference_mode():
        fresh = MinMaxObserver()
        fresh.update(torch.tensor([0.5]))
        assert fresh.is_initialized()


_NOT_KERNELS = {"view", "_unsafe_view", "reshape", "detach", "alias", "t", "transpose", "expand", "as_strided", "empty", "empty_strided", "unsqueeze", "squeeze"}


class _Kernels(TorchDispatchMode):
    """Counts the ops that compute (views and allocations excluded): on a GPU, each is one launch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NOT_KERNELS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "accelerator"])
def test_weight_rounding_under_autocast_is_six_kernels_on_an_accelerator(device: str) -> None:
    """A QAT step of a model of many small layers is bound by launching kernels (the H200 profile), so the
    weight rounding's kernel count is its cost there: the largest magnitude (one reduction; on the CPU,
    whose infinity norm is slow, ``abs`` and ``amax``), the scale (divide, clamp), divide, round, and the
    product written directly in bfloat16. No clamp of float32 levels rounded to nearest: the scales keep
    them within range."""
    torch.manual_seed(0)
    w = torch.randn(48, 40)
    w[3] = 0.0  # a pruned row: scale clamped, levels 0
    expected = fake_quantize_weight(w, 8).to(torch.bfloat16)
    with FakeAccelerator() if device == "accelerator" else contextlib.nullcontext():
        w_dev = (to_accelerator(w) if device == "accelerator" else w).requires_grad_()
        with _Kernels() as kernels:
            out = fake_quantize_weight(w_dev, 8, dtype=torch.bfloat16)
        assert torch.equal(to_cpu(out.detach()), expected) and out.dtype == torch.bfloat16
        reduction = ["abs", "amax"] if device == "cpu" else ["linalg_vector_norm"]
        assert kernels.names == [*reduction, "div_", "clamp_min_", "div", "round_", "mul"]
        out.float().sum().backward()
        assert to_cpu(w_dev.grad).eq(1.0).all() and w_dev.grad.dtype == torch.float32


def test_input_fake_quant_is_the_int8_layers_grid_with_the_clamps_gradient() -> None:
    """Six kernels forward (divide, round, zero point, clamp, and back), not nine; the same values as
    the converted layer's integer levels, and the gradient that clamping to the range passes (boundary
    values inside, NaN and the far side outside)."""
    from lightning_compress.quantization.fake_quant import activation_qparams, fake_quantize_activation

    torch.manual_seed(0)
    scale, zero_point = activation_qparams(torch.tensor(-1.3), torch.tensor(2.9))
    lo, hi = (0 - zero_point) * scale, (255 - zero_point) * scale
    x = torch.cat([torch.randn(4000) * 2, torch.stack([lo, hi, lo - 1e-6, hi + 1e-6]), torch.tensor([float("nan"), 9.0, -9.0])])
    x.requires_grad_()
    with _Kernels() as kernels:
        y = fake_quantize_activation(x, scale, zero_point)
    assert kernels.names == ["div", "round_", "add_", "clamp_", "sub_", "mul_"]
    levels = torch.clamp(torch.round(x.detach() / scale) + zero_point, 0, 255)
    torch.testing.assert_close(y.detach(), (levels - zero_point) * scale, rtol=0, atol=0, equal_nan=True)
    g = torch.randn_like(x)
    y.backward(g)
    reference = x.detach().clone().requires_grad_()
    torch.clamp(reference, lo, hi).backward(g)
    assert torch.equal(x.grad, reference.grad)
    assert x.grad[-7:-3].tolist() == [g[-7].item(), g[-6].item(), 0.0, 0.0] and x.grad[-3:].tolist() == [0.0] * 3


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float32, "floor"), (torch.bfloat16, "nearest"), (torch.float16, "nearest")])
def test_weight_levels_stay_on_the_symmetric_grid_where_the_clamp_is_needed(dtype: torch.dtype, rounding: str) -> None:
    """The clamp is skipped only where it cannot act (float32, rounding to nearest). Rounding down takes
    ``-max|w| / s`` a few ulps below ``-qmax`` to ``-qmax - 1``, and a bfloat16 scale can put
    ``max|w| / s`` at ``qmax + 0.5``, which rounds to ``qmax + 1``: both keep the clamp. Half-precision weights are
    divided by their (half-precision) scales in float32; rounding down, a row's largest magnitude, when positive,
    is level qmax."""
    torch.manual_seed(0)
    w = (torch.randn(512, 64) * torch.rand(512, 1)).to(dtype)
    q, s = quantize_weight(w, 8, rounding=rounding)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    qmax = 127
    amax = w.abs().amax(1, keepdim=True)
    scale = (amax / qmax).clamp_min(2.0**-24 if dtype == torch.float16 else 1e-12)  # float16 has no 1e-12
    quotient = w.float() / scale.float()
    rounded = torch.floor(quotient) if rounding == "floor" else torch.round(quotient)
    if rounding == "floor":
        rounded[w == amax] = qmax
    rounded = rounded.to(dtype)
    assert torch.equal(q, rounded.clamp(-qmax, qmax).to(torch.int8))
    assert torch.equal(fake_quantize_weight(w, 8, rounding=rounding), rounded.clamp(-qmax, qmax) * scale)


def test_float16_weights_near_the_largest_float16_stay_finite() -> None:
    """max|w| = 65504: the scale rounded up to 516, and 127 * 516 = 65532 is inf in float16."""
    w = torch.tensor([[60000.0, -65504.0, 1.0, 0.0]], dtype=torch.float16)
    out = fake_quantize_weight(w, 8)
    assert out.isfinite().all() and float(out[0, 1]) < -65000 and float(out[0, 0]) > 59000
    q, scale = quantize_weight(w, 8)
    assert int(q[0, 1]) == -127 and torch.equal(out, (q.float() * scale.float()).to(torch.float16))


def test_float16_weights_with_a_pruned_row_round_without_nan() -> None:
    """float16 has no 1e-12 (the scale floor): an all-zero row would divide 0 by 0."""
    w = torch.tensor([[1e-5, -5e-6, 0.0], [0.0, 0.0, 0.0], [0.5, -0.25, 0.125]], dtype=torch.float16)
    out = fake_quantize_weight(w, 8)
    assert out.isfinite().all() and torch.equal(out[1], torch.zeros(3, dtype=torch.float16))
    step = float(w[2].abs().max()) / 127
    assert (out[2].float() - w[2].float()).abs().max() <= 0.51 * step
    q, _ = quantize_weight(w, 8)
    assert int(q.abs().max()) <= 127
