"""The plugins on a CUDA GPU, in fp32 and ``bf16-mixed``; skipped without one.

Run on a machine with a GPU: ``bash scripts/gpu_check.sh`` (or ``pytest tests/test_cuda.py -q -rs``).
Tiny digits runs, seconds each. What they guard against, seen on an H200 (torch 2.11):

- channel pruning crashed in ``channel_masks`` (keep-vectors made in ``setup``, before Lightning moves
  the model to the GPU, met scores on the GPU);
- an int8-converted model crashed in ``torch._int_mm`` for a 10-class head (CUDA needs both sizes of
  the weight to be multiples of 8 and more than 16 rows).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import calibrate, trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from lightning_compress import (
    MLP,
    ClassifierModule,
    CompressionReport,
    DigitsDataModule,
    DistillationModule,
    LeNet5,
    PruningCallback,
    QuantizeCallback,
    ResCNN,
)
from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant
from lightning_compress.quantization.convert import Int8Linear, LowBitLayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRECISIONS = [
    "32-true",
    pytest.param(
        "bf16-mixed",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs a CUDA GPU with bf16"
        ),
    ),
]


class _CudaProbe(Callback):
    """Where each child of the LightningModule was when training ended (Lightning's teardown moves the
    module back to the CPU after ``fit``, so a check after ``fit`` cannot tell)."""

    def __init__(self) -> None:
        self.on_cuda: dict[str, bool] = {}

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.on_cuda = {name: _on_cuda(child) for name, child in pl_module.named_children() if list(child.parameters())}


def _trained_on_cuda(trainer: Trainer, *names: str) -> bool:
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, _CudaProbe))
    return all(probe.on_cuda.get(n, False) for n in names)


def _trainer(tmp_path: Path, callbacks: list[Any], precision: str, max_epochs: int = 2, **kwargs: Any) -> Trainer:
    args = trainer_kwargs(tmp_path, accelerator="gpu", deterministic=None, precision=precision, max_epochs=max_epochs, **kwargs)
    return Trainer(callbacks=[*callbacks, _CudaProbe()], **args)


def _on_cuda(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def _test_batch(dm: DigitsDataModule) -> torch.Tensor:
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    return x


# -------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("precision", PRECISIONS)
def test_unstructured_pruning_fits_on_cuda(tmp_path: Path, precision: str) -> None:
    seed_everything(0)
    module = ClassifierModule(MLP(64, (64, 32), 10))
    cb = PruningCallback(0.8, schedule="linear", end_epoch=2, update_every_n_steps=5, verbose=False)
    trainer = _trainer(tmp_path, [cb], precision, max_epochs=3)
    trainer.fit(module, DigitsDataModule(batch_size=64))
    assert _trained_on_cuda(trainer, "model")
    assert cb.sparsity == pytest.approx(0.8, abs=0.01)
    weights = [m.weight for m in module.model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01)  # the masks are in the weights
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("arch", ["mlp", "rescnn"])
def test_channel_pruning_with_shrink_on_cuda(tmp_path: Path, precision: str, scope: str, arch: str) -> None:
    seed_everything(0)
    net = MLP(64, (64, 32), 10) if arch == "mlp" else ResCNN(width=8)
    module = ClassifierModule(net)
    params_before = sum(p.numel() for p in net.parameters())
    cb = PruningCallback(
        0.5, structure="channel", scope=scope, schedule="one_shot", start_epoch=1, shrink=True, verbose=False
    )
    dm = DigitsDataModule(batch_size=64)
    trainer = _trainer(tmp_path, [cb], precision, max_epochs=3)
    trainer.fit(module, dm)
    assert _trained_on_cuda(trainer, "model")
    assert sum(p.numel() for p in module.model.parameters()) < params_before  # channels removed
    if arch == "mlp":
        linears = [m for m in module.model.modules() if isinstance(m, nn.Linear)]
        assert linears[-1].out_features == 10  # the head is never cut
    module.cuda().eval()  # Lightning's teardown moved it back to the CPU
    with torch.no_grad():
        out = module(_test_batch(dm).cuda())
    assert out.shape[-1] == 10 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("precision", PRECISIONS)
def test_qat_fits_on_cuda_and_converts(tmp_path: Path, precision: str) -> None:
    seed_everything(0)
    module = ClassifierModule(MLP(64, (48,), 10))  # 64->48 takes torch._int_mm, the 48->10 head cannot
    quant = QuantizeCallback(start_epoch=0, latency="none")
    report = CompressionReport(batch_size=8, repeats=2, warmup=0, print_table=False)
    dm = DigitsDataModule(batch_size=64)
    trainer = _trainer(tmp_path, [quant, report], precision)
    trainer.fit(module, dm)
    assert _trained_on_cuda(trainer, "model")
    assert report.report is not None and report.report["compressed"]["size_bytes"] > 0
    converted = quant.quantized_model
    assert converted is not None
    assert {v["format"] for v in converted.quantization_spec.values()} == {"int8_linear"}
    x = _test_batch(dm)
    gpu = copy.deepcopy(converted).cuda()
    cpu = copy.deepcopy(converted).cpu()
    module.cuda().eval()  # Lightning's teardown moved it back to the CPU
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out_gpu, out_cpu, fake = gpu(x.cuda()).cpu(), cpu(x), module(x.cuda()).float().cpu()
    torch.testing.assert_close(out_gpu, out_cpu, atol=1e-5, rtol=1e-5)
    assert (out_gpu.argmax(1) == fake.argmax(1)).float().mean() > 0.95


def _converted(net: nn.Module, x: torch.Tensor, settings: QuantSettings) -> nn.Module:
    prepare_fake_quant(net, settings)
    calibrate(net, x)
    return convert_fake_quant(net)


@pytest.mark.parametrize("head_bias", [True, False])
def test_int8_model_with_10_class_head_runs_on_cuda_and_cpu(head_bias: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10, bias=head_bias)).cuda()
    x = torch.randn(64, 1, 8, 8, device="cuda")
    converted = _converted(net, x, QuantSettings(bits=8, activation_bits=8))  # converted on the GPU
    assert all(isinstance(m, Int8Linear) for m in (converted[1], converted[3]))
    assert _on_cuda(converted)
    cpu = copy.deepcopy(converted).cpu()
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"out_features=10\).*output width \(10\)") as record:
            out = converted(x)
        assert not [w for w in record if "out_features=48" in str(w.message)]  # 64x48 keeps torch._int_mm
        torch.testing.assert_close(out.cpu(), cpu(x.cpu()), atol=1e-5, rtol=1e-5)
        small = x[:4]  # 4 rows: no layer can take torch._int_mm on CUDA
        with pytest.warns(UserWarning, match=r"out_features=48\).*more than 16 rows"):
            out_small = converted(small)
        torch.testing.assert_close(out_small.cpu(), cpu(small.cpu()), atol=1e-5, rtol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = converted(x)
        torch.testing.assert_close(out_bf16.float().cpu(), cpu(x.cpu()), atol=1e-5, rtol=1e-5)


def test_int8_fallback_equals_int_mm_on_cuda() -> None:
    """Where both run on the GPU, the float64 fallback is the ``torch._int_mm`` result exactly."""
    g = torch.Generator(device="cuda").manual_seed(0)
    xq = torch.randint(-128, 128, (64, 256), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (256, 64), dtype=torch.int8, device="cuda", generator=g)
    assert torch.equal(Int8Linear.int_matmul_fallback(xq, w), torch._int_mm(xq, w))


def test_lowbit_model_runs_on_cuda_and_cpu() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).cuda()
    x = torch.randn(32, 1, 8, 8, device="cuda")
    converted = _converted(net, x, QuantSettings(bits=4, activation_bits=None))
    assert isinstance(converted[1], LowBitLayer) and _on_cuda(converted)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).cpu(), copy.deepcopy(converted).cpu()(x.cpu()), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("precision", PRECISIONS)
def test_distillation_fits_on_cuda(tmp_path: Path, precision: str) -> None:
    seed_everything(0)
    module = DistillationModule(MLP(64, (32,), 10), LeNet5(image_size=8), temperature=4.0, alpha=0.5)
    trainer = _trainer(tmp_path, [], precision)
    trainer.fit(module, DigitsDataModule(batch_size=64))
    assert _trained_on_cuda(trainer, "student", "teacher")
    assert not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


# ------------------------------------------------------------------------------------------------ scale
def test_global_threshold_on_cuda_equals_the_cpu_selection() -> None:
    from lightning_compress.pruning.masks import _kth_prune, unstructured_masks

    torch.manual_seed(0)
    scores = {"a": torch.rand(1500, 2000), "b": torch.randint(0, 50, (700, 900)).float(), "c": torch.randn(5000)}
    targets = {n: 0.6 for n in scores}
    expected = unstructured_masks(scores, targets, "global")
    got = unstructured_masks({n: s.cuda() for n, s in scores.items()}, targets, "global")
    assert all(m.is_cuda for m in got.values())
    assert all(torch.equal(got[n].cpu(), expected[n]) for n in scores)
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert torch.equal(_kth_prune(flat.cuda(), 1_234_567).cpu(), _kth_prune(flat, 1_234_567))


def test_global_threshold_on_cuda_under_deterministic_algorithms() -> None:
    """``Trainer(deterministic=True)``: the histogram passes (over 2**20 scores) ran torch.histc, which raises there."""
    from lightning_compress.pruning.masks import unstructured_masks

    torch.manual_seed(0)
    scores = {"a": torch.rand(1500, 2000), "b": torch.randn(900, 700)}
    expected = unstructured_masks(scores, {n: 0.6 for n in scores}, "global")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = unstructured_masks({n: t.cuda() for n, t in scores.items()}, {n: 0.6 for n in scores}, "global")
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(got[n].cpu(), expected[n]) for n in scores)


def test_masks_pack_on_cuda_to_the_cpu_bits() -> None:
    from lightning_compress.pruning.mask_storage import pack_mask, unpack_mask

    mask = torch.rand(333, 77) > 0.4
    packed = pack_mask(mask.cuda())
    assert torch.equal(packed["bits"], pack_mask(mask)["bits"])
    assert torch.equal(unpack_mask(packed, "cuda").cpu(), mask)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8), reason="needs compute capability 8.0+"
)
def test_semi_structured_layers_match_dense_and_report_their_speed() -> None:
    from lightning_compress.pruning.sparse_kernels import is_two_four, use_semi_structured

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024)).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for layer in (net[0], net[2]):
            w = layer.weight.view(layer.weight.shape[0], -1, 4)
            keep = torch.zeros_like(w, dtype=torch.bool).scatter_(2, w.abs().topk(2, dim=2).indices, True)
            layer.weight.mul_(keep.view_as(layer.weight))
    assert is_two_four(net[0].weight) and is_two_four(net[2].weight)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = net(x)
    kept = use_semi_structured(copy.deepcopy(net), x, min_speedup=1e9)
    assert all(v["path"] == "dense" and v["speedup"] > 0 for v in kept.values())
    table = use_semi_structured(net, x, min_speedup=1e-9)  # convert whatever the timing says
    assert [v["path"] for v in table.values()] == ["2:4 sparse", "2:4 sparse"], table
    with torch.no_grad():
        sparse = net(x)
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=2e-2, atol=2e-2)


def test_fake_quant_weight_under_cuda_autocast_is_written_once_in_bf16() -> None:
    from lightning_compress.quantization.fake_quant import fake_quantize_weight
    from lightning_compress.quantization.layers import Quantizer

    quantizer = Quantizer(QuantSettings(bits=8, activation_bits=None), weight_only=True)
    w = torch.randn(256, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rounded = quantizer.weight(w)
        y = torch.nn.functional.linear(torch.randn(64, 512, device="cuda"), rounded)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, fake_quantize_weight(w, 8).to(torch.bfloat16))
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and w.grad.isfinite().all()


def test_weight_rounding_on_cuda_is_the_cpu_grid() -> None:
    """The GPU takes the largest magnitude as an infinity norm, the CPU as ``|w|.amax``: the same grid."""
    from lightning_compress.quantization.fake_quant import fake_quantize_weight, quantize_weight

    torch.manual_seed(0)
    w = torch.randn(384, 768) * torch.rand(384, 1)
    w[7] = 0.0
    for bits, granularity in [(8, "per_channel"), (4, 128)]:
        q_cpu, s_cpu = quantize_weight(w, bits, granularity)
        q_gpu, s_gpu = quantize_weight(w.cuda(), bits, granularity)
        assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
        assert torch.equal(fake_quantize_weight(w.cuda(), bits, granularity).cpu(), fake_quantize_weight(w, bits, granularity))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_compiled_qat_fit_on_cuda_is_one_graph_and_converts(tmp_path: Path, precision: str) -> None:
    """``LanguageModelModule(compile=...)`` with inductor on the GPU: 8-bit QAT of weights and inputs
    traces as one graph (``fullgraph=True``), and the converted model agrees with the fake-quantised one."""
    from torch._dynamo.utils import counters
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress.lm import GPTDecoder, LanguageModelModule

    torch._dynamo.reset()
    counters.clear()
    seed_everything(0)
    module = LanguageModelModule(
        GPTDecoder(d_model=64, n_layers=2, n_heads=4, max_len=32), example_seq_len=32, compile={"fullgraph": True}
    )
    tokens = torch.randint(0, 256, (64, 33))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16)
    quantize = QuantizeCallback(latency="none")
    trainer = Trainer(**trainer_kwargs(
        tmp_path, accelerator="gpu", precision=precision, max_epochs=2, callbacks=[quantize], limit_val_batches=2,
        deterministic=False,
    ))
    trainer.fit(module, loader, loader)
    assert counters["graph_break"] == {}
    assert torch.isfinite(trainer.callback_metrics["val_ppl"])
    network = module.model.cuda().eval()
    x = tokens[:4, :-1].cuda()
    with torch.no_grad():
        eager = network.forward(x).float()  # .forward: the eager call
        outputs = {"converted": quantize.quantized_model.cuda().eval()(x).float(), "compiled": network(x).float()}
    # each layer's integer arithmetic is the fake-quant layer's, but differences of an ulp elsewhere (the
    # attention, inductor's fused division and rounding) can move an input that sits on a rounding
    # boundary of the next layer's grid by one level, and that runs through the layers after it
    for name, got in outputs.items():
        assert (got - eager).abs().max() <= 0.01 * eager.abs().max(), name
        assert (got.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.99, name
