"""Channel keep-vectors: which output channels of each coupled group survive, and the masks they imply.

A *group* (:class:`ChannelGroupSpec`) is the layers whose output channels are pruned together with the
biases, BatchNorms and input columns that follow them; a *keep-vector* is a ``torch.bool`` tensor over
its channels, ``True`` where the channel survives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_compress.pruning.threshold import _kth_prune

__all__ = ["ChannelGroupSpec", "channel_masks", "check_channel_targets", "coarse_targets_note", "expand_channel_mask", "spread_channels"]

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
    return [_kth_prune(s, n - _kept(n, k, round_to)) for s, n, k in zip(s_list, sizes, prune_counts)]


def _kept(size: int, pruned: int, round_to: int | None) -> int:
    """The channels of ``size`` a group keeps when ``pruned`` are asked for: at least one, rounded up to ``round_to``."""
    keep = max(1, size - pruned)
    return min(size, int(math.ceil(keep / round_to) * round_to)) if round_to else keep


def check_channel_targets(
    groups: Sequence[ChannelGroupSpec], targets: Sequence[float], scope: str, unit: str = "channels", round_to: int | None = None
) -> None:
    """Refuse targets that :func:`channel_masks` could reach only by removing a group's last channel (it keeps
    one, so the run would end below its target without a word).

    Raises:
        ValueError: naming the group, its size and the most that can be reached.

    Example:
        >>> g = ChannelGroupSpec(["conv"], 4)
        >>> check_channel_targets([g], [0.75], "layer")
        >>> check_channel_targets([g], [0.9], "layer")
        Traceback (most recent call last):
        ...
        ValueError: a target of 0.9 removes round(0.9 x 4) = 4 of the 4 channels of 'conv', but a layer keeps at least one: at most 0.75 is reachable there. Lower the target, exclude 'conv', or use scope='global'
        >>> check_channel_targets([ChannelGroupSpec(["conv"], 16)], [0.97], "layer", round_to=8)
        Traceback (most recent call last):
        ...
        ValueError: a target of 0.97 removes round(0.97 x 16) = 16 of the 16 channels of 'conv', but a layer keeps at least 8 (round_to): at most 0.5 is reachable there. Lower the target, exclude 'conv', or use scope='global'
    """
    sizes = [g.size for g in groups]
    if scope == "layer":
        for g, t in zip(groups, targets):
            if g.size and int(round(t * g.size)) >= g.size:
                least = min(g.size, round_to or 1)  # kept: at least one, rounded up to round_to
                raise ValueError(
                    f"a target of {t:g} removes round({t:g} x {g.size}) = {int(round(t * g.size))} of the {g.size} {unit} of "
                    f"{g.members[0]!r}, but a layer keeps at least {'one' if least == 1 else f'{least} (round_to)'}: at most "
                    f"{(g.size - least) / g.size:.4g} is reachable there. Lower the target, exclude {g.members[0]!r}, or use "
                    "scope='global'"
                )
        return
    budget, room = int(round(sum(t * n for t, n in zip(targets, sizes)))), sum(sizes) - len(groups)
    if budget > room:
        raise ValueError(
            f"a target of {max(targets):g} removes {budget} of the {sum(sizes)} {unit} of the {len(groups)} pruned layers, "
            f"but each keeps at least one: at most {room / max(1, sum(sizes)):.4g} is reachable. Lower the target"
        )


def coarse_targets_note(
    groups: Sequence[ChannelGroupSpec], targets: Sequence[float], scope: str, unit: str = "channels",
    round_to: int | None = None, tolerance: float = 0.05,
) -> str | None:
    """A warning for the layers whose whole channels (or heads: a grouped-query layer holds few) make a
    layer-scope target end more than ``tolerance`` away from it, or ``None``.

    >>> print(coarse_targets_note([ChannelGroupSpec(["attn.q_proj"], 2)], [0.25], "layer", "units"))
    PruningCallback: whole units cannot reach the target in 1 layer(s): 'attn.q_proj' has 2, so a target of 0.25 removes 0 of them (0%). Use a target those counts divide (scope='layer'), or scope='global'
    """
    if scope != "layer":
        return None
    far = [(g, t, g.size - _kept(g.size, int(round(t * g.size)), round_to)) for g, t in zip(groups, targets) if g.size]
    far = [(g, t, k) for g, t, k in far if abs(k / g.size - t) > tolerance]
    if not far:
        return None
    said = "; ".join(f"{g.members[0]!r} has {g.size}, so a target of {t:g} removes {k} of them ({k / g.size:.0%})" for g, t, k in far[:3])
    more = "; ..." if len(far) > 3 else ""
    by = f" kept in multiples of round_to={round_to}," if round_to else ""
    return (
        f"PruningCallback: whole {unit}{by} cannot reach the target in {len(far)} layer(s): {said}{more}. Use a target "
        "those counts divide (scope='layer'), or scope='global'"
    )


def expand_channel_mask(keep: Tensor, shape: torch.Size | Sequence[int], dim: int = 0) -> Tensor:
    """Broadcast a keep-vector over channels to a full bool mask of ``shape`` along ``dim``."""
    view = [1] * len(shape)
    view[dim] = -1
    return keep.view(view).expand(*shape).clone()
