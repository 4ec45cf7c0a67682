"""Compare two models without a Trainer: :func:`compression_report` measures parameters, bytes, MACs and
latency (interleaved in one process) of a baseline and a compressed model and returns the report dict
(the schema is in the README, "The report"). :class:`~lightning_compress.report.CompressionReport` calls
it at the end of ``fit``; the measuring functions are :mod:`lightning_compress.measure`'s."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.layout import input_batch_dim
from lightning_compress.measure import (
    _macs_or_none,
    check_timing,
    count_parameters,
    device_of,
    measure_latency,
    sequence_length,
    serialized_size,
    split_call,
)
from lightning_compress.module_copy import copy_model

__all__ = ["compression_report"]


def _describe(
    model: nn.Module,
    example: Any,
    size_bytes: int | None = None,
    counts: tuple[int, int] | None = None,
    macs: int | None = None,
    batch_dim: int = 0,
) -> dict[str, Any]:
    params, nonzero = count_parameters(model) if counts is None else counts
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 0.0 if params == 0 else 1.0 - nonzero / params,
        "size_bytes": serialized_size(model) if size_bytes is None else size_bytes,
        "macs": _macs_or_none(model, example, batch_dim) if macs is None else macs,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def compression_report(
    baseline: nn.Module,
    compressed: nn.Module,
    example_input: Any,
    *,
    baseline_metrics: Mapping[str, float] | None = None,
    compressed_metrics: Mapping[str, float] | None = None,
    batch_size: int = 64,
    repeats: int = 30,
    warmup: int = 5,
    num_threads: int | None = 1,
    compressed_size_bytes: int | None = None,
    compressed_counts: tuple[int, int] | None = None,
    compressed_macs: int | None = None,
    seq_len: int | None = None,
    cuda: bool = False,
    batch_dim: int | None = None,
) -> dict[str, Any]:
    """Compare two models: the report dict without any Trainer.

    Returns ``{"baseline": {...}, "compressed": {...}, "ratios": {...}}`` where both model dicts hold
    ``params``, ``nonzero_params``, ``sparsity``, ``size_bytes``, ``macs``, ``latency_ms`` (median),
    ``latency_p10_ms``/``latency_p90_ms`` and ``metrics``, and for a sequence model ``tokens_per_s``;
    ``ratios`` holds ``size`` (baseline bytes / compressed bytes), ``latency`` (baseline ms /
    compressed ms: > 1 is faster), ``params``, ``nonzero_params`` and ``macs``. With ``cuda``, the
    same latency keys prefixed ``cuda_`` and the ratio ``cuda_latency``.

    Args:
        baseline: The reference model.
        compressed: The compressed model.
        example_input: What the models' ``forward`` takes, for one batch: a tensor, a tuple of
            positional arguments, a dict of keyword arguments, or a ``ForwardCall`` (the first sample
            of each batched tensor is repeated to ``batch_size``; token ids stay integers).
        baseline_metrics: Metrics of the reference (copied into the report).
        compressed_metrics: Metrics of the compressed model.
        batch_size: Batch size of the latency measurement.
        repeats: Timed forwards per model (median reported).
        warmup: Untimed forwards first.
        num_threads: Threads during timing.
        compressed_size_bytes: Bytes of the compressed artifact when it is a file of its own
            (an exported or converted model); default ``torch.save`` of its ``state_dict``.
        compressed_counts: ``(parameters, non-zero parameters)`` of the compressed model when its
            tensors are not ``nn.Parameter`` s (a converted model keeps packed integer buffers);
            default counted from ``compressed.parameters()``.
        compressed_macs: Multiply-accumulates per sample of the compressed model when they must
            be counted on another module (the float model a converted artifact came from).
        seq_len: Tokens per sample, for ``tokens_per_s`` (batch × ``seq_len`` / median seconds).
            Default: the sequence length of an integer ``(batch, seq_len)`` input (token ids), found
            by :func:`~lightning_compress.measure.sequence_length`; none for other inputs.
        cuda: Also time both models on the GPU (copies of those not already there), when CUDA is
            available; a failure there is a ``cuda_note``, not an error.
        batch_dim: The batch dimension of the input's tensors; default read from the baseline model
            (1 for sequence-first inputs, :func:`~lightning_compress.layout.input_batch_dim`).

    Example:
        >>> big, small = nn.Linear(64, 64), nn.Linear(64, 8)
        >>> r = compression_report(big, small, torch.randn(1, 64), batch_size=4, repeats=3, warmup=1)
        >>> r["ratios"]["params"] > 7, sorted(r["baseline"])[:3]
        (True, ['latency_ms', 'latency_p10_ms', 'latency_p90_ms'])
    """
    if batch_dim is None:
        batch_dim = input_batch_dim(baseline, *split_call(example_input))
    base = _describe(baseline, example_input, batch_dim=batch_dim)
    comp = _describe(compressed, example_input, compressed_size_bytes, compressed_counts, compressed_macs, batch_dim)
    tokens = seq_len if seq_len is not None else sequence_length(example_input, batch_dim)
    timing = {"batch_size": batch_size, "repeats": repeats, "warmup": warmup, "seq_len": tokens, "batch_dim": batch_dim}
    check_timing(batch_size, repeats, warmup, tokens)  # bad settings are errors, not a note about the models
    latency_note = None
    try:
        lat_b, lat_c = measure_latency([baseline, compressed], example_input, num_threads=num_threads, **timing)
    except Exception as err:  # noqa: BLE001 - the rest of the report stands; the note says what failed
        lat_b = lat_c = {"median_ms": None, "p10_ms": None, "p90_ms": None}
        latency_note = (
            f"CPU latency: not measured, a model failed on the example input at batch {batch_size} "
            f"({type(err).__name__}: {err})."
        )
        warnings.warn(f"CompressionReport: {latency_note}", UserWarning, stacklevel=2)
    timed = lat_b.get("batch_size")
    if batch_size is not None and timed is not None and timed != batch_size:
        latency_note = (
            f"CPU latency: timed at the input's own batch of {timed}, not batch_size={batch_size}: a tensor of the call "
            f"has {timed} in two dimensions, so which one is the batch cannot be told."
        )
        warnings.warn(f"CompressionReport: {latency_note}", UserWarning, stacklevel=2)
        timing = {**timing, "batch_size": timed}
    for d, lat, metrics in ((base, lat_b, baseline_metrics), (comp, lat_c, compressed_metrics)):
        _put_latency(d, lat, "")
        d["metrics"] = {k: float(v) for k, v in (metrics or {}).items()}
    report: dict[str, Any] = {
        "baseline": base,
        "compressed": comp,
        "ratios": {
            "size": _ratio(base["size_bytes"], comp["size_bytes"]),
            "latency": _ratio(base["latency_ms"], comp["latency_ms"]),
            "params": _ratio(base["params"], comp["params"]),
            "nonzero_params": _ratio(base["nonzero_params"], comp["nonzero_params"]),
            "macs": _ratio(base["macs"], comp["macs"]),
        },
        "latency_setup": {**timing, "num_threads": num_threads},
    }
    if latency_note:
        report["latency_note"] = latency_note
    if cuda:
        note = _cuda_latency(baseline, compressed, example_input, report, timing)
        if note:
            report["cuda_note"] = note
    return report


def _put_latency(d: dict[str, Any], lat: Mapping[str, Any], prefix: str) -> None:
    d[f"{prefix}latency_ms"] = lat["median_ms"]
    d[f"{prefix}latency_p10_ms"] = lat["p10_ms"]
    d[f"{prefix}latency_p90_ms"] = lat["p90_ms"]
    if "tokens_per_s" in lat:
        d[f"{prefix}tokens_per_s"] = lat["tokens_per_s"]


def _cuda_latency(
    baseline: nn.Module, compressed: nn.Module, example: Any, report: dict[str, Any], timing: Mapping[str, Any]
) -> str | None:
    """Time both models on the GPU into ``report`` (``cuda_*`` keys); a note when that was not possible."""
    if not torch.cuda.is_available():
        return "CUDA latency: not measured (CUDA is not available)."
    try:
        on_gpu = [m if device_of(m).type == "cuda" else copy_model(m).to("cuda") for m in (baseline, compressed)]
        lat_b, lat_c = measure_latency(on_gpu, example, num_threads=None, device="cuda", **timing)
    except Exception as err:  # noqa: BLE001 - a model that cannot run on the GPU (a CPU-only int8 kernel)
        return f"CUDA latency: not measured ({type(err).__name__}: {err})."
    finally:
        on_gpu = []
        torch.cuda.empty_cache()
    _put_latency(report["baseline"], lat_b, "cuda_")
    _put_latency(report["compressed"], lat_c, "cuda_")
    report["ratios"]["cuda_latency"] = _ratio(lat_b["median_ms"], lat_c["median_ms"])
    return None
