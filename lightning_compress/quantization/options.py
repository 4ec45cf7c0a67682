"""``QuantizeOptions``: every option of :class:`~lightning_compress.QuantizeCallback`, checked on construction."""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from lightning_compress._validation import as_flag, as_patterns, regex_map
from lightning_compress.batches import BatchForward
from lightning_compress.deploy import ONNX_TOLERANCE, PACKAGE_SUFFIX, check_onnx_tolerance
from lightning_compress.guard import NONFINITE_ACTIONS, GuardOptions
from lightning_compress.quantization.lowbit import BACKENDS
from lightning_compress.quantization.fake_quant import ROUNDING
from lightning_compress.schedules import Schedule, make_schedule
from lightning_compress.selection import preview

__all__ = ["LATENCY", "METHODS", "WEIGHT_BITS", "BitsSpec", "QuantizeOptions", "layer_bits"]

METHODS = ("qat", "ptq")
#: The weight widths a layer may take (converted layers exist for each).
WEIGHT_BITS = tuple(range(2, 9))
LATENCY = ("both", "eager", "none")
#: One width, an ``{epoch: bits}`` schedule (fractional epochs allowed), or a per-layer ``{regex: bits}`` map (see
#: :func:`layer_bits`). ``float`` keys: typed ``int``, a command-line parser would truncate ``4.5`` to ``4``.
BitsSpec = Union[int, Mapping[float, int], Mapping[str, int]]


def _check_epoch(name: str, value: Any, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a (fractional) epoch >= 0{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def _check_bits(value: Any, what: str = "weight_bits") -> int:
    """``value`` as an ``int`` in 2..8 (numpy's integers too: ``np.int64(4)`` is 4)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value not in WEIGHT_BITS:
        raise ValueError(f"{what} must be an integer from 2 to 8, got {value!r}")
    return int(value)


def _epoch_key(key: Any) -> float | None:
    """The epoch an ``{epoch: bits}`` key stands for: a number (numpy's too), or one written as text (``"2"``,
    ``"2.5"``: YAML and JSON keys arrive so); ``None`` for anything else, a module-name regex.

    >>> _epoch_key(2), _epoch_key("2.5"), _epoch_key(" 3 "), _epoch_key("fc.*"), _epoch_key(True)
    (2.0, 2.5, 3.0, None, None)
    """
    if isinstance(key, str):
        return float(key) if re.fullmatch(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*", key) else None
    if isinstance(key, bool) or not isinstance(key, numbers.Real):
        return None
    return float(key)


def _check_layer_map(bits: Mapping[Any, Any]) -> dict[str, int]:
    return regex_map(bits, "weight_bits", _check_bits)


def layer_bits(names: Sequence[str], bits: Mapping[str, int], others: Iterable[str] = ()) -> dict[str, int]:
    """Weight bits per layer from an ordered ``{regex: bits}`` map.

    Each layer (a module name, as ``include`` matches them) takes the bits of the first regex found in
    its name (``re.search``). Every regex must match at least one selected layer, and every selected
    layer must be matched: a layer left out would either stay float (what ``exclude`` says) or take a
    width nobody wrote, so a map covers them all, with a catch-all ``".*"`` last if needed. When a
    regex matches only layers that are not selected (``others``: every quantisable layer of the
    model), the error names them.

    >>> layer_bits(["fc1", "fc2", "out"], {"fc": 4, ".*": 8})
    {'fc1': 4, 'fc2': 4, 'out': 8}
    >>> layer_bits(["fc1", "out"], {"fc": 4})
    Traceback (most recent call last):
    ...
    ValueError: weight_bits map gives no bits to the selected layers ['out'] (1 in all); add a pattern for them (a catch-all '.*' last, e.g. {'fc': 4, '.*': 8}) or leave them in float with exclude=['out']
    """
    out: dict[str, int] = {}
    for pattern, value in bits.items():
        if not any(re.search(pattern, n) for n in names):
            unselected = [n for n in others if n not in names and re.search(pattern, n)]
            hint = (
                f"; it matches {preview(unselected, 3)}, which are not selected (see include/exclude)" if unselected else ""
            )
            raise ValueError(
                f"weight_bits regex {pattern!r} matches none of the layers selected for quantisation: {preview(names)}{hint}"
            )
        for n in names:
            if n not in out and re.search(pattern, n):
                out[n] = int(value)
    missing = [n for n in names if n not in out]
    if missing:
        example = {**{k: v for k, v in list(bits.items())[:2]}, ".*": 8}
        raise ValueError(
            f"weight_bits map gives no bits to the selected layers {preview(missing)}; add a pattern for them (a "
            f"catch-all '.*' last, e.g. {example!r}) or leave them in float with exclude={[re.escape(n) for n in missing]!r}"
        )
    return {n: out[n] for n in names}


def _check_count(value: Any, what: str, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}{hint}, got {value!r}")


#: What ``export_to`` may end in: an :func:`~lightning_compress.export_for_cpu` package, an ONNX file, a compact
#: artifact (:func:`~lightning_compress.export` by suffix).
EXPORT_SUFFIXES = (PACKAGE_SUFFIX, ".onnx", ".safetensors")


@dataclass
class QuantizeOptions:
    """The options of :class:`~lightning_compress.QuantizeCallback` (documented there), normalised.

    Raises:
        ValueError: any invalid value, naming it and the valid choices.
    """

    method: str = "qat"
    weight_bits: BitsSpec = 8
    activation_bits: int | None = 8
    granularity: str | int = "per_channel"
    rounding: str = "nearest"
    start_epoch: float = 0.0
    freeze_observers_epoch: float | None = None
    freeze_bn_epoch: float | None = None
    calibration_batches: int = 32
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    convert_on_fit_end: bool = True
    monitor: str | None = None
    max_drop: float | None = None
    mode: str = "max"
    backend: str = "auto"
    latency: str = "both"
    observer_momentum: float = 0.1
    batch_forward: BatchForward | None = None
    quantize_teacher: bool = False
    bn_reestimate_batches: int = 32
    save_to: str | None = None
    export_to: str | None = None
    on_nonfinite: str = "error"
    export_dynamic_sequence: bool = False
    onnx_tolerance: float = ONNX_TOLERANCE

    def __post_init__(self) -> None:
        for flag in ("convert_on_fit_end", "quantize_teacher", "export_dynamic_sequence"):
            setattr(self, flag, as_flag(getattr(self, flag), flag))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid choices: {list(METHODS)}")
        self.schedule = self._bits_schedule()
        if self.activation_bits not in (8, None) or isinstance(self.activation_bits, bool):
            raise ValueError(f"activation_bits must be 8 or None (weight-only), got {self.activation_bits!r}")
        g = self.granularity
        if isinstance(g, str) and g.strip().isdigit():  # `--...granularity=32` on a command line arrives as text
            g = self.granularity = int(g)
        if isinstance(g, bool) or not (g in ("per_channel", "per_tensor") or (isinstance(g, int) and g > 0)):
            raise ValueError(f"unknown granularity {g!r}; valid: 'per_channel', 'per_tensor' or a positive group size")
        if self.rounding not in ROUNDING:
            raise ValueError(f"unknown rounding {self.rounding!r}; valid choices: {list(ROUNDING)}")
        self.start_epoch = _check_epoch("start_epoch", self.start_epoch, allow_none=False)  # type: ignore[assignment]
        for name in ("freeze_observers_epoch", "freeze_bn_epoch"):
            value = _check_epoch(name, getattr(self, name))
            if value is not None and value < self.start_epoch:
                raise ValueError(f"{name}={value:g} is before start_epoch={self.start_epoch:g}; it must be >= start_epoch")
            setattr(self, name, value)
        _check_count(self.calibration_batches, "calibration_batches", 1)
        _check_count(self.bn_reestimate_batches, "bn_reestimate_batches", 0, " (0: off)")
        self.guard = GuardOptions(self.monitor, self.max_drop, self.mode)
        if self.monitor is not None and not self.lowers_bits():
            what = "method='ptq' calibrates once" if self.method == "ptq" else f"weight_bits={self.weight_bits!r} keeps one width"
            warnings.warn(  # accepted: a config may keep its guard while trying settings; it acts on nothing here
                f"QuantizeCallback: monitor={self.monitor!r} guards the lowering of weight_bits over epochs, and {what}: "
                "there is no lowering to stop or roll back, so it will not act. Give a schedule such as {0: 8, 2: 4}, "
                "or drop monitor and max_drop",
                UserWarning, stacklevel=4,
            )
        self.max_drop = None if self.max_drop is None else float(self.max_drop)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid choices: {list(BACKENDS)}")
        if self.latency not in LATENCY:
            raise ValueError(f"unknown latency {self.latency!r}; valid choices: {list(LATENCY)}")
        if isinstance(self.observer_momentum, bool) or not isinstance(self.observer_momentum, (int, float)) or not (
            0.0 < self.observer_momentum <= 1.0
        ):
            raise ValueError(f"observer_momentum must be in (0, 1], got {self.observer_momentum!r}")
        if self.batch_forward is not None and not callable(self.batch_forward):
            raise ValueError(f"batch_forward must be a function (module, batch) -> output, got {self.batch_forward!r}")
        self._check_outputs()
        self.include = as_patterns(self.include, "include")
        self.exclude = as_patterns(self.exclude, "exclude")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"unknown on_nonfinite {self.on_nonfinite!r}; valid: {list(NONFINITE_ACTIONS)}")

    def lowers_bits(self) -> bool:
        """Whether the run lowers its weights' width over epochs (QAT with a schedule): what the accuracy guard acts on."""
        return self.method == "qat" and any(m > 0 for m in self.schedule.milestones())

    def within_epochs(self) -> bool:
        """Whether a setting takes effect inside an epoch (a fractional start or freeze epoch, or bits milestone)."""
        epochs = [self.start_epoch, self.freeze_observers_epoch, self.freeze_bn_epoch, *self.schedule.milestones()]
        return any(e is not None and not float(e).is_integer() for e in epochs)

    def _bits_schedule(self) -> Schedule:
        bits = self.weight_bits
        self.layer_bits: dict[str, int] | None = None
        if not isinstance(bits, Mapping):
            self.weight_bits = _check_bits(bits)  # a plain int: numpy's would not go into a YAML config or a log
            return make_schedule(self.weight_bits)
        if not bits:
            raise ValueError("weight_bits map is empty; give {epoch: bits} or {regex: bits} entries, or a number")
        epochs = [_epoch_key(k) is not None for k in bits]
        if not all(epochs):
            if any(epochs):
                raise ValueError(
                    f"weight_bits={dict(bits)!r} mixes epochs and module-name regexes; give either an {{epoch: bits}} "
                    "schedule or a per-layer {regex: bits} map"
                )
            self.layer_bits = _check_layer_map(bits)
            return make_schedule(max(self.layer_bits.values()))
        if self.method == "ptq":
            raise ValueError("an {epoch: bits} schedule needs training; method='ptq' takes a single weight_bits")
        schedule: dict[float, int] = {}
        for key, value in bits.items():
            epoch = _epoch_key(key)
            if epoch is None or not math.isfinite(epoch) or epoch < 0:
                raise ValueError(f"weight_bits schedule key {key!r} must be an epoch >= 0 (fractional allowed, e.g. 2.5)")
            if epoch in schedule:
                same = [k for k in bits if _epoch_key(k) == epoch]
                raise ValueError(f"weight_bits schedule keys {same!r} are the same epoch {epoch:g}; give each epoch once")
            schedule[epoch] = _check_bits(value, f"weight_bits[{key!r}]")
        return make_schedule(schedule)

    def _check_outputs(self) -> None:
        for name in ("save_to", "export_to"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
                raise ValueError(f"{name} must be a file path (relative to the run's log directory) or None, got {value!r}")
        if self.save_to and self.export_to and os.path.normpath(str(self.save_to)) == os.path.normpath(str(self.export_to)):
            raise ValueError(f"save_to and export_to are the same file ({self.save_to!r}): the export would replace the "
                             "save_quantized file; give them different names")
        if (self.save_to or self.export_to) and not self.convert_on_fit_end:
            raise ValueError("save_to/export_to write the converted model, which convert_on_fit_end=False never builds")
        if self.save_to and self.backend == "torchao" and str(self.save_to).endswith(".safetensors"):
            raise ValueError(
                f"save_to={self.save_to!r}: torchao layers hold tensor subclasses, which safetensors cannot store; "
                "use a .pt path or backend='auto'"
            )
        if self.export_to and not str(self.export_to).endswith(EXPORT_SUFFIXES):
            raise ValueError(
                f"export_to={self.export_to!r}: the suffix picks the artifact; valid: {list(EXPORT_SUFFIXES)} "
                "(an AOTInductor package, an ONNX file checked in onnxruntime, a compact artifact)"
            )
        self._check_export_format()
        check_onnx_tolerance(self.onnx_tolerance)
        if self.onnx_tolerance != ONNX_TOLERANCE and not str(self.export_to or "").endswith(".onnx"):
            raise ValueError(f"onnx_tolerance={self.onnx_tolerance!r} applies to an export_to ONNX file, but export_to is {self.export_to!r}")
        if self.export_dynamic_sequence and not self.export_to:
            raise ValueError("export_dynamic_sequence=True applies to the export_to artifact, but export_to is not set; "
                             "give export_to: model.pt2, or leave export_dynamic_sequence False")

    def _check_export_format(self) -> None:
        """An ``export_to`` format that cannot take what the options make, refused before training."""
        export = str(self.export_to or "")
        if self.backend == "torchao" and export.endswith((".safetensors", ".onnx")):
            what = "the compact artifact cannot store" if export.endswith(".safetensors") else "ONNX export does not take"
            raise ValueError(
                f"export_to={self.export_to!r}: torchao layers hold tensor subclasses, which {what}; use a "
                f"{PACKAGE_SUFFIX} path (an AOTInductor package) or backend='auto'"
            )
        if export.endswith(".onnx") and isinstance(self.granularity, int):
            raise ValueError(
                f"export_to={self.export_to!r} with granularity={self.granularity}: ONNX stores one weight scale per output "
                f"channel, and a group size gives every {self.granularity} weights their own; use granularity='per_channel' "
                f"or 'per_tensor', or a {PACKAGE_SUFFIX} or .safetensors export_to"
            )
