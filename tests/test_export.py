"""lightning_compress.export / load: the compact artifact (sparse indices, packed low-bit values, no pickle)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_compress as lc
from lightning_compress import ClassifierModule, DigitsDataModule, PruningCallback, QuantizeCallback
from lightning_compress.lm import GPTDecoder
from lightning_compress.models import MLP
from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant


@pytest.fixture(scope="module")
def pruned_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A digits MLP pruned to 80% and int8-QAT trained in one real fit; (float model, converted model, test batch)."""
    seed_everything(0)
    module = ClassifierModule(MLP(64, (64, 32), 10))
    prune = PruningCallback(0.8, schedule="one_shot", start_epoch=0, verbose=False)
    quant = QuantizeCallback(start_epoch=1, latency="none")
    dm = DigitsDataModule(batch_size=64)
    Trainer(callbacks=[prune, quant], **trainer_kwargs(tmp_path_factory.mktemp("fit"), max_epochs=3)).fit(module, dm)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    assert quant.quantized_model is not None
    return module.model, quant.quantized_model.eval(), x


def test_compact_artifact_of_a_pruned_int8_model_loads_and_agrees(pruned_int8, tmp_path: Path) -> None:
    float_model, converted, x = pruned_int8
    info = lc.export(converted, tmp_path / "m.safetensors", x[:1])
    assert info["bytes"] == os.path.getsize(tmp_path / "m.safetensors")
    assert set(info["tensors"].values()) - {"dense"}, info["tensors"]  # the zeros are indexed, not stored
    float_file = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, os.fspath(float_file))
    assert info["bytes"] < os.path.getsize(float_file) / 2
    loaded = lc.load(tmp_path / "m.safetensors")
    assert isinstance(loaded, nn.Module)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))  # any batch size: 64 here, exported with 1
        assert torch.equal(loaded(x[:3]), converted(x[:3]))


def test_four_bit_values_stay_packed_and_their_zeros_indexed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = MLP(64, (128,), 10).eval()
    with torch.no_grad():
        for layer in (net.net[1], net.net[3]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.9)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    converted = convert_fake_quant(net).eval()
    x = torch.randn(8, 64)
    info = lc.export(converted, tmp_path / "q4.safetensors", x)
    assert "nibbles" in info["tensors"].values() or "bitmap" in info["tensors"].values()
    assert info["same_as"] == {}  # nothing tied: every reader of format version 1 loads the file
    from safetensors import safe_open

    with safe_open(os.fspath(tmp_path / "q4.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lightning_compress"])["version"] == 1
    with torch.no_grad():
        assert torch.equal(lc.load(tmp_path / "q4.safetensors")(x), converted(x))


def test_a_language_model_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPTDecoder(d_model=32, n_layers=1, n_heads=2, max_len=16, attention="sdpa").eval()
    tokens = torch.randint(0, 256, (2, 16))
    lc.export(model, tmp_path / "lm.safetensors", tokens)
    with torch.no_grad():
        torch.testing.assert_close(lc.load(tmp_path / "lm.safetensors")(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["compact", "onnx"])
def test_dynamic_sequence_takes_other_lengths_within_the_position_table(tmp_path: Path, form: str) -> None:
    """Exported with the example's length only, a language model's artifact refused any other length; with
    dynamic_sequence=True it takes 2 to 32 tokens (its position table), the same logits as the model, and refuses 40."""
    if form == "onnx":
        pytest.importorskip("onnxruntime", reason="format='onnx' needs the onnx extra")
    torch.manual_seed(0)
    model = GPTDecoder(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_len=32).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                layer.weight[:, ::2] = 0
    path = tmp_path / ("lm.safetensors" if form == "compact" else "lm.onnx")
    lc.export(model, path, torch.randint(0, 64, (2, 12)), format=form, dynamic_sequence=True)
    run = lc.load(path)
    for length in (2, 5, 32):
        tokens = torch.randint(0, 64, (3, length))
        with torch.no_grad():
            torch.testing.assert_close(run(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception):  # noqa: B017 - each runtime words it its own way; none returns numbers
        run(torch.randint(0, 64, (3, 40)))
    with pytest.raises(ValueError, match=r"dynamic_sequence=True needs inputs with a sequence dimension .* at least 2"):
        lc.export(model, tmp_path / "one.safetensors", torch.randint(0, 64, (2, 1)), dynamic_sequence=True)
    with pytest.raises(ValueError, match=r"dynamic_sequence=True needs dynamic_batch=True"):
        lc.export(model, tmp_path / "fixed" / path.name, torch.randint(0, 64, (2, 12)), format=form, dynamic_batch=False, dynamic_sequence=True)
    assert not (tmp_path / "fixed").exists()  # refused before anything is written


def test_a_tied_weight_is_stored_once(tmp_path: Path) -> None:
    """The head tied to the embedding is one tensor under two names in the graph: the file stores it once
    (smaller than the same model untied by the embedding's bytes), and the loaded model agrees. A file whose
    pointer names no stored tensor is a clear error."""
    torch.manual_seed(0)
    tied = GPTDecoder(d_model=32, n_layers=1, n_heads=2, max_len=16, attention="sdpa").eval()
    untied = GPTDecoder(d_model=32, n_layers=1, n_heads=2, max_len=16, attention="sdpa", tie_weights=False).eval()
    untied.load_state_dict(tied.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    info = lc.export(tied, tmp_path / "tied.safetensors", tokens)
    apart = lc.export(untied, tmp_path / "untied.safetensors", tokens)
    assert list(info["same_as"].items()) == [("state/head.weight", "state/tok_emb.weight")] and not apart["same_as"]
    assert info["tensors"]["state/head.weight"] == info["tensors"]["state/tok_emb.weight"]
    assert apart["bytes"] - info["bytes"] > 0.8 * tied.tok_emb.weight.numel() * 4  # float32 weights compress little
    with torch.no_grad():
        assert torch.equal(lc.load(tmp_path / "tied.safetensors")(tokens), tied(tokens))

    def point_elsewhere(tensors, metadata):
        header = json.loads(metadata["lightning_compress"])
        header["entries"]["state/head.weight"]["same_as"] = "state/nothing"
        metadata["lightning_compress"] = json.dumps(header)

    _rewrite(tmp_path / "tied.safetensors", point_elsewhere)
    with pytest.raises(ValueError, match=r"damaged: tensor 'state/head\.weight' is missing or misnamed"):
        lc.load(tmp_path / "tied.safetensors")


class KeywordOnly(nn.Module):
    """An HF-style forward: keyword-only ``input_ids`` and ``attention_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids)) * attention_mask.unsqueeze(-1)


@pytest.mark.parametrize("form", ["compact", "pt2"])
def test_keyword_forwards_export_and_load_called_by_keyword(tmp_path: Path, form: str) -> None:
    """A keyword-only forward (and one mixing positional and keyword inputs through a ForwardCall): exported
    from a batch of 1, loaded, called by keyword at another batch size, equal to the model."""
    from lightning_compress.batches import ForwardCall

    torch.manual_seed(0)
    model = KeywordOnly().eval()
    with torch.no_grad():
        model.head.weight[:, ::2] = 0  # something for the compact file to index
    example = {"input_ids": torch.randint(0, 32, (1, 6)), "attention_mask": torch.ones(1, 6)}
    path = tmp_path / ("kw.safetensors" if form == "compact" else "kw.pt2")
    info = lc.export(model, path, example, format=form)
    assert info["bytes"] == path.stat().st_size > 0
    loaded = lc.load(path)
    batch = {"input_ids": torch.randint(0, 32, (5, 6)), "attention_mask": (torch.rand(5, 6) > 0.3).float()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), model(**batch), rtol=1e-5, atol=1e-5)
    if form == "compact":
        mixed = nn.Bilinear(4, 3, 2).eval()
        call = ForwardCall((torch.randn(3, 4),), {"input2": torch.randn(3, 3)})
        lc.export(mixed, tmp_path / "mixed.safetensors", call)
        x1, x2 = torch.randn(7, 4), torch.randn(7, 3)
        with torch.no_grad():
            torch.testing.assert_close(lc.load(tmp_path / "mixed.safetensors")(x1, input2=x2), mixed(x1, x2))
        # called positionally: the keywords are named (torch said "Ran into a kwarg keyword mismatch")
        with pytest.raises(TypeError, match=r"kw.safetensors' takes 0 positional input\(s\), got 2; pass the others by keyword: input_ids, attention_mask"):
            loaded(batch["input_ids"], batch["attention_mask"])
        with pytest.raises(TypeError, match=r"takes 1 positional input\(s\), got 2; pass the others by keyword: input2"):
            lc.load(tmp_path / "mixed.safetensors")(x1, x2)
        # a keyword left out: torch's "Ran into a kwarg keyword mismatch" before
        with pytest.raises(TypeError, match=r"kw.safetensors': missing input\(s\) \['attention_mask'\]; it takes "
                                            r"\['input_ids', 'attention_mask'\] by keyword"):
            loaded(input_ids=batch["input_ids"])
        with pytest.raises(TypeError, match=r"mixed.safetensors': missing input\(s\) \['input2'\]; it takes 1 input\(s\) by "
                                            r"position then \['input2'\] by keyword"):
            lc.load(tmp_path / "mixed.safetensors")(x1)


def test_onnx_takes_keyword_inputs_and_is_called_by_name(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="format='onnx' needs the onnx extra")
    torch.manual_seed(0)
    model = KeywordOnly().eval()
    example = {"attention_mask": torch.ones(2, 6), "input_ids": torch.randint(0, 32, (2, 6))}  # not forward's order
    written = lc.export(model, tmp_path / "kw.onnx", example, format="onnx")
    assert written["max_abs_diff"] < 1e-5
    other = {"input_ids": torch.randint(0, 32, (5, 6)), "attention_mask": (torch.rand(5, 6) > 0.3).float()}
    with torch.no_grad():
        assert torch.allclose(lc.load(tmp_path / "kw.onnx")(**other), model(**other), atol=1e-5)  # any batch size


def test_loading_never_unpickles_anything_but_plain_tensors(pruned_int8, tmp_path: Path, monkeypatch) -> None:
    _, converted, x = pruned_int8
    lc.export(converted, tmp_path / "m.safetensors", x[:2])
    real_load = torch.load
    calls = []

    def only_weights(*args, **kwargs):  # the deserializer's fallback would be weights_only=False
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", only_weights)
    lc.load(tmp_path / "m.safetensors")
    assert calls and all(calls)


def test_a_model_with_nothing_compressed_is_written_plainly_and_said_so(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="nothing in Sequential is compressed"):
        info = lc.export(net, tmp_path / "plain.safetensors", torch.randn(3, 4))
    assert set(info["tensors"].values()) == {"dense"} and "note" in info
    with torch.no_grad():
        x = torch.randn(5, 4)
        assert torch.equal(lc.load(tmp_path / "plain.safetensors")(x), net(x))
    # a zero bias or a BatchNorm's counter is no compression; a model with channels removed is, though dense
    from lightning_compress import ResCNN, shrink_model

    with pytest.warns(UserWarning, match="nothing in ResCNN is compressed"):
        lc.export(ResCNN(width=8).eval(), tmp_path / "cnn.safetensors", torch.randn(1, 1, 8, 8))
    mlp = MLP(16, (64,), 4).eval()
    shrink_model(mlp, {"net.1": torch.arange(64) < 8}, torch.zeros(1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "note" not in lc.export(mlp, tmp_path / "shrunk.safetensors", torch.randn(2, 16))


def test_bad_format_and_missing_example_are_clear_errors(tmp_path: Path) -> None:
    net = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"unknown export format 'onnx2'; valid: \['compact', 'onnx', 'pt2'\]"):
        lc.export(net, tmp_path / "x", torch.randn(2, 4), format="onnx2")
    with pytest.raises(ValueError, match="needs example_inputs"):
        lc.export(net, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match=r"got a dict where 'lengths' is a list: an artifact takes tensors"):
        lc.export(net, tmp_path / "x.safetensors", {"input": torch.randn(2, 4), "lengths": [4, 4]})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx", ".pt2"])
def test_a_lightning_module_without_forward_is_told_which_network_to_export(tmp_path: Path, suffix: str) -> None:
    """The Hugging Face wrapper the docs show calls ``self.model(**batch)`` in its steps and defines no forward;
    exporting it gave torch's "_forward_unimplemented() got an unexpected keyword argument 'input_ids'"."""
    from lightning.pytorch import LightningModule

    class Wrapper(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)  # smaller: not the one to name
            self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            return self.model(batch["x"]).sum()

    module = Wrapper()
    with pytest.raises(TypeError, match=r"defines no forward .* e\.g\. export\(module\.model, \.\.\.\)"):
        lc.export(module, tmp_path / f"m{suffix}", {"x": torch.randn(2, 4)})
    with pytest.raises(TypeError, match=r"export_for_cpu: Wrapper defines no forward"):
        lc.export_for_cpu(module, {"x": torch.randn(2, 4)}, tmp_path / "n.pt2")
    assert not list(tmp_path.iterdir())
    assert lc.export(module.model, tmp_path / "m.safetensors", torch.randn(2, 4))["bytes"] > 0  # what the message says works

    class Distilling(Wrapper):  # a frozen teacher larger than the student is not the network to name
        def __init__(self) -> None:
            super().__init__()
            self.teacher = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 2)).requires_grad_(False)

    with pytest.raises(TypeError, match=r"e\.g\. export\(module\.model, \.\.\.\)"):
        lc.export(Distilling(), tmp_path / "d.safetensors", {"x": torch.randn(2, 4)})

    class Assigned(Wrapper):  # a forward of the instance's own: exported as it is
        def __init__(self) -> None:
            super().__init__()
            self.forward = self.model.forward

    x = torch.randn(3, 4)
    for name, model in (("assigned", Assigned()), ("wrapper", torch.compile(nn.Linear(4, 2)))):
        lc.export(model, tmp_path / f"{name}.safetensors", torch.randn(2, 4))
        with torch.no_grad():
            torch.testing.assert_close(lc.load(tmp_path / f"{name}.safetensors")(x), model(x))


def _rewrite(path: Path, edit) -> None:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(os.fspath(path))
    edit(tensors, metadata)
    save_file(tensors, os.fspath(path), metadata=metadata)


def test_damaged_newer_and_foreign_files_are_clear_errors(pruned_int8, tmp_path: Path) -> None:
    _, converted, x = pruned_int8
    good = tmp_path / "m.safetensors"
    lc.export(converted, good, x[:2])
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="damaged|truncated"):
        lc.load(truncated)
    truncated.write_bytes(raw[:100])  # cut inside its header: it was called a file of another tool
    with pytest.raises(ValueError, match=r"'.*truncated\.safetensors' is truncated: its safetensors header says \d+ bytes"):
        lc.load(truncated)
    truncated.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        lc.load(truncated)

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(raw)

    def flip(tensors, metadata):
        key = next(k for k in tensors if k.startswith("state/"))
        tensors[key] = tensors[key].clone()
        tensors[key][len(tensors[key]) // 2] ^= 0xFF

    _rewrite(flipped, flip)
    with pytest.raises(ValueError, match=r"damaged: tensor '.*'"):
        lc.load(flipped)

    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(raw)
    def bump(tensors, metadata):
        header = json.loads(metadata["lightning_compress"])
        metadata["lightning_compress"] = json.dumps({**header, "version": 99})

    _rewrite(newer, bump)
    with pytest.raises(ValueError, match="format version 99, newer than this library reads .* upgrade"):
        lc.load(newer)

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, os.fspath(foreign))
    with pytest.raises(ValueError, match="not a lightning-compress compact artifact"):
        lc.load(foreign)
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(ValueError, match="not an artifact written by lightning_compress.export"):
        lc.load(pickled)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an artifact"):
        lc.load(text)
    with pytest.raises(FileNotFoundError):
        lc.load(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------------- ONNX
def test_onnx_holds_int8_weights_and_activations_and_onnxruntime_agrees(pruned_int8, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    import onnx

    float_model, converted, x = pruned_int8
    info = lc.export(converted, tmp_path / "m.onnx", x[:1], format="onnx")
    # checked on noisy copies of the one-row example too, where one rounding flip is forgiven; the example itself agrees
    assert info["max_abs_diff"] < 0.02 and info["onnxruntime_ms"] > 0 and info["torch_ms"] > 0
    with torch.no_grad():
        assert float((lc.load(tmp_path / "m.onnx")(x[:1]) - converted(x[:1])).abs().max()) < 1e-4
    assert set(info["layers"].values()) == {"int8 weights, int8 activations (QuantizeLinear/DequantizeLinear)"}
    proto = onnx.load(os.fspath(tmp_path / "m.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert sorted(tuple(i.dims) for i in int8) == sorted(tuple(m.weight.shape) for m in float_model.modules() if isinstance(m, nn.Linear))
    run = lc.load(tmp_path / "m.onnx")
    with torch.no_grad():
        got, expected = run(x), converted(x)  # any batch size
    # an input within float error of a rounding half may land on the neighbouring int8 level in one of
    # the two runtimes: at most one activation step times the weights, and the same predictions
    assert float((got - expected).abs().max()) < 2e-3 * float(expected.abs().max())
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize(
    ("rows", "by", "passes", "of"),
    [(1, 5.0, True, 1000), (10, 5.0, True, 1000), (11, 5.0, False, 1000), (1, 19.0, True, 1000), (1, 25.0, False, 1000),
     (1, 5.0, True, 9), (2, 5.0, False, 9)],
)
def test_onnx_check_forgives_a_few_rounding_flips_only(rows: int, by: float, passes: bool, of: int) -> None:
    """onnxruntime's outputs shifted at ``rows`` of ``of`` output rows by ``by`` times the tolerance: up to
    1% of the rows (or one row) a few tolerances off are rounding flips; more rows, or one row 20 tolerances off,
    are refused. One flip in a one-row example's 9 checked rows was 11%, refused."""
    from lightning_compress.onnx_export import check_agreement

    expected = torch.randn(of, 10)
    got = expected.clone()
    got[:rows, 3] += by * 2e-3 * max(1.0, float(expected.abs().max()))
    if passes:
        assert check_agreement([got], [expected], 2e-3) == pytest.approx(by * 2e-3 * max(1.0, float(expected.abs().max())), rel=1e-3)
    else:
        with pytest.raises(ValueError, match=r"onnxruntime's outputs differ from PyTorch's by up to .*; not written"):
            check_agreement([got], [expected], 2e-3)


@pytest.mark.parametrize("fault", ["input scale doubled", "zero row off by one flip"])
def test_onnx_check_of_a_one_row_zero_example_probes_the_scales_and_forgives_one_flip(
    pruned_int8, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """ClassifierModule's example_input_array is one row of zeros. At zero every int8 input is its zero point
    whatever its scale, and an all-zero input counted as ids held as floats, so no noisy copy ran: a file with
    its first layer's input scale doubled was written. And with one row and 8 copies, one rounding flip was 11%
    of the rows: a bfloat16 PTQ model's file (its zero row on a rounding half) was refused. Now the zeros get
    noise, a one-row example is checked on 32 copies, and one flipped row is forgiven."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    import lightning_compress.onnx_export as onnx_export

    _, converted, _ = pruned_int8
    own_view = onnx_export._qdq_view

    def faulty(model: nn.Module):
        view, stored = own_view(model)
        if fault == "input scale doubled":
            next(m for m in view.modules() if isinstance(m, onnx_export._QDQLayer)).act_scale.mul_(2.0)
        else:  # what a rounding flip does: one row, a few tolerances off (at the all-zero input only)
            inner = view.forward
            view.forward = lambda x: inner(x) + 5 * 2e-3 * (x == 0).all(-1, keepdim=True) * max(1.0, float(inner(x).abs().max()))
        return view, stored

    monkeypatch.setattr(onnx_export, "_qdq_view", faulty)
    zeros = torch.zeros(1, 64)
    if fault == "input scale doubled":
        with pytest.raises(ValueError, match=r"beyond .* in [1-9]\d(\.\d)?% of the output rows"):
            lc.export(converted, tmp_path / "m.onnx", zeros)
        assert not (tmp_path / "m.onnx").exists()
    else:
        assert lc.export(converted, tmp_path / "m.onnx", zeros)["max_abs_diff"] > 2e-3


def test_onnx_check_at_tokens_keeps_a_samples_row_of_position_scores() -> None:
    """A (batch, seq_len) output (a question-answering model's start_logits) compared at the tokens was indexed into
    one vector: one row, where each sample is one. Its rows are kept; the padded entries, which runtimes fill as they
    like, count as agreeing."""
    from lightning_compress.onnx_export import check_agreement_at_tokens

    tokens = torch.ones(200, 16, dtype=torch.bool)
    tokens[:, 12:] = False
    expected = torch.randn(200, 16)
    got = expected.clone()
    got[:, 12:] += 1.0  # every padded entry differs
    got[0, 3] += 5 * 2e-3 * float(expected.abs().max())  # one rounding flip: 1 of 200 samples
    assert check_agreement_at_tokens([got], [expected], tokens, 2e-3) > 0
    got[1:3, 5] += 5 * 2e-3 * float(expected.abs().max())  # three samples: 1.5% of the rows
    with pytest.raises(ValueError, match=r"in 1.5% of the output rows"):
        check_agreement_at_tokens([got], [expected], tokens, 2e-3)


def test_onnx_check_counts_a_feature_maps_entries_and_takes_a_tolerance(tmp_path: Path) -> None:
    """One rounding flip in a conv net shifts a 3x3 patch of a (N, C, H, W) output: 3 of 128 rows along the width
    (2.3%, refused; a U-Net's int8 export was refused or written depending on the example's batch size), 9 of 2,048
    entries (0.4%). A feature map's entries are counted; a (N, T, V) output keeps its rows (a position's logits).
    export(format="onnx") takes the tolerance, checked on construction."""
    from lightning_compress.onnx_export import check_agreement

    expected = torch.zeros(2, 4, 16, 16)
    got = expected.clone()
    got[0, 1, 5:8, 5:8] += 5 * 2e-3
    assert check_agreement([got], [expected], 2e-3) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match=r"in 2.3% of the output rows .* pass a larger onnx_tolerance \(now 0.002\)"):
        check_agreement([got.reshape(2, 4 * 16, 16)], [expected.reshape(2, 4 * 16, 16)], 2e-3)
    with pytest.raises(ValueError, match=r"onnx_tolerance must be a number in \(0, 1\), got 0"):
        lc.export(nn.Linear(4, 2), tmp_path / "m.onnx", torch.randn(1, 4), format="onnx", onnx_tolerance=0)


def test_onnx_refusal_of_a_float_model_does_not_blame_int8_rounding(tmp_path: Path) -> None:
    """A model without int8 activations has no rounding step the runtimes could take differently: a graph that
    computes otherwise (here a random draw in forward) is refused with that cause, not with int8 rounding flips."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.rand_like(x[:, :4])

    with pytest.raises(ValueError, match=r"quantises no activation, so no rounding step differs") as refused:
        lc.export(Noisy(), tmp_path / "n.onnx", torch.randn(3, 8), format="onnx")
    assert "Rounding flips" not in str(refused.value)
    assert not (tmp_path / "n.onnx").exists()


def test_onnx_refuses_group_scales_and_names_the_way_out(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    net = MLP(64, (32,), 10)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None, granularity=16))
    converted = convert_fake_quant(net).eval()
    with pytest.raises(ValueError, match=r"layer 'net.1' has scales per group of 16 .* a compact artifact \(a \.safetensors path\)"):
        lc.export(converted, tmp_path / "g.onnx", torch.randn(2, 64), format="onnx")
    assert not (tmp_path / "g.onnx").exists()


class ReadsItsWeight(nn.Module):
    """ViT-style: the input is cast to the patch projection's ``weight.dtype`` in the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 4, stride=4)
        self.head = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.patch(x.to(self.patch.weight.dtype)).flatten(1))


def test_onnx_of_a_model_that_reads_a_converted_layers_weight(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    torch.manual_seed(0)
    net = ReadsItsWeight()
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=None))
    converted = convert_fake_quant(net).eval()
    info = lc.export(converted, tmp_path / "w.onnx", torch.randn(2, 1, 8, 8), format="onnx")
    assert info["max_abs_diff"] < 1e-4 and set(info["layers"]) == {"patch", "head"}
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lc.load(tmp_path / "w.onnx")(x), converted(x), rtol=1e-4, atol=1e-4)


def test_onnx_without_its_extra_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "lightning-compress\[onnx\]"'):
        lc.export(nn.Linear(4, 2), tmp_path / "x.onnx", torch.randn(2, 4), format="onnx")


class _Varargs(nn.Module):
    """A wrapper whose forward takes ``*args``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 4)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.net(*args)


def test_varargs_forwards_and_wrappers_export_with_a_dynamic_batch_and_only_what_forward_calls(tmp_path: Path) -> None:
    """A ``forward(*args)`` exports for any batch size; a DistillationModule exports as its forward (the
    student), without the teacher it never calls there, and agrees with the student."""
    from lightning_compress import ResCNN
    from lightning_compress.distillation import DistillationModule

    torch.manual_seed(0)
    wrap = _Varargs().eval()
    lc.export(wrap, tmp_path / "wrap.safetensors", torch.randn(2, 8))
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(lc.load(tmp_path / "wrap.safetensors")(x), wrap(x))

    module = DistillationModule(MLP(64, (32,), 10), ResCNN(width=16), example_input_shape=(1, 8, 8)).eval()
    images = torch.randn(3, 1, 8, 8)
    with pytest.warns(UserWarning, match="nothing in DistillationModule is compressed"):
        info = lc.export(module, tmp_path / "distilled.safetensors", images[:1])
    student = lc.export(module.student, tmp_path / "student.safetensors", images[:1])
    assert not [k for k in info["tensors"] if ".teacher." in k or k.startswith("state/teacher")]
    assert info["bytes"] < student["bytes"] + 512  # the student's weights only (the teacher alone is ~40 KB)
    with torch.no_grad():
        assert torch.equal(lc.load(tmp_path / "distilled.safetensors")(images), module.student(images))


def test_converted_attention_projections_stay_packed_in_the_compact_artifact(tmp_path: Path) -> None:
    """nn.MultiheadAttention reads its projection weight as an attribute: the artifact computes it from
    the packed 4-bit values in the graph instead of storing the dequantised float copy too."""
    from safetensors import safe_open

    torch.manual_seed(0)
    net = GPTDecoder(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_len=16)  # attention="mha"
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    net(torch.randint(0, 64, (4, 16)))
    converted = convert_fake_quant(net).eval()
    ids = torch.randint(0, 64, (3, 16))
    info = lc.export(converted, tmp_path / "mha.safetensors", ids[:2])
    with safe_open(os.fspath(tmp_path / "mha.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "state/blocks.0.attn.in_proj.packed" in names and not [n for n in names if n.endswith("in_proj_weight")]
    lc.save_quantized(converted, tmp_path / "q.safetensors")
    assert info["bytes"] < 1.15 * os.path.getsize(tmp_path / "q.safetensors")  # the graph besides the same packed values
    from lightning_compress.measure import fast_paths_off

    with torch.no_grad(), fast_paths_off():  # eager eval attention takes a fused kernel (1.8e-7 apart); the graph the composite path
        assert torch.equal(lc.load(tmp_path / "mha.safetensors")(ids), converted(ids))


class ReadsItsStride(nn.Module):
    """Computes a shape from ``conv.stride`` in its forward, as Whisper's encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[-1] // self.conv.stride[0]
        return self.head(torch.relu(self.conv(x))[..., :steps].mean(-1))


def test_a_converted_model_that_reads_its_layers_configuration_exports(tmp_path: Path) -> None:
    """The converted conv answers ``stride`` as the float one did, so the graph is captured and the
    artifact agrees with the converted model."""
    torch.manual_seed(0)
    net = ReadsItsStride()
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    converted = convert_fake_quant(net).eval()
    lc.export(converted, tmp_path / "stride.safetensors", torch.randn(2, 4, 16))
    x = torch.randn(5, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(lc.load(tmp_path / "stride.safetensors")(x), converted(x), rtol=0, atol=1e-6)


class _TokenTagger(ClassifierModule):
    """Dict batches, and a step that calls its model by keyword (``self.model(**inputs)``), as Hugging Face projects do."""

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def test_export_to_packages_the_whole_keyword_call_of_the_step(tmp_path: Path) -> None:
    """QuantizeCallback(export_to=...) exported the first tensor of the call, one sample of it: a keyword-only
    model was not written, and a model that takes a mask lost it. The package takes the step's whole call, at any
    batch size, and agrees with the converted model; with export_dynamic_sequence (reachable from a YAML) at any
    sequence length too (trained at 6)."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    ids = torch.randint(0, 32, (64, 6))
    rows = [{"input_ids": i, "attention_mask": (torch.rand(6) > 0.2).float(), "labels": i} for i in ids]
    quant = QuantizeCallback(method="ptq", calibration_batches=2, latency="none", export_to="tagger.pt2", export_dynamic_sequence=True)
    module = _TokenTagger(KeywordOnly())
    Trainer(callbacks=[quant], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0)).fit(module, DataLoader(rows, batch_size=16))
    written = quant.compression_summary()["exported_to"]["path"]
    run = lc.load(written)
    for length in (6, 3, 11):
        batch = {"input_ids": torch.randint(0, 32, (5, length)), "attention_mask": (torch.rand(5, length) > 0.3).float()}
        with torch.no_grad():
            torch.testing.assert_close(run(**batch), quant.quantized_model(**batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"compiled for \(any, 2\+\)"):  # a sequence of 1 is outside what export allows
        run(input_ids=torch.randint(0, 32, (5, 1)), attention_mask=torch.ones(5, 1))


def test_a_strided_example_exports_and_the_loaded_artifact_takes_eval(tmp_path: Path) -> None:
    """x[:, :2] of a sequence-first batch is a strided view: torch.export tied its strides to the batch and refused a
    dynamic one. And `model = lc.load(...); model.eval()` must work (torch.export's module raises on eval())."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # sequence-first: (T, N, E)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with torch.no_grad():
        model.layers[0].linear1.weight[:, ::2] = 0
    batch = torch.randn(5, 4, 8)
    lc.export(model, tmp_path / "seq.safetensors", batch[:, :2])
    loaded = lc.load(tmp_path / "seq.safetensors")
    assert loaded.eval() is loaded and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="a compact artifact is an inference graph"):
        loaded.train()


class _SequenceFirstWithPadding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.enc(x, src_key_padding_mask=mask)  # PyTorch's own layout: x (S, N, E), mask (N, S)


@pytest.mark.parametrize("example_batch", [1, 2])
def test_a_sequence_first_model_with_a_key_padding_mask_exports_with_a_dynamic_batch(tmp_path: Path, example_batch: int) -> None:
    """The mask's batch is its dimension 0 beside a (S, N, E) input, as the report's resizing already read it: export
    refused "the same batch size in dimension 1" for PyTorch's own call."""
    torch.manual_seed(0)
    model = _SequenceFirstWithPadding().eval()
    lc.export(model, tmp_path / "seq.safetensors", (torch.randn(12, example_batch, 16), torch.zeros(example_batch, 12, dtype=torch.bool)))
    loaded = lc.load(tmp_path / "seq.safetensors")
    for n in (1, 5):
        x, mask = torch.randn(12, n, 16), torch.zeros(n, 12, dtype=torch.bool)
        mask[:, -3:] = True
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)


def test_each_loader_names_the_one_that_reads_another_kind_of_file(pruned_int8, tmp_path: Path) -> None:
    float_model, converted, x = pruned_int8
    lc.export(converted, tmp_path / "compact.safetensors", x[:1])
    lc.save_quantized(converted, tmp_path / "int8.safetensors")
    with pytest.raises(ValueError, match=r"not written by save_quantized: it is a compact artifact .* lightning_compress\.load\(path\)"):
        lc.load_quantized(MLP(64, (64, 32), 10), tmp_path / "compact.safetensors")
    with pytest.raises(ValueError, match=r"is not a compact artifact: it is a quantised model file .*load_quantized\(model, path\)"):
        lc.load(tmp_path / "int8.safetensors")
    with pytest.raises(ValueError, match=r"is not a checkpoint: it is a compact artifact .* lightning_compress\.load\(path\)"):
        lc.load_pruned(MLP(64, (64, 32), 10), tmp_path / "compact.safetensors")
    # a file of the loader's own kind whose header is damaged is said to be damaged, not to be another kind
    tensors = load_file(tmp_path / "compact.safetensors")
    save_file(tensors, tmp_path / "bad_header.safetensors", metadata={"lightning_compress": "{not json"})
    with pytest.raises(ValueError, match=r"bad_header\.safetensors' is damaged: its header does not parse"):
        lc.load(tmp_path / "bad_header.safetensors")


def test_a_compact_artifact_called_with_another_float_dtype_says_so_and_takes_other_integer_ids(tmp_path: Path) -> None:
    """A float64 input to a float32 compact artifact failed inside the graph ("mat1 and mat2 must have the same dtype");
    the .pt2 package already named both dtypes. Token ids of another integer width still index as before."""
    import lightning_compress as lc

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    lc.export(net, tmp_path / "m.safetensors", torch.zeros(2, 4))
    loaded = lc.load(tmp_path / "m.safetensors")
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), net(x))
    with pytest.raises(TypeError, match=r"positional input 0 is torch.float64, but the artifact was exported for torch.float32 "
                       r"inputs; cast it \(.to\(torch.float32\)\)"):
        loaded(x.double())
    table = torch.nn.Embedding(10, 3).eval()
    lc.export(table, tmp_path / "e.safetensors", torch.zeros(2, 5, dtype=torch.long))
    ids = torch.randint(0, 10, (2, 5))
    assert torch.equal(lc.load(tmp_path / "e.safetensors")(ids.int()), table(ids))
