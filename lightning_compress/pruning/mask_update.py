"""One mask update of a pruning run, without a Trainer: score, select, mask, count.

:class:`~lightning_compress.PruningCallback` calls :func:`update_masks` at each step of its schedule with the
optimizers it has and a function that makes every process agree on the masks (rank 0's under DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_compress.guard import check_finite
from lightning_compress.pruning.channel_masks import channel_masks
from lightning_compress.pruning.masks import keep_one_per_norm, nm_masks, unstructured_masks, zero_optimizer_state
from lightning_compress.pruning.options import PruningOptions
from lightning_compress.pruning.state import PruningState
from lightning_compress.selection import preview

__all__ = ["ZERO_PRESERVING", "keeps_zeros", "newly_collapsed", "selection_scores", "update_masks"]

#: Optimizers whose update of an entry with zero weight, zero gradient and zero state is exactly zero
#: (momentum, Adam moments, RMS averages and weight decay all multiply zeros). With these, pruned weights
#: stay exactly zero once their gradients are masked, so re-masking the weights after each step is a no-op.
#: Exact types only: a subclass may change ``step``.
ZERO_PRESERVING = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def keeps_zeros(optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether every optimizer leaves an entry with zero weight, gradient and first moment (momentum) exactly zero,
    whatever its second moment."""
    return all(type(opt) in ZERO_PRESERVING for opt in optimizers)


def selection_scores(run: PruningState, options: PruningOptions, where: str) -> dict[str, Tensor]:
    """The criterion's scores of the weights this process holds; with ``on_nonfinite="warn"`` a non-finite
    weight scores lowest (it is the first to go), with ``"error"`` it raises, naming the layer and ``where``."""
    held = run.local_params()  # this process's rows of sharded weights
    bad = check_finite(run.params.items(), where, options.on_nonfinite)  # sharded: over every process's rows
    scores = options.criterion.element_scores(held)
    unscored = getattr(options.criterion, "unscored", [])
    if unscored and options.scope == "global":
        rank_zero_warn(
            f"PruningCallback: criterion {options.criterion.name!r} ranks {preview(unscored)} by |w|: no optimizer step "
            "since the last update had a gradient for them (frozen, or not used by the loss), and |w| is not on the "
            "scale of the other weights' |w·grad|, so scope='global' prunes one group far more than the other; "
            "exclude them, or use scope='layer' or criterion='magnitude'"
        )
    for n in bad:
        scores[n] = torch.where(held[n].isfinite(), scores[n], torch.finfo(scores[n].dtype).min)
    return scores


def update_masks(
    run: PruningState,
    options: PruningOptions,
    level: float,
    optimizers: Sequence[torch.optim.Optimizer],
    share: Callable[[Any], Any],
    where: str,
) -> dict[str, int]:
    """Mask ``run``'s weights to ``level`` (0..1) of their targets, zero the pruned entries and their optimizer
    state, rewind the survivors when a rewind copy exists, and return the zeros of every weight.

    ``share`` takes the masks (or the channel keeps) this process made and returns those every process uses.
    """
    if options.kind == "unstructured":
        targets = {n: level * run.targets[n] for n in run.names}
        scores = selection_scores(run, options, where)
        masks = unstructured_masks(scores, targets, options.scope, run.masks, run.input_major, run.shards)
        run.masks = share(keep_one_per_norm(masks, scores, run.normalised, run.masks) if run.normalised else masks)
    elif options.kind == "nm":
        n, m = options.nm  # type: ignore[misc]
        scores = selection_scores(run, options, where)
        levels = dict.fromkeys(run.names, level)
        run.masks = share(nm_masks(scores, n, m, levels, options.scope, run.masks, run.input_major, run.shards))
    else:
        check_finite(run.masked_params().items(), where, options.on_nonfinite)
        group_scores = options.criterion.channel_scores(run.params, run.groups)
        targets = [level * max(run.targets[f"{m}.weight"] for m in g.members) for g in run.groups]
        run.set_channel_keep(share(channel_masks(group_scores, targets, options.scope, run.keep, options.round_to)))
    run.apply()
    run.moments_pending = not zero_optimizer_state(optimizers, run.masked_params(), run.all_masks())
    run.rewind_weights(optimizers)
    options.criterion.reset()
    run.level = level
    run.updates += 1
    return run.layer_zeros()


def newly_collapsed(run: PruningState, zeros: dict[str, int], already: set[str]) -> list[str]:
    """Weights pruned whole by this update and not in ``already``: their layers now output a constant."""
    return [n for n in run.names if n not in already and zeros.get(n, 0) == run.params[n].numel() > 0]
