"""Loading files: nothing in a file runs, damaged files are caught, and every error names the file."""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import calibrate, trainer_kwargs
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import DistillationModule
from lightning_compress._files import UnsafePickleError, Unresolved, load_torch_file, sniff
from lightning_compress._placeholder_unpickler import _PlaceholderUnpickler
from lightning_compress.distillation.teacher import read_state_dict
from lightning_compress.models import MLP, ResCNN
from lightning_compress.pruning.reload import load_pruned
from lightning_compress.quantization.callback import QuantizeCallback
from lightning_compress.quantization import convert_fake_quant, load_quantized, save_quantized
from lightning_compress.quantization.layer_selection import prepare_fake_quant
from lightning_compress.quantization.layers import QuantSettings


class RunsCode:
    """Pickles as the call ``func(*args)``: plain unpickling runs it (what a malicious file does)."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def hostile_hparams(tmp_path: Path) -> dict[str, Any]:
    """Hyper-parameters as a Lightning checkpoint may pickle them, two of them running code when loaded."""
    return {
        "config": argparse.Namespace(lr=0.1, hidden=[16]),  # not on torch's allowlist, harmless
        "mkdir": RunsCode(os.mkdir, str(tmp_path / "made_by_mkdir")),
        "exec": RunsCode(exec, f"open({str(tmp_path / 'made_by_exec')!r}, 'w').close()"),
    }


def side_effects(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("made_by"))


def lightning_style_ckpt(path: Path, net: nn.Module, hparams: dict[str, Any]) -> Path:
    torch.save(
        {
            "epoch": 3,
            "global_step": 30,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": hparams,
            "callbacks": {},
        },
        path,
    )
    return path


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


# ------------------------------------------------------------------------------- no code from files
def test_hostile_teacher_ckpt_runs_nothing_and_its_weights_still_load(tmp_path: Path) -> None:
    teacher = MLP(64, (16,), 10)
    path = lightning_style_ckpt(tmp_path / "teacher.ckpt", teacher, hostile_hparams(tmp_path))
    with pytest.raises(UnsafePickleError, match=r"teacher_ckpt '.*teacher\.ckpt' holds pickled Python objects \(for example [\w.]+\)"):
        load_torch_file(path, "teacher_ckpt")
    tensors = read_state_dict(path)
    assert side_effects(tmp_path) == []
    assert sorted(tensors) == sorted(f"model.{k}" for k in teacher.state_dict())
    for k, v in teacher.state_dict().items():
        assert torch.equal(tensors[f"model.{k}"], v)


def test_hostile_teacher_ckpt_through_distillation_module(tmp_path: Path) -> None:
    teacher = MLP(64, (16,), 10)
    path = lightning_style_ckpt(tmp_path / "teacher.ckpt", teacher, hostile_hparams(tmp_path))
    module = DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(path))
    assert side_effects(tmp_path) == []
    assert module.teacher_prefix == "model."
    assert_same_weights(module.teacher, teacher)


def test_real_lightning_checkpoint_with_object_hparams_loads_without_running_them(tmp_path: Path) -> None:
    class Teacher(LightningModule):
        def __init__(self, config: argparse.Namespace, hook: Any) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = MLP(64, (16,), 10)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    hook = RunsCode(os.mkdir, str(tmp_path / "made_by_mkdir"))
    module = Teacher(argparse.Namespace(lr=0.1), hook)
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="teacher")
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, max_epochs=1, callbacks=[ckpt])
    Trainer(**kwargs).fit(module, data)
    for made in tmp_path.glob("made_by_*"):  # Lightning deep-copies the hyper-parameters, which runs the call
        made.rmdir()
    student = DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(tmp_path / "ckpt" / "teacher.ckpt"))
    assert side_effects(tmp_path) == []
    assert_same_weights(student.teacher, module.model)


def test_trust_pickle_loads_a_pickled_module_and_warns(tmp_path: Path) -> None:
    teacher = MLP(64, (16,), 10)
    path = tmp_path / "whole_module.pt"
    torch.save(teacher, path)  # the module object, not its state_dict: needs unpickling
    with pytest.raises(UnsafePickleError, match=r"teacher_ckpt '.*whole_module\.pt' holds a pickled lightning_compress\.models\.MLP object.*trust_pickle=True"):
        DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(path))
    with pytest.warns(UserWarning, match=r"trust_pickle=True loads its pickled Python objects .* runs whatever code"):
        module = DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(path), trust_pickle=True)
    assert_same_weights(module.teacher, teacher)
    assert "trust_pickle" not in module.hparams  # a saved checkpoint cannot switch it on for whoever loads it
    # load_from_checkpoint re-reads teacher_ckpt from the saved hyper-parameters; trust is given again
    saved = tmp_path / "student.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": "2.6.6"}, saved)
    with pytest.raises(UnsafePickleError, match=r"whole_module\.pt' holds a pickled lightning_compress\.models\.MLP"):
        DistillationModule.load_from_checkpoint(saved, student=MLP(64, (8,), 10), teacher=MLP(64, (16,), 10))
    with pytest.warns(UserWarning, match=r"trust_pickle=True"):
        again = DistillationModule.load_from_checkpoint(saved, student=MLP(64, (8,), 10), teacher=MLP(64, (16,), 10), trust_pickle=True)
    assert_same_weights(again.teacher, teacher)


def test_trust_pickle_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_compress.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    teacher = MLP(64, (16,), 10)
    torch.save(teacher, tmp_path / "whole_module.pt")
    mlp = "lightning_compress.models.MLP"
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
        "model": {
            "class_path": "lightning_compress.DistillationModule",
            "init_args": {
                "student": {"class_path": mlp, "init_args": {"in_features": 64, "hidden": [8], "num_classes": 10}},
                "teacher": {"class_path": mlp, "init_args": {"in_features": 64, "hidden": [16], "num_classes": 10}},
                "teacher_ckpt": str(tmp_path / "whole_module.pt"),
                "trust_pickle": True,
            },
        },
        "data": {"class_path": "lightning_compress.DigitsDataModule"},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match=r"trust_pickle=True"):
        cli = cli_main(["--config", str(tmp_path / "distill.yaml")], run=False)
    assert_same_weights(cli.model.teacher, teacher)


def test_placeholder_unpickler_refuses_to_patch_an_allowlisted_class() -> None:
    # BUILD on the class collections.Counter with slot state {"__len__": _codecs.encode}: a plain pickle
    # Unpickler restricted only in find_class would set Counter.__len__ for the whole process
    data = b"\x80\x02ccollections\nCounter\nN}X\x07\x00\x00\x00__len__c_codecs\nencode\ns\x86b."
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to set the state of a type"):
        _PlaceholderUnpickler(io.BytesIO(data)).load()
    assert "encode" not in repr(__import__("collections").Counter.__len__)
    # an unknown global is a placeholder; calling it, building it, filling it do nothing
    data = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00exit\x85R}X\x01\x00\x00\x00a\x4b\x01sb."
    out = _PlaceholderUnpickler(io.BytesIO(data)).load()
    assert isinstance(out, Unresolved) and out.name == "os.system(...)"


# ------------------------------------------------------------------------------ not a checkpoint
def other_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hi")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: p.write_text("epoch=3 val_acc=0.98\n"), ValueError, r"'.*teacher\.ckpt' is not a checkpoint, torch or safetensors file \(it looks like text: 'epoch=3 val_acc=0\.98'\)"),
        (lambda p: p.write_bytes(b""), ValueError, r"'.*teacher\.ckpt' is empty \(0 bytes\).*copy it again"),
        (lambda p: p.mkdir(), IsADirectoryError, r"'.*teacher\.ckpt' is a folder, not a file"),
        (lambda p: p.write_bytes(pickle.dumps({"w": 1}, protocol=4)), ValueError, r"'.*teacher\.ckpt' is a plain Python pickle, not written by torch\.save"),
        (lambda p: other_zip(p), ValueError, r"'.*teacher\.ckpt' is a zip archive, but not one written by torch\.save"),
        (lambda p: torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(p)), ValueError, r"'.*teacher\.ckpt' is a TorchScript archive"),
    ],
    ids=["text", "empty", "folder", "plain-pickle", "other-zip", "torchscript"],
)
def test_not_a_checkpoint_as_teacher_ckpt(tmp_path: Path, make: Any, error: type, match: str) -> None:
    path = tmp_path / "teacher.ckpt"
    make(path)
    with pytest.raises(error, match=match):
        DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(path))


def test_missing_teacher_ckpt_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"teacher_ckpt '.*nowhere\.ckpt' not found.*Train the teacher first"):
        DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(tmp_path / "nowhere.ckpt"))


def test_teacher_ckpt_of_another_architecture_names_the_file(tmp_path: Path) -> None:
    path = lightning_style_ckpt(tmp_path / "teacher.ckpt", MLP(64, (32,), 10), {})
    with pytest.raises(ValueError, match=r"teacher_ckpt '.*teacher\.ckpt': the teacher checkpoint does not hold all teacher weights.*\(16, 64\)"):
        DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(path))


# ------------------------------------------------------------------------------ damaged files
def quantized_mlp(bits: int = 8, hidden: int = 64) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    float_net = MLP(64, (hidden,), 10)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=8))
    calibrate(net, torch.randn(16, 1, 8, 8))
    return float_net, convert_fake_quant(net)


def cut(path: Path, fraction: float = 0.95) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_quantized_file(tmp_path: Path, suffix: str) -> None:
    float_net, converted = quantized_mlp()
    path = tmp_path / f"q{suffix}"
    save_quantized(converted, path)
    cut(path)
    with pytest.raises(ValueError, match=rf"quantised model file '.*q{re.escape(suffix)}' is truncated.*copy it again"):
        load_quantized(float_net, path)


def test_truncated_teacher_ckpt(tmp_path: Path) -> None:
    path = cut(lightning_style_ckpt(tmp_path / "teacher.ckpt", MLP(64, (16,), 10), {}))
    with pytest.raises(ValueError, match=r"teacher_ckpt '.*teacher\.ckpt' is truncated or damaged.*copy it again"):
        DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10), teacher_ckpt=str(path))


def tensor_data_range(path: Path) -> tuple[int, int]:
    """Byte range of the tensor data in a safetensors file or in the storage record of a one-storage .pt."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", data[:8])
        return 8 + n, len(data)
    with zipfile.ZipFile(path) as z:
        (info,) = [i for i in z.infolist() if re.search(r"/data/\d+$", i.filename)]
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.file_size


def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_flipped_byte_names_file_and_tensor(tmp_path: Path, suffix: str) -> None:
    float_net, converted = quantized_mlp()
    path = tmp_path / f"q{suffix}"
    save_quantized(converted, path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    start, end = tensor_data_range(path)
    assert start <= middle < end  # the middle of the file is tensor data
    data[middle] ^= 0x10
    path.write_bytes(bytes(data))
    before = converted.state_dict()
    (changed,) = [k for k, v in raw_tensors(path).items() if not torch.equal(v, before[k])]
    with pytest.raises(ValueError, match=rf"quantised model file '.*q{re.escape(suffix)}': the data of tensor {re.escape(repr(changed))} is damaged \(CRC-32 [0-9a-f]{{8}}, written as [0-9a-f]{{8}}\).*copy it again"):
        load_quantized(float_net, path)


# ------------------------------------------------------------------------------ other tools' files
def test_plain_float_state_dict_to_load_quantized(tmp_path: Path) -> None:
    float_net, _ = quantized_mlp()
    torch.save(float_net.state_dict(), tmp_path / "float.pt")
    with pytest.raises(ValueError, match=r"'.*float\.pt' was not written by save_quantized: it holds a plain state_dict of 4 tensors \(keys like \['net\.1\.weight'.*model\.load_state_dict"):
        load_quantized(float_net, tmp_path / "float.pt")


def test_safetensors_file_of_another_tool_to_load_quantized(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    float_net, _ = quantized_mlp()
    save_file(float_net.state_dict(), tmp_path / "float.safetensors", metadata={"producer": "someone else"})
    with pytest.raises(ValueError, match=r"'.*float\.safetensors' is a safetensors file of 4 tensors that save_quantized did not write.*\['producer'\]"):
        load_quantized(float_net, tmp_path / "float.safetensors")
    # keys of its own that happen to share our earlier names are not read as ours (it is not "damaged")
    save_file(float_net.state_dict(), tmp_path / "pt.safetensors", metadata={"format": "pt", "aliases": "lm_head.weight=embed.weight"})
    with pytest.raises(ValueError, match=r"is a safetensors file of 4 tensors that save_quantized did not write.*\['aliases', 'format'\]"):
        load_quantized(float_net, tmp_path / "pt.safetensors")


def rewrite_spec(path: Path, edit: Any) -> None:
    """Rewrite the stored quantisation spec of a save_quantized file (tensors untouched)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(path, framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(meta["lightning_compress_quantized"])
        edit(header["quantization_spec"])
        meta["lightning_compress_quantized"] = json.dumps(header, separators=(",", ":"))
        save_file(tensors, path, metadata=meta)
    else:
        blob = torch.load(path, weights_only=True)
        edit(blob["quantization_spec"])
        torch.save(blob, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_of_a_newer_format_version(tmp_path: Path, suffix: str) -> None:
    float_net, converted = quantized_mlp()
    path = tmp_path / f"q{suffix}"
    save_quantized(converted, path)
    rewrite_spec(path, lambda spec: spec.update(version=99))
    with pytest.raises(ValueError, match=r"'.*q\.\w+' was written by a newer lightning-compress \(file format version 99; this release reads versions \[2, 3\]\): upgrade"):
        load_quantized(float_net, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("bits", [8, 4])
def test_files_written_before_the_digests_still_load(tmp_path: Path, suffix: str, bits: int) -> None:
    float_net, converted = quantized_mlp(bits)
    path = tmp_path / f"q{suffix}"
    save_quantized(converted, path)
    rewrite_spec(path, lambda spec: spec.pop("crc32"))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(float_net, path)(x), converted(x), atol=0, rtol=0)


def test_digest_cost_is_small(tmp_path: Path) -> None:
    float_net, converted = quantized_mlp()
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"q{suffix}"
        save_quantized(converted, path)
        with_crc = path.stat().st_size
        rewrite_spec(path, lambda spec: spec.pop("crc32"))
        assert with_crc - path.stat().st_size <= 64  # 8 hex digits per tensor, plus alignment


# ------------------------------------------------------------------------------ load_pruned
def test_load_pruned_reads_hostile_checkpoint_safely(tmp_path: Path) -> None:
    net = ResCNN(width=8)
    path = lightning_style_ckpt(tmp_path / "pruned.ckpt", net, hostile_hparams(tmp_path))
    fresh = load_pruned(ResCNN(width=8), path)
    assert side_effects(tmp_path) == []
    assert_same_weights(fresh, net)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_text("not a checkpoint"), r"pruned checkpoint '.*pruned\.ckpt' is not a checkpoint, torch or safetensors file \(it looks like text"),
        (lambda p: cut(lightning_style_ckpt(p, ResCNN(width=8), {})), r"pruned checkpoint '.*pruned\.ckpt' is truncated or damaged"),
        (lambda p: lightning_style_ckpt(p, MLP(64, (16,), 10), {}), r"pruned checkpoint '.*pruned\.ckpt' does not fit ResCNN: .*Missing key.*build the model with the class and arguments"),
        (lambda p: torch.save([torch.zeros(2)], p), r"pruned checkpoint '.*pruned\.ckpt' holds \[tensor.*not a state dict"),
    ],
    ids=["text", "truncated", "other-model", "a-list"],
)
def test_load_pruned_errors_name_the_file(tmp_path: Path, make: Any, match: str) -> None:
    path = tmp_path / "pruned.ckpt"
    make(path)
    with pytest.raises(ValueError, match=match):
        load_pruned(ResCNN(width=8), path)


def test_load_pruned_layer_that_cannot_take_the_shape_is_named(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    state = dict(net.state_dict())
    state["1.weight"], state["1.bias"] = torch.ones(6), torch.zeros(6)  # a LayerNorm is not resized
    torch.save(state, tmp_path / "pruned.pt")
    with pytest.raises(ValueError, match=r"'.*pruned\.pt' does not fit Sequential: .*size mismatch for 1\.weight"):
        load_pruned(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)), tmp_path / "pruned.pt")


def _two_layers(hidden: int = 16, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _grouped_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))


def _unfit_grouped_conv_state() -> dict:
    state = _grouped_convs().state_dict()  # the first layer can shrink, the grouped second cannot take its shape
    state["0.weight"], state["0.bias"], state["2.weight"] = state["0.weight"][:6], state["0.bias"][:6], torch.zeros(8, 3, 3, 3)
    return state


@pytest.mark.parametrize(
    ("build", "state", "said"),
    [
        # a larger network of another class count grew the model and loaded
        (_two_layers, lambda: _two_layers(32, 5).state_dict(), r"'0' is stored larger than the model builds it \(out_features 32 > 16\)"),
        # the model was left resized after a failing strict load, and after a later layer refused its shape
        (_two_layers, lambda: {k: v for k, v in _two_layers(4).state_dict().items() if k != "2.bias"}, r"Missing key\(s\) in state_dict: \"2\.bias\""),
        (_grouped_convs, _unfit_grouped_conv_state, r"cannot resize grouped convolution '2' \(groups=2\)"),
        # a bias that does not match its weight loaded, and failed at the first forward
        (_two_layers, lambda: {**_two_layers(4).state_dict(), "2.bias": torch.zeros(7)}, r"2\.bias is stored with shape \(7,\), but its layer has 3 output rows"),
    ],
)
def test_a_checkpoint_that_does_not_fit_leaves_the_model_as_it_was(build: Any, state: Any, said: str) -> None:
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=said):
        load_pruned(model, state())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    shrunk = _two_layers(4)  # and a fitting one still loads
    model = _two_layers()
    load_pruned(model, {f"model.{k}": v for k, v in shrunk.state_dict().items()})
    x = torch.randn(2, 8)
    assert torch.equal(model(x), shrunk(x))


def test_a_module_refuses_a_bias_that_does_not_fit_its_weight_before_resizing() -> None:
    from lightning_compress import ClassifierModule

    module = ClassifierModule(_two_layers(), num_classes=3)
    state = {f"model.{k}": v for k, v in _two_layers(4).state_dict().items()}
    state["model.2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"model\.2\.bias is stored with shape \(7,\), but its layer has 3 output rows"):
        module.load_state_dict(state)
    assert module.model[0].out_features == 16 and module.model[2].bias.shape == (3,)


# ------------------------------------------------------------------------------ quantisation callback
def test_quantize_callback_restore_reads_checkpoint_safely(tmp_path: Path) -> None:
    from lightning_compress.quantization.state import callback_state_in_checkpoint

    cb = QuantizeCallback()
    state = {"version": 1, "current_bits": 4, "history": [], "calibrated": False, "layers": {}}
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "callbacks": {cb.state_key: state}, "hyper_parameters": hostile_hparams(tmp_path)}, path)
    assert callback_state_in_checkpoint(str(path), cb.state_key) == state  # the function setup('test') calls
    assert side_effects(tmp_path) == []


def test_sniff_kinds(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    save_file({"w": torch.zeros(2)}, tmp_path / "c.bin")  # the suffix does not matter
    assert [sniff(tmp_path / n) for n in ("a.pt", "b.pt", "c.bin")] == ["zip", "pickle", "safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(load_torch_file(tmp_path / "b.pt")["w"], torch.zeros(2))


# ------------------------------------------------------------------------------ pruning state
def _fit_pruned(tmp_path: Path, max_epochs: int, ckpt_path: Path | None = None) -> None:
    from lightning.pytorch import seed_everything

    from lightning_compress import ClassifierModule
    from lightning_compress.pruning import PruningCallback

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=8)
    callbacks = [PruningCallback(0.5, schedule="one_shot", verbose=False), ModelCheckpoint(dirpath=tmp_path, filename="last")]
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, num_sanity_val_steps=0, max_epochs=max_epochs, callbacks=callbacks)
    Trainer(**kwargs).fit(ClassifierModule(MLP(64, (32,), 10)), data, ckpt_path=ckpt_path)


def _edit_pruning_state(tmp_path: Path, edit: Any) -> Path:
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("PruningCallback")]
    edit(ckpt["callbacks"][key]["masks"]["model.net.1.weight"])
    torch.save(ckpt, tmp_path / "edited.ckpt")
    return tmp_path / "edited.ckpt"


def test_pruning_state_of_another_model_names_the_layer(tmp_path: Path) -> None:
    _fit_pruned(tmp_path, 1)
    path = _edit_pruning_state(tmp_path, lambda mask: mask.update(shape=[16, 64]))
    with pytest.raises(ValueError, match=r"pruning state does not fit the model: weight 'model\.net\.1\.weight' is \(32, 64\) in the model, but its saved mask is \(16, 64\)\. Resume with the model"):
        _fit_pruned(tmp_path, 2, path)


def test_damaged_pruning_mask_names_the_layer(tmp_path: Path) -> None:
    _fit_pruned(tmp_path, 1)
    path = _edit_pruning_state(tmp_path, lambda mask: mask.update(bits=mask["bits"][:64]))  # 64 of 256 bytes
    with pytest.raises(ValueError, match=r"pruning state .*weight 'model\.net\.1\.weight'.* 64 bytes.* 256"):
        _fit_pruned(tmp_path, 2, path)


def test_load_pruned_still_loads_a_model_that_cannot_be_copied() -> None:
    """The dry run copies the model; one holding a lock (deepcopy refuses it) failed to load with a raw TypeError."""
    import threading

    model = _two_layers()
    model.lock = threading.Lock()
    shrunk = _two_layers(4)
    load_pruned(model, shrunk.state_dict())
    x = torch.randn(2, 8)
    assert model[0].out_features == 4 and torch.equal(model(x), shrunk(x))


def test_a_model_that_cannot_be_copied_is_put_back_when_the_file_does_not_fit() -> None:
    """Without the copy the dry run needs, the model was resized and left so when the load then failed."""
    import threading

    model = _two_layers()
    model.lock = threading.Lock()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {**_two_layers(4).state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"Unexpected key\(s\) in state_dict: \"extra\.weight\""):
        load_pruned(model, state)
    assert model[0].out_features == 16 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_quantized_safetensors_file_has_one_metadata_key_and_files_of_earlier_releases_load(tmp_path: Path) -> None:
    """safetensors writes its metadata keys in a per-process order: a file with a key each for the format, the spec
    and the aliases differed in bytes between two processes saving the same model. One header key makes the bytes
    the model's alone; files written with the separate keys still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    float_net, converted = quantized_mlp()
    path = tmp_path / "q.safetensors"
    save_quantized(converted, path)
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert list(meta) == ["lightning_compress_quantized"]
    header = json.loads(meta["lightning_compress_quantized"])
    legacy = {"format": header["format"], "quantization_spec": json.dumps(header["quantization_spec"])}
    save_file(tensors, tmp_path / "old.safetensors", metadata=legacy)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = converted(x)
        for name in ("q.safetensors", "old.safetensors"):
            torch.testing.assert_close(load_quantized(float_net, tmp_path / name)(x), expected, atol=0, rtol=0)
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"lightning_compress_quantized": json.dumps({**header, "aliases": {"a": "missing"}})})
    with pytest.raises(ValueError, match=r"is damaged: its aliases name tensors the file does not hold"):
        load_quantized(float_net, tmp_path / "bad.safetensors")
    from lightning_compress import load

    with pytest.raises(ValueError, match=r"is not a compact artifact: it is a quantised model file written by save_quantized"):
        load(path)


def test_safetensors_files_are_readable_as_other_files_the_process_writes(tmp_path: Path) -> None:
    """safetensors' save_file leaves its file readable by its owner only (0o600), which a server running as another
    user cannot load; every .safetensors file written here gets the mode the umask gives any new file (0o644 under
    022), as the .pt and .onnx files already had."""
    from lightning_compress import export
    from lightning_compress.quantization import QuantSettings, prepare_fake_quant

    torch.manual_seed(0)
    student = MLP(8, (16,), 4)
    fake = MLP(8, (16,), 4)
    prepare_fake_quant(fake, QuantSettings())
    calibrate(fake, torch.randn(32, 8))
    quantized = convert_fake_quant(fake)
    module = DistillationModule(student, MLP(8, (16,), 4))
    previous = os.umask(0o022)
    try:
        export(student, tmp_path / "a.safetensors", torch.randn(2, 8))
        save_quantized(quantized, tmp_path / "q.safetensors")
        module.export_student(tmp_path / "s.safetensors")
        torch.save(student.state_dict(), tmp_path / "plain.pt")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.safetensors": 0o644, "q.safetensors": 0o644, "s.safetensors": 0o644, "plain.pt": 0o644}


def test_each_file_of_this_library_given_to_another_loader_names_its_own(tmp_path: Path) -> None:
    """A save_quantized file given to load_pruned (either format) or to load, and a Lightning checkpoint given to load,
    said only that the keys did not fit or that it was no artifact; each now names the loader that reads it."""
    from lightning_compress import load
    from lightning_compress.quantization import QuantSettings, prepare_fake_quant

    torch.manual_seed(0)
    fake = MLP(8, (16,), 4)
    prepare_fake_quant(fake, QuantSettings())
    calibrate(fake, torch.randn(32, 8))
    quantized = convert_fake_quant(fake)
    for name in ("q.safetensors", "q.pt"):
        save_quantized(quantized, tmp_path / name)
        with pytest.raises(ValueError, match=r"written by save_quantized; load it .* lightning_compress.load_quantized\(model, path\)"):
            load_pruned(MLP(8, (16,), 4), tmp_path / name)
    with pytest.raises(ValueError, match=r"not an artifact .* written by save_quantized; load it .*load_quantized\(model, path\)"):
        load(tmp_path / "q.pt")
    torch.save({"state_dict": MLP(8, (16,), 4).state_dict(), "pytorch-lightning_version": "2.6"}, tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"a Lightning checkpoint: load it with YourModule.load_from_checkpoint\(path\)"):
        load(tmp_path / "run.ckpt")


def test_load_pruned_takes_the_network_under_the_prefix_a_module_of_your_own_uses(tmp_path: Path) -> None:
    """A LightningModule of your own holding its network as self.net (or deeper) writes "net."-prefixed keys: load_pruned
    takes them, as it takes ClassifierModule's "model." (the hint of load_quantized for a shrunk model pointed there,
    and it said the model was built with the wrong class)."""
    from lightning_compress.pruning.shrink import shrink_model

    torch.manual_seed(0)
    net = ResCNN(width=8)
    shrink_model(net, {"block.conv1": torch.arange(8) < 3}, torch.zeros(1, 1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    for prefix in ("net.", "backbone.model."):
        state = {f"{prefix}{k}": v for k, v in net.state_dict().items()} | {"head_loss.weight": torch.ones(3)}
        fresh = load_pruned(ResCNN(width=8), {"state_dict": state}, strict=True)
        assert fresh.block.conv1.out_channels == 3
        torch.testing.assert_close(fresh.eval()(x), net.eval()(x), rtol=0, atol=0)
    # a teacher's (or an EMA) copy of the same network beside it: which one to load is not guessed
    twins = {f"teacher.{k}": v for k, v in ResCNN(width=8).state_dict().items()} | {f"net.{k}": v for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"the model's keys under several prefixes \('teacher\.', 'net\.'\)|\('net\.', 'teacher\.'\)"):
        load_pruned(ResCNN(width=8), {"state_dict": twins})


def test_a_path_that_cannot_be_written_is_said_in_one_message(tmp_path: Path, monkeypatch) -> None:
    """check_writable, which refuses a report folder or an export path before the run that writes it: a file or a
    link to nothing in the way is named, nothing is made with make=False, and an unreadable folder on the way is the
    same ValueError (it was a bare PermissionError from the walk to the nearest existing folder)."""
    from lightning_compress._files import check_writable

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^W '.*notes.txt/a/b.json' cannot be written: '.*notes.txt' is a file, not a folder$"):
        check_writable(tmp_path / "notes.txt" / "a" / "b.json", "W")
    with pytest.raises(ValueError, match=r"cannot be written: it is a file, not a folder$"):
        check_writable(tmp_path / "notes.txt", "W", folder=True)
    with pytest.raises(ValueError, match=r"'.*gone' is a link to nothing, not a folder$"):
        check_writable(tmp_path / "gone" / "x.json", "W", make=False)
    check_writable(tmp_path / "new" / "deeper" / "x.json", "W", make=False)
    assert not (tmp_path / "new").exists()  # checked in the nearest folder that stands; nothing made
    check_writable(tmp_path / "made" / "x.json", "W")
    assert (tmp_path / "made").is_dir()

    def locked(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", locked)
    with pytest.raises(ValueError, match=r"^W '.*x.json' cannot be written: Permission denied"):
        check_writable(tmp_path / "locked" / "x.json", "W")


def test_a_folder_given_as_the_file_to_load_or_save_is_named(tmp_path) -> None:
    """lc.load of a folder said "no artifact at", and save_quantized into an existing folder raised the raw
    IsADirectoryError of its temporary file's rename."""
    import lightning_compress as lc
    from lightning_compress.models import MLP
    from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant, save_quantized

    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"artifact '.*x.safetensors' is a folder, not a file; give the path of the file itself"):
        lc.load(folder)
    model = MLP(8, (4,), 2)
    prepare_fake_quant(model, QuantSettings(bits=8, activation_bits=None))
    with pytest.raises(ValueError, match=r"save_quantized '.*x.safetensors' is a folder; give a file's path"):
        save_quantized(convert_fake_quant(model), folder)
    assert list(folder.iterdir()) == []
