"""The quantisation section of the compression report (JSON-ready)."""

from __future__ import annotations

from typing import Any

__all__ = ["epoch_detail", "quantization_summary"]


def quantization_summary(callback: Any, ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Bits per layer, observed ranges, the bit-width history, sizes and latency, and notes.

    ``callback`` is the :class:`~lightning_compress.QuantizeCallback` (its options and run record)."""
    report = callback._report
    warned = list(callback.fit_warnings) + list(report.get("warnings", []))  # the callback's, then the artifact's
    notes = list(warned)
    if "bn_reestimated" in report:
        bn = report["bn_reestimated"]
        notes.append(
            f"BatchNorm statistics of {bn['layers']} layers re-estimated on {bn['batches']} training batches "
            "at the end of each QAT epoch (before its validation and checkpoint)"
        )
    layers = callback._layers
    out = {
        "method": callback.method,
        "mode": callback.method,  # the former key, for readers of earlier reports
        "weight_bits": round(callback._mean_bits(), 4) if callback._bits_of else callback._current_bits,
        "weight_bits_map": callback.options.layer_bits,
        "activation_bits": callback.activation_bits,
        "granularity": callback.granularity,
        "rounding": callback.rounding,
        "bits_per_layer": {n: int(m.quantizer.bits) for n, m in layers.items()},
        "layers_quantized": len(layers),
        "layers_total": callback._total_candidates,
        "fraction_quantized": callback._fraction(),
        "observer_ranges": {n: list(r) for n, r in ranges.items()},
        "observer_range_summary": {
            "min": min((r[0] for r in ranges.values()), default=None),
            "max": max((r[1] for r in ranges.values()), default=None),
        },
        "locked_bits": callback._guard.locked_bits,
        "history": list(callback._guard.history),
        **report,
    }
    if warned:
        out["warnings"] = warned
    if notes:
        out["notes"] = notes
    return out


def epoch_detail(callback: Any, ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    """What the loggers get at the end of each training epoch: the mean width and the quantised share (32 bits and
    0 before quantisation starts), each layer's width, and the spread of the observed input ranges."""
    active = callback.is_active()
    detail = {
        "quant/weight_bits": callback._mean_bits() if active else 32.0,
        "quant/fraction_quantized": callback._fraction() if active else 0.0,
        **{f"quant/bits/{name}": float(layer.quantizer.bits if callback._enabled else 32) for name, layer in callback._layers.items()},
    }
    if ranges:
        detail["quant/act_range_mean"] = sum(hi - lo for lo, hi in ranges.values()) / len(ranges)
        detail["quant/act_range_max"] = max(hi - lo for lo, hi in ranges.values())
    return detail

