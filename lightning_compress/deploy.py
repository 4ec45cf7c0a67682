"""Running a compressed model fast on CPU.

Two paths, both through inductor, which fuses the static int8 Linear's input quantisation and its
dequantise/ReLU/requantise epilogue into vectorised C++ kernels around ``_int_mm``, and both with
*freezing* (parameters and buffers become constants of the graph, so constant arithmetic is folded):

- :func:`export_for_cpu` compiles the model ahead of time into an AOTInductor package (``.pt2``):
  one file holding the compiled kernels and the weights, any batch size, called from C++ without
  Python's per-call overhead; :func:`load_for_cpu` loads it, without the model's Python classes.
  The fastest path and the one we recommend for serving.
- :func:`compile_for_cpu` is ``torch.compile`` in the same process: no files, lazy, for models
  that ``torch.export`` cannot capture or for quick measurements.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    >>> fast = compile_for_cpu(net)  # compiles lazily, at the first call of each input shape
    >>> fast.model is not net and not fast.model.training  # a snapshot of net, in eval mode
    True
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress._files import QUANTIZED_FORMAT, other_loader_hint
from lightning_compress.artifact_calls import check_call
from lightning_compress.capture import bake_parametrizations, capture, check_forward_defined, example_call_parts, named_keyword_forward, traced_inputs
from lightning_compress.module_copy import copy_model
from lightning_compress.sharding import check_not_sharded

__all__ = [
    "EXPORT_FORMATS", "CompiledForCPU", "capture", "compile_for_cpu", "export", "export_for_cpu", "export_format", "load", "load_for_cpu",
]

#: What :func:`export` writes: ``compact`` (sparse indices and packed low-bit values in one safetensors
#: file, :mod:`lightning_compress.compact`), ``onnx`` (int8 weights and activations as ONNX's own
#: quantisation operators, :mod:`lightning_compress.onnx_export`) or ``pt2`` (an AOTInductor package,
#: :func:`export_for_cpu`).
EXPORT_FORMATS = ("compact", "onnx", "pt2")

PACKAGE_SUFFIX = ".pt2"

#: :func:`export`'s default bound on onnxruntime's difference from PyTorch, as a fraction of the largest output.
ONNX_TOLERANCE = 2e-3

#: Key of the package metadata holding the dtypes of the inputs it was compiled for (JSON).
INPUT_DTYPES_KEY = "lightning_compress.input_dtypes"


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if not kwargs and all(type(v) is Tensor for v in args):  # the common call, keyed in about 1 us
        return tuple((v.shape, v.dtype, v.device) for v in args)

    def one(v: Any) -> Any:
        if isinstance(v, Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device.type)
        if isinstance(v, (list, tuple)):
            return tuple(one(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, one(x)) for k, x in v.items()))
        return type(v).__name__

    return one(args), one(kwargs)


def _graphs_compiled() -> int | None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without the counters: treat every call as compiling
        return None
    return int(counters["stats"]["unique_graphs"])


class CompiledForCPU:
    """A frozen ``torch.compile`` of ``model`` for inference (see :func:`compile_for_cpu`).

    Calls run under ``torch.inference_mode()``. Until a call with a given input signature (shapes,
    dtypes) runs without compiling anything, calls with it run with inductor's ``freezing`` setting
    on, so every graph dynamo builds for it (including the recompiles that follow a first call)
    is frozen; afterwards such calls go straight to the compiled graphs. The setting is restored
    after each of those calls: the process-wide inductor configuration does not change.

    Attributes:
        model: The snapshot that was compiled: a deep copy of the given module, in ``eval`` mode.
    """

    def __init__(self, model: nn.Module, dynamic: bool | None = False) -> None:
        # a copy: frozen graphs hold the weights as constants, and dynamo would hand a second compile
        # of the same object the first one's graph, so later weight changes must not reach this one
        self.model = copy_model(model).eval()
        self._compiled = torch.compile(self.model, dynamic=dynamic)
        self._stable: set[Any] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            return self._call(args, kwargs)
        with torch.inference_mode():
            return self._call(args, kwargs)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = _signature(args, kwargs)
        if key in self._stable:
            return self._compiled(*args, **kwargs)
        import torch._inductor.config as inductor_config

        before = _graphs_compiled()
        previous = inductor_config.freezing
        inductor_config.freezing = True
        try:
            out = self._compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = previous
        if before is not None and _graphs_compiled() == before:
            self._stable.add(key)
        return out

    def __repr__(self) -> str:
        return f"CompiledForCPU({type(self.model).__name__}, settled signatures={len(self._stable)})"


def compile_for_cpu(model: nn.Module, dynamic: bool | None = False) -> CompiledForCPU:
    """Compile ``model`` for CPU inference with inductor freezing; returns a callable.

    The recommended way to run a converted (quantised) or shrunk model on CPU: on MNIST
    LeNet-300-100 at batch 64 the int8 model compiled this way ran 2.1-2.3x faster than the float
    model compiled the same way (``benchmarks/quantize_mnist.py --latency-only``), where a plain
    ``torch.compile`` gave about 1.9x.

    Freezing treats the weights as constants, so the result runs a snapshot: a deep copy of ``model``
    taken now (the original is not changed, not even put in ``eval`` mode). Compile after training;
    after the weights change, call ``compile_for_cpu`` again. ``dynamic`` is passed to ``torch.compile`` (``False``: one graph per input shape,
    the fastest for a few fixed batch sizes). Needs a C++ compiler at run time, as every inductor
    CPU compile does.

    Args:
        model: The module to run (copied; the copy is put in ``eval`` mode).
        dynamic: ``torch.compile``'s ``dynamic`` argument.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_for_cpu expects an nn.Module, got {type(model).__name__}")
    return CompiledForCPU(model, dynamic=dynamic)


def export_for_cpu(
    model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *, dynamic_batch: bool = True, dynamic_sequence: bool = False
) -> Path:
    """Compile ``model`` ahead of time into an AOTInductor package for CPU inference; returns its path.

    ``torch.export`` captures a snapshot of ``model`` (a deep copy on the CPU in ``eval`` mode; the
    original is not changed) and AOTInductor compiles it with freezing into ``path``, one ``.pt2`` file with the
    kernels and the weights. Load it with :func:`load_for_cpu` (no Python model classes needed there).
    On MNIST LeNet-300-100 at batch 64 the int8 model packaged this way ran 2.5-2.6x faster than the
    float model packaged the same way and 2.5x faster than float in eager mode, and 1.3x faster than
    eager float at batch 1 (``benchmarks/quantize_mnist.py --latency-only``); :func:`compile_for_cpu`
    of the same model spends about 40 us more per call in Python. Packed low-bit layers (4-bit, int8 convolutions)
    are unpacked into float weights inside the package: it runs them at float speed and is no
    smaller than the float model's; keep :func:`~lightning_compress.quantization.save_quantized`
    files for storage.

    Compiling takes seconds to a minute and needs a C++ compiler, as every inductor CPU compile does.

    Args:
        model: The module to export (copied to the CPU; the copy is put in ``eval`` mode).
        example_inputs: A tensor, or a tuple of tensors: the positional arguments of ``forward``; or a dict
            of its keyword arguments, or a :class:`~lightning_compress.batches.ForwardCall` (both). The
            package is then called the same way.
        path: The package file; must end in ``.pt2`` (an existing file is replaced). Parent folders are created.
        dynamic_batch: Dimension 0 of every input is a batch size the package accepts at any value
            (``False``: only the example's exact shapes).
        dynamic_sequence: The sequence length of token inputs (and their mask) too, within the range
            ``torch.export`` finds (a model with a position table of 32 takes 2 to 32), which the
            loaded package checks.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` not tensors.
        ValueError: a weight or buffer of ``model`` holds NaN or inf (the message names it).
        ValueError: ``path`` does not end in ``.pt2``, or ``dynamic_batch`` with inputs that do not share a
            batch dimension (or have none, or batch size 0).
        RuntimeError: ``torch.export`` cannot capture the model (data-dependent Python control flow,
            a batch size fixed inside ``forward``): the message says which. No file appears at
            ``path`` unless compiling succeeds.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_for_cpu expects an nn.Module, got {type(model).__name__}")
    check_not_sharded(model, "export_for_cpu")
    check_forward_defined(model, "export_for_cpu")
    path = Path(path)
    if path.suffix != PACKAGE_SUFFIX:
        raise ValueError(f"an AOTInductor package path must end in {PACKAGE_SUFFIX!r}; got {os.fspath(path)!r}")
    if path.is_dir():
        raise ValueError(f"{os.fspath(path)!r} is a folder; give the package file's path")
    bounds: dict[str, Any] = {}  # the tables integer inputs index: the package aborts the process past one
    program = capture(
        model, example_inputs, dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence,
        who=f"export_for_cpu({os.fspath(path)!r})", bounds=bounds,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # compiled beside its destination, then renamed into place: no file appears at path unless
    # compiling succeeds, and a rename within one folder is atomic
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        args, kwargs = program.example_inputs
        shapes = _input_shapes(program)
        ranges = {str(k): [_bound(r.lower), _bound(r.upper)] for k, r in program.range_constraints.items()}
        _limit_sequence(ranges, shapes, bounds)
        values = bounds.get("values", {})
        dtypes = json.dumps({
            "args": [str(t.dtype) for t in args], "kwargs": {k: str(v.dtype) for k, v in kwargs.items()},
            "shapes": {"args": shapes[: len(args)], "kwargs": dict(zip(kwargs, shapes[len(args) :])), "ranges": ranges},
            "values": {"args": {str(i): rows for i, rows in values.get("args", {}).items()}, "kwargs": values.get("kwargs", {})},
            "fixed": example_call_parts(example_inputs)[2],
        })
        built = torch._inductor.aoti_compile_and_package(
            program,
            package_path=os.path.join(tmp, path.name),
            inductor_configs={"freezing": True, "aot_inductor.metadata": {INPUT_DTYPES_KEY: dtypes}},
        )
        os.replace(built, path)
    return path


def _limit_sequence(ranges: dict[str, list[int | None]], shapes: list[list[int | str]], bounds: dict[str, Any]) -> None:
    """Cap the range of the first input's dynamic sequence dimension at the position table's length that
    :func:`~lightning_compress.lookup_bounds.lookup_bounds` confirmed (``bounds["sequence"]``)."""
    longest, axis = bounds.get("sequence"), bounds.get("sequence_dim")
    if longest is None or axis is None or not shapes or len(shapes[0]) <= axis or not isinstance(shapes[0][axis], str):
        return
    symbol = shapes[0][axis]
    low, high = ranges.get(symbol, [None, None])
    ranges[symbol] = [low, longest if high is None else min(high, longest)]


def _bound(value: Any) -> int | None:
    """A range end of a dynamic dimension as JSON: an int, or ``None`` for no bound."""
    try:
        return int(value)
    except Exception:  # noqa: BLE001 - sympy's infinities raise several kinds of error here
        return None


def _input_shapes(program: torch.export.ExportedProgram) -> list[list[int | str]]:
    """The shape of each user input of ``program`` (positional, then keyword, as ``example_inputs`` flattens),
    a dynamic dimension as its symbol's name (``"s0"``: inputs sharing it must agree)."""
    names = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
    return [[d if isinstance(d, int) else str(d) for d in n.meta["val"].shape] for n in placeholders]


def _check_archive(path: str | os.PathLike[str]) -> None:
    """A ``.pt2`` package is a zip archive whose entries (kernels, weights) each carry a CRC-32: check them all
    before loading, since the package runs a damaged weight without any error (a flipped bit of a bias was
    0.016 off)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable AOTInductor package: truncated, damaged or not written by "
            f"export_for_cpu ({type(err).__name__}: {err}); export it again"
        ) from err
    if bad is not None:
        raise ValueError(f"{os.fspath(path)!r} is damaged: {bad!r} in it fails its CRC-32 check; export it again")


class CheckedPackage:
    """A loaded AOTInductor package that refuses an input of another dtype or shape than it was compiled
    for, and hands it contiguous tensors: the package itself reads a tensor's bytes as the compiled dtype,
    shape and memory layout, and returns wrong numbers without an error otherwise (a bf16 package called
    with float32 input was 0.8 off, a channels-last input 0.48, a smaller image read past its end).
    Only the dynamic dimensions (the batch) may differ from the example's, equal wherever they are shared.
    It also refuses token ids past the table they index and a sequence past the model's position table
    (:mod:`~lightning_compress.lookup_bounds`): there the package's kernels end the whole process.
    Other attributes are the package's.

    Attributes:
        package: The package as ``torch._inductor.aoti_load_package`` returns it.
    """

    def __init__(self, package: Any, recorded: dict[str, Any], where: str = "the package") -> None:
        self.package = package
        self._where = where
        self._recorded_inputs = "args" in recorded or "kwargs" in recorded  # absent in packages that recorded nothing
        self._args: list[str] = list(recorded.get("args", []))
        self._kwargs: dict[str, str] = dict(recorded.get("kwargs", {}))
        shapes = recorded.get("shapes") or {}  # absent in packages that recorded dtypes only
        self._arg_shapes: list[list[int | str]] = list(shapes.get("args", []))
        self._kwarg_shapes: dict[str, list[int | str]] = dict(shapes.get("kwargs", {}))
        self._ranges: dict[str, list[int | None]] = dict(shapes.get("ranges", {}))
        values = recorded.get("values") or {}  # absent in packages written before they were recorded
        self._arg_rows: dict[int, int] = {int(i): int(r) for i, r in (values.get("args") or {}).items()}
        self._kwarg_rows: dict[str, int] = {k: int(r) for k, r in (values.get("kwargs") or {}).items()}
        self._fixed: dict[str, Any] = dict(recorded.get("fixed") or {})  # settings fixed at export (use_cache=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._recorded_inputs:
            kwargs = check_call(self._where, len(self._args), list(self._kwargs), args, kwargs, self._fixed)
        given = [(f"positional input {i}", v, d, self._arg_shapes[i] if i < len(self._arg_shapes) else None)
                 for i, (v, d) in enumerate(zip(args, self._args))]
        given += [(f"input {k!r}", v, self._kwargs[k], self._kwarg_shapes.get(k)) for k, v in kwargs.items() if k in self._kwargs]
        sizes: dict[str, int] = {}
        for where, value, expected, shape in given:
            if not isinstance(value, Tensor):
                continue
            if str(value.dtype) != expected:
                raise TypeError(
                    f"{where} is {value.dtype}, but the package was compiled for {expected} inputs; cast it "
                    f"(.to({expected})) or export the model again with an example of that dtype"
                )
            if shape is not None:
                self._check_shape(where, tuple(value.shape), shape, sizes, self._ranges)
        for where, value, rows in [(f"positional input {i}", args[i], r) for i, r in self._arg_rows.items() if i < len(args)] + [
            (f"input {k!r}", kwargs[k], r) for k, r in self._kwarg_rows.items() if k in kwargs
        ]:
            if isinstance(value, Tensor) and value.numel() and (int(value.min()) < 0 or int(value.max()) >= rows):
                raise ValueError(
                    f"{where} holds {int(value.min())}..{int(value.max())}, but it indexes a table of {rows} rows "
                    f"(0..{rows - 1}); PyTorch would raise an IndexError, and the package's kernels end the process"
                )
        args = tuple(v.contiguous() if isinstance(v, Tensor) else v for v in args)
        kwargs = {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return self.package(*args, **kwargs)

    @staticmethod
    def _check_shape(
        where: str, got: tuple[int, ...], shape: list[int | str], sizes: dict[str, int], ranges: dict[str, list[int | None]]
    ) -> None:
        def fits(g: int, d: int | str) -> bool:
            if isinstance(d, int):
                return g == d
            low, high = ranges.get(d, [None, None])
            return sizes.setdefault(d, g) == g and (low is None or g >= low) and (high is None or g <= high)

        if not (len(got) == len(shape) and all(fits(g, d) for g, d in zip(got, shape))):
            def shown(d: int | str) -> str:
                if isinstance(d, int):
                    return str(d)
                low, high = ranges.get(d, [None, None])
                return f"{low or 1}..{high}" if high is not None else ("any" if not low or low <= 1 else f"{low}+")

            compiled = "(" + ", ".join(shown(d) for d in shape) + ")"
            raise ValueError(
                f"{where} has shape {got}, but the package was compiled for {compiled} (a dynamic dimension within its "
                "range, the same size in every input that has it); export the model again with an example of this shape"
            )

    def __getattr__(self, name: str) -> Any:
        package = self.__dict__.get("package")  # absent in a copy being built: no recursion through here
        if package is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(package, name)


def load_for_cpu(path: str | os.PathLike[str]) -> Callable[..., Any]:
    """Load an :func:`export_for_cpu` package; returns a callable taking the same inputs as the model.

    A package written by :func:`export_for_cpu` records its inputs' dtypes, and the callable refuses
    other ones (:class:`CheckedPackage`); ``torch._inductor.aoti_load_package`` alone loads it too,
    without that check.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable package (truncated, damaged or something else).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no AOTInductor package at {os.fspath(path)!r} (write one with export_for_cpu)")
    _check_archive(path)
    try:
        package = torch._inductor.aoti_load_package(os.fspath(path))
        recorded = getattr(package, "get_metadata", dict)().get(INPUT_DTYPES_KEY)
        return package if recorded is None else CheckedPackage(package, json.loads(recorded), os.fspath(path))
    except RuntimeError as err:
        first_line = next(iter(str(err).splitlines()), "")
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable AOTInductor package: truncated, damaged or not written by "
            f"export_for_cpu ({first_line}); export it again"
        ) from err


def _compressed_anything(model: nn.Module) -> bool:
    """Low-bit layers, channels or units removed, or weights with zeros to index (at least 5%: an
    initial zero bias or a BatchNorm counter is not compression)."""
    from lightning_compress.pruning.shrink import REMOVED_MARK
    from lightning_compress.quantization.lowbit import _PackedLayer

    if any(isinstance(m, _PackedLayer) or hasattr(m, "quantization_spec") or getattr(m, REMOVED_MARK, False) for m in model.modules()):
        return True
    return any(p.dim() >= 2 and float((p == 0).float().mean()) >= 0.05 for p in model.parameters())


def check_onnx_tolerance(value: Any) -> None:
    """Refuse an ``onnx_tolerance`` that is not a number in (0, 1), naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"onnx_tolerance must be a number in (0, 1), got {value!r}")


#: The formats a suffix picks (any other suffix: ``"compact"``), as written: :func:`export` and :func:`load` alike.
_FORMAT_OF_SUFFIX = {PACKAGE_SUFFIX: "pt2", ".onnx": "onnx"}


def check_export_path(path: str | os.PathLike[str]) -> None:
    """Refuse, before anything is written, a path :func:`export` cannot write as meant: a folder, or a known suffix in
    other letters (``model.ONNX`` would be written, and read back, as a compact artifact).

    Raises:
        ValueError: naming the path and what to give instead.
    """
    if Path(path).is_dir():
        raise ValueError(f"{os.fspath(path)!r} is a folder; give the artifact file's path (a new name, inside it or elsewhere)")
    suffix = Path(path).suffix
    if suffix not in _FORMAT_OF_SUFFIX and suffix.lower() in _FORMAT_OF_SUFFIX:
        raise ValueError(
            f"{os.fspath(path)!r}: the suffix picks the format as written, and {suffix!r} is not {suffix.lower()!r}; "
            f"write {Path(path).with_suffix(suffix.lower()).name!r} for {_FORMAT_OF_SUFFIX[suffix.lower()]!r}, or another suffix "
            "(.safetensors) for a compact artifact"
        )


def export_format(path: str | os.PathLike[str], format: str | None = None) -> str:
    """What :func:`export` writes to ``path``: ``format`` when given, else by the suffix (``.onnx``: ``"onnx"``,
    ``.pt2``: ``"pt2"``, any other: ``"compact"``), the rule :func:`load` reads a file by; so a compact
    artifact under ``.onnx`` or ``.pt2`` is refused: it would be written, then not read back.

    Raises:
        ValueError: an unknown ``format``, or one the suffix contradicts, naming both.
    """
    suffix = Path(path).suffix
    if format is None:
        return _FORMAT_OF_SUFFIX.get(suffix, "compact")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {list(EXPORT_FORMATS)}")
    if format == "compact" and suffix in _FORMAT_OF_SUFFIX:
        raise ValueError(
            f"format='compact' to {os.fspath(path)!r}: load() reads a {suffix} file as {_FORMAT_OF_SUFFIX[suffix]!r}; "
            "give the compact artifact another suffix (.safetensors), or leave format out"
        )
    return format


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    *,
    format: str | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
    onnx_tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """Write ``model`` as a deployable artifact; :func:`load` reads it back without the model's classes.

    Args:
        model: The compressed model: pruned, channel-shrunk, converted (``QuantizeCallback.quantized_model``)
            or a distilled student; a LightningModule is exported as its ``forward``, without the children
            that forward never calls (a distillation module's teacher).
        path: The file to write (parent folders are created; an existing file is replaced, never left
            half-written).
        example_inputs: A batch of ``forward``'s inputs: a tensor or tuple (positional), a dict of keyword
            inputs (tensors, plus settings such as ``use_cache=False``, fixed in the artifact) or a
            :class:`~lightning_compress.batches.ForwardCall` (both); default the LightningModule's
            ``example_input_array``. A model returning an output object (a Hugging Face ``ModelOutput``)
            is exported returning a plain ``dict`` of its tensors.
        format: Default: by ``path``'s suffix (:func:`export_format`): ``.onnx`` is ``"onnx"``, ``.pt2``
            ``"pt2"``, any other ``"compact"``. ``"compact"``: the smallest of the three for sparse weights (zeros indexed,
            low-bit values kept packed, zlib; 8,774 bytes against ONNX's 27,698 for an 80% sparse MLP), for storage and
            shipping; it holds the graph too, a few KB, so a small dense or int8 model can be larger than its ONNX file
            (11,136 against 10,487 bytes for an int8 MLP). ``"onnx"``: int8 weights behind ``DequantizeLinear`` and int8
            activations as ``QuantizeLinear``/``DequantizeLinear``, from the model's own scales, checked in
            onnxruntime (needs the ``[onnx]`` extra; the path must end in ``.onnx``; the result adds the
            largest difference and both latencies). ``"pt2"``: compiled kernels for the fastest CPU serving (:func:`export_for_cpu`;
            the path must end in ``.pt2``).
        dynamic_batch: Any batch size at load (``False``: the example's shapes only).
        dynamic_sequence: Any sequence length of token inputs (and their attention mask) too, within the
            range ``torch.export`` finds (a position table of 32 entries: 2 to 32); the example needs at
            least 2 positions. An error names the model's part that fixes the length, if one does.
        onnx_tolerance: ``"onnx"``: how far onnxruntime's outputs may be from PyTorch's, as a fraction of the
            largest output, in 99% of the output rows (:func:`~lightning_compress.onnx_export.check_agreement`).

    Returns:
        ``{"format", "path", "bytes"}`` (the file's size), plus for ``compact`` the encoding of every
        tensor; ``"note"`` says when nothing in the model was compressed (the file is then a plain dense
        artifact, and a warning says so too).

    Raises:
        ValueError: an unknown ``format`` (the message lists the valid ones), a ``format`` that another
            format's suffix contradicts, a known suffix in other letters (``.ONNX``), a folder's path, no
            example input, a model FSDP2 shards (gather it with :func:`~lightning_compress.sharding.whole_copy`).
    """
    check_export_path(path)
    format = export_format(path, format)
    check_onnx_tolerance(onnx_tolerance)
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects an nn.Module, got {type(model).__name__}")
    check_not_sharded(model, "export")
    check_forward_defined(model, "export")
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError("export needs example_inputs (a batch of forward's inputs), or a module with example_input_array")
    if format == "pt2":
        written = export_for_cpu(model, example_inputs, path, dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence)
        return {"format": "pt2", "path": os.fspath(written), "bytes": written.stat().st_size}
    if format == "onnx":
        from lightning_compress.onnx_export import export_onnx

        inputs, kwargs, constants = example_call_parts(example_inputs)
        model = bake_parametrizations(model)  # parametrized weights as the tensors they compute
        model = named_keyword_forward(model, inputs, kwargs, constants) if dynamic_batch else model
        traced, traced_kwargs, dynamic = traced_inputs(model, inputs, kwargs, constants, dynamic_batch, dynamic_sequence)
        written = export_onnx(
            model, path, inputs, kwargs=kwargs, constants=constants, traced_inputs=(traced, traced_kwargs), dynamic_shapes=dynamic,
            tolerance=float(onnx_tolerance),
        )
        return {"format": "onnx", "path": os.fspath(path), **written}
    from lightning_compress.compact import check_plain_tensors, save_compact

    check_plain_tensors(model, path)
    program = capture(
        model, example_inputs, dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence, who=f"export({os.fspath(path)!r})",
        unpack_lowbit=False,
    )
    info = save_compact(program, path, fixed=example_call_parts(example_inputs)[2])
    result = {"format": "compact", "path": os.fspath(path), **info}
    if not _compressed_anything(model):
        result["note"] = (
            f"nothing in {type(model).__name__} is compressed (no zeros to index, no low-bit layers): "
            "the artifact stores it densely"
        )
        warnings.warn(result["note"], UserWarning, stacklevel=2)
    return result


def load(path: str | os.PathLike[str]) -> Callable[..., Any]:
    """Read what :func:`export` wrote: for ``compact``, an ``nn.Module`` (a ``torch.fx.GraphModule``) whose
    outputs equal the exported model's; for ``pt2``, the package's callable (:func:`load_for_cpu`); for
    ``onnx``, a callable running it in onnxruntime (tensors in, the model's output out, in its structure).
    Reading runs no code from the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a folder.
        ValueError: not an artifact, a newer format version, or a damaged or truncated file.
    """
    from lightning_compress._files import IncompleteFileError, check_file, sniff
    from lightning_compress.compact import load_compact

    check_file(path, "artifact")
    written_as = export_format(path)  # the rule export writes by
    if written_as == "pt2":
        return load_for_cpu(path)
    if written_as == "onnx":
        from lightning_compress.onnx_load import load_onnx

        return load_onnx(path)
    try:
        kind = sniff(path, "artifact")
    except IncompleteFileError:
        raise
    except ValueError:
        kind = None
    if kind != "safetensors":
        raise ValueError(
            f"{os.fspath(path)!r} is not an artifact written by lightning_compress.export (a compact .safetensors "
            f"file or a {PACKAGE_SUFFIX} package){_torch_file_hint(path) if kind == 'zip' else ''}"
        )
    return load_compact(path)


def _torch_file_hint(path: str | os.PathLike[str]) -> str:
    """Which loader reads a ``torch.save`` file of this library or Lightning, from the names in its pickle (nothing is
    unpickled); empty for any other file."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            data = archive.read(pickled) if pickled is not None else b""
    except (OSError, zipfile.BadZipFile):
        return ""
    if b"quantization_spec" in data:
        return f"; {other_loader_hint({'format': QUANTIZED_FORMAT})}"
    if b"pytorch-lightning_version" in data:
        return ("; it is a Lightning checkpoint: load it with YourModule.load_from_checkpoint(path), or its network with "
                "lightning_compress.load_pruned(model, path)")
    return ""
