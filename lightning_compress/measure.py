"""Measuring a model: parameters, MACs, bytes of the saved artifact, latency.

Plain functions on modules and tensors, with no Trainer and nothing else of this package: only
torch, the standard library and (imported when asked for) safetensors. :mod:`lightning_compress.report`
builds the report and the callback on top of them, and the compression plugins use them directly.

Example:
    >>> from torch import nn
    >>> count_parameters(nn.Linear(4, 2))
    (10, 10)
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "SIZE_FORMATS",
    "count_macs",
    "count_parameters",
    "device_of",
    "measure_latency",
    "safetensors_tensors",
    "serialized_size",
    "storage_region",
]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)`` of ``model``, each shared tensor counted once.

    Parameters of converted low-bit layers (tensor subclasses) count their logical elements.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_()
        >>> count_parameters(lin)
        (8, 2)
    """
    total = nonzero = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        try:
            nonzero += int(torch.count_nonzero(p.detach()).item())
        except (RuntimeError, NotImplementedError, TypeError):
            nonzero += p.numel()  # packed/quantised storage: count every logical element
    return total, nonzero


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (conv, linear, matmul ops).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) in eval mode under
    ``no_grad``; pass a batch of one for per-sample MACs.

    Example:
        >>> count_macs(nn.Linear(10, 5), torch.zeros(1, 10))
        50
    """
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return int(counter.get_total_flops()) // 2


def serialized_size(
    obj: nn.Module | Mapping[str, Any] | str | os.PathLike[str], format: str = "torch"  # noqa: A002 - the public name
) -> int:
    """Bytes of the real artifact: a module's ``state_dict`` (or a given dict) serialised, or a file's size.

    ``format="torch"`` measures ``torch.save``; ``format="safetensors"`` measures a ``.safetensors`` file
    (a JSON header plus the raw bytes, without the per-tensor zip records of ``torch.save``; tensors
    sharing storage are stored once, as ``safetensors.torch.save_model`` does).

    Raises:
        ValueError: unknown ``format``, or a tensor safetensors cannot hold (a tensor subclass, such as
            torchao's quantised weights).

    Example:
        >>> serialized_size(nn.Linear(256, 256)) > 4 * (256 * 256 + 256)
        True
        >>> serialized_size(nn.Linear(256, 256), format="safetensors") < serialized_size(nn.Linear(256, 256))
        True
    """
    if format not in SIZE_FORMATS:
        raise ValueError(f"unknown format {format!r}; valid choices: {list(SIZE_FORMATS)}")
    if isinstance(obj, (str, os.PathLike)):
        return os.path.getsize(obj)
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if format == "safetensors":
        from safetensors.torch import save

        return len(save(safetensors_tensors(state)[0]))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


SIZE_FORMATS = ("torch", "safetensors")


def storage_region(t: torch.Tensor) -> tuple[Any, ...]:
    """Which memory ``t`` views: tensors with equal regions are one tensor under several names (a tied
    weight); element ``0`` identifies the storage itself."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def safetensors_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` as safetensors can store it: ``(tensors, aliases)``.

    ``tensors`` holds contiguous plain tensors; a storage shared by several names (a tied weight) is
    kept once, under its first name, and ``aliases`` maps each dropped name to the kept one.

    Raises:
        ValueError: an entry that is not a plain tensor (torchao's quantised tensor subclasses, or
            non-tensor extra state), named, with what to do instead.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, nn.Parameter):
            raise ValueError(
                f"{name!r} is a {type(value).__name__}, which safetensors cannot store (it holds plain tensors only); "
                "save this model with torch.save (a '.pt' path) instead"
            )
        key = storage_region(value)
        if value.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        value = value.detach()
        if value.numel() and key[0] in storages:
            value = value.clone()  # another view of a stored tensor's memory: its own copy
        storages.add(key[0])
        tensors[name] = value.contiguous()
    return tensors, aliases


def _batch_of(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    one = example[:1]
    return one.repeat(batch_size, *([1] * (one.dim() - 1))).contiguous()


def measure_latency(
    models: Sequence[Callable[[torch.Tensor], Any]] | Mapping[str, Callable[[torch.Tensor], Any]],
    example_input: torch.Tensor,
    *,
    batch_size: int | None = 64,
    repeats: int = 30,
    warmup: int = 5,
    num_threads: int | None = 1,
    iters: int | None = 1,
) -> Any:
    """CPU latency of each model on the same batch, interleaved, in milliseconds.

    The models run in turn within every repeat (A, B, A, B, ...) so that machine noise hits them
    alike. Returns one ``{"median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms"}`` dict per model:
    a list for a sequence of models, a dict with the same keys for a mapping.

    Args:
        models: Models (or any callables, e.g. ``torch.compile`` results) to time. ``nn.Module`` s
            are put in ``eval`` mode for the measurement and restored afterwards.
        example_input: An input; with ``batch_size`` its first sample is repeated to that size,
            with ``batch_size=None`` it is used as it is.
        batch_size: Batch size of the timed forward (``None``: the input's own).
        repeats: Timings per model; the median is reported.
        warmup: Untimed forwards per model first.
        num_threads: ``torch.set_num_threads`` during the measurement (restored afterwards);
            ``None`` keeps the current setting.
        iters: Forwards averaged within one timing (``None``: as many as take about 20 ms), to time
            very fast models above the clock's resolution.
    """
    if (batch_size is not None and batch_size <= 0) or repeats <= 0 or warmup < 0:
        raise ValueError(f"need batch_size > 0, repeats > 0, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    named = dict(models) if isinstance(models, Mapping) else dict(enumerate(models))
    x = example_input.detach().cpu()
    if batch_size is not None:
        x = _batch_of(x, batch_size)
    previous_threads = torch.get_num_threads()
    modules = {k: m for k, m in named.items() if isinstance(m, nn.Module)}
    modes = {k: m.training for k, m in modules.items()}
    times: dict[Any, list[float]] = {k: [] for k in named}
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        for m in modules.values():
            m.eval()
        with torch.inference_mode():
            for m in named.values():
                for _ in range(warmup):
                    m(x)
            if iters is None:
                first = next(iter(named.values()))
                start = time.perf_counter()
                first(x)
                iters = max(1, min(200, int(0.02 / max(time.perf_counter() - start, 1e-6))))
            for _ in range(repeats):
                for k, m in named.items():
                    start = time.perf_counter()
                    for _ in range(iters):
                        m(x)
                    times[k].append((time.perf_counter() - start) * 1e3 / iters)
    finally:
        torch.set_num_threads(previous_threads)
        for k, mode in modes.items():
            modules[k].train(mode)
    out = {}
    for k, t in times.items():
        q = statistics.quantiles(t, n=10) if len(t) > 1 else [t[0]] * 9
        out[k] = {"median_ms": statistics.median(t), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(t), "max_ms": max(t)}
    return out if isinstance(models, Mapping) else [out[k] for k in named]


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter, else of its first buffer (converted int8 layers keep
    their weights in buffers), else the CPU.

    Example:
        >>> device_of(nn.Linear(2, 2)).type, device_of(nn.BatchNorm1d(2).requires_grad_(False)).type
        ('cpu', 'cpu')
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _macs_or_none(model: nn.Module, example: torch.Tensor) -> int | None:
    try:
        return count_macs(model, example[:1].detach().to(device_of(model)))
    except Exception:  # noqa: BLE001 - an op the FLOP counter cannot follow: MACs are then unknown
        return None
