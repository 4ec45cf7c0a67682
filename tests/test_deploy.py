"""compile_for_cpu (frozen inductor compile, no global side effects) and export_for_cpu/load_for_cpu
(AOTInductor packages) on float and converted models."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_compress import compile_for_cpu, export_for_cpu, load_for_cpu
from lightning_compress.models import MLP, ResCNN
from lightning_compress.quantization import (
    QuantSettings,
    convert_fake_quant,
    fake_quant_layers,
    prepare_fake_quant,
)


def _converted_mlp(bits: int = 8, activation_bits: int | None = 8) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    float_net = MLP(64, (32, 16), 10)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=activation_bits))
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = True
    with torch.no_grad():
        net(torch.randn(128, 64))
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = False
    return float_net.eval(), convert_fake_quant(net)


def test_compile_for_cpu_matches_eager_for_each_batch_size_and_leaves_config_alone() -> None:
    import torch._inductor.config as inductor_config

    float_net, quant = _converted_mlp()
    freezing_before = inductor_config.freezing
    for model in (float_net, quant):
        fast = compile_for_cpu(model)
        assert fast.model is not model and not fast.model.training  # a snapshot
        for batch in (1, 64, 1, 64):  # a second batch size compiles again; a seen one reuses its graph
            x = torch.randn(batch, 64)
            with torch.no_grad():
                ref = model(x)
            out = fast(x)
            assert out.shape == ref.shape and not out.requires_grad
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert "settled signatures=2" in repr(fast)  # both sizes ran once without compiling
    assert inductor_config.freezing == freezing_before  # freezing applies to our compiles only


def test_compile_for_cpu_compiles_a_snapshot_and_sees_new_weights_on_recompile() -> None:
    torch.manual_seed(0)
    model = MLP(16, (8,), 4).eval()
    x = torch.randn(4, 16)
    first = compile_for_cpu(model)
    before = first(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
        now = model(x)
    torch.testing.assert_close(first(x), before)  # the snapshot keeps the old weights
    torch.testing.assert_close(compile_for_cpu(model)(x), now, atol=1e-5, rtol=1e-5)  # a new compile sees the new ones


def test_compile_for_cpu_runs_packed_low_bit_layers() -> None:
    _, quant = _converted_mlp(bits=4, activation_bits=None)  # LowBitLayer: unpacked once, outside the graph
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = quant(x)
    torch.testing.assert_close(compile_for_cpu(quant)(x), ref, atol=1e-5, rtol=1e-5)


def test_compile_for_cpu_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module, got function"):
        compile_for_cpu(lambda x: x)  # type: ignore[arg-type]


def test_export_for_cpu_packages_int8_model_for_any_batch_size_loadable_without_our_classes(tmp_path: Path) -> None:
    _, quant = _converted_mlp()
    quant.train()
    path = export_for_cpu(quant, torch.randn(1, 64), tmp_path / "pkg" / "int8.pt2")  # batch 1: traced with 2
    assert path == tmp_path / "pkg" / "int8.pt2" and path.is_file()
    assert quant.training  # the snapshot was put in eval mode, not the model
    quant.eval()
    run = load_for_cpu(path)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            ref = quant(x)
        out = run(x)
        assert out.shape == (batch, 10)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the package would read another dtype's bytes as float32 (1.08 off for bf16 input): refused instead
    with pytest.raises(TypeError, match=r"positional input 0 is torch.bfloat16, but the package was compiled for torch.float32"):
        run(torch.randn(2, 64, dtype=torch.bfloat16))
    # a process that never imports lightning_compress runs it: the package holds graph and weights
    x = torch.randn(5, 64)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; run = torch._inductor.aoti_load_package(sys.argv[1]); "
        "torch.save(run(torch.load(sys.argv[2])), sys.argv[3]); "
        "sys.exit(any(m.startswith('lightning_compress') for m in sys.modules))"
    )
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), quant(x), atol=1e-5, rtol=1e-5)


def test_export_for_cpu_fixed_shape_runs_folded_low_bit_convolutions(tmp_path: Path) -> None:
    from lightning_compress.quantization.convert import LowBitLayer

    torch.manual_seed(0)
    net = ResCNN(1, 10, width=4)
    prepare_fake_quant(net, QuantSettings(bits=4, activation_bits=None))
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 8, 8))  # BatchNorm statistics to fold
    quant = convert_fake_quant(net.eval())
    assert any(isinstance(m, LowBitLayer) for m in quant.modules())
    x = torch.randn(6, 1, 8, 8)
    run = load_for_cpu(export_for_cpu(quant, (x,), tmp_path / "cnn.pt2", dynamic_batch=False))
    with torch.no_grad():
        torch.testing.assert_close(run(x), quant(x), atol=1e-5, rtol=1e-5)
    assert not any(hasattr(m, "unpacked_weight") for m in quant.modules())  # unpacked in the snapshot only
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quant.modules())  # folded into the packed convs


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > 0) else x


@pytest.mark.parametrize(
    ("model", "example", "name", "error", "match"),
    [
        (lambda x: x, torch.randn(2, 4), "m.pt2", TypeError, "expects an nn.Module, got function"),
        (nn.Linear(4, 2), [1.0, 2.0], "m.pt2", TypeError, "tensor or a non-empty tuple of tensors.*got list"),
        (nn.Linear(4, 2), (), "m.pt2", TypeError, "non-empty tuple of tensors.*got tuple"),
        (nn.Linear(4, 2), torch.randn(2, 4), "m.pt", ValueError, r"must end in '\.pt2'; got '.*m\.pt'"),
        (nn.Bilinear(4, 3, 2), (torch.randn(2, 4), torch.randn(3, 3)), "m.pt2", ValueError, r"same batch size.*\[\(2, 4\), \(3, 3\)\].*dynamic_batch=False"),
        (nn.Identity(), torch.tensor(1.0), "m.pt2", ValueError, r"same batch size in dimension 0; got shapes \[\(\)\]"),
        (nn.Linear(4, 2), torch.randn(0, 4), "m.pt2", ValueError, "batch size 0; give at least one sample"),
        (_DataDependent(), torch.randn(2, 4), "m.pt2", RuntimeError, "torch.export could not capture _DataDependent.*compile_for_cpu"),
    ],
)
def test_export_for_cpu_rejects_bad_input_before_writing(
    tmp_path: Path, model: object, example: object, name: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        export_for_cpu(model, example, tmp_path / name)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_export_for_cpu_refuses_a_folder_path(tmp_path: Path) -> None:
    (tmp_path / "m.pt2").mkdir()
    with pytest.raises(ValueError, match=r"m\.pt2' is a folder; give the package file's path"):
        export_for_cpu(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.pt2")


def test_load_for_cpu_names_a_missing_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no AOTInductor package at .*nothing\.pt2.*export_for_cpu"):
        load_for_cpu(tmp_path / "nothing.pt2")
    text = tmp_path / "text.pt2"
    text.write_text("not a package")
    with pytest.raises(ValueError, match=r"'.*text\.pt2' is not a readable AOTInductor package: truncated, damaged"):
        load_for_cpu(text)


def test_a_loaded_package_copies(tmp_path: Path) -> None:
    """``copy`` builds the checked package without ``__init__``: reading its package must not recurse."""
    import copy

    from lightning_compress.deploy import CheckedPackage

    checked = CheckedPackage(nn.Linear(4, 2), {"args": ["torch.float32"], "kwargs": {}})
    for clone in (copy.copy(checked), copy.deepcopy(checked)):
        assert clone(torch.zeros(1, 4)).shape == (1, 2) and clone.in_features == 4


def test_a_package_takes_any_memory_layout_and_refuses_other_shapes_or_damage(tmp_path: Path) -> None:
    """The package reads its input's bytes in the compiled layout and shape: a channels-last or strided input was
    0.48 off and a smaller image read past its end, without an error. The loaded package makes inputs contiguous
    and refuses a shape whose fixed dimensions differ; a flipped bit inside it fails its CRC-32 at load."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    path = export_for_cpu(net, torch.randn(2, 3, 8, 8), tmp_path / "conv.pt2")
    run = load_for_cpu(path)
    x = torch.randn(5, 3, 8, 8)
    big = torch.zeros(5, 3, 16, 16)
    big[:, :, ::2, ::2] = x
    with torch.no_grad():
        expected = net(x)
    for layout in (x, x.to(memory_format=torch.channels_last), big[:, :, ::2, ::2]):
        torch.testing.assert_close(run(layout), expected, atol=1e-5, rtol=1e-5)
    for shape in ((5, 3, 6, 6), (5, 2, 8, 8), (5, 3, 8)):
        with pytest.raises(ValueError, match=rf"positional input 0 has shape \({shape[0]}, .*compiled for \(any, 3, 8, 8\)"):
            run(torch.randn(shape))
    blob = bytearray(path.read_bytes())
    at = blob.find(net[3].bias.detach().numpy().tobytes())  # the head's bias, stored raw in the package
    assert at > 0
    blob[at + 2] ^= 0x80
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"damaged\.pt2' is damaged: .* fails its CRC-32 check"):
        load_for_cpu(damaged)


def test_a_loaded_package_checks_a_dynamic_dimension_against_its_range() -> None:
    """A package exported with dynamic_sequence records the range torch.export found (2..32 for a position table of
    32): the batch may be any size, the sequence within its range and the same in every input."""
    from lightning_compress.deploy import CheckedPackage

    shapes = {"args": [["s0", "s1"]], "kwargs": {"mask": ["s0", "s1"]}, "ranges": {"s0": [1, None], "s1": [2, 32]}}
    checked = CheckedPackage(lambda ids, mask=None: ids.shape, {"args": ["torch.int64"], "kwargs": {"mask": "torch.int64"}, "shapes": shapes})
    ids = torch.zeros(5, 20, dtype=torch.long)
    assert checked(ids, mask=torch.zeros(5, 20, dtype=torch.long)) == (5, 20)
    for bad, mask in ((torch.zeros(5, 40, dtype=torch.long), None), (torch.zeros(5, 1, dtype=torch.long), None), (ids, torch.zeros(5, 19, dtype=torch.long))):
        with pytest.raises(ValueError, match=r"compiled for \(any, 2\.\.32\)"):
            checked(bad, mask=torch.zeros_like(bad) if mask is None else mask)


def test_a_loaded_package_names_missing_unknown_and_positional_inputs() -> None:
    """A package exported with input_ids and attention_mask by keyword: torch's "Ran into a kwarg keyword mismatch: Got
    the following keywords [] but expected [...]" for a positional call or a missing mask, as the compact file had."""
    from lightning_compress.deploy import CheckedPackage

    recorded = {"args": [], "kwargs": {"input_ids": "torch.int64", "attention_mask": "torch.int64"}}
    checked = CheckedPackage(lambda **named: sorted(named), recorded, "lm.pt2")
    ids = torch.zeros(2, 6, dtype=torch.long)
    assert checked(input_ids=ids, attention_mask=ids) == ["attention_mask", "input_ids"]
    with pytest.raises(TypeError, match=r"'lm.pt2' takes 0 positional input\(s\), got 2; pass the others by keyword: input_ids, attention_mask"):
        checked(ids, ids)
    with pytest.raises(TypeError, match=r"'lm.pt2': missing input\(s\) \['attention_mask'\]; it takes \['input_ids', 'attention_mask'\] by keyword"):
        checked(input_ids=ids)
    with pytest.raises(TypeError, match=r"unknown input\(s\) \['labels'\]"):
        checked(input_ids=ids, attention_mask=ids, labels=ids)
    one = CheckedPackage(lambda x: x, {"args": ["torch.float32"], "kwargs": {}}, "net.pt2")
    with pytest.raises(TypeError, match=r"'net.pt2' takes 1 positional input\(s\), got 0; it takes 1 input\(s\) by position"):
        one()
    fixed = CheckedPackage(lambda **named: sorted(named), {**recorded, "fixed": {"use_cache": False}}, "lm.pt2")
    assert fixed(input_ids=ids, attention_mask=ids, use_cache=False) == ["attention_mask", "input_ids"]  # left out of the call
    with pytest.raises(TypeError, match=r"'lm.pt2': use_cache=False was fixed when it was exported, got use_cache=True"):
        fixed(input_ids=ids, attention_mask=ids, use_cache=True)


class _PositionTable(nn.Module):
    """Token and position tables, the positions computed from the sequence (shifted by ``offset``, as OPT's are),
    as Hugging Face decoders look them up: ``torch.export`` finds no upper bound for the sequence."""

    def __init__(self, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.tok, self.pos, self.head = nn.Embedding(50, 8), nn.Embedding(16 + offset, 8), nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1]) + self.offset
        return self.head(self.tok(input_ids.view(-1, input_ids.shape[-1])) + self.pos(positions))


class _RelativeBuckets(nn.Module):
    """A table indexed by relative-position buckets (T5): any sequence length works, nothing is bounded."""

    def __init__(self) -> None:
        super().__init__()
        self.buckets = nn.Embedding(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        relative = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp(0, 7)
        return x + self.buckets(relative).squeeze(-1).sum(0)


class _PaddedPositions(nn.Module):
    """OPT's positions: the cumulative sum of the attention mask, shifted by 2; ``labels`` is only compared."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 8), nn.Embedding(18, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.cumsum(1) * attention_mask - 1).clamp(min=0) + 2
        return (self.tok(input_ids) + self.pos(positions)).sum(-1) * (labels >= 0)


class _EvenLengths(_RelativeBuckets):
    """Relative buckets (any length) and a forward that takes even lengths only: its failure one position past the
    buckets' table is not that table's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError("an even length is needed")
        return super().forward(x)


class _GathersByPosition(nn.Module):
    """RoBERTa: token types (one row) gathered by position from a buffer before the position lookup, so a longer
    sequence fails in that gather, not in the position table."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.types = nn.Embedding(50, 8), nn.Embedding(16, 8), nn.Embedding(1, 8)
        self.register_buffer("buffered_types", torch.zeros(1, 16, dtype=torch.long))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        n, positions = input_ids.shape[1], torch.arange(input_ids.shape[1])
        if token_type_ids is None:
            token_type_ids = torch.gather(self.buffered_types.expand(input_ids.shape[0], -1), 1, positions.expand(input_ids.shape[0], n))
        return self.tok(input_ids) + self.pos(positions) + self.types(token_type_ids)


def test_lookup_bounds_finds_token_and_position_tables_by_what_indexes_them() -> None:
    from lightning_compress.lookup_bounds import lookup_bounds

    ids = torch.randint(0, 50, (2, 6))
    for offset in (0, 2):
        found = lookup_bounds(_PositionTable(offset).eval(), (ids,), {}, sequence=True)
        assert found["values"]["args"] == {0: 50} and found["sequence"] == 16 and found["sequence_dim"] == 1
    assert lookup_bounds(_PositionTable().eval(), (ids,), {}, sequence=False)["sequence"] is None
    nothing = {"values": {"args": {}, "kwargs": {}}, "sequence": None, "sequence_dim": 1}
    assert lookup_bounds(_RelativeBuckets(), (torch.randn(2, 6),), {}, sequence=True) == nothing
    assert lookup_bounds(_EvenLengths(), (torch.randn(2, 6),), {}, sequence=True) == nothing  # bounded at 8 before
    # a left-padded mask: the positions do not reach length - 1, which hid the table; labels sharing the ids' memory
    # (labels=input_ids) were bounded by the vocabulary, refusing -100
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, :3] = 0
    found = lookup_bounds(_PaddedPositions(), (), {"input_ids": ids, "attention_mask": mask, "labels": ids}, sequence=True)
    assert found["values"]["kwargs"] == {"input_ids": 50} and found["sequence"] == 16
    # RoBERTa: all-zero token types (a 1-row table) were read as a mask and made ones; a longer sequence fails first in
    # a gather by position: both lost the bound
    types = torch.zeros_like(ids)
    assert lookup_bounds(_GathersByPosition(), (), {"input_ids": ids, "token_type_ids": types}, sequence=True)["sequence"] == 16
    assert lookup_bounds(_GathersByPosition(), (), {"input_ids": ids}, sequence=True)["sequence"] == 16


def test_a_package_refuses_ids_past_their_table_and_a_sequence_past_the_positions(tmp_path: Path) -> None:
    """An AOTInductor package ends the whole process (SIGABRT, no Python exception) on an index past a table: token ids
    at or above the vocabulary, or a sequence past a position table that torch.export left unbounded (Hugging Face
    GPT-2 at 40 tokens of 32 positions). The loaded package refuses both with an error; the process lives."""
    torch.manual_seed(0)
    path = export_for_cpu(_PositionTable().eval(), {"input_ids": torch.randint(0, 50, (2, 6))}, tmp_path / "pos.pt2",
                          dynamic_sequence=True)
    script = (
        "import sys, torch\nfrom lightning_compress import load_for_cpu\nrun = load_for_cpu(sys.argv[1])\n"
        "print(tuple(run(input_ids=torch.randint(0, 50, (3, 16))).shape))\n"
        "for ids in (torch.randint(0, 50, (3, 17)), torch.full((3, 5), 50), torch.full((3, 5), -1)):\n"
        "    try:\n        run(input_ids=ids)\n        print('ran')\n"
        "    except ValueError as err:\n        print('refused:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "(3, 16, 3)" and len(lines) == 4, lines
    assert "has shape (3, 17), but the package was compiled for (any, 2..16)" in lines[1]
    assert "holds 50..50, but it indexes a table of 50 rows (0..49)" in lines[2] and "holds -1..-1" in lines[3]


class _Scaled(nn.Module):
    """A keyword forward with a setting (``double``), as Hugging Face models take ``use_cache``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, double: bool = True) -> torch.Tensor:
        return self.fc(x) * (2 if double else 1)


@pytest.mark.parametrize("suffix", ["safetensors", pytest.param("pt2", marks=pytest.mark.slow), "onnx"])  # pt2: a C++ compile
def test_a_setting_fixed_at_export_may_be_passed_again_with_its_value(tmp_path: Path, suffix: str) -> None:
    """An artifact exported with ``{"x": ..., "double": False}`` fixes ``double``: every format's call may pass it again
    with that value (the output is the exported one), and another value is refused naming the fixed one; it was
    "unknown input(s) ['double']" in all three."""
    from lightning_compress import export, load

    if suffix == "onnx":
        pytest.importorskip("onnxruntime", reason="format='onnx' needs the onnx extra")
    torch.manual_seed(0)
    model, x = _Scaled().eval(), torch.randn(3, 4)
    export(model, tmp_path / f"m.{suffix}", {"x": x, "double": False})
    served = load(tmp_path / f"m.{suffix}")
    with torch.no_grad():
        expected = model(x, double=False)
    assert torch.allclose(served(x=x), expected, atol=1e-6)
    assert torch.allclose(served(x=x, double=False), expected, atol=1e-6)
    for other in (True, 0):
        with pytest.raises(TypeError, match=rf"double=False was fixed when it was exported, got double={other}; export it again"):
            served(x=x, double=other)
    with pytest.raises(TypeError, match=r"unknown input\(s\) \['triple'\].*; fixed at export: double=False"):
        served(x=x, triple=True)


@pytest.mark.parametrize("kind", ["orthogonal", "weight_norm", "hook_weight_norm"])
def test_a_parametrized_weight_is_exported_as_the_tensor_it_computes(tmp_path: Path, kind: str) -> None:
    """The graph recomputed parametrized weights at every call and stored their inputs: an orthogonal 512x32 layer
    exported 975 KB (a 512x512 base), 15x the baked model. The artifact now holds the weight it computes, and the
    model keeps its parametrization (removing it from a copy had taken the original's weight away)."""
    from torch.nn.utils import parametrizations

    from lightning_compress import export, load

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10))
    {"orthogonal": parametrizations.orthogonal, "weight_norm": parametrizations.weight_norm,
     "hook_weight_norm": torch.nn.utils.weight_norm}[kind](net[0])
    net.eval()
    x = torch.randn(3, 512)
    with torch.no_grad():
        expected = net(x)
    written = export(net, tmp_path / "m.safetensors", x)
    assert written["bytes"] < 1.5 * 4 * (512 * 32 + 32 * 10)  # the weights once, no base or direction/magnitude pair
    assert torch.allclose(load(tmp_path / "m.safetensors")(x), expected, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(net(x), expected)  # the model itself is as it was
    assert hasattr(net[0], "parametrizations") or net[0]._forward_pre_hooks
