"""The tables an exported model's integer inputs index, for the checks a loaded AOTInductor package makes.

A package's kernels abort the whole serving process (``std::terminate`` inside a parallel region, not a
Python exception) on an index past a table: a token id at or above the vocabulary, or a sequence longer
than a position table, where PyTorch, a compact artifact and ONNX raise an error. :func:`lookup_bounds`
runs the model once on the example and records every ``F.embedding`` it makes:

- indexed by an input itself (token ids): that input's values must be in ``[0, rows)``;
- indexed by positions the model computes from the sequence (``arange`` of it, maybe shifted, as OPT's
  are by 2): the longest sequence the table takes, kept only when the model run one position past it
  fails in that table's lookup, or fails at one and at two positions past it (RoBERTa fails earlier, in a
  gather by position); a table the sequence does not index (T5's relative buckets) bounds nothing.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.tok, self.pos = nn.Embedding(50, 4), nn.Embedding(8, 4)
    ...     def forward(self, ids):
    ...         return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
    >>> lookup_bounds(Net(), (torch.zeros(2, 5, dtype=torch.long),), {}, batch_dim=0, sequence=True)
    {'values': {'args': {0: 50}, 'kwargs': {}}, 'sequence': 8, 'sequence_dim': 1}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_compress.measure import tensor_batch_axis

__all__ = ["MAX_PROBED_SEQUENCE", "lookup_bounds"]

#: The longest sequence the model is run at to confirm a position table's bound; a longer table bounds nothing.
MAX_PROBED_SEQUENCE = 16384


class _Lookups(TorchFunctionMode):
    """Records ``(index, rows)`` of every ``F.embedding`` call (``nn.Embedding`` and converted embeddings), and the
    rows of the tables whose lookup raised (an index past them)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, int]] = []
        self.failed: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.embedding:
            return func(*args, **kwargs)
        index = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        rows = int(weight.shape[0]) if isinstance(weight, Tensor) else None
        if isinstance(index, Tensor) and rows is not None and not index.is_floating_point() and index.numel():
            self.seen.append((index, rows))
        try:
            return func(*args, **kwargs)
        except Exception:
            if rows is not None:
                self.failed.add(rows)
            raise


def _run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Lookups:
    """The lookups of one call (no gradients); a call that fails leaves the tables whose lookup failed."""
    lookups = _Lookups()
    try:
        with torch.no_grad(), lookups:
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - what failed is in lookups.failed; another failure confirms nothing
        if not lookups.failed:
            lookups.failed.add(-1)
    return lookups


def _is_input(index: Tensor, given: Tensor) -> bool:
    """``index`` is ``given`` or a view of all of it (``input_ids.view(-1, n)``)."""
    return index.data_ptr() == given.data_ptr() and index.numel() == given.numel() and index.dtype == given.dtype


def _map(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return tuple(fn(t) if isinstance(t, Tensor) else t for t in args), {k: fn(t) if isinstance(t, Tensor) else t for k, t in kwargs.items()}


def _unpadded(t: Tensor, first: Tensor) -> Tensor:
    """A 0/1 mask of the first input's shape as all ones: positions computed from a padded mask (OPT's cumulative
    sum) do not reach the table's end, and a lengthened padded mask would not either."""
    if t is first or t.shape != first.shape or t.is_floating_point() or not t.numel():
        return t
    return torch.ones_like(t) if bool(((t == 0) | (t == 1)).all()) else t


def _lengthened(t: Tensor, length: int, batch: int | None, batch_dim: int, to: int) -> Tensor:
    """``t``'s first sample, its sequence dimension (beside its batch one) of ``length`` made ``to`` long by
    repeating it."""
    axis = tensor_batch_axis(t, batch, batch_dim)
    if axis is None:
        return t
    t = t.narrow(axis, 0, 1)
    along = 1 - axis if axis in (0, 1) else None
    if along is None or t.dim() <= along or t.shape[along] != length:
        return t
    reps = [1] * t.dim()
    reps[along] = math.ceil(to / length)
    return t.repeat(*reps).narrow(along, 0, to)


def lookup_bounds(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, batch_dim: int = 0, sequence: bool = False
) -> dict[str, Any]:
    """``{"values": {"args": {i: rows}, "kwargs": {name: rows}}, "sequence": longest or None, "sequence_dim": d}``
    for the call ``model(*args, **kwargs)``: the inputs whose values index a table directly (each must stay below
    ``rows``), and with ``sequence`` the longest sequence (dimension ``d = 1 - batch_dim`` of the first input) the
    model's position tables take: the smallest such table, kept when the model run one position past it, on one
    sample, fails in that table's lookup, or fails at one and at two positions past it (at most
    :data:`MAX_PROBED_SEQUENCE` positions). Runs the model two to four times without gradients; each input is
    copied first, so inputs sharing memory (``labels=input_ids``) are told apart."""
    args, kwargs = _map(torch.clone, args, kwargs)
    seen = _run(model, args, kwargs).seen
    values: dict[str, dict[Any, int]] = {"args": {}, "kwargs": {}}
    named = [("args", i, t) for i, t in enumerate(args)] + [("kwargs", k, t) for k, t in kwargs.items()]
    named = [(kind, key, t) for kind, key, t in named if isinstance(t, Tensor) and not t.is_floating_point() and t.numel()]
    for index, rows in seen:
        for kind, key, t in named:
            if _is_input(index, t):
                values[kind][key] = min(values[kind].get(key, rows), rows)
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
    seq_axis = 1 - batch_dim if batch_dim in (0, 1) else None
    longest = None
    if sequence and first is not None and seq_axis is not None and first.dim() > seq_axis:
        length = int(first.shape[seq_axis])
        indexing = {id(t) for kind, key, t in named if key in values[kind]}  # token (type) ids: their values stay
        full_args, full_kwargs = _map(lambda t: t if id(t) in indexing else _unpadded(t, first), args, kwargs)
        given = [t for t in (*full_args, *full_kwargs.values()) if isinstance(t, Tensor)]
        unchanged = all(a is b for a, b in zip((*full_args, *full_kwargs.values()), (*args, *kwargs.values())))
        candidates = []
        for index, rows in seen if unchanged else _run(model, full_args, full_kwargs).seen:  # positions 0..length-1 (+ offset)
            if any(_is_input(index, t) for t in given):
                continue
            offset = int(index.max()) - (length - 1)
            if index.shape[-1] == length and offset >= 0 and rows - offset >= length:
                candidates.append((rows - offset, rows))
        if candidates and min(candidates)[0] < MAX_PROBED_SEQUENCE:
            bound, rows = min(candidates)
            batch = int(first.shape[batch_dim]) if first.dim() > batch_dim else None

            def fails_at(n: int) -> set[int]:
                return _run(model, *_map(lambda t: _lengthened(t, length, batch, batch_dim, n), full_args, full_kwargs)).failed

            failed = fails_at(bound + 1)
            # past that table; or failing before its lookup (RoBERTa gathers its token types by position first) at two
            # lengths past it, where a model refusing odd lengths runs at the second
            if rows in failed or (failed and fails_at(bound + 2)):
                longest = bound
    return {"values": values, "sequence": longest, "sequence_dim": seq_axis}
