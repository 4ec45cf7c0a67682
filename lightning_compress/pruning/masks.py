"""Pure functions on modules and tensors: choose what to prune, turn scores into masks, apply masks.

Nothing here knows about a Trainer. A *mask* is a ``torch.bool`` tensor of the parameter's shape,
``True`` where the weight survives. Masks are applied in place (``weight.mul_(mask)``): the model keeps
its own parameters and ``state_dict`` keys, ``deepcopy`` and ``torch.compile`` keep working.

Devices: a mask is made on the device of its scores, whatever the device of the masks in force that
are passed as ``current`` (a callback may have made those before the model moved to the GPU);
:func:`pack_mask` and :func:`unpack_mask` go through the host (1 bit per entry, for checkpoints).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> names = select_parameters(net)
    >>> names
    ['0.weight', '2.weight']
    >>> params = dict(net.named_parameters())
    >>> scores = {n: params[n].detach().abs() for n in names}
    >>> masks = unstructured_masks(scores, {n: 0.5 for n in names}, scope="global")
    >>> apply_masks(params, masks)
    >>> round(global_sparsity(masks), 2)
    0.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.sharding import local
from lightning_compress.pruning.threshold import lowest_k_masks
from lightning_compress.pruning.weights import prunable_weight
from lightning_compress.selection import preview as _preview
from lightning_compress.selection import select_weights

if TYPE_CHECKING:
    from lightning_compress.sharding import ShardGroup

__all__ = [
    "ChannelGroupSpec",
    "PRUNABLE_TYPES",
    "apply_masks",
    "broadcast_masks",
    "check_nm_shapes",
    "channel_masks",
    "expand_channel_mask",
    "spread_channels",
    "find_followers",
    "global_sparsity",
    "layer_targets",
    "mask_gradients",
    "nm_masks",
    "pack_mask",
    "parse_granularity",
    "row_masks",
    "select_parameters",
    "sparse_storage_bytes",
    "storage_bytes",
    "unpack_mask",
    "unstructured_masks",
    "zero_optimizer_state",
]

#: Module types whose ``weight`` is pruned by default; ``MultiheadAttention``'s projection weights and
#: GPT-2 style ``Conv1D`` weights are too (see :mod:`lightning_compress.pruning.weights`).
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

GRANULARITIES = ("unstructured", "channel", "N:M (e.g. '2:4')", "heads", "neurons", "heads+neurons")


def parse_granularity(granularity: str) -> tuple[str, tuple[int, int] | None]:
    """``"unstructured"`` / ``"channel"`` / ``"N:M"`` -> (kind, (N, M) or None).

    >>> parse_granularity("2:4")
    ('nm', (2, 4))
    >>> parse_granularity("channel")
    ('channel', None)
    """
    if not isinstance(granularity, str):
        raise ValueError(f"structure must be a string, got {granularity!r}; valid: {list(GRANULARITIES)}")
    g = granularity.strip().lower()
    if g in ("unstructured", "channel"):
        return g, None
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", g)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if mm < 2 or n < 1 or n >= mm:
            raise ValueError(
                f"structure {granularity!r}: N:M sparsity keeps N of every M weights and needs 1 <= N < M "
                f"(e.g. '2:4'), got N={n}, M={mm}"
            )
        return "nm", (n, mm)
    raise ValueError(f"unknown structure {granularity!r}; valid: {list(GRANULARITIES)}")


def check_nm_shapes(params: Mapping[str, Tensor], m: int, structure: str, input_major: Collection[str] = ()) -> None:
    """N:M sparsity groups M consecutive inputs of each output: every weight needs a multiple of M inputs.

    ``input_major``: names of weights whose inputs run along dim 0 (``Conv1D`` ``(in, out)``, transposed
    convolutions ``(in, out / groups, *kernel)``).

    >>> check_nm_shapes({"fc.weight": torch.zeros(4, 6)}, 4, "2:4")
    Traceback (most recent call last):
    ...
    ValueError: structure '2:4': fc.weight of shape (4, 6) has 6 inputs per output, not a multiple of 4; exclude it (exclude=['fc'])
    """
    for n, p in params.items():
        inputs = p.shape[0] if n in input_major and p.dim() >= 2 else p.numel() // max(1, p.shape[0]) if p.dim() else 0
        if p.dim() < 2 or inputs % m:
            raise ValueError(
                f"structure {structure!r}: {n} of shape {tuple(p.shape)} has {inputs} "
                f"inputs per output, not a multiple of {m}; exclude it (exclude=[{n.rsplit('.', 1)[0]!r}])"
            )


def _prunable_weight(module: nn.Module, leaf: str) -> bool:
    return prunable_weight(module, leaf)


def _rows(t: Tensor, transposed: bool) -> Tensor:
    """``t`` as ``(outputs, inputs)``: rows are output units. ``transposed``: the inputs are dim 0 (``Conv1D``
    ``(in, out)``, a transposed convolution ``(in, out, *kernel)``): a row is one entry of the other dims."""
    if transposed:
        return t.movedim(0, -1).reshape(-1, t.shape[0])
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() else t.reshape(1, 1)  # 0 rows: a shard may hold none


def _unrows(rows: Tensor, shape: torch.Size, transposed: bool) -> Tensor:
    """Inverse of :func:`_rows`."""
    if transposed:
        return rows.reshape(*shape[1:], shape[0]).movedim(-1, 0).contiguous()
    return rows.reshape(shape)


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the parameters to prune, in ``named_parameters`` order.

    By default every matmul weight (:mod:`lightning_compress.pruning.weights`): the ``weight`` of
    every ``Linear`` (``MultiheadAttention.out_proj`` included) and ``Conv*`` module, the projection
    weights of ``MultiheadAttention`` (``in_proj_weight``) and GPT-2 style ``Conv1D`` weights; never
    biases, norm layers, embeddings, nor anything under an attribute called ``teacher`` (a
    distillation teacher). The rule is :func:`lightning_compress.selection.select_weights`, shared
    with quantisation. A tensor shared by two modules (a head tied to an embedding) is named once,
    by its first selected name.

    Raises:
        ValueError: a pattern matches nothing it could act on, or nothing is left to prune.
    """
    names = select_weights(model, include, exclude, _prunable_weight, "prune")
    tensors = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    out = []
    for n in names:
        if id(tensors[n]) not in seen:
            seen.add(id(tensors[n]))
            out.append(n)
    return out


def layer_targets(
    names: Sequence[str], target: float | Mapping[str, float], others: Iterable[str] = ()
) -> dict[str, float]:
    """Per-parameter final sparsity from a scalar or an ordered ``{regex: sparsity}`` map.

    With a map, each parameter takes the value of the first regex found in its name; a parameter no
    regex matches is not pruned (0). Every regex must match at least one selected parameter; when it
    matches only parameters that are not selected (``others``: e.g. every parameter of the model), the
    error names them and says how to select them (``include``).

    >>> layer_targets(["fc1.weight", "fc2.weight"], {"fc1": 0.9})
    {'fc1.weight': 0.9, 'fc2.weight': 0.0}
    """
    if not isinstance(target, Mapping):
        return {n: float(target) for n in names}
    out = {n: 0.0 for n in names}
    seen = set()
    for pattern, value in target.items():
        hits = [n for n in names if n not in seen and re.search(pattern, n)]
        if not any(re.search(pattern, n) for n in names):
            unselected = [n for n in others if n not in names and re.search(pattern, n)]
            hint = (
                f"; it matches {_preview(unselected, 3)}, which are not selected: add their full names to include, with "
                f"'.*' to keep the default layers (include=['.*', r'{re.escape(unselected[0])}'])"
                if unselected
                else ""
            )
            raise ValueError(
                f"target_sparsity regex {pattern!r} matches none of the weights selected for pruning: {_preview(names)}{hint}"
            )
        for n in hits:
            out[n] = float(value)
            seen.add(n)
    return out


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _kth_prune(flat_scores: Tensor, k: int, shards: ShardGroup | None = None) -> Tensor:
    """Bool keep-vector pruning exactly the ``k`` lowest scores (on ties, the earlier index goes first).

    Linear time (a selection plus a tie break), not a full sort: cheap enough to run every few steps.
    On the CPU the selection is numpy's introselect, 8x faster than ``torch.kthvalue`` on 266k scores;
    elsewhere, and over the shards of a weight split across processes,
    :func:`~lightning_compress.pruning.threshold.lowest_k_masks` (histogram passes on the device).
    """
    if shards is not None:
        return lowest_k_masks([flat_scores], k, shards=shards)[0]
    n = flat_scores.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k <= 0, dtype=torch.bool, device=flat_scores.device)
    if flat_scores.device.type == "cpu" and flat_scores.dtype in _NUMPY_DTYPES:
        arr = flat_scores.detach().numpy()
        v_np = np.partition(arr, k - 1)[k - 1]
        nan = bool(np.isnan(v_np))  # NaN ranks last: every number goes, then the first NaNs
        below_np = ~np.isnan(arr) if nan else arr < v_np
        need = k - int(below_np.sum())
        if need > 0:
            below_np[np.flatnonzero(np.isnan(arr) if nan else arr == v_np)[:need]] = True
        return torch.from_numpy(~below_np)
    return lowest_k_masks([flat_scores], k)[0]


def _prune_lowest(tensors: Sequence[Tensor], k: int, shards: ShardGroup | None = None) -> list[Tensor]:
    """Keep-masks pruning the ``k`` lowest entries over ``tensors`` (ties: earlier first). On the CPU one
    numpy selection over the concatenation; elsewhere (and over shards) :func:`lowest_k_masks`, which
    never concatenates and keeps everything on the device (no host copy of the scores)."""
    if shards is not None:
        return lowest_k_masks(tensors, k, shards=shards)
    if all(t.device.type == "cpu" for t in tensors):
        keep = _kth_prune(torch.cat([t.flatten() for t in tensors]), k)
        return [m.view_as(t) for m, t in zip(keep.split([t.numel() for t in tensors]), tensors)]
    return lowest_k_masks(tensors, k)


def unstructured_masks(
    scores: Mapping[str, Tensor],
    targets: Mapping[str, float],
    scope: str = "global",
    current: Mapping[str, Tensor] | None = None,
    input_major: Collection[str] = (),
    shards: ShardGroup | None = None,
) -> dict[str, Tensor]:
    """Element masks pruning the lowest scores.

    Args:
        scores: Importance per element (same shape as the weight); higher survives.
        targets: Fraction of each tensor to prune. With ``scope="global"`` one threshold is used
            across all tensors and the pruned count is ``sum(target_i * numel_i)``.
        scope: ``"global"``, ``"layer"`` or ``"row"`` (every output row of a tensor loses the same
            share: :func:`row_masks`).
        current: Masks already in force: their pruned entries stay pruned (masks only shrink).
        input_major: Names of weights whose inputs are dim 0 (``Conv1D``, transposed convolutions): a row is
            one entry of the other dimensions.
        shards: The processes holding the other rows of each score tensor (weights sharded by rows):
            the masks are those the whole tensors would get.
    """
    if scope == "row":
        return row_masks(scores, targets, current, input_major, shards)
    scores = {n: _fold_current(s.detach().float(), current, n) for n, s in scores.items()}
    numel = _numels(scores, shards)
    if scope == "layer":
        out = {}
        for n, s in scores.items():
            k = _count(targets[n], numel[n])
            out[n] = _kth_prune(s.flatten(), k, shards).view_as(s)
        return out
    names = list(scores)
    if not names:
        return {}
    total = sum(numel.values())
    k = min(total, sum(_count(targets[n], numel[n], exact=False) for n in names))
    return dict(zip(names, _prune_lowest([scores[n] for n in names], int(round(k)), shards)))


def _numels(tensors: Mapping[str, Tensor], shards: ShardGroup | None, rows: bool = False) -> dict[str, int]:
    """Entries (or rows) of each tensor, over every process holding a shard of it: one reduction."""
    held = {n: (t.shape[0] if t.dim() else 1) if rows else t.numel() for n, t in tensors.items()}
    if shards is None or not held:
        return held
    summed = shards.sum(torch.tensor(list(held.values()), dtype=torch.int64)).tolist()
    return dict(zip(held, (int(v) for v in summed)))


def row_masks(
    scores: Mapping[str, Tensor],
    targets: Mapping[str, float],
    current: Mapping[str, Tensor] | None = None,
    input_major: Collection[str] = (),
    shards: ShardGroup | None = None,
) -> dict[str, Tensor]:
    """Element masks compared within each output row (Wanda's comparison group).

    Each tensor loses exactly ``round(target * numel)`` entries, spread over its output rows as
    evenly as possible: every row loses ``k // rows`` of its lowest scores and the ``k % rows`` rows
    whose next-lowest score is lowest lose one more. A row is one index of the first dimension; for the
    ``input_major`` names (``Conv1D`` ``(in, out)``, transposed convolutions) it runs along dim 0, one per
    index of the other dimensions. Entries already pruned in ``current`` stay pruned. With ``shards``
    (rows split across processes), the count and the rows that lose one more are those of the whole tensor.

    >>> s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    >>> row_masks({"w": s}, {"w": 0.5})["w"].int().tolist()
    [[0, 0, 1, 1], [1, 1, 0, 0]]
    """
    out = {}
    numel = _numels(scores, shards)
    for n, s in scores.items():
        folded = _fold_current(s.detach().float(), current, n)
        transposed = n in input_major and s.dim() >= 2
        if transposed and shards is not None:
            raise ValueError(f"{n}: weights stored (in, out) cannot be pruned per row when sharded by their inputs")
        rows = _rows(folded, transposed)
        r, length = rows.shape
        all_rows = numel[n] // max(1, length)
        k = min(_count(targets[n], numel[n]), all_rows * length)
        base, extra = divmod(k, max(1, all_rows))
        values, order = torch.sort(rows, dim=1, stable=True)
        per_row = torch.full((r,), base, dtype=torch.long, device=rows.device)
        if extra:
            column = values[:, base].contiguous() if r else values.new_zeros(0)
            per_row += (~_kth_prune(column, extra, shards)).long().to(rows.device)
        keep_sorted = torch.arange(length, device=rows.device).unsqueeze(0) >= per_row.unsqueeze(1)
        keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
        keep = _unrows(keep, s.shape, transposed)
        if current is not None and n in current:
            keep &= current[n].to(keep.device).view_as(keep)
        out[n] = keep
    return out


def _fold_current(s: Tensor, current: Mapping[str, Tensor] | None, name: str) -> Tensor:
    if current is not None and name in current:
        s = s.masked_fill(~current[name].to(s.device).view_as(s), float("-inf"))
    return s


def _count(fraction: float, numel: int, exact: bool = True) -> Any:
    value = fraction * numel
    return int(round(value)) if exact else value


def nm_masks(
    scores: Mapping[str, Tensor],
    n: int,
    m: int,
    fraction: Mapping[str, float],
    scope: str = "global",
    current: Mapping[str, Tensor] | None = None,
    input_major: Collection[str] = (),
    shards: ShardGroup | None = None,
) -> dict[str, Tensor]:
    """N:M masks: in each block of ``m`` consecutive weights along the input dimension keep the ``n`` best.

    ``fraction`` says, per tensor, which share of its blocks is already N:M sparse (the schedule ramps
    it from 0 to 1); the blocks that lose least importance go first (one ranking across tensors with
    ``scope="global"``). The weight's trailing size (``numel / out_channels``) must be a multiple of ``m``;
    for the ``input_major`` names (``Conv1D`` ``(in, out)``, transposed convolutions ``(in, out, *kernel)``) the
    blocks run along dim 0, the dimension the matrix multiplication reduces over.

    >>> w = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    >>> nm_masks({"w": w}, 2, 4, {"w": 1.0})["w"].int().tolist()
    [[1, 0, 1, 0, 1, 0, 0, 1]]
    """
    if not scores:
        return {}
    # masks in force, on their scores' device (they may have been made before the model moved)
    transposed = {name for name, s in scores.items() if name in input_major and s.dim() >= 2}
    held = {
        name: _rows(current[name].to(s.device).view_as(s), name in transposed)
        for name, s in scores.items()
        if current is not None and name in current
    }
    blocks: dict[str, Tensor] = {}
    block_keep: dict[str, Tensor] = {}
    cost: dict[str, Tensor] = {}
    for name, s in scores.items():
        s = _rows(s.detach().float(), name in transposed)
        s = _fold_current(s, held, name)
        b = s.reshape(-1, m)
        blocks[name] = b
        order = torch.argsort(b, dim=1, stable=True, descending=True)
        keep = torch.zeros_like(b, dtype=torch.bool)
        keep.scatter_(1, order[:, :n], True)
        block_keep[name] = keep
        lost = torch.where(keep, torch.zeros_like(b), b.clamp_min(0).nan_to_num(0.0, posinf=0.0, neginf=0.0))
        cost[name] = lost.sum(1)
        if name in held:
            already = (~held[name].reshape(-1, m)).sum(1) >= (m - n)
            cost[name] = cost[name].masked_fill(already, float("-inf"))
    chosen: dict[str, Tensor] = {}
    blocks_of = _numels(cost, shards)  # over all processes when the rows are sharded
    if scope == "layer":
        for name, c in cost.items():
            chosen[name] = ~_kth_prune(c, int(round(fraction[name] * blocks_of[name])), shards)
    else:
        names = list(cost)
        k = int(round(sum(fraction[nm] * blocks_of[nm] for nm in names)))
        kept = _prune_lowest([cost[nm] for nm in names], min(k, sum(blocks_of.values())), shards)
        chosen.update({name: ~keep for name, keep in zip(names, kept)})
    out = {}
    for name, s in scores.items():
        keep = torch.where(chosen[name].unsqueeze(1), block_keep[name], torch.ones_like(block_keep[name]))
        if name in held:
            keep &= held[name].reshape(-1, m)
        out[name] = _unrows(keep.reshape(_rows(s, name in transposed).shape), s.shape, name in transposed)
    return out


@dataclass
class ChannelGroupSpec:
    """Output channels pruned together: the Conv/Linear ``members`` plus the parameters that follow them.

    ``members``: module names whose output channels are coupled; ``size``: the channel count;
    ``followers``: ``{parameter name: dim}`` of biases and BatchNorm ``weight``/``bias`` that must be
    masked along with the channel (``dim=1``: the input columns of a following layer).
    """

    members: list[str]
    size: int
    followers: dict[str, int] = field(default_factory=dict)
    #: ``(module, attribute, per channel)`` of the counts to update on removal (an attention module's head
    #: count: query heads per key/value head, and key/value heads). A channel spans ``rows / size`` rows
    #: of each tensor (a head's rows in the query or in a narrower key projection).
    count_attributes: tuple[tuple[str, str, int], ...] = ()
    #: ``{parameter: (dim, blocks)}`` where it is not a member weight's rows or a follower's ``dim`` in one
    #: block: a GPT-2 ``Conv1D`` holds its outputs along dim 1, and its fused q/k/v in 3 blocks, each
    #: split over the channels (a head's columns in the query, in the key and in the value).
    layouts: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: ``{weight: channel of each input column}`` of the layers that read the channels (``-1``: another
    #: group's column), masked along dim 1 with the channels, so what flows in a pruned channel is never read.
    columns: dict[str, Tensor] = field(default_factory=dict)

    def column_mask(self, name: str, keep: Tensor, shape: Sequence[int]) -> Tensor:
        """The bool mask of consumer weight ``name`` (of ``shape``) for the channel keep-vector ``keep``."""
        index = self.columns[name].to(keep.device)
        kept = torch.cat([keep, keep.new_ones(1)])[index]  # -1 picks the appended True
        return expand_channel_mask(kept, shape, 1)

    def layout(self, name: str) -> tuple[int, int]:
        """``(dim, blocks)`` of parameter ``name`` (a member's ``.weight``/``.bias`` or a follower)."""
        return self.layouts.get(name, (self.followers.get(name, 0), 1))


def spread_channels(keep: Tensor, length: int, blocks: int = 1) -> Tensor:
    """A keep-vector over channels as one over ``length`` entries: ``blocks`` equal blocks, each split
    evenly over the channels in order (a head's rows; in a fused q/k/v, its rows in each of the three).

    Example:
        >>> spread_channels(torch.tensor([True, False]), 8, blocks=2).int().tolist()
        [1, 1, 0, 0, 1, 1, 0, 0]
    """
    per = length // (blocks * keep.numel())
    spread = keep if per == 1 else keep.repeat_interleave(per)
    return spread if blocks == 1 else spread.repeat(blocks)


def channel_masks(
    scores: Sequence[Tensor],
    targets: Sequence[float],
    scope: str = "global",
    current: Sequence[Tensor] | None = None,
    round_to: int | None = None,
) -> list[Tensor]:
    """Bool keep-vectors over output channels, one per group; never drops a group's last channel.

    Args:
        scores: Importance per channel per group (higher survives).
        targets: Fraction of channels to prune in each group (``scope="layer"``) or, with
            ``scope="global"``, weights of a single budget ``sum(target_i * size_i)`` spent on the
            lowest *normalised* scores (each group's scores divided by their mean, so layers of
            different scale compete fairly).
        scope: ``"global"`` or ``"layer"``.
        current: Keep-vectors in force: pruned channels stay pruned. They may be on another device than
            the scores (a callback makes them before the model moves to the GPU).
        round_to: Keep a multiple of this many channels per group (rounding the kept count up).

    Each keep-vector is on its group's scores' device.

    >>> [m.int().tolist() for m in channel_masks([torch.tensor([3.0, 1.0, 2.0, 0.5])], [0.5], "layer")]
    [[1, 0, 1, 0]]
    """
    if not scores:
        return []
    s_list = []
    for i, s in enumerate(scores):
        s = s.detach().float().flatten().nan_to_num(0.0)
        if scope == "global":
            s = s / s.abs().mean().clamp_min(1e-12)
        if current is not None:
            s = s.masked_fill(~current[i].to(s.device).flatten(), float("-inf"))
        s_list.append(s)
    sizes = [s.numel() for s in s_list]
    prune_counts: list[int]
    if scope == "layer":
        prune_counts = [int(round(t * n)) for t, n in zip(targets, sizes)]
    else:
        budget = int(round(sum(t * n for t, n in zip(targets, sizes))))
        device = s_list[0].device  # one ranking on one device, even for groups on several
        flat = torch.cat([s.to(device) for s in s_list])
        # a group's last channel is never a candidate
        protected = torch.cat(
            [torch.nn.functional.one_hot(torch.argmax(s), s.numel()).bool().to(device) for s in s_list]
        )
        order = torch.argsort(flat.masked_fill(protected, float("inf")), stable=True)
        pruned = torch.zeros_like(flat, dtype=torch.bool)
        pruned[order[: min(budget, flat.numel() - len(s_list))]] = True
        prune_counts, offset = [], 0
        for n in sizes:
            prune_counts.append(int(pruned[offset : offset + n].sum()))
            offset += n
    out = []
    for s, n, k in zip(s_list, sizes, prune_counts):
        keep_n = max(1, n - k)
        if round_to:
            keep_n = min(n, int(math.ceil(keep_n / round_to) * round_to))
        out.append(_kth_prune(s, n - keep_n))
    return out


def expand_channel_mask(keep: Tensor, shape: torch.Size | Sequence[int], dim: int = 0) -> Tensor:
    """Broadcast a keep-vector over channels to a full bool mask of ``shape`` along ``dim``."""
    view = [1] * len(shape)
    view[dim] = -1
    return keep.view(view).expand(*shape).clone()


def find_followers(model: nn.Module, example_input: Any, members: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """Trace one forward pass with hooks: which BatchNorm consumes each member's output, and which module is an output head.

    Returns:
        ``({member: batchnorm module name}, {names of modules whose output is the model's output})``.
    """
    members = set(members)
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    followers: dict[str, str] = {}
    heads: set[str] = set()
    last: dict[int, str] = {}
    handles = []

    def out_hook(name: str):
        def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                produced[id(output)] = name
                last[id(output)] = name

        return hook

    def bn_hook(name: str):
        def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and id(inputs[0]) in produced:
                followers.setdefault(produced[id(inputs[0])], name)

        return hook

    keepalive: list[Any] = []
    try:
        for name, mod in modules.items():
            if name in members:
                handles.append(mod.register_forward_hook(out_hook(name)))
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                handles.append(mod.register_forward_hook(bn_hook(name)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(example_input)
        finally:
            model.train(was_training)
        keepalive.append(out)
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if isinstance(o, Tensor) and id(o) in last:
                heads.add(last[id(o)])
    finally:
        for h in handles:
            h.remove()
    return followers, heads


def apply_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned entries of each parameter in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.mul_(mask.to(device=p.device, dtype=p.dtype))


def mask_gradients(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the gradients of pruned entries in place (parameters without a gradient are skipped)."""
    with torch.no_grad():
        for name, mask in masks.items():
            g = params[name].grad
            if g is not None:
                g = local(g)
                g.mul_(mask.to(device=g.device, dtype=g.dtype))


def zero_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], params: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> None:
    """Zero every per-element optimizer state (momentum, Adam moments...) of pruned entries so they cannot revive."""
    by_id = {id(params[n]): masks[n] for n in masks}
    with torch.no_grad():
        for opt in optimizers:
            for p, state in opt.state.items():
                mask = by_id.get(id(p))
                if mask is None:
                    continue
                for value in state.values():
                    value = local(value) if isinstance(value, Tensor) else value  # a shard's optimizer state is sharded too
                    if isinstance(value, Tensor) and value.shape == mask.shape and value.dim() == mask.dim():
                        value.mul_(mask.to(device=value.device, dtype=value.dtype))


def global_sparsity(masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> float:
    """Fraction of ``False`` entries over the given masks (all of them by default)."""
    names = list(masks) if names is None else list(names)
    total = sum(masks[n].numel() for n in names)
    kept = sum(int(masks[n].sum()) for n in names)
    return 0.0 if total == 0 else 1.0 - kept / total


def sparse_storage_bytes(mask: Tensor, element_size: int = 4) -> dict[str, Any]:
    """Estimated bytes of a tensor stored densely and sparsely (the cheaper of CSR with int32 indices and a bitmap).

    >>> sparse_storage_bytes(torch.tensor([[True, False, False, False]]))
    {'dense_bytes': 16, 'sparse_bytes': 5, 'format': 'bitmap'}
    """
    return storage_bytes(mask.numel(), int(mask.sum()), mask.shape[0] if mask.dim() > 0 else 1, element_size)


def storage_bytes(numel: int, nnz: int, rows: int, element_size: int = 4) -> dict[str, Any]:
    """:func:`sparse_storage_bytes` from the counts: entries, kept entries and rows of the tensor."""
    csr = nnz * (element_size + 4) + (rows + 1) * 4
    bitmap = nnz * element_size + math.ceil(numel / 8)
    fmt, size = ("csr", csr) if csr < bitmap else ("bitmap", bitmap)
    if numel * element_size <= size:
        fmt, size = "dense", numel * element_size
    return {"dense_bytes": numel * element_size, "sparse_bytes": size, "format": fmt}


def broadcast_masks(strategy: Any, world_size: int, masks: Any) -> Any:
    """Rank 0's masks (a dict or a list of bool tensors) on every rank, bit-packed for the broadcast,
    each back on its own tensor's device. One process: ``masks`` as they are."""
    if world_size <= 1:
        return masks
    if isinstance(masks, Mapping):
        packed = strategy.broadcast({n: pack_mask(t) for n, t in masks.items()}, src=0)
        return {n: unpack_mask(v, masks[n].device) for n, v in packed.items()}
    packed_list = strategy.broadcast([pack_mask(t) for t in masks], src=0)
    return [unpack_mask(v, t.device) for v, t in zip(packed_list, masks)]


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy's packbits order: the first entry is the high bit


def pack_mask(mask: Tensor, by_rows: bool = False) -> dict[str, Any]:
    """A bool mask as 1 bit per entry (for checkpoints): ``{"shape": [...], "bits": uint8 tensor}``.

    Packed on the mask's device, so only the bits (an eighth of the mask) reach the host. With
    ``by_rows``, each row (first dimension) starts a new byte: ``bits`` is ``(rows, bytes per row)``,
    so the bits of a weight's rows held by several processes concatenate, and split, by rows.

    >>> m = torch.tensor([[True, False, True]])
    >>> torch.equal(unpack_mask(pack_mask(m)), m)
    True
    >>> pack_mask(m)["bits"].tolist()  # the same bytes as numpy.packbits
    [160]
    """
    if by_rows:
        rows = mask.detach().reshape(mask.shape[0] if mask.dim() else 1, -1).to(torch.uint8)
        rows = torch.nn.functional.pad(rows, (0, (-rows.shape[1]) % 8))
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8).to(rows.device)
        bits = (rows.view(rows.shape[0], -1, 8) * weights).sum(2, dtype=torch.uint8)
        return {"shape": list(mask.shape), "bits": bits, "by_rows": True}
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8).to(flat.device)
    bits = (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": bits.cpu()}


def unpack_mask(packed: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """Inverse of :func:`pack_mask`, on ``device`` (default the CPU); unpacked there, so only the bits travel.

    ``bits`` may be on any device (a checkpoint loaded with ``map_location="cuda"``)."""
    shape = [int(s) for s in packed["shape"]]
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8)
    if packed.get("by_rows"):
        bits = packed["bits"].detach().to(device or "cpu", torch.uint8)
        length = math.prod(shape[1:]) if len(shape) > 1 else 1
        flags = (bits.unsqueeze(-1) & weights.to(bits.device)).ne(0).reshape(bits.shape[0], -1)
        return flags[:, :length].reshape(shape)
    numel = math.prod(shape) if shape else 1
    bits = packed["bits"].detach().to(device or "cpu", torch.uint8).reshape(-1, 1)
    return (bits & weights.to(bits.device)).ne(0).reshape(-1)[:numel].reshape(shape)
