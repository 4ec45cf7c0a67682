"""What an ONNX artifact holds and how it is called: input order, precision, metadata, path, attention weights."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_compress as lc
from lightning_compress.lm import GPTDecoder
from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant

onnx = pytest.importorskip("onnx", reason="format='onnx' needs the onnx extra")
pytest.importorskip("onnxruntime", reason="format='onnx' needs the onnx extra")

from lightning_compress.onnx_load import POSITIONAL_KEY  # noqa: E402 - after the extra's check


class TwoInputs(nn.Module):
    """Two inputs of the same shape: swapping them gives a wrong answer of the right shape."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(a) - b


def _metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def test_positional_tensors_follow_forwards_order_not_the_examples(tmp_path: Path) -> None:
    """Exported from a dict in the order (b, a), the file's inputs are (b, a); the file records forward's
    order (a, b) and a positional call follows it. A file without that record refuses positional tensors
    (two inputs) and names them; keywords work either way."""
    torch.manual_seed(0)
    model = TwoInputs().eval()
    lc.export(model, tmp_path / "ab.onnx", {"b": torch.randn(3, 4), "a": torch.randn(3, 4)}, format="onnx")
    run = lc.load(tmp_path / "ab.onnx")
    x_a, x_b = torch.randn(5, 4), torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x_a, x_b)
    torch.testing.assert_close(run(x_a, x_b), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(x_a, b=x_b), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(b=x_b, a=x_a), expected, rtol=1e-5, atol=1e-5)
    proto = onnx.load(str(tmp_path / "ab.onnx"))
    assert [i.name for i in proto.graph.input] == ["b", "a"]
    assert json.loads(_metadata(proto)[POSITIONAL_KEY]) == ["a", "b"]
    # listed in forward's order, which a positional call follows
    with pytest.raises(TypeError, match=r"unknown input\(s\) \['c'\]; its inputs are \['a', 'b'\]"):
        run(x_a, b=x_b, c=x_b)
    with pytest.raises(TypeError, match=r"\['a'\] given both positionally and by keyword"):
        run(x_a, a=x_a, b=x_b)
    with pytest.raises(TypeError, match=r"takes 2 positional input\(s\) \(a, b\), got 3"):
        run(x_a, x_b, x_b)

    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "unrecorded.onnx"))
    unrecorded = lc.load(tmp_path / "unrecorded.onnx")
    with pytest.raises(TypeError, match=r"does not record the order of forward's arguments; call it by keyword: b, a"):
        unrecorded(x_a, x_b)
    torch.testing.assert_close(unrecorded(a=x_a, b=x_b), expected, rtol=1e-5, atol=1e-5)


def _four_bit_mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    return convert_fake_quant(net).eval()


def test_a_bfloat16_model_is_written_computing_in_float32(tmp_path: Path) -> None:
    """The int8 weights and scales are exact in float32: the file computes in float32 (and says so), takes
    bfloat16 tensors at load, agrees with a float32 copy of the model and with the bfloat16 model up to
    bfloat16 rounding."""
    converted = _four_bit_mlp(torch.bfloat16)
    info = lc.export(converted, tmp_path / "bf16.onnx", torch.randn(2, 16, dtype=torch.bfloat16), format="onnx")
    assert "bfloat16" in info["note"] and "computes in float32" in info["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.onnx"]  # no temporary file left
    proto = onnx.load(str(tmp_path / "bf16.onnx"))
    assert sorted(tuple(i.dims) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8) == [(4, 32), (32, 16)]
    assert not [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.BFLOAT16]

    x = torch.randn(5, 16, dtype=torch.bfloat16)
    got = lc.load(tmp_path / "bf16.onnx")(x)
    with torch.no_grad():
        in_float32 = copy.deepcopy(converted).float()(x.float())
        own = converted(x).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, in_float32, rtol=1e-5, atol=1e-5)
    assert float((got - own).abs().max()) < 0.05 * float(own.abs().max())


@pytest.mark.parametrize("failure", ["onnxruntime cannot load it", "outputs disagree"])
def test_a_failed_export_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    import onnxruntime

    import lightning_compress.onnx_export as onnx_export

    def refuse(*args, **kwargs):
        raise RuntimeError("a type error")

    def disagree(*args, **kwargs):
        raise ValueError("onnxruntime's outputs differ from PyTorch's by up to 1; not written")

    if failure == "onnxruntime cannot load it":
        monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
        expected = r"onnxruntime cannot load the exported graph \(RuntimeError: a type error\); not written"
    else:
        monkeypatch.setattr(onnx_export, "check_agreement", disagree)
        expected = "outputs differ from PyTorch's"
    with pytest.raises(ValueError, match=expected):
        lc.export(_four_bit_mlp(torch.float32), tmp_path / "m.onnx", torch.randn(2, 16), format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_file_holds_no_debugging_records(tmp_path: Path) -> None:
    """No node, graph or tensor metadata (stack traces with source paths, fx node names): the int8 file of
    a small GPT is under half its float weights' size (it was 1.6x their size with the records)."""
    torch.manual_seed(0)
    net = GPTDecoder(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=16, attention="sdpa")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=None))
    net.train()
    net(torch.randint(0, 64, (4, 16)))
    converted = convert_fake_quant(net).eval()
    info = lc.export(converted, tmp_path / "gpt.onnx", torch.randint(0, 64, (1, 16)), format="onnx")

    proto = onnx.load(str(tmp_path / "gpt.onnx"))
    assert not [n.name for n in proto.graph.node if len(n.metadata_props) or n.doc_string]
    assert not proto.graph.metadata_props
    assert not [i.name for i in (*proto.graph.input, *proto.graph.value_info, *proto.graph.initializer) if len(i.metadata_props)]
    raw = (tmp_path / "gpt.onnx").read_bytes()
    source = str(Path(lc.__file__).resolve().parent.parent).encode()
    assert source not in raw and b"stack_trace" not in raw and b"lm.py" not in raw
    assert json.loads(_metadata(proto)[POSITIONAL_KEY]) == ["input_ids"]  # the model-level record stays
    assert info["bytes"] < len(buffer.getvalue()) / 2
    ids = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(lc.load(tmp_path / "gpt.onnx")(ids), converted(ids), rtol=1e-4, atol=1e-4)


def test_the_path_must_end_in_onnx(tmp_path: Path) -> None:
    """load() picks the reader by the suffix: a file written as model_onnx.bin could not be read back."""
    with pytest.raises(ValueError, match=r"must end in '\.onnx' .*; got '.*model_onnx\.bin'"):
        lc.export(nn.Linear(8, 2).eval(), tmp_path / "model_onnx.bin", torch.randn(2, 8), format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_suffix_picks_the_format_and_a_contradicting_one_is_refused(tmp_path: Path) -> None:
    """export(model, "m.onnx") wrote a compact safetensors file under .onnx, which load() then handed to onnxruntime."""
    net, x = nn.Linear(8, 2).eval(), torch.randn(2, 8)
    assert lc.export(net, tmp_path / "m.onnx", x)["format"] == "onnx"
    torch.testing.assert_close(lc.load(tmp_path / "m.onnx")(x), net(x).detach(), rtol=1e-4, atol=1e-4)
    assert lc.export(net, tmp_path / "m.bin", x)["format"] == "compact"
    with pytest.raises(ValueError, match=r"format='compact' to '.*m2\.onnx': load\(\) reads a \.onnx file as 'onnx'; .*\.safetensors"):
        lc.export(net, tmp_path / "m2.onnx", x, format="compact")
    assert not (tmp_path / "m2.onnx").exists()
    # model.ONNX and model.PT2 were written as compact files in silence
    for upper, lower in (("m.ONNX", "m.onnx"), ("m.Pt2", "m.pt2")):
        with pytest.raises(ValueError, match=rf"the suffix picks the format as written.*write '{re.escape(lower)}'"):
            lc.export(net, tmp_path / upper, x)
        assert not (tmp_path / upper).exists()
    # a folder: refused before anything is written (the compact writer left its temporary file and raised on replace)
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("out", "out.onnx"):
        (tmp_path / name).mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=r"is a folder; give the artifact file's path"):
            lc.export(net, tmp_path / name, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.onnx", "out", "out.onnx"]
    # reading is not refused: a compact file saved as m.ONNX before the check loads as it was written
    (tmp_path / "m.bin").rename(tmp_path / "old.ONNX")
    torch.testing.assert_close(lc.load(tmp_path / "old.ONNX")(x), net(x).detach())


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize("kind", ["gpt", "encoder"])
def test_multihead_attention_projections_are_int8_in_the_file(tmp_path: Path, kind: str) -> None:
    """A converted nn.MultiheadAttention keeps a float copy of its packed projection weights: the file holds
    the int8 projection behind DequantizeLinear instead, and no float tensor of its size."""
    torch.manual_seed(0)
    if kind == "gpt":
        net = GPTDecoder(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_len=16)  # attention="mha"
        example, other = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (3, 16))
        attention = "blocks.0.attn.in_proj"
    else:
        net = Encoder()
        example, other = torch.randn(2, 6, 32), torch.randn(3, 6, 32)
        attention = "encoder.layers.0.self_attn.in_proj"
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    converted = convert_fake_quant(net).eval()
    info = lc.export(converted, tmp_path / "mha.onnx", example, format="onnx")
    assert info["layers"][attention] == "4-bit weights in int8"

    proto = onnx.load(str(tmp_path / "mha.onnx"))
    int8 = {i.name: tuple(i.dims) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert int8[f"{attention}.q"] == (96, 32)
    floats = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and sorted(i.dims) == [32, 96]]
    assert not floats
    assert "DequantizeLinear" in {n.op_type for n in proto.graph.node}
    with torch.no_grad():
        expected = converted(other)
    torch.testing.assert_close(lc.load(tmp_path / "mha.onnx")(other), expected, rtol=1e-4, atol=1e-4)


def test_a_damaged_weight_is_an_error_at_load(tmp_path: Path) -> None:
    """onnxruntime runs a flipped bit of a weight without complaint (0.028 off); the file's recorded graph digest
    makes it an error at load."""
    lc.export(_four_bit_mlp(torch.float32), tmp_path / "m.onnx", torch.randn(2, 16), format="onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    blob = bytearray((tmp_path / "m.onnx").read_bytes())
    at = blob.find(weight.raw_data)
    assert at > 0
    blob[at + len(weight.raw_data) // 2] ^= 0x10
    (tmp_path / "damaged.onnx").write_bytes(bytes(blob))
    lc.load(tmp_path / "m.onnx")  # the intact file loads
    with pytest.raises(ValueError, match=r"damaged\.onnx' is damaged: its graph .* does not match the SHA-256"):
        lc.load(tmp_path / "damaged.onnx")


class _ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = x + torch.relu(self.b3(self.c3(x)))
        return self.head(x.flatten(1))


def test_an_int8_cnn_file_serves_the_arithmetic_it_was_checked_with(tmp_path: Path) -> None:
    """onnxruntime's default optimisations fuse this int8 CNN's quantise/dequantise pairs into kernels that round
    differently (35% of 200 rows beyond the tolerance), and two example rows could pass the check by chance. The
    check runs noisy copies of the example too, and the file records the optimisation level it agrees at, which
    load applies: on 200 other inputs the loaded file agrees with the converted model."""
    from conftest import trainer_kwargs
    from lightning.pytorch import Trainer, seed_everything

    from lightning_compress import ClassifierModule, DigitsDataModule, QuantizeCallback
    from lightning_compress.onnx_export import check_agreement

    seed_everything(0)
    module = ClassifierModule(_ResidualCNN(), example_input_shape=(1, 8, 8))
    quant = QuantizeCallback(latency="none", bn_reestimate_batches=2)
    Trainer(callbacks=[quant], **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=1)).fit(
        module, DigitsDataModule(batch_size=32)
    )
    converted = quant.quantized_model.eval()
    torch.manual_seed(1)
    info = lc.export(converted, tmp_path / "cnn.onnx", torch.randn(2, 1, 8, 8), format="onnx")
    run = lc.load(tmp_path / "cnn.onnx")
    x = torch.randn(200, 1, 8, 8)
    with torch.no_grad():
        check_agreement([run(x)], [converted(x)], 2e-3)
    if _metadata(onnx.load(tmp_path / "cnn.onnx")).get("lightning_compress.graph_optimization") == "disable_all":
        assert "optimisations compute this model differently" in info["note"]


class _FloatIds(nn.Module):
    """Token ids held as floats and cast in forward, as some data pipelines hand them over."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(8, 4), nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids.long()).mean(1))


def test_the_check_leaves_ids_held_as_floats_alone(tmp_path: Path) -> None:
    """The check's noisy copies of the example turned float-held ids into indices out of range: the export failed."""
    model = _FloatIds().eval()
    with torch.no_grad():
        model.head.weight[:, ::2] = 0
    ids = torch.randint(0, 8, (2, 5)).float()
    info = lc.export(model, tmp_path / "ids.onnx", ids, format="onnx")
    with torch.no_grad():
        torch.testing.assert_close(lc.load(tmp_path / "ids.onnx")(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert info["max_abs_diff"] < 1e-5


def test_an_operator_onnx_cannot_translate_is_named_in_one_paragraph(tmp_path: Path) -> None:
    """A library's own operator (a mixture of experts' grouped matmul) stopped torch.onnx with screens of 'next steps'
    around the cause: the error names the operator and the formats that take it, and nothing is written."""

    @torch.library.custom_op("lc_tests::opaque_scale", mutates_args=())
    def opaque_scale(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @opaque_scale.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return opaque_scale(self.fc(x))

    with pytest.raises(ValueError, match=r"torch\.onnx could not convert Opaque \(DispatchError: No ONNX function found for .*lc_tests\.opaque_scale.*a compact artifact \(\.safetensors\) or a \.pt2 package") as raised:
        lc.export(Opaque().eval(), tmp_path / "opaque.onnx", torch.randn(2, 4), format="onnx")
    assert "\n" not in str(raised.value) and not list(tmp_path.iterdir())
    assert "an operator ONNX has no translation for" in str(raised.value)


def test_a_graph_torch_onnx_fails_to_rewrite_is_not_blamed_on_a_missing_operator(tmp_path: Path) -> None:
    """A float T5 captures with torch.export, and torch.onnx then fails inside its own rewriting of a ``view``
    (torch 2.13); the message had said the graph held an operator ONNX cannot translate, which it does not."""
    transformers = pytest.importorskip("transformers", reason="the T5 model class is Hugging Face's")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 64, (2, 8))
    call = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :4], "use_cache": False}
    try:
        lc.export(model, tmp_path / "t5.onnx", call)
    except ValueError as err:  # what torch 2.13's torch.onnx does
        assert "no translation" not in str(err), str(err)
        assert "torch.onnx failed while turning that graph into ONNX" in str(err) and "a .pt2 package" in str(err)
        assert not list(tmp_path.iterdir())
    else:  # a torch.onnx that converts it: the file must then compute what the model does
        with torch.no_grad():
            expected = model(**call).logits
        got = lc.load(tmp_path / "t5.onnx")(**{k: v for k, v in call.items() if k != "use_cache"})["logits"]
        assert torch.allclose(torch.as_tensor(got), expected, atol=1e-4)


def test_every_output_comes_back_in_the_models_structure(tmp_path: Path) -> None:
    """A model returning (logits, {"aux": ...}) loaded from ONNX gave the first tensor alone: the rest was dropped
    without a word. The file records the output's structure and the runner rebuilds it."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, dict[str, torch.Tensor | None]]:
            return self.a(x), None, {"aux": self.b(x), "loss": None}  # None leaves have no graph output

    model = TwoHeads().eval()
    lc.export(model, tmp_path / "two.onnx", torch.randn(2, 4), format="onnx")
    x = torch.randn(5, 4)
    got = lc.load(tmp_path / "two.onnx")(x)
    with torch.no_grad():
        expected = model(x)
    assert isinstance(got, tuple) and len(got) == 3 and got[1] is None and got[2]["loss"] is None
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2]["aux"], expected[2]["aux"], rtol=1e-5, atol=1e-5)
