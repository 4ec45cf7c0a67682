"""Per-layer weight bits: ``QuantizeCallback(weight_bits={regex: bits})`` through QAT, PTQ, conversion,
files, checkpoints, the report and the CLI, on the digits MLP (layers ``model.net.1`` and ``model.net.3``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import fit_quantize_config, trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import ClassifierModule, DigitsDataModule
from lightning_compress.models import MLP
from lightning_compress.quantization import QuantizeCallback, fake_quant_layers, load_quantized
from lightning_compress.quantization import callback as callback_module
from lightning_compress.quantization.options import layer_bits

MAP = {r"net\.1": 4, ".*": 8}
FIRST, LAST = 64 * 48, 48 * 10  # weights of model.net.1 and model.net.3


def _module() -> ClassifierModule:
    seed_everything(0)
    return ClassifierModule(MLP(64, (48,), 10))


def _fit(
    tmp_path: Path, cb: QuantizeCallback, max_epochs: int = 2, module: ClassifierModule | None = None,
    ckpt_path: str | None = None, **kwargs: Any,
):
    module = module or _module()
    callbacks: list[Callback] = [cb, *kwargs.pop("callbacks", [])]
    settings = trainer_kwargs(tmp_path, limit_train_batches=5, limit_val_batches=2, **kwargs)
    trainer = Trainer(max_epochs=max_epochs, callbacks=callbacks, **settings)
    trainer.fit(module, DigitsDataModule(), ckpt_path=ckpt_path)
    return module, trainer


def test_layer_bits_first_match_wins_and_errors_name_layers() -> None:
    names = ["model.net.1", "model.net.3"]
    assert layer_bits(names, {r"net\.3": 2, "net": 6}) == {"model.net.1": 6, "model.net.3": 2}
    with pytest.raises(ValueError, match=r"weight_bits regex 'conv' matches none of the layers selected .*'model\.net\.1'"):
        layer_bits(names, {"conv": 4, ".*": 8})
    with pytest.raises(ValueError, match=r"it matches \['teacher\.fc'\] .*, which are not selected"):
        layer_bits(names, {"teacher": 4, ".*": 8}, [*names, "teacher.fc"])
    with pytest.raises(ValueError, match=r"gives no bits to the selected layers \['model\.net\.3'\].*exclude=\['model\\\\.net\\\\.3'\]"):
        layer_bits(names, {r"net\.1": 4})


@pytest.mark.parametrize(
    ("bits", "match"),
    [
        ({"fc": 9}, r"weight_bits\['fc'\] must be an integer from 2 to 8, got 9"),
        ({"fc": 1.5}, r"weight_bits\['fc'\] must be an integer from 2 to 8, got 1.5"),
        ({"(": 4}, r"weight_bits regex '\(' is invalid"),
        ({0: 8, "fc": 4}, "mixes epochs and module-name regexes"),
        ({}, r"weight_bits map is empty; give \{epoch: bits\} or \{regex: bits\}"),
    ],
)
def test_bad_maps_raise_on_construction(bits: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizeCallback(weight_bits=bits)


def test_integer_keys_stay_an_epoch_schedule() -> None:
    assert QuantizeCallback(weight_bits={"0": 8, "2": 4}).options.layer_bits is None
    assert QuantizeCallback(weight_bits={r"net\.1": 4, ".*": 8}, method="ptq").options.layer_bits == MAP


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": {"conv": 4, ".*": 8}}, r"weight_bits regex 'conv' matches none of the layers selected"),
        ({"weight_bits": {r"net\.1": 4}}, r"gives no bits to the selected layers \['model\.net\.3'\]"),
        ({"weight_bits": {r"net\.3": 4, ".*": 8}, "exclude": [r"net\.3"]}, r"it matches \['model\.net\.3'\].*not selected"),
    ],
)
def test_bad_maps_raise_in_setup_before_the_model_changes(tmp_path, monkeypatch, kwargs: dict, match: str) -> None:
    def must_not_run(*args: Any, **kw: Any) -> None:
        raise AssertionError("the model was about to change before the map was checked")

    monkeypatch.setattr(callback_module, "prepare_fake_quant", must_not_run)
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, QuantizeCallback(latency="none", **kwargs), module=module)
    assert not fake_quant_layers(module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_qat_map_gives_each_layer_its_bits_through_conversion_and_files(tmp_path) -> None:
    uniform = QuantizeCallback(weight_bits=8, latency="none", save_to=str(tmp_path / "u" / "q.safetensors"))
    _fit(tmp_path / "u", uniform)
    cb = QuantizeCallback(weight_bits=MAP, latency="none", save_to=str(tmp_path / "m" / "q.safetensors"))
    module, trainer = _fit(tmp_path / "m", cb)
    assert {n: m.quantizer.bits for n, m in fake_quant_layers(module).items()} == {"model.net.1": 4, "model.net.3": 8}
    spec = cb.quantized_model.quantization_spec
    assert (spec["net.1"]["bits"], spec["net.1"]["format"]) == (4, "lowbit")
    assert (spec["net.3"]["bits"], spec["net.3"]["format"]) == (8, "int8_linear")
    mean = (4 * FIRST + 8 * LAST) / (FIRST + LAST)
    assert float(trainer.callback_metrics["quant/weight_bits"]) == pytest.approx(mean)
    summary = cb.compression_summary()
    assert summary["bits_per_layer"] == {"model.net.1": 4, "model.net.3": 8}
    assert summary["weight_bits"] == pytest.approx(mean, abs=1e-4) and summary["weight_bits_map"] == MAP
    assert cb.compression_state()["weight_bits"] == pytest.approx(mean)
    # 4-bit weights are packed two per byte: net.1 stores FIRST / 2 bytes, and the file is about that much
    # smaller than the all-8-bit one (the two layer formats' headers and scales differ by a few dozen bytes)
    assert cb.quantized_model.net[1].qweight.numel() == FIRST // 2
    small, full = summary["saved_to"]["bytes"], uniform.compression_summary()["saved_to"]["bytes"]
    assert full - small >= FIRST // 2 - 128
    loaded = load_quantized(MLP(64, (48,), 10), tmp_path / "m" / "q.safetensors")
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cb.quantized_model(x), atol=0, rtol=0)


def test_ptq_map(tmp_path) -> None:
    cb = QuantizeCallback(method="ptq", weight_bits={r"net\.3": 2, r"net\.1": 6}, calibration_batches=3, latency="none")
    _fit(tmp_path, cb, max_epochs=1)
    spec = cb.quantized_model.quantization_spec
    assert (spec["net.1"]["bits"], spec["net.3"]["bits"]) == (6, 2)
    assert cb.compression_summary()["bits_per_layer"] == {"model.net.1": 6, "model.net.3": 2}


def test_checkpoint_resumes_with_the_map_and_refuses_another(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    _fit(tmp_path, QuantizeCallback(weight_bits=MAP, latency="none", convert_on_fit_end=False), callbacks=[ckpt],
         enable_checkpointing=True)
    last = str(tmp_path / "ck" / "last.ckpt")
    saved = torch.load(last, weights_only=False)["callbacks"]["QuantizeCallback"]
    assert saved["layer_bits"] == {"model.net.1": 4, "model.net.3": 8}
    assert {n: e["bits"] for n, e in saved["layers"].items()} == {"model.net.1": 4, "model.net.3": 8}
    cb = QuantizeCallback(weight_bits=MAP, latency="none")
    module, trainer = _fit(tmp_path / "r", cb, max_epochs=3, ckpt_path=last)
    assert trainer.current_epoch == 3 and cb.quantized_model.quantization_spec["net.1"]["bits"] == 4
    with pytest.raises(ValueError, match=r"trained with per-layer weight bits .* asks for one weight width for every layer"):
        _fit(tmp_path / "x", QuantizeCallback(weight_bits=4, latency="none"), max_epochs=3, ckpt_path=last)


def test_a_config_with_a_map_runs_through_the_cli(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    cli, quant = fit_quantize_config(tmp_path, {"weight_bits": {r"model\.net\.1": 3, ".*": 8}, "latency": "none"}, [48])
    assert {k: v["bits"] for k, v in quant.quantized_model.quantization_spec.items()} == {"net.1": 3, "net.3": 8}
    assert isinstance(cli.model.model.net[1], nn.Linear)


def test_layer_bits_config_runs(tmp_path: Path) -> None:
    """configs/qat_layer_bits.yaml as shipped (fewer batches): 4-bit hidden layers, an 8-bit output layer."""
    from lightning_compress.cli import cli_main

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "qat_layer_bits.yaml").read_text())
    config["trainer"].update(max_epochs=3, limit_train_batches=4, limit_val_batches=2, default_root_dir=str(tmp_path),
                             enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"]["start_epoch"] = 1
    path = tmp_path / "bits.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = cli_main(["fit", "--config", str(path)])
    quant = next(cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizeCallback))
    assert {k: v["bits"] for k, v in quant.quantized_model.quantization_spec.items()} == {"net.1": 4, "net.3": 4, "net.5": 8}
