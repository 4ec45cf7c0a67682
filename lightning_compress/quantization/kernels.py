"""Serve each ``Linear`` layer on the fastest quantised kernel the device has, chosen by measurement.

torchao has int8 and int4 weight-only kernels, int8 dynamic-activation kernels and float8 kernels,
but which is fastest depends on the device and on the shape: on an H200, ``torch._int_mm`` ran int8 at
0.16-0.19x the speed of a bf16 matmul, and a weight-only kernel only pays where the matmul is bound by
reading the weights (few rows). So :func:`use_fastest_kernels` converts a copy of every ``nn.Linear`` to
each candidate path, times it against the layer as it is at the input shape the model really gives
it (interleaved medians, on the model's device and dtype), and keeps the fastest path only where it is
faster by ``min_speedup``. The returned table says, per layer, which path it took, the timings, the
output error of every path, and why a path was not available (a kernel this device or build lacks).

Example (which path wins depends on the machine, so the example only reads the table):
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 64))
    >>> table = use_fastest_kernels(net, torch.randn(8, 64), paths=("int8_weight",), repeats=3)
    >>> sorted(table["0"])
    ['error', 'ms', 'path', 'reasons', 'speedup']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.measure import layer_input_shapes, measure_latency, probe_input
from lightning_compress.quantization.lowbit import import_torchao

__all__ = ["KERNEL_PATHS", "use_fastest_kernels"]

#: The candidate paths: torchao's configs for ``quantize_``.
KERNEL_PATHS: dict[str, Callable[[Any], Any]] = {
    "int8_weight": lambda tq: tq.Int8WeightOnlyConfig(),
    "int8_dynamic": lambda tq: tq.Int8DynamicActivationInt8WeightConfig(),
    "int4_weight": lambda tq: tq.Int4WeightOnlyConfig(group_size=128),
    "fp8_weight": lambda tq: tq.Float8WeightOnlyConfig(),
    "fp8_dynamic": lambda tq: tq.Float8DynamicActivationFloat8WeightConfig(),
}

#: What torchao raises for a kernel the device or the build does not have.
_UNAVAILABLE = (ImportError, AssertionError, RuntimeError, NotImplementedError, ValueError, TypeError)


def _convert(layer: nn.Linear, path: str) -> nn.Linear:
    tq = import_torchao()
    holder = nn.Sequential(copy.deepcopy(layer))
    tq.quantize_(holder, KERNEL_PATHS[path](tq))
    return holder[0]


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _one_layer(
    layer: nn.Linear, rows: int, paths: Sequence[str], min_speedup: float, max_error: float | None, repeats: int
) -> dict[str, Any]:
    w = layer.weight
    x = probe_input(rows, w)
    with torch.inference_mode():
        ref = F.linear(x, w, layer.bias)
    converted: dict[str, nn.Linear] = {}
    errors: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for path in paths:
        try:
            candidate = _convert(layer, path)
            if type(candidate.weight) in (torch.Tensor, nn.Parameter):  # torchao skips shapes its kernel cannot take
                reasons[path] = f"torchao left the weight {tuple(w.shape)} as it was: a shape this path does not take"
                continue
            with torch.inference_mode():
                errors[path] = _relative_error(candidate(x), ref)
        except _UNAVAILABLE as err:  # a kernel this device or build lacks
            reasons[path] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unavailable'}"
            continue
        if max_error is not None and errors[path] > max_error:
            reasons[path] = f"relative output error {errors[path]:.3g} above max_error={max_error:g}"
            continue
        converted[path] = candidate
    if not converted:
        return {"path": "dense", "speedup": None, "error": errors, "ms": {}, "reasons": reasons}
    timed = measure_latency(
        {"dense": layer, **converted}, x, batch_size=None, repeats=repeats, warmup=3, num_threads=None, iters=None,
        device=w.device,
    )
    ms = {k: v["median_ms"] for k, v in timed.items()}
    best = min(converted, key=lambda k: ms[k])
    speedup = ms["dense"] / ms[best]
    for path in converted:
        if path != best:
            reasons[path] = f"{ms['dense'] / ms[path]:.2f}x dense, slower than {best}"
    if speedup >= min_speedup:
        layer.weight = converted[best].weight  # the module stays: hooks and names are kept
        reasons[best] = f"measured {speedup:.2f}x dense at {rows} rows"
        return {"path": best, "speedup": speedup, "error": errors, "ms": ms, "reasons": reasons}
    reasons[best] = f"measured {speedup:.2f}x dense at {rows} rows, below min_speedup={min_speedup:g}"
    return {"path": "dense", "speedup": speedup, "error": errors, "ms": ms, "reasons": reasons}


def use_fastest_kernels(
    model: nn.Module,
    example_input: Any,
    *,
    paths: Sequence[str] = tuple(KERNEL_PATHS),
    min_speedup: float = 1.05,
    max_error: float | None = None,
    repeats: int = 20,
) -> dict[str, dict[str, Any]]:
    """Give each ``nn.Linear`` of ``model`` the fastest of ``paths`` where it is measured faster, in place.

    Args:
        model: The trained float model, on the device to serve from, in the dtype to serve in
            (``model.to("cuda", torch.bfloat16)``); pruned or distilled models too.
        example_input: A batch as ``forward`` takes it (tensor, tuple, dict); each layer is timed at the
            input shape it sees for this batch.
        paths: Candidates, from :data:`KERNEL_PATHS` (torchao's int8/int4 weight-only, int8 dynamic
            activations, float8 weight-only and dynamic).
        min_speedup: Convert a layer only when its time as it is over the best path's time reaches this.
        max_error: Skip a path whose relative output error (``|y_q - y| / |y|`` on a random input of the
            layer's shape) is above this; ``None``: every path competes on speed alone (the table still
            reports each error).
        repeats: Interleaved timings per layer and path (medians compared).

    Returns:
        ``{layer name: {"path": path | "dense", "speedup": float | None, "error": {path: float},
        "ms": {path: median ms}, "reasons": {path: str}}}`` for every ``nn.Linear`` (a layer the input does
        not reach stays dense, with that reason).

    Raises:
        ValueError: an unknown path, or ``min_speedup`` / ``max_error`` / ``repeats`` out of range,
            before any layer changes.
    """
    unknown = [p for p in paths if p not in KERNEL_PATHS]
    if unknown or not paths:
        raise ValueError(f"unknown kernel paths {unknown or list(paths)}; valid: {list(KERNEL_PATHS)}")
    if not (isinstance(min_speedup, (int, float)) and min_speedup >= 0 and math.isfinite(min_speedup)):
        raise ValueError(f"min_speedup must be a finite number >= 0, got {min_speedup!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and max_error > 0):
        raise ValueError(f"max_error must be a number > 0 or None, got {max_error!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    layers = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    shapes = layer_input_shapes(model, example_input, layers)
    table: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        shape = shapes.get(name)
        if shape is None:
            table[name] = {"path": "dense", "speedup": None, "error": {}, "ms": {}, "reasons": {"*": "not called by the example input"}}
            continue
        table[name] = _one_layer(layer, math.prod(shape[:-1]), paths, min_speedup, max_error, repeats)
    return table
