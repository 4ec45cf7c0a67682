"""Fake quantisation and conversion of models held in bfloat16 and float16: the converted model holds
the integers and scales the fake-quant model evaluated with, and files load in the float model's dtype."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import calibrate, trainer_kwargs
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassifierModule
from lightning_compress.quantization import (
    Int8Linear,
    LowBitLayer,
    QuantizeCallback,
    QuantSettings,
    convert_fake_quant,
    load_quantized,
    prepare_fake_quant,
    save_quantized,
)
from lightning_compress.quantization.fake_quant import input_levels

LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_intra_op_thread: None) -> None:
    """One intra-op thread (shared CPU)."""


class TokenNet(nn.Module):
    """Every kind of layer conversion handles: an embedding, attention, a conv, Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.att(h, h, h, need_weights=False)[0]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2).relu()
        return self.head(self.lin(h).relu())


def _prepared(dtype: torch.dtype, settings: QuantSettings) -> tuple[TokenNet, torch.Tensor]:
    net = TokenNet().to(dtype)
    prepare_fake_quant(net, settings)
    ids = torch.randint(0, 20, (4, 6))
    calibrate(net, ids)
    return net, ids


def _ulps(n: int, dtype: torch.dtype, reference: torch.Tensor) -> float:
    """``n`` units of ``dtype``'s precision at the largest magnitude of ``reference``."""
    return n * torch.finfo(dtype).eps * float(reference.abs().max())


def _inputs_and_outputs(net: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[tuple, torch.Tensor]]:
    """``{child: (its inputs, its output)}`` of one run of ``net`` on ``x``."""
    seen: dict[str, tuple[tuple, torch.Tensor]] = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a, o))) for n in names]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("bits", "activation_bits", "granularity"),
    [(4, None, "per_channel"), (2, 4, "per_tensor"), (4, 8, 8), (8, None, "per_channel"), (6, 6, 4)],
)
def test_converted_layers_compute_what_the_fake_quant_layers_evaluated(dtype, bits, activation_bits, granularity) -> None:
    """Each converted layer (embedding, conv, Linears with or without input quantisation, attention's
    projections) gives exactly its fake-quant layer's evaluation output in the model's own dtype: the
    same integer weights, scales and input levels (bfloat16 weights once took other levels for about
    7% of their entries at 4 bits)."""
    torch.manual_seed(bits)
    net, ids = _prepared(dtype, QuantSettings(bits=bits, activation_bits=activation_bits, granularity=granularity))
    names = ["emb", "conv", "lin", "head"]
    fake = _inputs_and_outputs(net, ids, names)
    converted = convert_fake_quant(net)
    with torch.no_grad():
        for name in names:
            inputs, expected = fake[name]
            layer = converted.get_submodule(name)
            assert isinstance(layer, LowBitLayer)
            out = layer(*inputs)
            assert out.dtype == dtype
            assert torch.equal(out, expected), f"{name}: max |difference| {(out.double() - expected.double()).abs().max():.3g}"
        for pname in ("in_proj_weight",):
            assert torch.equal(getattr(converted.att, pname), net.att.quantizer.weight(getattr(net.att, pname)))
        assert torch.equal(converted.att.out_proj.weight, net.att.out_proj.quantizer.weight(net.att.out_proj.weight))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_int8_linear_takes_the_fake_quant_weights_and_input_levels(dtype, granularity) -> None:
    """The int8 x int8 Linear holds the fake-quant weights of a bfloat16/float16 layer and quantises its
    inputs to the same levels; its integer product is exact where the fake-quant model's matmul rounds,
    so outputs agree to the dtype's rounding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10)).to(dtype)
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=8, granularity=granularity))
    x = torch.randn(64, 32).to(dtype)
    calibrate(net, x)
    fake = _inputs_and_outputs(net, x, ["0", "2"])
    converted = convert_fake_quant(net)
    with torch.no_grad():
        for name in ("0", "2"):
            (inp,), expected = fake[name]
            layer, qat = converted.get_submodule(name), net.get_submodule(name)
            assert isinstance(layer, Int8Linear)
            assert torch.equal(layer.weight.to(dtype), qat.quantizer.weight(qat.weight))
            scale, zero = layer.input_qparams
            levels = input_levels(inp, scale, zero, -128, 127)
            assert torch.equal(levels.sub(zero).mul(scale).to(dtype), qat.quantizer.input(inp))
            out = layer(inp)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), expected.float(), rtol=0.0, atol=_ulps(2, dtype, expected))


def _dead_input_net(dtype: torch.dtype, bits: int) -> tuple[nn.Sequential, torch.Tensor]:
    """A Linear behind a ReLU that never fires: its observed input range is [0, 0]."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
    with torch.no_grad():
        net[0].bias.fill_(-10.0)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=8))
    x = torch.randn(16, 4).to(dtype)
    calibrate(net, x)
    return net, x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_an_input_observed_only_at_zero_stays_finite(dtype, bits) -> None:
    """A zero input range gives the smallest positive scale of the dtype (float16 rounds 1e-8 to 0,
    which once made every output of the float16 fake-quant layer NaN); converted, it computes the same."""
    net, x = _dead_input_net(dtype, bits)
    obs = net[2].quantizer.observer
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 0.0)
    with torch.no_grad():
        fake = net(x)
        real = convert_fake_quant(net)(x)
    assert torch.isfinite(fake).all() and torch.isfinite(real).all()
    if bits == 4:  # LowBitLayers: the fake-quant arithmetic itself
        assert torch.equal(real, fake)
    else:  # Int8Linear: an exact integer product
        torch.testing.assert_close(real.float(), fake.float(), rtol=0.0, atol=_ulps(2, dtype, fake))


class _DeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(4, 3), nn.Linear(8, 3)
        with torch.no_grad():
            self.a.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x) + self.b(torch.relu(self.a(x)))  # ``b`` sees only zeros


def test_float16_qat_with_a_dead_input_trains_to_finite_weights(tmp_path: Path) -> None:
    """``precision="16-true"`` QAT of a model with a Linear behind a dead ReLU: validation and the weights
    stay finite (they once turned NaN in the first step)."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    module = ClassifierModule(_DeadBranch(), num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    kwargs = trainer_kwargs(tmp_path, precision="16-true", max_epochs=1, deterministic=False)
    trainer = Trainer(**kwargs, callbacks=[QuantizeCallback(weight_bits=8, latency="none")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert all(torch.isfinite(p).all() for p in module.parameters())


class NormNet(nn.Module):
    """Quantised layers with float tensors between them (LayerNorm, a float bias, attention biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids))
        return self.head(h + self.att(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize(
    ("saved", "loaded"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)]
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_quantized_takes_the_dtype_of_the_float_model(tmp_path: Path, saved, loaded, suffix: str) -> None:
    """A file saved from a model in one dtype loads into the float class in another as a model of that
    other dtype throughout (a bf16 file once left LayerNorm and attention biases in bf16 in a float32
    model, which then failed in its first LayerNorm), and it computes what the converted model computes
    once moved to that dtype."""
    torch.manual_seed(0)
    net = NormNet().to(saved)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None, granularity=8))
    ids = torch.randint(0, 20, (3, 7))
    calibrate(net, ids)
    converted = convert_fake_quant(net)
    save_quantized(converted, tmp_path / f"q{suffix}")
    model = load_quantized(NormNet().to(loaded), tmp_path / f"q{suffix}")
    floats = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert floats == {loaded}
    assert {m.compute_dtype for m in model.modules() if isinstance(m, LowBitLayer)} == {loaded}
    with torch.no_grad():
        out, expected = model(ids), converted.to(loaded)(ids)
    assert out.dtype == loaded
    # the same integers and scales; the moved model's attention keeps the projection weights it dequantised in
    # the saved dtype, the loaded one dequantises them in its own
    torch.testing.assert_close(out, expected, rtol=0.0, atol=_ulps(2, saved, expected))


class TiedFloatNet(nn.Module):
    """A quantised Linear between an embedding and a head that share one float weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(ids)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_quantized_casts_a_shared_float_weight_once(tmp_path: Path, suffix: str) -> None:
    net = TiedFloatNet().to(torch.bfloat16)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None), include=["mid"])
    converted = convert_fake_quant(net)
    save_quantized(converted, tmp_path / f"q{suffix}")
    model = load_quantized(TiedFloatNet(), tmp_path / f"q{suffix}")
    assert model.emb.weight.dtype == model.head.weight.dtype == torch.float32
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()  # one tensor, as in the file
    assert torch.equal(model.emb.weight, net.emb.weight.float())
    assert model(torch.arange(10)[None]).dtype == torch.float32


def test_the_observed_range_stays_float32_in_a_bfloat16_module(tmp_path: Path) -> None:
    """precision="bf16-true" casts the module, the observers' running range included: a bfloat16 moving average stops
    once an update is below half its step (0.80 where the data reach 0.93 after 200 batches at momentum 0.01)."""
    from lightning_compress import MLP, QuantizeCallback
    from lightning_compress.quantization.fake_quant import MinMaxObserver

    obs = MinMaxObserver(momentum=0.01)
    obs.update(torch.tensor([0.0, 0.9312345]))
    obs = obs.to(torch.bfloat16)  # as Lightning casts after a checkpoint restored the range: the value kept, not rounded
    assert obs.max_val.dtype == torch.float32 and obs.max_val.item() == torch.tensor(0.9312345).item()
    obs.min_val.zero_(), obs.max_val.zero_()
    for _ in range(300):
        obs.update(torch.tensor([0.0, 2.0], dtype=torch.bfloat16))
    assert obs.max_val.item() > 1.9  # float32 reaches 1.95; bfloat16 held at 1.61 from its start at 0

    x = torch.rand(64 * 100, 64)
    x[:64] *= 0.5  # the first batch spans [0, 0.5): the range must grow from there
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    quant = QuantizeCallback(weight_bits=8, start_epoch=0, observer_momentum=0.01, latency="none", convert_on_fit_end=False)
    trainer = Trainer(max_epochs=1, precision="bf16-true", callbacks=[quant], **trainer_kwargs(tmp_path, limit_val_batches=0))
    trainer.fit(module, DataLoader(TensorDataset(x, torch.randint(0, 10, (len(x),))), batch_size=64))
    observer = module.model.net[1].quantizer.observer
    assert observer.max_val.dtype == torch.float32 and module.model.net[1].weight.dtype == torch.bfloat16
    assert observer.max_val.item() > 0.8  # 0.5 + (1 - 0.5) * (1 - 0.99**100) = 0.82 in float32; bfloat16 stalled lower
