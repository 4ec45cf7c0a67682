"""Serve 2:4-sparse ``Linear`` layers with the GPU's semi-structured sparse kernels where they are faster.

A 2:4 mask halves the multiply work only if the matmul runs on a sparse kernel, and
``torch.sparse.to_sparse_semi_structured`` is not always faster: on an H200 in bf16 it was 1.31x
dense at 16384x8192x8192 but 0.11-0.42x at 4096x{1024, 4096}. So :func:`use_semi_structured` times
every candidate layer on the device at hand, at the input shape the model really gives it, and
converts only the layers measured faster by ``min_speedup``. The rest stay dense. The returned table
says which layer took which path, and why.

Example (on a CPU every layer stays dense, with the reason):
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 16))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([1.0, 0.0, 2.0, 0.0] * 32).view(16, 8))
    >>> use_semi_structured(net, torch.randn(2, 8))["0"]["path"]
    'dense'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.measure import layer_input_shapes, measure_latency, probe_input

__all__ = ["is_two_four", "use_semi_structured"]


def is_two_four(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of each output row has at most 2 non-zeros.

    >>> is_two_four(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 4.0, 0.0]]))
    True
    >>> is_two_four(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    False
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1).le(2).all())


def _unsupported(layer: nn.Linear, rows: int) -> str | None:
    w = layer.weight
    if w.device.type != "cuda":
        return f"no semi-structured sparse kernel on {w.device.type}"
    if torch.cuda.get_device_capability(w.device)[0] < 8:
        return "semi-structured sparse kernels need compute capability 8.0 or newer"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured sparse kernels take float16/bfloat16 weights, this one is {w.dtype}"
    out_f, in_f = w.shape
    if out_f % 64 or in_f % 64 or rows % 8:
        return f"shape ({out_f}, {in_f}) with {rows} input rows: the kernels need multiples of 64 (and of 8 rows)"
    return None


def use_semi_structured(
    model: nn.Module,
    example_input: Any,
    *,
    min_speedup: float = 1.05,
    repeats: int = 20,
) -> dict[str, dict[str, Any]]:
    """Replace the weight of each 2:4-sparse ``nn.Linear`` by a semi-structured sparse tensor where timed faster.

    Args:
        model: On the device to serve from, in the dtype to serve in (``model.to("cuda", torch.bfloat16)``).
        example_input: A batch as the model's ``forward`` takes it (tensor, tuple, dict); each layer is
            timed at the input shape it sees for this batch.
        min_speedup: Convert a layer only when dense time / sparse time reaches this.
        repeats: Interleaved timings per layer and path (medians compared).

    Returns:
        ``{layer name: {"path": "2:4 sparse" | "dense", "speedup": float | None, "reason": str}}`` for every
        2:4-sparse ``nn.Linear``; layers that are not 2:4 sparse are not listed.
    """
    if min_speedup <= 0:
        raise ValueError(f"min_speedup must be > 0, got {min_speedup!r}")
    candidates = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and is_two_four(m.weight)}
    shapes = layer_input_shapes(model, example_input, candidates)
    table: dict[str, dict[str, Any]] = {}
    for name, layer in candidates.items():
        shape = shapes.get(name)
        if shape is None:
            table[name] = {"path": "dense", "speedup": None, "reason": "not called by the example input"}
            continue
        rows = 1
        for s in shape[:-1]:
            rows *= s
        reason = _unsupported(layer, rows)
        if reason is not None:
            table[name] = {"path": "dense", "speedup": None, "reason": reason}
            continue
        table[name] = _time_and_convert(layer, rows, min_speedup, repeats)
    return table


def _time_and_convert(layer: nn.Linear, rows: int, min_speedup: float, repeats: int) -> dict[str, Any]:
    from torch.sparse import to_sparse_semi_structured

    w = layer.weight.detach()
    try:
        sparse = to_sparse_semi_structured(w)
    except (RuntimeError, ValueError) as err:  # a kernel this build lacks
        return {"path": "dense", "speedup": None, "reason": f"to_sparse_semi_structured failed: {err}"}
    x = probe_input(rows, w)
    bias = layer.bias.detach() if layer.bias is not None else None
    timed: Mapping[str, Any] = measure_latency(
        {"dense": lambda t: F.linear(t, w, bias), "sparse": lambda t: F.linear(t, sparse, bias)},
        x,
        batch_size=None,
        repeats=repeats,
        warmup=3,
        num_threads=None,
        iters=None,
        device=w.device,
    )
    speedup = timed["dense"]["median_ms"] / timed["sparse"]["median_ms"]
    if speedup >= min_speedup:
        layer.weight = nn.Parameter(sparse, requires_grad=False)
        return {"path": "2:4 sparse", "speedup": speedup, "reason": f"measured {speedup:.2f}x dense at {rows} rows"}
    return {"path": "dense", "speedup": speedup, "reason": f"sparse measured {speedup:.2f}x dense at {rows} rows, below {min_speedup}"}
