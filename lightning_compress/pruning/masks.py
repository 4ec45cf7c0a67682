"""Pure functions on modules and tensors: choose what to prune, turn scores into masks, apply masks.

Nothing here knows about a Trainer. A *mask* is a ``torch.bool`` tensor of the parameter's shape,
``True`` where the weight survives. Masks are applied in place (``weight.mul_(mask)``): the model keeps
its own parameters and ``state_dict`` keys, ``deepcopy`` and ``torch.compile`` keep working.

Devices: a mask is made on the device of its scores, whatever the device of the masks in force that
are passed as ``current`` (a callback may have made those before the model moved to the GPU).
Channel keep-vectors are in :mod:`~lightning_compress.pruning.channel_masks`, packing for checkpoints in
:mod:`~lightning_compress.pruning.mask_storage`.

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
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.sharding import local
from lightning_compress.pruning.threshold import _kth_prune, _prune_lowest  # noqa: F401 - _kth_prune re-exported
from lightning_compress.pruning.weights import input_dim, prunable_weight
from lightning_compress.selection import preview as _preview
from lightning_compress.selection import select_weights

if TYPE_CHECKING:
    from lightning_compress.sharding import ShardGroup

# their home before they moved: channel keep-vectors, the bit packing, the channel tracing (imports and pickles keep working)
from lightning_compress.pruning.channel_masks import (  # noqa: E402,F401
    ChannelGroupSpec,
    channel_masks,
    expand_channel_mask,
    spread_channels,
)
from lightning_compress.pruning.channels import find_followers  # noqa: E402,F401
from lightning_compress.pruning.mask_storage import (  # noqa: E402,F401
    broadcast_masks,
    pack_mask,
    sparse_storage_bytes,
    storage_bytes,
    unpack_mask,
)

__all__ = [
    "apply_masks",
    "broadcast_masks",
    "channel_masks",
    "ChannelGroupSpec",
    "check_nm_shapes",
    "expand_channel_mask",
    "find_followers",
    "global_sparsity",
    "layer_targets",
    "mask_gradients",
    "nm_masks",
    "pack_mask",
    "parse_granularity",
    "PRUNABLE_TYPES",
    "row_masks",
    "select_parameters",
    "sparse_storage_bytes",
    "spread_channels",
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
    convolutions ``(in, out / groups, *kernel)``), or ``{name: dim}`` (:func:`input_dim`).

    >>> check_nm_shapes({"fc.weight": torch.zeros(4, 6)}, 4, "2:4")
    Traceback (most recent call last):
    ...
    ValueError: structure '2:4': fc.weight of shape (4, 6) has 6 inputs per output, not a multiple of 4; exclude it (exclude=['fc'])
    """
    for n, p in params.items():
        dim = input_dim(input_major, n, p)
        inputs = p.shape[dim] if dim is not None else p.numel() // max(1, p.shape[0]) if p.dim() else 0
        if p.dim() < 2 or inputs % m:
            raise ValueError(
                f"structure {structure!r}: {n} of shape {tuple(p.shape)} has {inputs} "
                f"inputs per output, not a multiple of {m}; exclude it (exclude=[{n.rsplit('.', 1)[0]!r}])"
            )


def _prunable_weight(module: nn.Module, leaf: str) -> bool:
    return prunable_weight(module, leaf)


def _rows(t: Tensor, dim: int | None) -> Tensor:
    """``t`` as ``(outputs, inputs)``: rows are output units. With ``dim``, the inputs are that dimension (0 for
    ``Conv1D`` ``(in, out)`` and transposed convolutions ``(in, out, *kernel)``, 1 for experts ``(E, in, out)``):
    a row is one entry of the other dims."""
    if dim is not None:
        return t.movedim(dim, -1).reshape(-1, t.shape[dim])
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() else t.reshape(1, 1)  # 0 rows: a shard may hold none


def _unrows(rows: Tensor, shape: torch.Size, dim: int | None) -> Tensor:
    """Inverse of :func:`_rows`."""
    if dim is not None:
        moved = [size for i, size in enumerate(shape) if i != dim] + [shape[dim]]
        return rows.reshape(moved).movedim(-1, dim).contiguous()
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

    A regex matching only weights earlier ones take is said (a warning): its value is never used.
    """
    if not isinstance(target, Mapping):
        return {n: float(target) for n in names}
    out = {n: 0.0 for n in names}
    seen = set()
    owners: dict[str, str] = {}  # the regex each weight took its value from
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
        if not hits:  # first match wins: this value is never used
            taken = [n for n in names if re.search(pattern, n)]
            owner = {n: owners[n] for n in taken}
            said = ", ".join(f"{n!r} by {p!r}" for n, p in list(owner.items())[:3]) + (", ..." if len(owner) > 3 else "")
            rank_zero_warn(
                f"target_sparsity regex {pattern!r} matches only weights earlier regexes take ({said}; the first match "
                f"wins), so its value {value!r} is not used: reorder the map or make the earlier regex narrower"
            )
        for n in hits:
            out[n] = float(value)
            seen.add(n)
            owners[n] = pattern
    return out


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
        input_major: Names of weights whose inputs are dim 0 (``Conv1D``, transposed convolutions), or
            ``{name: dim}`` (:func:`input_dim`): a row is one entry of the other dimensions.
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
    ``input_major`` names (``Conv1D`` ``(in, out)``, transposed convolutions) it runs along dim 0 (or the
    dimension :func:`input_dim` gives), one per index of the other dimensions. Entries already pruned in
    ``current`` stay pruned. With ``shards`` (rows split across processes), the count and the rows that lose one more are those of the whole tensor.

    >>> s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    >>> row_masks({"w": s}, {"w": 0.5})["w"].int().tolist()
    [[0, 0, 1, 1], [1, 1, 0, 0]]
    """
    out = {}
    numel = _numels(scores, shards)
    for n, s in scores.items():
        folded = _fold_current(s.detach().float(), current, n)
        inputs_at = input_dim(input_major, n, s)
        if inputs_at == 0 and shards is not None:
            raise ValueError(f"{n}: weights stored (in, out) cannot be pruned per row when sharded by their inputs")
        rows = _rows(folded, inputs_at)
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
        keep = _unrows(keep, s.shape, inputs_at)
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
    blocks run along dim 0, the dimension the matrix multiplication reduces over (for ``{name: dim}``, along
    ``dim``: 1 for experts stored ``(E, in, out)``).

    >>> w = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    >>> nm_masks({"w": w}, 2, 4, {"w": 1.0})["w"].int().tolist()
    [[1, 0, 1, 0, 1, 0, 0, 1]]
    """
    if not scores:
        return {}
    # masks in force, on their scores' device (they may have been made before the model moved)
    inputs_at = {name: input_dim(input_major, name, s) for name, s in scores.items()}
    held = {
        name: _rows(current[name].to(s.device).view_as(s), inputs_at[name])
        for name, s in scores.items()
        if current is not None and name in current
    }
    blocks: dict[str, Tensor] = {}
    block_keep: dict[str, Tensor] = {}
    cost: dict[str, Tensor] = {}
    for name, s in scores.items():
        s = _rows(s.detach().float(), inputs_at[name])
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
        out[name] = _unrows(keep.reshape(_rows(s, inputs_at[name]).shape), s.shape, inputs_at[name])
    return out


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


#: Per-element optimizer states that scale a step rather than make one (second moments, Adagrad's sum, Adamax's
#: infinity norm): with a zero first moment and gradient, a pruned entry's step is zero whatever they hold.
SECOND_MOMENT_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf"})


def zero_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], params: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> bool:
    """Zero the per-element optimizer state that moves pruned entries (momentum, Adam's first moment...) so they
    cannot revive; returns whether every masked parameter an optimizer steps had its state (an optimizer makes it at
    its first step; a frozen parameter, and any under SGD without momentum, never has any).

    Second moments (:data:`SECOND_MOMENT_STATES`) are kept: they move nothing while the first moment and the gradient
    are zero, and a pruned entry's own is the right scale should it ever grow back. Where one is exactly zero (pruned
    before its first gradient) it is set to the mean of the tensor's non-zero entries (1 if none): CPU kernels take
    the square root of an exact zero about 10 times slower than of other numbers, which made a training step of a half-pruned
    LeNet-300-100 with non-fused Adam 1.8 times slower (fused Adam and GPUs are not affected)."""
    by_id = {id(params[n]): masks[n] for n in masks}
    optimizers = list(optimizers)
    with torch.no_grad():
        have = {id(p) for opt in optimizers for p, state in opt.state.items() if state}
        # the parameters an optimizer steps, and makes state for (a frozen or unlisted one never gets any)
        stepped = {
            id(p) for opt in optimizers if _keeps_state(opt) for group in getattr(opt, "param_groups", ()) for p in group["params"]
            if p.requires_grad
        }  # fmt: skip
        for opt in optimizers:
            for p, state in opt.state.items():
                mask = by_id.get(id(p))
                if mask is None:
                    continue
                for key, value in state.items():
                    value = local(value) if isinstance(value, Tensor) else value  # a shard's optimizer state is sharded too
                    if not (isinstance(value, Tensor) and value.shape == mask.shape and value.dim() == mask.dim()):
                        continue
                    keep = mask.to(device=value.device)
                    if key not in SECOND_MOMENT_STATES:
                        value.mul_(keep.to(value.dtype))
                        continue
                    positive = value > 0
                    count = positive.sum()
                    total = (value * positive).sum(dtype=torch.float32)  # a float16 state's sum overflows
                    scale = torch.where(count > 0, total / count.clamp(min=1), torch.ones((), device=value.device))
                    value.copy_(torch.where(~keep & (value == 0), scale.to(value.dtype), value))
    return all(id(params[n]) in have or id(params[n]) not in stepped for n in masks)


def _keeps_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` makes per-parameter state at its steps (SGD without momentum makes none)."""
    return not (isinstance(optimizer, torch.optim.SGD) and all(not g.get("momentum") for g in optimizer.param_groups))


def global_sparsity(masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> float:
    """Fraction of ``False`` entries over the given masks (all of them by default)."""
    names = list(masks) if names is None else list(names)
    total = sum(masks[n].numel() for n in names)
    kept = sum(int(masks[n].sum()) for n in names)
    return 0.0 if total == 0 else 1.0 - kept / total


def keep_one_per_norm(
    masks: Mapping[str, Tensor], scores: Mapping[str, Tensor], dims: Mapping[str, int], current: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``masks`` where each weight of ``dims`` (:func:`~lightning_compress.pruning.weights.normalised_directions`) keeps at
    least one entry in every slice its norm is taken over (each slice along ``dim``, the tensor for -1): a
    ``weight_norm`` direction pruned whole there computes 0/0. The entry kept is the best-scored one that ``current``
    (the masks before this update) still keeps, so masks only shrink.

    Example:
        >>> m = keep_one_per_norm({"v": torch.tensor([[True, False], [False, False]])}, {"v": torch.tensor([[1., 2.], [3., 4.]])}, {"v": 0})
        >>> m["v"].tolist()
        [[True, False], [False, True]]
        >>> before = {"v": torch.tensor([[True, True], [True, False]])}
        >>> keep_one_per_norm({"v": torch.zeros(2, 2, dtype=torch.bool)}, {"v": torch.tensor([[1., 2.], [3., 4.]])}, {"v": 1}, before)["v"].tolist()
        [[False, True], [True, False]]
    """
    out = dict(masks)
    for name, dim in dims.items():
        mask = masks.get(name)
        if mask is None or mask.numel() == 0 or mask.dim() == 0:
            continue
        moved = mask.movedim(dim, 0) if dim >= 0 else mask.reshape(1, -1)
        rows = moved.reshape(moved.shape[0], -1)
        empty = ~rows.any(1)
        if not bool(empty.any()):
            continue
        score = scores[name].movedim(dim, 0) if dim >= 0 else scores[name].reshape(1, -1)
        score = score.reshape(rows.shape).float()
        if current is not None and name in current:  # among the entries still kept: a pruned one is never revived
            before = (current[name].movedim(dim, 0) if dim >= 0 else current[name].reshape(1, -1)).reshape(rows.shape)
            score = torch.where(before.to(score.device), score, torch.finfo(score.dtype).min)
        rows = rows.clone()
        lost = empty.nonzero().squeeze(1)
        rows[lost, score[lost].argmax(1).to(rows.device)] = True
        kept = rows.reshape(moved.shape)
        out[name] = kept.movedim(0, dim) if dim >= 0 else kept.reshape(mask.shape)
    return out
