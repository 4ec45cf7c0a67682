"""Fake quantisation, layer preparation and conversion, without a Trainer."""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import pytest
import torch
from conftest import calibrate
from torch import nn

from lightning_compress.models import MLP, ResCNN
from lightning_compress.quantization import (
    Int8Linear,
    LowBitLayer,
    MinMaxObserver,
    QuantSettings,
    convert_fake_quant,
    fake_quant_layers,
    fake_quantize_activation,
    fake_quantize_weight,
    load_quantized,
    pack_int4,
    prepare_fake_quant,
    quantize_weight,
    round_values,
    save_quantized,
    strip_fake_quant,
    unpack_int4,
)
from lightning_compress.quantization.fake_quant import activation_qparams
from lightning_compress.report import serialized_size


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
def test_rounding_modes(rounding: str) -> None:
    x = torch.tensor([-1.5, -0.2, 0.0, 0.2, 0.5, 1.7])
    r = round_values(x, rounding)
    assert torch.equal(r, r.round())
    assert r[2] == 0
    if rounding == "floor":
        assert r.tolist() == [-2.0, -1.0, 0.0, 0.0, 0.0, 1.0]
    if rounding == "stochastic":
        torch.manual_seed(0)
        many = round_values(torch.full((20000,), 0.25), "stochastic")
        assert abs(many.mean().item() - 0.25) < 0.02  # unbiased
        assert set(many.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="valid choices"):
        round_values(x, "up")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_of_half_precision_is_unbiased(dtype: torch.dtype) -> None:
    """The noise was added in the input's dtype, which rounded the sum before the floor: an exact 100 in bfloat16
    came out 100.25 on average, and 8-bit bfloat16 weights were biased by +0.09 of a step."""
    torch.manual_seed(0)
    assert round_values(torch.full((20000,), 100.0, dtype=dtype), "stochastic").double().mean().item() == 100.0
    fraction = torch.full((20000,), 2.703125, dtype=dtype)  # exact in both dtypes
    assert abs(round_values(fraction, "stochastic").double().mean().item() - 2.703125) < 0.01
    w = torch.randn(128, 128).to(dtype)
    step = w.double().abs().amax(1, keepdim=True) / 127
    mean = sum(fake_quantize_weight(w, 8, rounding="stochastic").double() for _ in range(100)) / 100
    assert abs(((mean - w.double()) / step).mean().item()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_levels_match_an_exact_reference(dtype: torch.dtype, rounding: str) -> None:
    """Levels against float64 arithmetic on the scales the layer stores. Half-precision quotients were rounded before
    rounding to a level (steps of 0.5 at 100 in bfloat16); rounding down put a row's largest weight, by definition
    qmax steps of its scale, a level below it (7.6% of positive rows at 8 bits)."""
    torch.manual_seed(0)
    w = (torch.rand(2000, 16) + 0.01).to(dtype)
    w[::2] -= 0.5
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        q, scale = quantize_weight(w, bits, "per_channel", rounding)
        exact = w.double() / scale.double()
        ref = (exact.round() if rounding == "nearest" else exact.floor()).clamp(-qmax, qmax)
        top = w.double() == w.double().abs().amax(1, keepdim=True)  # the largest magnitude, and positive
        if rounding == "floor":  # the weight of a row's largest magnitude is qmax steps of its scale
            ref[top] = qmax
            positive = w.double().amax(1) == w.double().abs().amax(1)
            assert (q.max(1).values[positive] == qmax).all()
            assert positive.any() and (~positive).any()  # rows led by a negative weight too: those keep their floor
        assert torch.equal(q.double(), ref), (bits, (q.double() != ref).sum().item())
        fq = fake_quantize_weight(w, bits, rounding=rounding)
        assert fq.dtype == dtype and torch.equal(fq, (q.double() * scale.double()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounding_down_a_group_whose_scale_is_at_its_floor_keeps_its_weights_small(dtype: torch.dtype) -> None:
    """The largest weight of a row is qmax steps of its scale, unless the scale was raised to its floor: a row of
    weights near 1e-14 rounded down to level 127 (1.27e-10, 12,700 times the weight), and an all-zero row must stay
    zero. Rows of ordinary weights keep their top level."""
    w = torch.tensor([[1e-14, -5e-15, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, -0.25, 0.1, 0.0]]).to(dtype)
    for bits in (2, 4, 8):  # at 2 bits (qmax 1) the first rule lifted every zero of an all-zero row to level 1
        qmax = 2 ** (bits - 1) - 1
        q, scale = quantize_weight(w, bits, "per_channel", "floor")
        assert q[0].abs().max() <= 1 and q[1].abs().max() == 0, bits
        assert q[2, 0] == qmax
        assert (fake_quantize_weight(w, bits, rounding="floor")[:2].double().abs() <= 1e-10).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor", 4])
def test_weight_grid_and_ste(bits: int, granularity) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8, requires_grad=True)
    fq = fake_quantize_weight(w, bits, granularity)
    q, scale = quantize_weight(w, bits, granularity)
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() <= qmax and q.dtype == torch.int8
    distinct = fq.detach().reshape(-1).unique().numel()
    assert distinct <= (2 * qmax + 1) * (1 if granularity == "per_tensor" else w.numel())
    # each row of a per-channel grid has at most 2*qmax+1 levels and reaches +-max|w|
    if granularity == "per_channel":
        for row, row_fq in zip(w.detach(), fq.detach()):
            assert row_fq.unique().numel() <= 2 * qmax + 1
            assert torch.isclose(row_fq.abs().max(), row.abs().max())
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize_weight(torch.randn(4, 6), 4, 4)


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pruned_zeros_stay_zero(rounding: str, bits: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    mask = (torch.rand_like(lin.weight) > 0.5).float()
    with torch.no_grad():
        lin.weight.mul_(mask)
    net = nn.Sequential(lin)
    prepare_fake_quant(net, QuantSettings(bits=bits, rounding=rounding, activation_bits=None))
    net.train()
    fq = net[0].quantizer.weight(net[0].weight)
    assert torch.all(fq[mask == 0] == 0)
    q, _ = quantize_weight(net[0].weight.detach(), bits, "per_channel", rounding)
    assert torch.all(q[mask == 0] == 0)
    calibrate(net, torch.randn(4, 32))
    converted = convert_fake_quant(net)
    layer = converted[0]
    if isinstance(layer, LowBitLayer):
        assert torch.all(layer.dequantized_weight()[mask == 0] == 0)
    else:
        assert torch.all(layer.weight.dequantize()[mask == 0] == 0)


def test_activation_fake_quant_and_observer() -> None:
    obs = MinMaxObserver(momentum=None)
    obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-0.5, 3.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)
    scale, zp = activation_qparams(torch.tensor(0.5), torch.tensor(2.55))  # widened to contain 0
    assert scale.item() == pytest.approx(0.01) and zp.item() == 0
    x = torch.tensor([-1.0, 0.0, 0.013, 1.0, 9.0], requires_grad=True)
    y = fake_quantize_activation(x, scale, zp)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.01, 1.0, 2.55])
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped STE
    with pytest.raises(ValueError, match="momentum"):
        MinMaxObserver(momentum=0.0)


def test_pack_int4_roundtrip() -> None:
    torch.manual_seed(0)
    for n in (1, 2, 7, 1000):
        q = torch.randint(-8, 8, (n,), dtype=torch.int8)
        packed = pack_int4(q)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_int4(packed, n), q)
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(torch.tensor([8], dtype=torch.int8))


class KwargsNet(nn.Module):
    """Forward with several inputs and a keyword: must keep working (no stubs, no patched forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, extra: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(h).mean(1) + extra) * scale


def test_prepare_keeps_signature_keys_params_and_strips() -> None:
    torch.manual_seed(0)
    net = KwargsNet()
    keys = list(net.state_dict())
    params = [id(p) for p in net.parameters()]
    layers = prepare_fake_quant(net, QuantSettings(bits=4))
    assert sorted(layers) == ["conv", "emb", "head"]  # LayerNorm stays float
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    assert net.emb.quantizer.observer is None  # embeddings are weight-only
    tokens, extra = torch.randint(0, 20, (2, 5)), torch.randn(2, 8)
    out = net(tokens, extra, scale=2.0)
    assert out.shape == (2, 3)
    clone = copy.deepcopy(net)
    assert torch.equal(clone(tokens, extra, scale=2.0), out)
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = True
    net(tokens, extra)
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = False
    converted = convert_fake_quant(net.eval())
    assert {v["format"] for v in converted.quantization_spec.values()} == {"lowbit"}
    assert converted.emb.qweight.dtype == torch.uint8  # 4-bit, packed
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens, extra, scale=2.0), net(tokens, extra, scale=2.0))
    strip_fake_quant(net)
    assert type(net.head) is nn.Linear and not hasattr(net.head, "quantizer")


def test_include_exclude_and_errors_before_change() -> None:
    net = MLP(16, (8,), 4)
    chosen = prepare_fake_quant(copy.deepcopy(net), QuantSettings(), exclude=[r"net\.3"])
    assert sorted(chosen) == ["net.1"]
    with pytest.raises(ValueError, match="include pattern 'nothing_here' matches no weight to quantise"):
        prepare_fake_quant(net, QuantSettings(), include=["nothing_here"])
    with pytest.raises(ValueError, match="exclude pattern 'nothing_here' matches none of the weights selected to quantise"):
        prepare_fake_quant(net, QuantSettings(), exclude=["nothing_here"])
    bn_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert sorted(prepare_fake_quant(copy.deepcopy(bn_net), QuantSettings(), include=[".*"])) == ["0"]  # ".*" takes no norm
    with pytest.raises(ValueError, match=r"cannot quantise '1.weight' \(BatchNorm2d\): quantisation takes the weights of .*drop the include pattern"):
        prepare_fake_quant(bn_net, QuantSettings(), include=[r"1\.weight"])
    assert type(bn_net[0]) is nn.Conv2d  # nothing changed

    class MyLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    sub = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 2))
    with pytest.raises(ValueError, match=r"cannot quantise '1.weight' \(MyLinear\).*exclude=\['1'\]"):
        prepare_fake_quant(sub, QuantSettings(), include=[".*"])  # named by include: an error
    assert type(sub[0]) is nn.Linear
    with pytest.warns(UserWarning, match=r"1 layers of the default selection stay in float.*MyLinear: a subclass of Linear with its own forward.*\['1'\]"):
        assert sorted(prepare_fake_quant(copy.deepcopy(sub), QuantSettings())) == ["0"]  # by default: left in float
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded: nothing to warn about
        assert sorted(prepare_fake_quant(sub, QuantSettings(), exclude=["^1$"])) == ["0"]
    assert type(sub[1]) is MyLinear
    with pytest.raises(ValueError, match="group size 5 does not divide"):
        prepare_fake_quant(MLP(16, (8,), 4), QuantSettings(granularity=5))


@pytest.mark.parametrize("where", ["weight", "input range"])
def test_convert_refuses_non_finite_weights_and_ranges_before_any_change(where: str) -> None:
    """A NaN weight (or observed input range) converted to NaN scales and meaningless integers in silence when
    convert_fake_quant was called directly; QuantizeCallback checked, the public function did not."""
    torch.manual_seed(0)
    net = MLP(16, (8,), 4)
    prepare_fake_quant(net, QuantSettings())
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = True
    net(torch.randn(8, 16))
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = False
    with torch.no_grad():
        if where == "weight":
            net.net[3].weight[0, 0] = float("nan")
        else:
            net.net[3].quantizer.observer.max_val.fill_(float("inf"))
    said = r"net\.3\.weight" if where == "weight" else r"net\.3 input range \(max\)"
    with pytest.raises(ValueError, match=f"convert_fake_quant: non-finite values \\(NaN or inf\\) in \\['{said}'\\]"):
        convert_fake_quant(net, inplace=True)
    assert sorted(fake_quant_layers(net)) == ["net.1", "net.3"]  # nothing was converted
    with pytest.warns(UserWarning, match="convert_fake_quant: non-finite values"):
        converted = convert_fake_quant(net, on_nonfinite="warn")
    assert sorted(converted.quantization_spec) == ["net.1", "net.3"]
    with pytest.raises(ValueError, match=r"unknown on_nonfinite 'ignore'; valid choices: \['error', 'warn', None\]"):
        convert_fake_quant(net, on_nonfinite="ignore")


def test_default_selection_leaves_what_goes_with_a_skipped_layer_in_float() -> None:
    """An attention module with its own forward stays in float, and with it its out_proj (which it computes);
    a Linear tied to an embedding with its own forward stays in float with it. With nothing else left, the
    error names them all (include cannot take them either)."""
    from lightning_compress.quantization.layer_selection import select_layers, skipped_layers

    class MyAttention(nn.MultiheadAttention):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs)

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 4.0

    net = nn.ModuleDict({"attn": MyAttention(8, 2), "emb": ScaledEmbedding(10, 8), "head": nn.Linear(8, 10, bias=False), "fc": nn.Linear(8, 8)})
    net["head"].weight = net["emb"].weight
    assert [name for name, _ in select_layers(net)] == ["fc"]
    assert skipped_layers(net) == {
        "attn": "MyAttention: a subclass of MultiheadAttention with its own forward, which fake quantisation would replace",
        "emb": "ScaledEmbedding: a subclass of Embedding with its own forward, which fake quantisation would replace",
        "attn.out_proj": "the attention module 'attn' that computes it stays in float",
        "head": "its weight is the same Parameter as that of 'emb', which stays in float",
    }
    del net["fc"]
    with pytest.raises(ValueError, match=r"no layer of ModuleDict can be fake-quantised: MyAttention: .*\['attn'\].*it has no other weight to quantise"):
        prepare_fake_quant(net, QuantSettings())


def test_skip_teacher_unless_included() -> None:
    root = nn.Module()
    root.student = nn.Linear(4, 2)
    root.teacher = nn.Linear(4, 2)
    assert sorted(prepare_fake_quant(copy.deepcopy(root), QuantSettings())) == ["student"]
    assert sorted(prepare_fake_quant(copy.deepcopy(root), QuantSettings(), quantize_teacher=True)) == ["student", "teacher"]
    assert sorted(prepare_fake_quant(root, QuantSettings(), include=["teacher"])) == ["teacher"]


@pytest.mark.parametrize(
    ("bits", "act", "backend", "fmt", "min_ratio"),
    [
        (8, 8, "auto", "int8_linear", 3.9),
        (8, 8, "torchao", "torchao_int8_dynamic", 3.85),
        (8, None, "auto", "lowbit", 3.9),
        (8, None, "torchao", "torchao_int8_weight", 3.85),
        (4, None, "auto", "lowbit", 7.0),
        (4, 8, "auto", "lowbit", 7.0),
    ],
)
def test_convert_lenet_size_agreement_and_reload(tmp_path, bits, act, backend, fmt, min_ratio) -> None:
    torch.manual_seed(0)
    float_net = MLP(784, (300, 100), 10)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=act))
    x = torch.randn(64, 1, 28, 28)
    calibrate(net, x)
    converted = convert_fake_quant(net, backend=backend)
    assert {v["format"] for v in converted.quantization_spec.values()} == {fmt}
    assert serialized_size(float_net) / serialized_size(converted) >= min_ratio
    with torch.no_grad():
        ref, out = net(x), converted(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    if backend == "auto":
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # same integers, same scales
    path = tmp_path / "q.pt"
    save_quantized(converted, str(path))
    torch.load(path, weights_only=True)  # plain tensors, dicts and allow-listed torchao tensors
    reloaded = load_quantized(float_net, str(path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), out)
    st = tmp_path / "q.safetensors"
    if backend == "torchao":  # tensor subclasses: only torch.save holds them, and nothing is written
        with pytest.raises(ValueError, match=r"'net\.1\.weight' is a \w+, which safetensors cannot store.*'\.pt'"):
            save_quantized(converted, st)
        assert not st.exists()
        return
    save_quantized(converted, st)
    assert serialized_size(converted, format="safetensors") < st.stat().st_size < path.stat().st_size  # + the spec
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(float_net, st)(x), out, atol=0, rtol=0)


@pytest.mark.parametrize("rounding", ["floor", "stochastic"])
def test_torchao_conversion_keeps_the_integers_of_the_rounding(rounding: str) -> None:
    """torchao rounds to nearest itself: its int8 Linear is handed the fake-quant layer's own integers
    (floor-rounded ones too), and its Conv2d path, which picks its own scales, is left to the packed
    layer for floor rounding. Stochastic rounding evaluates and converts to nearest."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=None, rounding=rounding))
    converted = convert_fake_quant(net, backend="torchao")
    formats = {name: entry["format"] for name, entry in converted.quantization_spec.items()}
    assert formats == {"0": "lowbit" if rounding == "floor" else "torchao_intx_conv2d", "2": "torchao_int8_weight"}
    h = torch.randn(16, 4 * 6 * 6)
    with torch.no_grad():
        torch.testing.assert_close(converted[2](h), net.eval()[2](h), atol=1e-5, rtol=1e-5)
        if rounding == "floor":
            x = torch.randn(16, 2, 8, 8)
            torch.testing.assert_close(converted(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("bits", "min_ratio"), [(8, 3.9), (4, 7.0)])
def test_cnn_safetensors_size_and_reload(tmp_path, bits: int, min_ratio: float) -> None:
    """The benchmark's CNN: small convs, so per-tensor file records weigh; safetensors has none."""
    torch.manual_seed(0)
    float_net = ResCNN(width=32)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=8 if bits == 8 else None))
    x = torch.randn(16, 1, 28, 28)
    calibrate(net, x)
    converted = convert_fake_quant(net)
    assert {v.get("folded_bn") for v in converted.quantization_spec.values()} - {None} == {"stem.1", "block.bn1", "block.bn2", "down.1"}
    ratio = serialized_size(float_net, format="safetensors") / serialized_size(converted, format="safetensors")
    assert ratio >= min_ratio
    assert ratio > serialized_size(float_net) / serialized_size(converted)  # torch.save: zip records per tensor
    save_quantized(converted, tmp_path / "cnn.safetensors")
    save_quantized(converted, tmp_path / "cnn.pt")
    assert (tmp_path / "cnn.safetensors").stat().st_size < (tmp_path / "cnn.pt").stat().st_size
    # the file a user keeps, spec included, clears the bar too: the spec stores per layer only what
    # the float model does not tell, not shapes or convolution arguments
    # (less 0.2%: the file also carries a CRC-32 of every tensor, 56 bytes of metadata on this 40 kB model)
    assert serialized_size(float_net, format="safetensors") / (tmp_path / "cnn.safetensors").stat().st_size >= 0.998 * min_ratio
    # and so does the .pt file: its tensors are views into one storage per dtype, one zip record instead of five
    assert serialized_size(float_net) / (tmp_path / "cnn.pt").stat().st_size >= min_ratio
    blob = torch.load(tmp_path / "cnn.pt", weights_only=True)
    assert len({t.untyped_storage().data_ptr() for t in blob["state_dict"].values()}) == 1
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(tmp_path / "cnn.safetensors", framework="pt") as f:
        stored = json.loads(f.metadata()["lightning_compress_quantized"])["quantization_spec"]
    assert "weight_shape" not in json.dumps(stored) and "stride" not in json.dumps(stored)
    assert stored["default"] == {"format": "lowbit", "bits": bits, "granularity": "per_channel", "activation_bits": 8 if bits == 8 else None}
    assert sorted(load_file(tmp_path / "cnn.safetensors")) == sorted(converted.state_dict())
    reloaded = load_quantized(float_net, tmp_path / "cnn.safetensors")
    assert reloaded.quantization_spec == converted.quantization_spec  # the JSON round trip keeps the spec
    from_pt = load_quantized(float_net, tmp_path / "cnn.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), converted(x), atol=0, rtol=0)
        torch.testing.assert_close(from_pt(x), converted(x), atol=0, rtol=0)


def _stats_free_bn() -> ResCNN:
    net = ResCNN(width=8)
    net.block.bn1.track_running_stats = False  # nothing to fold: the conv keeps its own bias count
    return net


def _stride_two_stem() -> ResCNN:
    net = ResCNN(width=8)
    net.stem[0].stride = (2, 2)  # same shapes as ResCNN(width=8), other convolution
    return net


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(
    ("other", "match"),
    [
        (lambda: ResCNN(width=4), r"layer 'stem\.0' holds 144 packed bytes, but the float model's Conv2d with 'stem\.1' folded in needs 76; pass"),
        (_stride_two_stem, r"layer 'stem\.0' was saved from a layer other than the float model's Conv2d with 'stem\.1' folded in \(shape, op"),
        (_stats_free_bn, r"layer 'block\.conv1' holds 648 packed bytes, but the float model's Conv2d \(no BatchNorm folded in\) needs 616"),
        (lambda: MLP(784, (8,), 10), r"the float model has no layer 'stem\.0'; pass the float model the file was saved from"),
    ],
)
def test_load_quantized_checks_the_float_model_against_the_file(tmp_path, suffix: str, other, match: str) -> None:
    torch.manual_seed(0)
    float_net = ResCNN(width=8)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=8))
    calibrate(net, torch.randn(8, 1, 12, 12))
    path = tmp_path / f"cnn{suffix}"
    save_quantized(convert_fake_quant(net), path)
    assert load_quantized(ResCNN(width=8), path) is not None  # the same class, other weights: fine
    with pytest.raises(ValueError, match=match):
        load_quantized(other(), path)


def test_load_quantized_reads_files_that_hold_the_whole_spec(tmp_path) -> None:
    torch.manual_seed(0)
    float_net = ResCNN(width=8)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    calibrate(net, torch.randn(8, 1, 12, 12))
    converted = convert_fake_quant(net)
    torch.save({"quantization_spec": converted.quantization_spec, "state_dict": converted.state_dict()}, tmp_path / "first.pt")
    reloaded = load_quantized(float_net, tmp_path / "first.pt")  # the layout save_quantized wrote at first
    assert reloaded.quantization_spec == converted.quantization_spec
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), converted(x), atol=0, rtol=0)


def test_pt_file_aligns_packed_layers_after_odd_sized_byte_buffers(tmp_path) -> None:
    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.arange(3, dtype=torch.uint8))  # 3 bytes before the packed layer
            self.fc = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.table.sum()

    torch.manual_seed(0)
    net = WithTable()
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    converted = convert_fake_quant(net)
    save_quantized(converted, tmp_path / "t.pt")
    reloaded = load_quantized(WithTable(), tmp_path / "t.pt")
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), converted(x), atol=0, rtol=0)


def _saved_mlp_blob(tmp_path) -> tuple[dict, nn.Module]:
    torch.manual_seed(0)
    net = MLP(16, (8,), 4)
    prepare_fake_quant(net, QuantSettings(bits=8))
    calibrate(net, torch.randn(8, 16))
    converted = convert_fake_quant(net)
    save_quantized(converted, tmp_path / "q.pt")
    return torch.load(tmp_path / "q.pt", weights_only=True), converted


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"version": 1}, r"edited\.pt: quantisation spec version 1 is not one this release reads \(\[2, 3\]"),
        ({"digests": "abcdef"}, r"edited\.pt: its layer digests do not fit the 2 layers it lists; the file is damaged"),
        ({"digests": "0" * 12}, r"edited\.pt: layer 'net\.1' was saved from a layer other than the float model's Linear"),
    ],
)
def test_load_quantized_refuses_an_unknown_version_or_damaged_digests(tmp_path, edit: dict, match: str) -> None:
    blob, _ = _saved_mlp_blob(tmp_path)
    blob["quantization_spec"].update(edit)
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=match):
        load_quantized(MLP(16, (8,), 4), tmp_path / "edited.pt")


def test_load_quantized_reads_version_2_files_with_one_whole_digest(tmp_path) -> None:
    from lightning_compress.quantization.files import _whole_digest

    blob, converted = _saved_mlp_blob(tmp_path)
    spec = blob["quantization_spec"]
    del spec["digests"]
    spec.update(version=2, digest=_whole_digest(converted.quantization_spec))
    torch.save(blob, tmp_path / "v2.pt")
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(MLP(16, (8,), 4), tmp_path / "v2.pt")(x), converted(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"v2\.pt was saved from a model whose quantised layers differ"):
        load_quantized(MLP(16, (6,), 4), tmp_path / "v2.pt")


def test_first_layout_files_are_checked_for_missing_layers(tmp_path) -> None:
    _, converted = _saved_mlp_blob(tmp_path)
    torch.save({"quantization_spec": converted.quantization_spec, "state_dict": converted.state_dict()}, tmp_path / "first.pt")
    with pytest.raises(ValueError, match=r"first\.pt: the float model has no layer 'net\.3'"):
        load_quantized(MLP(16, (), 4), tmp_path / "first.pt")


def test_pt_file_keeps_tied_weights_tied_in_one_storage_per_dtype(tmp_path) -> None:
    torch.manual_seed(0)
    float_net = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False), nn.Linear(10, 4))
    float_net[1].weight = float_net[0].weight
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=8), include=["^2$"])
    idx = torch.randint(0, 10, (8,))
    calibrate(net, idx)
    converted = convert_fake_quant(net)
    save_quantized(converted, tmp_path / "tied.pt")
    state = torch.load(tmp_path / "tied.pt", weights_only=True)["state_dict"]
    assert state["0.weight"].data_ptr() == state["1.weight"].data_ptr()  # stored once
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == 2  # one per dtype: float32, uint8
    reloaded = load_quantized(float_net, tmp_path / "tied.pt")
    assert reloaded[0].weight.data_ptr() == reloaded[1].weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx), converted(idx), atol=0, rtol=0)


def test_safetensors_foreign_file_and_tied_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="safetensors file of 1 tensors that save_quantized did not write"):
        load_quantized(MLP(4, (3,), 2), tmp_path / "plain.safetensors")
    tied = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    tied[1].weight = tied[0].weight
    one = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    assert serialized_size(tied, format="safetensors") < serialized_size(one, format="safetensors")
    with pytest.raises(ValueError, match="unknown format 'onnx'; valid choices"):
        serialized_size(tied, format="onnx")


def test_convert_cnn_folds_batchnorm_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    float_net = ResCNN(width=8)
    float_net.train()(torch.randn(32, 1, 12, 12) * 3 + 1)  # non-trivial running statistics
    net = copy.deepcopy(float_net).eval()
    prepare_fake_quant(net, QuantSettings(bits=4))
    x = torch.randn(8, 1, 12, 12)
    calibrate(net, x)
    converted = convert_fake_quant(net)
    folded = {v.get("folded_bn") for v in converted.quantization_spec.values()} - {None}
    assert folded == {"stem.1", "block.bn1", "block.bn2", "down.1"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), net(x), atol=1e-5, rtol=1e-5)
    save_quantized(converted, str(tmp_path / "cnn.pt"))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(float_net, str(tmp_path / "cnn.pt"))(x), converted(x))
    unfolded = convert_fake_quant(net, fold_bn=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules()) == 4
    save_quantized(unfolded, tmp_path / "unfolded.safetensors")  # the file says not to fold at load
    again = load_quantized(float_net, tmp_path / "unfolded.safetensors")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in again.modules()) == 4
    assert again.quantization_spec == unfolded.quantization_spec
    with torch.no_grad():
        torch.testing.assert_close(again(x), unfolded(x), atol=0, rtol=0)
    for layer in fake_quant_layers(net).values():  # observers still on, as after QAT without freeze_observers_epoch
        layer.quantizer.observing = True
    still_observing = convert_fake_quant(net)
    assert {v.get("folded_bn") for v in still_observing.quantization_spec.values()} - {None} == folded


class _ConvCalledTwice(nn.Module):
    """One conv run twice, each time before its own BatchNorm; and one BatchNorm after two convs."""

    def __init__(self, w: int = 8) -> None:
        super().__init__()
        self.shared, self.bn_a, self.bn_b = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.BatchNorm2d(w)
        self.left, self.right, self.bn = nn.Conv2d(1, w, 3, padding=1), nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.fc = nn.Linear(w, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_a(self.shared(x)).relu() + self.bn_b(self.shared(x)).relu()
        return self.fc((y + self.bn(self.left(x)).relu() + self.bn(self.right(x)).relu()).mean((2, 3)))


def test_a_batchnorm_is_folded_only_into_a_conv_it_alone_follows(tmp_path) -> None:
    """Folding ``bn_b`` into a conv also run before ``bn_a`` changed that call (converted logits 1.27 off, with no
    warning); folding one BatchNorm into the first of two convs left an Identity for the second (AttributeError when
    fit ended). Neither is folded; the converted model and its file agree with the fake-quant model."""
    torch.manual_seed(0)
    float_net = _ConvCalledTwice()
    for _ in range(3):
        float_net.train()(torch.randn(16, 1, 8, 8) * 2 + 1)
    with torch.no_grad():  # the two BatchNorms after the shared conv clearly differ, as trained ones do
        float_net.bn_b.weight.fill_(2.0), float_net.bn_b.running_var.mul_(0.25)
    net = copy.deepcopy(float_net).eval()
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    x = torch.randn(8, 1, 8, 8)
    converted = convert_fake_quant(net)
    assert {v.get("folded_bn") for v in converted.quantization_spec.values()} == {None}
    save_quantized(converted, tmp_path / "twice.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(converted(x), net(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_quantized(float_net, tmp_path / "twice.safetensors")(x), converted(x))


def test_convert_cnn_and_int8_linear_module() -> None:
    torch.manual_seed(0)
    net = ResCNN(width=8)
    prepare_fake_quant(net, QuantSettings(bits=8))
    x = torch.randn(8, 1, 12, 12)
    calibrate(net, x)
    for backend in ("auto", "torchao"):
        converted = convert_fake_quant(net, backend=backend)
        formats = {k: v["format"] for k, v in converted.quantization_spec.items()}
        assert formats["fc"] == ("int8_linear" if backend == "auto" else "torchao_int8_dynamic")
        with torch.no_grad():
            assert torch.allclose(converted(x), net(x), atol=0.05)
    assert isinstance(convert_fake_quant(net).fc, Int8Linear)
    with pytest.raises(ValueError, match="valid choices"):
        convert_fake_quant(net, backend="tensorrt")
    with pytest.raises(ValueError, match="no fake-quantised layer"):
        convert_fake_quant(MLP(4, (4,), 2))


def test_converted_layers_keep_one_buffer_and_fresh_views(tmp_path) -> None:
    torch.manual_seed(0)
    float_net = ResCNN(width=8)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=8))
    x = torch.randn(8, 1, 12, 12)
    calibrate(net, x)
    converted = convert_fake_quant(net)
    for name in converted.quantization_spec:
        layer = converted.get_submodule(name)
        assert list(layer.state_dict()) == ["packed"] and layer.packed.dtype == torch.uint8
    fc = converted.fc
    assert fc.weight_t.shape == (fc.in_features, fc.out_features) and fc.weight_t.dtype == torch.int8
    assert fc.weight_t.data_ptr() == fc.packed.data_ptr()  # views, not copies
    with torch.no_grad():
        before = converted(x)
        twin = copy.deepcopy(converted)
        twin.fc.packed.zero_()  # the copy's cached views must follow the copy's own buffer ...
        assert torch.equal(converted(x), before)  # ... and leave the original alone
        assert not torch.equal(twin(x), before)
        twin.load_state_dict(converted.state_dict())  # loading drops the cached views and unpacked weights
        torch.testing.assert_close(twin(x), before)
        twin.stem[0].packed.zero_()
        twin.load_state_dict(converted.state_dict())
        torch.testing.assert_close(twin(x), before)


@pytest.mark.parametrize(("bits", "act"), [(8, 8), (8, None), (4, None)])
def test_converted_layers_follow_buffer_swaps_inference_mode_and_half(bits, act) -> None:
    torch.manual_seed(0)
    net = MLP(16, (8,), 4)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=act))
    x = torch.randn(6, 16)
    calibrate(net, x)
    q = convert_fake_quant(net)
    with torch.inference_mode():
        ref = q(x)  # the first call fills the cache under inference mode ...
    xg = x.clone().requires_grad_(True)
    out = q(xg)  # ... which must not leak inference tensors into autograd
    if act is None:  # float compute on the unpacked weight: differentiable in the input
        out.sum().backward()
        assert xg.grad is not None
    zeroed = {k: torch.zeros_like(v) for k, v in q.state_dict().items()}
    with torch.no_grad():
        swapped = torch.func.functional_call(q, zeroed, (x,))
        assert not torch.allclose(swapped, ref)  # the swapped-in buffers are used, not cached views
        torch.testing.assert_close(q(x), ref)
        if act is None:  # weight-only layers compute in the input's dtype
            out = copy.deepcopy(q).half()(x.half())
            assert out.dtype == torch.float16
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_log_filter_drops_only_cuda_extension_notices() -> None:
    import logging

    from lightning_compress.quantization.convert import _DropCudaExtensionNoise

    f = _DropCudaExtensionNoise()

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("torchao", logging.WARNING, __file__, 1, msg, None, None)

    assert not f.filter(rec("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load"))
    assert f.filter(rec("Skipping import of cpp extensions due to incompatible torch version"))
    assert f.filter(rec("a real warning"))


@pytest.mark.slow
def test_torchao_cuda_extension_notices_filtered() -> None:
    import subprocess
    import sys

    code = "from lightning_compress.quantization.convert import import_torchao; import_torchao()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to load" not in proc.stderr and "KernelPreference" not in proc.stderr


@pytest.mark.parametrize("attention", ["mha", "sdpa"])
def test_a_bfloat16_model_converts_to_layers_that_compute_in_bfloat16(attention: str, tmp_path) -> None:
    """Converted layers keep the model's float dtype: an embedding lookup (no floating input to follow)
    and the weight and bias nn.MultiheadAttention reads from its out_proj come in bfloat16, so the
    converted bf16 GPT runs and agrees with its fake-quantised self, and so do its compact artifact and
    the model load_quantized rebuilds from a file; .float() moves them to float32."""
    import lightning_compress as lc
    from lightning_compress.capture import capture
    from lightning_compress.lm import GPTDecoder

    torch.manual_seed(0)
    make = lambda: GPTDecoder(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_len=16, attention=attention).to(torch.bfloat16)  # noqa: E731
    net = make()
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    ids = torch.randint(0, 64, (4, 16))
    net(ids)
    with torch.no_grad():
        fake = net.eval()(ids)
        converted = convert_fake_quant(net).eval()
        real = converted(ids)
    assert real.dtype == torch.bfloat16 and converted.tok_emb.weight.dtype == torch.bfloat16
    assert (fake.argmax(-1) == real.argmax(-1)).float().mean() > 0.9
    assert torch.allclose(fake.float(), real.float(), atol=0.05 * float(fake.abs().max()))
    info = lc.export(converted, tmp_path / "gpt.safetensors", ids)
    lc.save_quantized(converted, tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.allclose(lc.load(tmp_path / "gpt.safetensors")(ids).float(), real.float(), atol=0.02 * float(real.abs().max()))
        assert capture(converted, ids).module()(ids).dtype == torch.bfloat16  # unpacked once, as export_for_cpu does
        assert torch.equal(load_quantized(make(), tmp_path / "q.safetensors")(ids), real)
        assert converted.float()(ids).dtype == torch.float32
    assert info["same_as"] == {"state/head.packed": "state/tok_emb.packed"}  # the tied head, and nothing else


@pytest.mark.parametrize("activation_bits", [8, None])
def test_a_weight_changed_after_conversion_is_an_error_not_a_lost_change(tmp_path, activation_bits: int | None) -> None:
    """peft's merge_and_unload adds the adapter to `layer.weight.data`: an Int8Linear computed without it and a
    weight-only layer saved and exported without it (0.0104 in the logits), silently. Reading the weight is fine."""
    import lightning_compress as lc

    torch.manual_seed(0)
    model = MLP(16, (32,), 4)
    prepare_fake_quant(model, QuantSettings(bits=8, activation_bits=activation_bits))
    calibrate(model, torch.randn(64, 16))
    converted = convert_fake_quant(model).eval()
    layer = converted.net[1]
    assert isinstance(layer, Int8Linear if activation_bits else LowBitLayer)
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = converted(x)
        _ = layer.weight.sum()  # a read changes nothing: every use goes on
        torch.testing.assert_close(converted(x), before, rtol=0, atol=0)
    save_quantized(converted, tmp_path / "read.safetensors")
    with torch.no_grad():  # a write through the packed buffer's views leaves a stale cache, not a changed weight
        layer.params.mul_(1.0)
        layer.packed[-4:] = torch.tensor([float("nan")]).view(torch.uint8)  # a NaN in the float section equals itself
    copy.deepcopy(converted).state_dict()
    layer.weight.data += 0.01 * torch.randn_like(layer.weight)  # what peft's unsafe merge does
    said = r"(Int8Linear|LowBitLayer): its weight was changed in place after conversion \(an adapter merged into it, such as peft's merge_and_unload\?\)"
    uses = [lambda: copy.deepcopy(converted), lambda: save_quantized(converted, tmp_path / "m.safetensors"),
            lambda: lc.export(converted, tmp_path / "m.bin", x)]
    if activation_bits:  # its product never reads the float weight
        uses.append(lambda: converted(x))
    for use in uses:
        with pytest.raises(RuntimeError, match=said):
            use()
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.bin").exists()


def test_saving_the_inner_model_of_a_converted_wrapper_says_what_to_save(tmp_path) -> None:
    """convert_fake_quant sets the spec on the module it returns; peft's merge_and_unload returns the inner model of
    that wrapper, and save_quantized said "not a converted model ... convert it with convert_fake_quant first", which
    then refused it as having no fake-quantised layer. A merge into its converted layers is said as such."""

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    torch.manual_seed(0)
    wrapped = Wrapper(MLP(16, (32,), 4))
    prepare_fake_quant(wrapped, QuantSettings(bits=8, activation_bits=None))
    converted = convert_fake_quant(wrapped).eval()
    save_quantized(converted, tmp_path / "whole.safetensors")
    with pytest.raises(ValueError, match=r"MLP holds 2 converted layers but no quantization_spec, which convert_fake_quant sets on "
                       r"the module it returns .*: save the module it returned"):
        save_quantized(converted.inner, tmp_path / "inner.safetensors")
    converted.inner.net[1].weight.data += 0.01
    with pytest.raises(RuntimeError, match=r"LowBitLayer: its weight was changed in place after conversion"):
        save_quantized(converted.inner, tmp_path / "inner.safetensors")
    assert not (tmp_path / "inner.safetensors").exists()
    with pytest.raises(ValueError, match=r"not a converted model \(no quantization_spec\)"):
        save_quantized(MLP(16, (32,), 4), tmp_path / "float.safetensors")
