"""Pruning's accuracy guard: judge each validation of a fit against the run's baseline, and restore the last good
masks and weights when ``monitor`` falls more than ``max_drop``.

The baseline is the last validation before pruning began (:class:`~lightning_compress.pruning.state.PruningState`
keeps it with the last good masks and weights); the decision is the shared core's
(:func:`~lightning_compress.guard.evaluate_drop`, taken together by every process).
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.guard import checkpoint_score_note, evaluate_drop, guard_tripped, read_monitor
from lightning_compress.guard_snapshot import state_buffers
from lightning_compress.pruning.state import PruningState

__all__ = ["judge_validation"]


def judge_validation(
    trainer: Trainer, pl_module: LightningModule, run: PruningState, monitor: str, max_drop: float, mode: str
) -> bool:
    """Judge this validation's ``monitor`` for ``run``: keep it as the baseline while the model is dense (or when no
    baseline was taken before pruning began, with a warning), keep the masks and weights as good while within
    ``max_drop``, else restore the last good ones, freeze the run and warn. Returns whether it restored."""
    value = read_monitor(trainer, monitor, "PruningCallback")
    if run.frozen:
        return False  # tripped: the restored state and the baseline it was judged by stand
    dense = run.level == 0.0 and not run.has_pruned()
    if dense or run.baseline is None:
        run.baseline = value
        run.save_good(state_buffers(pl_module))
        if not dense:
            # pruning began before any validation of the run (start_epoch=0 with a one-shot or per-step schedule, or
            # validation less often than the updates): this first validation is the only reference there is
            rank_zero_warn(
                f"PruningCallback accuracy guard: no validation ran before pruning began, so its baseline is this first "
                f"one, {monitor}={value:.4g} at sparsity {run.sparsity:.2%}: it guards against falls from there, not "
                "from the dense model. For a dense baseline, let a validation run first (start_epoch >= 1, validating "
                "every epoch)"
            )
        return False
    baseline = run.baseline
    tripped, _, reason = evaluate_drop(value, baseline, max_drop, mode)
    if not guard_tripped(trainer, tripped):
        run.save_good(state_buffers(pl_module))
        return False
    run.restore_good(trainer.optimizers, state_buffers(pl_module))
    run.guard_events.append({
        "epoch": int(trainer.current_epoch), "step": int(trainer.global_step), "monitor": monitor,
        "value": value, "baseline": baseline, "max_drop": max_drop, "restored_sparsity": run.sparsity,
    })
    run.frozen = True
    rank_zero_warn(
        f"PruningCallback accuracy guard: {monitor}={value:.4g} {reason or 'moved past max_drop on another process'}; "
        f"restored the last good masks and weights (sparsity {run.sparsity:.2%}) and stopped raising sparsity"
        f"{checkpoint_score_note(trainer) or '.'}"
    )
    return True
