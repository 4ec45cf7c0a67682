"""How a pruning run continues from a checkpoint: its masks, level and record restored, the criterion's state
with them, and the schedule its first fit planned kept when a default ``end_epoch`` would move with another
``max_epochs``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.pruning.options import PruningOptions
from lightning_compress.pruning.state import PruningState

__all__ = ["restore_run", "replan_to_checkpoint_end"]


def restore_run(run: PruningState, state: Mapping[str, Any], fitting: bool, options: PruningOptions) -> None:
    """Load a checkpoint's ``state`` into ``run`` (and its criterion's). A fit resumed from it continues the run,
    even one written as the previous fit ended (an early stop's last.ckpt): its masks hold again, or the pruned
    weights would grow back; an evaluation (``trainer.test(ckpt_path=...)``) leaves a finished run finished, so a
    later fit trains freely as it would have. A checkpoint of another target says so."""
    finished = run.finished
    run.load_state_dict(state)
    run.finished = finished and not fitting
    if run.shrunk is not None:  # the parameters were replaced: nothing left for the criterion to collect
        options.criterion.teardown()
    else:
        options.criterion.load_state_dict(state.get("criterion", {}))
    if run.retargeted:
        former, reached, target = run.retargeted
        then = (
            "but its accuracy guard had stopped the run, which stays where it is" if run.frozen
            else f"and its schedule goes on toward {run.overall_target(1.0):.2%} (weights pruned further than "
            "their new target stay pruned)"
        )
        rank_zero_warn(
            f"PruningCallback: the checkpoint's run pruned toward {former:.2%} and reached {reached:.2%}; this "
            f"callback's target is {target:.2%}, {then}"
        )


def replan_to_checkpoint_end(
    options: PruningOptions, planned: float | None, end: float | None, max_epochs: int | None
) -> tuple[Callable[[float], float], float, float | None] | None:
    """The schedule (progress, end, removal epoch) of a resumed fit whose run was planned to end at ``planned``: a
    default ``end_epoch`` (75% of the epochs after ``start_epoch``) moves with a changed ``max_epochs``, and the run
    would skip updates and follow another curve. ``None``: keep ``end`` (it is the same, ``end_epoch`` was set, or
    this fit is too short for the planned end, which a warning says)."""
    if planned is None or options.end_epoch is not None or end is None or abs(planned - end) < 1e-9:
        return None
    try:
        plan = replace(options, end_epoch=planned).plan(max_epochs)
    except ValueError:  # a shorter fit than the one planned: its own default end, as before
        rank_zero_warn(
            f"PruningCallback: the checkpoint's run reaches its target at epoch {planned:g} (the default end_epoch "
            f"of its first fit), after this fit's max_epochs={max_epochs}: the schedule is planned again for "
            f"this fit and ends at epoch {end:g}. Set end_epoch to choose another."
        )
        return None
    rank_zero_warn(
        f"PruningCallback: the checkpoint's run reaches its target at epoch {planned:g} (the default end_epoch of "
        f"its first fit); this fit's max_epochs would put it elsewhere, but the run keeps its schedule. Set "
        "end_epoch to choose another."
    )
    return plan
