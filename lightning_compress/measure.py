"""Measuring a model: parameters, MACs, bytes of the saved artifact, latency, tokens per second.

Plain functions on modules and tensors, with no Trainer and nothing else of this package: only
torch, the standard library and (imported when asked for) safetensors. :mod:`lightning_compress.report`
builds the report and the callback on top of them, and the compression plugins use them directly.

An *input* here is what the model's ``forward`` takes, as Lightning's ``example_input_array`` spells
it: a tuple of positional arguments, a dict of keyword arguments, an object with ``args`` and
``kwargs`` attributes (:class:`lightning_compress.batches.ForwardCall`) for both, or anything else
(a tensor, a list) as the one positional argument. Tensors keep their dtype (token ids stay integers).

Example:
    >>> from torch import nn
    >>> count_parameters(nn.Linear(4, 2))
    (10, 10)
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.flop_formulas import OpaqueOps, extra_formulas

__all__ = [
    "SIZE_FORMATS",
    "count_macs",
    "count_parameters",
    "device_of",
    "layer_input_shapes",
    "measure_latency",
    "probe_input",
    "safetensors_tensors",
    "sequence_length",
    "serialized_size",
    "storage_region",
    "tensor_batch_axis",
]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)`` of ``model``, each shared tensor counted once.

    A module defining ``counted_parameters()`` (``{name: tensor}``) is counted with those tensors in place
    of its parameters of the same names, or beside them: a fake-quantised layer gives its weight as its
    forward computes with it, so the zeros that rounding makes (most weights at 2 bits) count as zeros, and
    a converted layer the weight and bias its buffers hold.
    Parameters of converted low-bit layers (tensor subclasses) count their logical elements.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_()
        >>> count_parameters(lin)
        (8, 2)
    """
    total = nonzero = 0
    seen: set[Any] = set()
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        counted = getattr(module, "counted_parameters", None)
        computed = counted() if callable(counted) else {}
        held = next(iter(module.buffers(recurse=False)), module)  # weights kept in buffers: a shared buffer counts once
        for name in [*own, *(n for n in computed if n not in own)]:
            key = id(own[name]) if name in own else (id(held), name)
            if key in seen:  # a shared tensor: counted where it was met first
                continue
            seen.add(key)
            value = computed.get(name, own.get(name))
            total += value.numel()
            try:
                nonzero += int(torch.count_nonzero(value.detach()).item())
            except (RuntimeError, NotImplementedError, TypeError):
                nonzero += value.numel()  # packed/quantised storage: count every logical element
    return total, nonzero


class _Call:
    """A forward call (``args``, ``kwargs``), as :func:`split_call` reads it."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs


def split_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the forward call that ``inputs`` stands for (see the module docstring)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    args, kwargs = getattr(inputs, "args", None), getattr(inputs, "kwargs", None)
    if isinstance(args, tuple) and isinstance(kwargs, Mapping):
        return args, dict(kwargs)
    return (inputs,), {}  # anything else is the one argument, as Lightning reads example_input_array


def _map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, v) for v in obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    return obj


def first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The first tensor of a call, nested containers (lists, tuples, dicts) searched in order; what
    decides the batch size of an input (:func:`_resized`) and where its batch dimension is read."""
    found: list[torch.Tensor] = []

    def visit(t: torch.Tensor) -> torch.Tensor:
        if not found:
            found.append(t)
        return t

    _map_tensors(visit, (args, dict(kwargs)))
    return found[0] if found else None


def tensor_batch_axis(t: torch.Tensor, batch: int | None, batch_dim: int = 0) -> int | None:
    """The batch dimension of ``t`` in a call whose batch is ``batch`` samples in dimension ``batch_dim``:
    ``batch_dim`` where ``t`` has that size; dimension 0 of a 2-D tensor beside a sequence-first input (a key padding
    mask is ``(N, S)`` in either layout); ``None`` for a tensor that is not batched.

    >>> tensor_batch_axis(torch.zeros(3, 10), 3, batch_dim=1), tensor_batch_axis(torch.zeros(10, 3, 8), 3, batch_dim=1)
    (0, 1)
    """
    if batch is None:
        return None
    if t.dim() > batch_dim and t.shape[batch_dim] == batch:
        return batch_dim
    return 0 if batch_dim == 1 and t.dim() == 2 and t.shape[0] == batch else None


def _resized(
    inputs: Any, batch_size: int | None, device: torch.device | str | None = None, batch_dim: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any], int | None]:
    """``(args, kwargs, batch)``: the call with every batched tensor's first sample repeated to ``batch_size``.

    The batch size of the input is dimension ``batch_dim`` (1 for sequence-first inputs) of its first
    tensor; tensors with that size there are batched (and a 2-D one with it in dimension 0 beside a
    sequence-first input: a key padding mask), others (a causal mask, say) are passed as they are. A tensor
    with the batch size in two dimensions is ambiguous: the call then keeps its own batch.
    ``batch_size=None`` keeps the input's own batch. Tensors are detached, keep their dtype, and
    move to ``device``.
    """
    args, kwargs = split_call(inputs)
    first = first_tensor(args, kwargs)
    own = int(first.shape[batch_dim]) if first is not None and first.dim() > batch_dim else None

    # a tensor with the batch size in two dimensions (a (T, T) mask where T is the batch size) cannot be told from
    # a batched one: the call is kept at its own batch size rather than resized wrongly, unless the first tensor holds
    # token ids and it has their shape and dtype (an attention mask or labels beside as many tokens as samples; a
    # float (T, T) mask beside float (T, T) inputs stays ambiguous)
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t is not first]

    def twin(t: torch.Tensor) -> bool:
        return first is not None and not first.is_floating_point() and t.shape == first.shape and t.dtype == first.dtype

    if own is not None and any(t.dim() >= 2 and list(t.shape).count(own) >= 2 and not twin(t) for t in tensors):
        batch_size = None

    def resize(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if device is not None:
            t = t.to(device)
        dim = tensor_batch_axis(t, own, batch_dim) if batch_size is not None else None
        if dim is None:
            return t
        one = t.narrow(dim, 0, 1)
        return one.expand(*one.shape[:dim], batch_size, *one.shape[dim + 1 :]).contiguous()

    args, kwargs = _map_tensors(resize, (args, kwargs))
    return tuple(args), dict(kwargs), (own if batch_size is None else batch_size)


def sequence_length(inputs: Any, batch_dim: int = 0) -> int | None:
    """Tokens per sample of a sequence model's input, or ``None`` for any other input.

    The input is a sequence model's when its first tensor holds integers (token ids) and has two
    dimensions, ``(batch, seq_len)`` (``(seq_len, batch)`` with ``batch_dim=1``): ``seq_len`` is
    returned. Padding is not subtracted.

    Example:
        >>> sequence_length(torch.zeros(4, 16, dtype=torch.long)), sequence_length(torch.zeros(4, 16))
        (16, None)
        >>> sequence_length({"input_ids": torch.zeros(2, 7, dtype=torch.long), "attention_mask": torch.ones(2, 7)})
        7
    """
    first = first_tensor(*split_call(inputs))
    if first is None or first.dim() != 2 or first.dtype == torch.bool:
        return None
    if first.is_floating_point() or first.is_complex():
        return None
    return int(first.shape[1 - batch_dim])


@contextlib.contextmanager
def fast_paths_off() -> Iterator[None]:
    """``nn.TransformerEncoder``/``nn.MultiheadAttention`` take their ordinary path (restored afterwards).

    Their inference fast path (eval, ``no_grad``) runs fused kernels (``_transformer_encoder_layer_fwd``,
    ``_native_multi_head_attention``) that FLOP counters do not see; the ordinary path runs the same
    matmuls as separate ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (conv, linear, matmul, attention).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) in eval mode under
    ``no_grad``, with the transformer fast paths off (``torch.backends.mha``, restored afterwards) so
    that ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` show their matmuls, and with the
    attention matmuls (``q @ k.T`` and ``attention @ v``, per head) of the fused
    ``F.scaled_dot_product_attention`` kernels counted (FlopCounterMode counts the CUDA kernels but
    not the CPU one), as are grouped expert matmuls (``torch._grouped_mm``, Hugging Face's
    ``transformers::grouped_mm_fallback``; :mod:`lightning_compress.flop_formulas`). Operators outside
    ``aten`` without a formula are named in a warning. Pass a batch of one for per-sample MACs. The parameters
    count with ``requires_grad`` off (restored afterwards): the counter's module tracker failed on a parameter
    passed as a module's input (DeBERTa's relative position table, ``AssertionError: Expected gradient function``).

    Args:
        model: The model.
        example_input: What its ``forward`` takes: a tuple of positional arguments, a dict of keyword
            arguments, an object with ``args`` and ``kwargs`` (a ``ForwardCall``), or anything else (a
            tensor) as the one argument.

    Example:
        >>> count_macs(nn.Linear(10, 5), torch.zeros(1, 10))
        50
        >>> attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.zeros(1, 3, 8)  # one sequence of 3 tokens, width 8
        >>> count_macs(attention, (x, x, x))  # q, k, v and out projections 4·3·8·8, scores 2·3·3·8
        912
    """
    args, kwargs = split_call(example_input)
    modes = {m: m.training for m in model.modules()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        model.eval()
        for p in trainable:
            p.requires_grad_(False)
        formulas = extra_formulas()
        counter, opaque = FlopCounterMode(display=False, custom_mapping=formulas), OpaqueOps(formulas)
        with torch.no_grad(), fast_paths_off(), counter, opaque:
            model(*args, **kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p in trainable:
            p.requires_grad_(True)
    if opaque.seen:
        warnings.warn(
            f"count_macs: {dict(opaque.seen)} (calls) are operators without a formula (a library's own kernels, such as "
            "the grouped expert matmul of a mixture of experts); the multiply-accumulates inside them, if any, are not "
            "counted", UserWarning, stacklevel=2,
        )  # fmt: skip
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


def safetensors_tensors(state: Mapping[str, Any], tied: str = "alias") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` as safetensors can store it: ``(tensors, aliases)``.

    ``tensors`` holds contiguous plain tensors. A storage shared by several names (a tied weight) is kept once,
    under its first name, and ``aliases`` maps each dropped name to the kept one; with ``tied="copy"`` every name
    keeps its own copy instead (``aliases`` is empty), so ``safetensors.torch.load_file`` alone gives every key of a
    strict load.

    Raises:
        ValueError: an entry that is not a plain tensor (torchao's quantised tensor subclasses, or
            non-tensor extra state), named, with what to do instead.
    """
    if tied not in ("alias", "copy"):
        raise ValueError(f"tied must be 'alias' or 'copy', got {tied!r}")
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
        if value.numel() and key in seen and tied == "alias":
            aliases[name] = seen[key]
            continue
        seen[key] = name
        value = value.detach()
        if value.numel() and key[0] in storages:
            value = value.clone()  # another view of a stored tensor's memory: its own copy
        storages.add(key[0])
        tensors[name] = value.contiguous()
    return tensors, aliases


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        sync = getattr(backend, "synchronize", None)
        if callable(sync):
            sync()


def check_timing(batch_size: int | None, repeats: int, warmup: int, seq_len: int | None = None) -> None:
    """A ``ValueError`` naming the bad value among :func:`measure_latency`'s timing settings."""
    if (batch_size is not None and batch_size <= 0) or repeats <= 0 or warmup < 0:
        raise ValueError(f"need batch_size > 0, repeats > 0, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    if seq_len is not None and seq_len <= 0:
        raise ValueError(f"seq_len must be > 0 or None, got {seq_len!r}")


def measure_latency(
    models: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
    example_input: Any,
    *,
    batch_size: int | None = 64,
    repeats: int = 30,
    warmup: int = 5,
    num_threads: int | None = 1,
    iters: int | None = 1,
    seq_len: int | None = None,
    device: torch.device | str = "cpu",
    batch_dim: int = 0,
) -> Any:
    """Latency of each model on the same batch, interleaved, in milliseconds (and tokens per second).

    The models run in turn within every repeat (A, B, A, B, ...) so that machine noise hits them
    alike. Returns one ``{"median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms", "batch_size"}`` dict per
    model (``batch_size``: the batch timed, the input's own where it could not be resized; plus
    ``"tokens_per_s"`` with ``seq_len``): a list for a sequence of models, a dict with the same keys for a mapping.

    Args:
        models: Models (or any callables, e.g. ``torch.compile`` results) to time, on ``device``.
            ``nn.Module`` s are put in ``eval`` mode for the measurement and restored afterwards.
        example_input: What the models' ``forward`` takes: a tensor, a tuple of positional arguments,
            a dict of keyword arguments, or an object with ``args`` and ``kwargs`` (a ``ForwardCall``).
            With ``batch_size`` the first sample of each batched tensor (those whose first dimension is
            the first tensor's) is repeated to that size, keeping its dtype; with ``batch_size=None``
            the input is used as it is.
        batch_size: Batch size of the timed forward (``None``: the input's own).
        repeats: Timings per model; the median is reported.
        warmup: Untimed forwards per model first.
        num_threads: ``torch.set_num_threads`` during the measurement (restored afterwards);
            ``None`` keeps the current setting.
        iters: Forwards averaged within one timing (``None``: as many as take about 20 ms), to time
            very fast models above the clock's resolution.
        seq_len: Tokens per sample: adds ``tokens_per_s`` = batch × ``seq_len`` / median seconds
            (:func:`sequence_length` finds it for token-id inputs).
        device: Where to time; the input is moved there, the models must be there already. On an
            accelerator each timing waits for its kernels (``synchronize``) before the clock stops.
        batch_dim: The batch dimension of the input's tensors (1 for sequence-first inputs, see
            :func:`~lightning_compress.layout.input_batch_dim`).
    """
    check_timing(batch_size, repeats, warmup, seq_len)
    device = torch.device(device)
    named = dict(models) if isinstance(models, Mapping) else dict(enumerate(models))
    args, kwargs, batch = _resized(example_input, batch_size, device, batch_dim)
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
                    m(*args, **kwargs)
            _synchronize(device)
            if iters is None:
                first = next(iter(named.values()))
                start = time.perf_counter()
                first(*args, **kwargs)
                _synchronize(device)
                iters = max(1, min(200, int(0.02 / max(time.perf_counter() - start, 1e-6))))
            for _ in range(repeats):
                for k, m in named.items():
                    start = time.perf_counter()
                    for _ in range(iters):
                        m(*args, **kwargs)
                    _synchronize(device)
                    times[k].append((time.perf_counter() - start) * 1e3 / iters)
    finally:
        torch.set_num_threads(previous_threads)
        for k, mode in modes.items():
            modules[k].train(mode)
    out = {}
    for k, t in times.items():
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else [t[0]] * 9  # within the samples
        median = statistics.median(t)
        out[k] = {"median_ms": median, "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(t), "max_ms": max(t), "batch_size": batch}
        if seq_len is not None and batch is not None:
            out[k]["tokens_per_s"] = batch * seq_len / (median / 1e3) if median > 0 else None
    return out if isinstance(models, Mapping) else [out[k] for k in named]


def layer_input_shapes(model: nn.Module, example_input: Any, layers: Mapping[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """The shape of the first input each of ``layers`` (``{name: module}`` inside ``model``) receives
    when ``model`` runs ``example_input`` once (no gradient); a layer the input does not reach is absent."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    try:
        args, kwargs = split_call(example_input)
        with torch.inference_mode():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating parameter (what it computes in), or ``None`` without one.

    Example:
        >>> floating_dtype(nn.Linear(2, 2).to(torch.bfloat16)), floating_dtype(nn.Embedding(2, 2).requires_grad_(False).double())
        (torch.bfloat16, torch.float64)
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


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


def _macs_or_none(model: nn.Module, example: Any, batch_dim: int = 0) -> int | None:
    """MACs per sample (the first sample of ``example`` along ``batch_dim``) on the model's device, or
    ``None`` when the FLOP counter cannot follow the model."""
    try:
        args, kwargs, batch = _resized(example, 1, device_of(model), batch_dim)
        return count_macs(model, _Call(args, kwargs)) // max(batch or 1, 1)  # kept at its own batch when ambiguous
    except Exception:  # noqa: BLE001 - an op the FLOP counter cannot follow: MACs are then unknown
        return None


def probe_input(rows: int, like: torch.Tensor) -> torch.Tensor:
    """Random inputs ``(rows, like.shape[1])`` for timing or checking a layer of weight ``like`` (its device and dtype),
    drawn from a generator of their own: torch's global one, which a fit's order and dropout follow, is left alone."""
    noise = torch.randn(rows, like.shape[1], generator=torch.Generator().manual_seed(0))
    return noise.to(device=like.device, dtype=like.dtype)
