"""Artifacts of models shaped as users write them: dataclass and number outputs, GPT-2's ``Conv1D`` layers saved
quantised, tied weights through per-layer bits, reloading and ONNX, and a layer called twice under channel removal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import calibrate
from lightning.pytorch import Trainer
from torch import nn

import lightning_compress as lc
from lightning_compress.measure import count_parameters
from lightning_compress.pruning.graph import UnsupportedChannelOpError
from lightning_compress.quantization import QuantizeCallback
from lightning_compress.quantization.convert import convert_fake_quant
from lightning_compress.quantization.layer_selection import prepare_fake_quant
from lightning_compress.quantization.layers import QuantSettings


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    temperature: float = 2.0


class DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> Prediction:
        return Prediction(self.fc(x))


class TupleWithNumber(DataclassNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:  # type: ignore[override]
        return self.fc(x), 3.0, x.shape[0]  # a constant, and a size read from the input


def _formats() -> list[tuple[str, str]]:
    formats = [("compact", "safetensors"), ("pt2", "pt2")]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return formats
    return [*formats, ("onnx", "onnx")]


@pytest.mark.parametrize(("fmt", "suffix"), _formats())
def test_dataclass_and_number_outputs_come_back_as_tensors(tmp_path: Path, fmt: str, suffix: str) -> None:
    """A dataclass came back as None, and a number among the outputs was dropped (a size read from the input is the
    input's at every call)."""
    x = torch.randn(2, 8)
    net = DataclassNet().eval()
    lc.export(net, tmp_path / f"dc.{suffix}", x, format=fmt)
    out = lc.load(tmp_path / f"dc.{suffix}")(x)
    assert set(out) == {"logits", "temperature"}
    torch.testing.assert_close(out["logits"], net(x).logits, atol=1e-6, rtol=0)
    assert float(out["temperature"]) == 2.0
    triple = TupleWithNumber().eval()
    lc.export(triple, tmp_path / f"tuple.{suffix}", x, format=fmt)
    other = torch.randn(5, 8)
    logits, number, size = lc.load(tmp_path / f"tuple.{suffix}")(other)
    torch.testing.assert_close(logits, triple(other)[0], atol=1e-6, rtol=0)
    assert float(number) == 3.0 and int(size) == 5 and size.dtype == torch.int64


@pytest.mark.parametrize(("bits", "activation_bits", "backend"), [(8, 8, "auto"), (8, None, "auto"), (4, None, "auto"),
                                                            (8, None, "torchao"), (8, 8, "torchao")])
def test_a_quantised_gpt2_file_loads_into_a_fresh_gpt2(tmp_path: Path, bits: int, activation_bits: int | None, backend: str) -> None:
    """GPT-2's Conv1D holds its weight as (in, out); the file describes the Linear it computes. Loading read the
    Conv1D's own layout and failed (no in_features; 'needs 3584 packed bytes')."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need `transformers` (in the dev extra)")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(config).eval()
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=activation_bits))
    ids = torch.randint(0, 64, (4, 8))
    calibrate(net, ids)
    quantised = convert_fake_quant(net, backend=backend)
    name = "gpt2.safetensors" if backend == "auto" else "gpt2.pt"  # torchao's tensors are saved with torch.save
    lc.save_quantized(quantised, tmp_path / name)
    torch.manual_seed(1)
    loaded = lc.load_quantized(transformers.GPT2LMHeadModel(config), tmp_path / name)
    assert torch.equal(loaded(ids).logits, quantised(ids).logits)


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 300) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_per_layer_bits_that_would_untie_a_tied_weight_are_refused(tmp_path: Path) -> None:
    """A tied embedding and head given 8 and 4 bits were converted into two tables (the tie silently lost)."""

    class Tokens(lc.ClassifierModule):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return self.model(batch[0]).mean()

    module = Tokens(TiedLM())
    callback = QuantizeCallback(weight_bits={"head": 4, ".*": 8}, activation_bits=None, latency="none")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 300, (8, 5))), batch_size=4)
    trainer = Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"\['model.emb', 'model.head'\] share one weight Parameter, stored once at one "
                       r"width, but the weight_bits map gives them \{'model.emb': 8, 'model.head': 4\}"):
        trainer.fit(module, loader)
    assert module.model.head.weight is module.model.emb.weight and type(module.model.head) is nn.Linear  # unchanged


def test_a_float_tied_weight_stays_tied_after_load_quantized(tmp_path: Path) -> None:
    """The tied embedding and head left in float came back as two Parameters: a later export stored them twice."""
    torch.manual_seed(0)
    net = TiedLM().eval()
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None), exclude=["emb", "head"])
    ids = torch.randint(0, 300, (2, 5))
    calibrate(net, ids)
    quantised = convert_fake_quant(net)
    lc.save_quantized(quantised, tmp_path / "tied.safetensors")
    loaded = lc.load_quantized(TiedLM(), tmp_path / "tied.safetensors")
    assert loaded.head.weight is loaded.emb.weight
    assert count_parameters(loaded) == count_parameters(quantised) and torch.equal(loaded(ids), quantised(ids))


def test_onnx_stores_a_quantised_tied_weight_once(tmp_path: Path) -> None:
    """Also after a .pt file is loaded, where the two layers hold two tensors over one memory."""
    pytest.importorskip("onnxruntime", reason="format='onnx' needs the onnx extra")
    torch.manual_seed(0)
    net = TiedLM(vocab=4000).eval()
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=None), include=["emb", "head"])
    ids = torch.randint(0, 4000, (2, 5))
    quantised = convert_fake_quant(net)
    lc.save_quantized(quantised, tmp_path / "tied.pt")
    loaded = lc.load_quantized(TiedLM(vocab=4000), tmp_path / "tied.pt")
    table = 4000 * 32  # int8 values of the one weight
    for name, model in (("converted", quantised), ("loaded", loaded)):
        lc.export(model, tmp_path / f"{name}.onnx", ids, format="onnx")
        assert table < (tmp_path / f"{name}.onnx").stat().st_size < 2 * table, name  # held twice before
        torch.testing.assert_close(lc.load(tmp_path / f"{name}.onnx")(ids), quantised(ids), atol=1e-5, rtol=0)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l0, self.shared, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.shared(torch.relu(self.l0(x))))
        return self.head(torch.relu(self.shared(h)))


def test_channels_read_by_a_layer_called_twice_are_not_removed() -> None:
    """Removing l0's channels cut the inputs of `shared`, whose second call reads 16 channels: the shrunk model
    crashed on its first call. The first call's input is refused too now, and the model is unchanged."""
    net = CalledTwice().eval()
    x = torch.randn(3, 8)
    before = net(x)
    with pytest.raises(UnsupportedChannelOpError, match=r"\['l0'\].*module 'shared' is called more than once"):
        lc.shrink_model(net, {"l0": torch.arange(16) % 2 == 0}, x)
    assert torch.equal(net(x), before)
