"""What QuantizeCallback and the converted models write: which network, in which formats, to which paths."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate, trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_compress as lc
from lightning_compress.guard import check_finite
from lightning_compress.quantization import QuantSettings, QuantizeCallback, convert_fake_quant, load_quantized, prepare_fake_quant


def _loader(n: int = 32, features: int = 16, classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)), batch_size=8)


class Classifier(LightningModule):
    """``self.model`` is the network; ``forward`` may do more (``head``: a module applied after it)."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if self.head is None else self.head(out)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def _fit(tmp_path, module: LightningModule, callback: QuantizeCallback, **kwargs: Any) -> Trainer:
    trainer = Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs(tmp_path, **kwargs))
    trainer.fit(module, _loader())
    return trainer


def _torchao_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = _mlp()
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=8))
    calibrate(net, torch.randn(32, 16))
    return convert_fake_quant(net, backend="torchao")


def test_torchao_weights_are_checked_finite_through_their_scales() -> None:
    """torchao's Int8Tensor runs no elementwise op (``isfinite`` raised NotImplementedError for aten.abs, so no
    torchao model could be exported): the check reads its inner tensors, and a NaN scale is still found."""
    model = _torchao_mlp()
    assert {e["format"] for e in model.quantization_spec.values()} == {"torchao_int8_dynamic"}
    assert check_finite(model.state_dict().items(), "export") == []
    with torch.no_grad():
        model[2].weight.scale[0] = float("nan")
    with pytest.raises(ValueError, match=r"export: non-finite values \(NaN or inf\) in \['2\.weight'\]"):
        check_finite(model.state_dict().items(), "export")


def test_torchao_model_exports_as_a_package_and_the_compact_format_refuses_it(tmp_path) -> None:
    model = _torchao_mlp()
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = model(x)
    compact = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"compact \(\.safetensors\) format stores plain tensors, but \['0\.weight', '2\.weight'\] "
                                         r"are tensor subclasses \(Int8Tensor.*Export a \.pt2 package instead"):
        lc.export(model, compact, x[:2])
    assert not compact.exists()
    written = lc.export(model, tmp_path / "m.pt2", x[:2])
    assert written["format"] == "pt2"
    torch.testing.assert_close(lc.load(tmp_path / "m.pt2")(x), ref)


def test_callback_with_torchao_backend_writes_its_export_to_package(tmp_path) -> None:
    seed_everything(0)
    module = Classifier(_mlp())
    quant = QuantizeCallback(backend="torchao", latency="none", export_to=str(tmp_path / "m.pt2"))
    _fit(tmp_path, module, quant)
    summary = quant.compression_summary()
    assert summary.get("warnings", []) == [] and summary["exported_to"]["format"] == "pt2"
    x = torch.randn(4, 16)
    with torch.no_grad():
        ref = quant.quantized_model(x)
    torch.testing.assert_close(lc.load(tmp_path / "m.pt2")(x), ref)


class Flattening(Classifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flatten(1))


@pytest.mark.parametrize("kind", ["head after model", "input reshaped"])
def test_the_network_the_step_calls_is_converted_saved_and_exported(tmp_path, kind: str) -> None:
    """The step calls ``self(x)``, whose forward does more than ``self.model``: a LayerNorm after it, or a reshape
    before it. Only ``self.model`` was converted, saved and exported (the LayerNorm silently dropped, a 2-D input
    refused); the artifacts are now the module's forward, and give its outputs."""
    seed_everything(0)
    make = (lambda: Classifier(_mlp(), nn.LayerNorm(3))) if kind == "head after model" else (lambda: Flattening(_mlp()))
    module = make()
    quant = QuantizeCallback(latency="none", save_to="q.pt", export_to="q.safetensors")
    trainer = Trainer(max_epochs=1, callbacks=[quant], **trainer_kwargs(tmp_path))
    x = torch.randn(4, 16) if kind == "head after model" else torch.randn(4, 4, 4)
    loader = _loader() if kind == "head after model" else DataLoader(TensorDataset(torch.randn(32, 4, 4), torch.randint(0, 3, (32,))), batch_size=8)
    trainer.fit(module, loader)
    assert quant.compression_summary().get("warnings", []) == []
    with torch.no_grad():
        expected = module.eval()(x)
        converted = quant.quantized_model(x)
    torch.testing.assert_close(converted, expected)
    reloaded = load_quantized(make(), tmp_path / "q.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), converted, atol=0, rtol=0)
    torch.testing.assert_close(lc.load(tmp_path / "q.safetensors")(x), converted)
    with torch.no_grad():  # the public convert() makes the same choice
        torch.testing.assert_close(quant.convert(module).eval()(x), converted, atol=0, rtol=0)


class _KeywordNet(nn.Module):
    """A Hugging Face-style network: keyword inputs, a mapping out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, features: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.net(features) * (1.0 if scale is None else scale)}


class _PassesThrough(LightningModule):
    """``self(batch)`` hands the batch's tensors to ``self.model(**batch)`` and returns its logits."""

    def __init__(self, positional: bool) -> None:
        super().__init__()
        self.model, self.positional = _KeywordNet(), positional

    def forward(self, *args: Any) -> torch.Tensor:
        if self.positional:  # self(features, scale)
            return self.model(features=args[0], scale=args[1])["logits"]
        return self.model(**args[0])["logits"]  # self(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        inputs = {"features": x, "scale": torch.ones(len(x), 1)}
        out = self(inputs["features"], inputs["scale"]) if self.positional else self(inputs)
        return F.cross_entropy(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("positional", [True, False], ids=["self(x, scale)", "self(batch)"])
def test_a_forward_passing_its_inputs_on_however_packed_gives_the_plain_network(tmp_path, positional: bool) -> None:
    """``self(ids, mask)`` -> ``self.model(input_ids=ids, ...)`` and ``self(batch)`` -> ``self.model(**batch)`` hand the
    same tensors on under other names: the whole module was converted, and its file did not load into the network."""
    seed_everything(0)
    module = _PassesThrough(positional)
    quant = QuantizeCallback(latency="eager", save_to="q.pt", export_to="q.safetensors")
    _fit(tmp_path, module, quant)
    assert isinstance(quant.quantized_model, _KeywordNet) and "eager" in quant.compression_summary()["latency"]
    x, scale = torch.randn(4, 16), torch.full((4, 1), 2.0)
    with torch.no_grad():
        converted = quant.quantized_model(features=x, scale=scale)["logits"]
        torch.testing.assert_close(converted, module.eval()(x, scale) if positional else module.eval()({"features": x, "scale": scale}))
        reloaded = load_quantized(_KeywordNet(), tmp_path / "q.pt").eval()
        torch.testing.assert_close(reloaded(features=x, scale=scale)["logits"], converted, atol=0, rtol=0)
        assert isinstance(quant.convert(module), _KeywordNet)


def test_a_forward_that_only_calls_model_still_gives_the_plain_network(tmp_path) -> None:
    """``forward`` returning ``self.model(x)``: ``model`` is all it computes, so the files load into the plain class."""
    seed_everything(0)
    module = Classifier(_mlp())
    quant = QuantizeCallback(latency="none", save_to="q.pt")
    _fit(tmp_path, module, quant)
    assert isinstance(quant.quantized_model, nn.Sequential)
    x = torch.randn(4, 16)
    reloaded = load_quantized(_mlp(), tmp_path / "q.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), quant.quantized_model(x), atol=0, rtol=0)


@pytest.mark.parametrize(("option", "name"), [("save_to", "out.pt"), ("export_to", "out.pt2")])
def test_a_folder_given_as_the_file_is_refused_before_training(tmp_path, option: str, name: str) -> None:
    """A folder at ``save_to``/``export_to`` passed the writability check; the fit trained to its end, then failed
    to write, losing the converted model."""
    (tmp_path / name).mkdir()
    module = Classifier(_mlp())
    before = [type(m) for m in module.modules()]
    trainer = Trainer(max_epochs=1, callbacks=[QuantizeCallback(latency="none", **{option: name})], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=rf"QuantizeCallback: {option} '.*{name}' is a folder; give a file's path"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0 and [type(m) for m in module.modules()] == before


class _BatchForward(LightningModule):
    """``forward(self, batch)``: the step hands its dict batch to forward, which an artifact cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["features"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self({"features": x}), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_export_to_of_a_forward_taking_the_batch_dict_is_refused_before_training(tmp_path) -> None:
    """The fit trained to its end and then only warned "export_to='f.pt2' not written: ... argument 0 is a dict"."""
    module = _BatchForward()
    before = [type(m) for m in module.modules()]
    trainer = Trainer(max_epochs=1, callbacks=[QuantizeCallback(latency="none", export_to="f.safetensors")], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"export_to='f.safetensors' cannot be written: .* argument 0 is a dict.* leave export_to out"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0 and [type(m) for m in module.modules()] == before  # nothing trained, nothing swapped
    quant = QuantizeCallback(latency="none", save_to="f.pt")  # the same module without export_to trains and converts
    _fit(tmp_path, _BatchForward(), quant)
    assert quant.quantized_model is not None and (tmp_path / "f.pt").is_file()


class _FolderAt(Callback):
    """Makes a folder at ``path`` once training has started (after the callbacks' setup checked it)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.path.mkdir()


def test_the_converted_model_is_kept_when_save_to_fails_at_the_end(tmp_path) -> None:
    seed_everything(0)
    module = Classifier(_mlp())
    quant = QuantizeCallback(latency="none", save_to="q.pt")
    trainer = Trainer(max_epochs=1, callbacks=[quant, _FolderAt(tmp_path / "q.pt")], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="is a folder; give a file.s path"):
        trainer.fit(module, _loader())
    assert quant.quantized_model is not None
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(quant.quantized_model(x), module.eval()(x))


class _StepCallsModel(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)


@pytest.mark.parametrize("step_calls", ["self.model(x)", "self(x)"])
def test_a_network_wrapped_by_torch_compile_is_saved_and_exported_as_the_plain_one(tmp_path, step_calls: str) -> None:
    """``self.model = torch.compile(net)``: the file named the layers ``_orig_mod.0`` (it did not load into ``net``'s
    class), and the export failed (the wrapper has no forward of its own to capture)."""
    seed_everything(0)
    module = (_StepCallsModel if step_calls == "self.model(x)" else Classifier)(torch.compile(_mlp()))
    quant = QuantizeCallback(latency="none", save_to="q.safetensors", export_to="e.safetensors")
    _fit(tmp_path, module, quant)
    assert quant.compression_summary().get("warnings", []) == []
    assert type(quant.quantized_model) is nn.Sequential
    x = torch.randn(4, 16)
    with torch.no_grad():
        converted = quant.quantized_model(x)
        torch.testing.assert_close(converted, module.eval()(x))
        torch.testing.assert_close(load_quantized(_mlp(), tmp_path / "q.safetensors")(x), converted, atol=0, rtol=0)
    torch.testing.assert_close(lc.load(tmp_path / "e.safetensors")(x), converted)


class _Forwards(LightningModule):
    """A ``forward`` around ``self.model`` that does a little more than hand its input on."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.model, self.kind = _KeywordNet(), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "input scaled in place":
            x /= 2.0
            return self.model(x)["logits"]
        if self.kind == "output scaled in place":
            return self.model(x)["logits"].mul_(2.0)
        if self.kind == "a number computed from the input":
            return self.model(x, scale=float(x.abs().amax()))["logits"]
        if self.kind == "a dataclass handed on":  # its tensors were not seen: the whole module was converted
            return self.model(x)
        return self.model(x)["logits"]


@dataclasses.dataclass
class _Prediction:
    logits: torch.Tensor


class _DataclassNet(_KeywordNet):
    def forward(self, features: torch.Tensor, scale: torch.Tensor | None = None) -> _Prediction:  # type: ignore[override]
        return _Prediction(super().forward(features, scale)["logits"])


@pytest.mark.parametrize("kind", ["input scaled in place", "output scaled in place", "a number computed from the input", "plain",
                                  "a dataclass handed on"])
def test_only_a_forward_that_changes_nothing_gives_the_child_alone(kind: str) -> None:
    """Tensors changed in place kept their identity, and a number computed from the input reached the child as a
    constant: each picked the child alone, whose export then froze the number or left out the change. The probe
    runs on a copy of the example, which a forward scaling its input in place used to change."""
    from lightning_compress.batches import ForwardCall
    from lightning_compress.quantization import QuantSettings, prepare_fake_quant
    from lightning_compress.quantization.artifact import network_and_call

    module = _Forwards(kind)
    if kind == "a dataclass handed on":
        module.model = _DataclassNet()
    layers = prepare_fake_quant(module, QuantSettings(bits=8, activation_bits=None))
    x = torch.randn(4, 16)
    example = ForwardCall((x.clone(),))
    network, call = network_and_call(module, len(layers), example)
    handed_on = kind in ("plain", "a dataclass handed on")
    assert (network is module.model) is handed_on and torch.equal(example.args[0], x)
    if kind == "plain":
        with torch.no_grad():
            torch.testing.assert_close(call(network)["logits"], module.eval()(x))
    if kind == "a dataclass handed on":
        with torch.no_grad():
            torch.testing.assert_close(call(network).logits, module.eval()(x).logits)
