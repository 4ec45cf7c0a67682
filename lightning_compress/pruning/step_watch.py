"""What a fit's training steps show about the pruned weights that ``setup`` cannot see.

:class:`StepWatch` follows the first training epoch of a fit: which pruned weights no optimizer step computes a
gradient for (a branch the data never takes, a head only validation runs), and whether Lightning saw any optimizer
step at all (a module in manual optimisation stepping an optimizer Lightning does not wrap leaves
``trainer.global_step`` where it was). :func:`unwrapped_optimizer_warning` says what the second means.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lightning_compress.selection import preview

__all__ = ["StepWatch", "unwrapped_optimizer_warning"]


class StepWatch:
    """The first training epoch's optimizer steps over the pruned weights ``params`` (``{name: parameter}``)."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self._sizes = {n: p.numel() for n, p in params.items()}
        #: Trainable pruned weights no optimizer step has had a gradient for yet.
        self._unreached = {n for n, p in params.items() if p.requires_grad}
        self.stepped = False  # Lightning ran an optimizer step

    def before_optimizer_step(self, params: Mapping[str, Tensor]) -> None:
        """An optimizer step is about to run: the weights with a gradient are the ones its steps used."""
        self.stepped = True
        if self._unreached:
            self._unreached = {n for n in self._unreached if params[n].grad is None}

    def unreached_note(self) -> str | None:
        """The pruned weights no step of the epoch computed a gradient for, when Lightning saw its steps."""
        if not self._unreached or not self.stepped:
            return None
        names = sorted(self._unreached)
        share = sum(self._sizes[n] for n in names) / max(sum(self._sizes.values()), 1)
        return (
            f"PruningCallback: no optimizer step of the first training epoch computed a gradient for {len(names)} of the "
            f"pruned weights ({preview(names, 5)}; {share:.1%} of the selected entries): the training steps do not use them, or "
            "their gradients are lost (torch.utils.checkpoint(use_reentrant=True) over inputs that need no gradient "
            "gives the weights inside none; use use_reentrant=False). They are pruned and counted toward "
            "target_sparsity like the rest, and with scope='global' they take part of the budget of the weights in "
            "use; exclude them (exclude=[...]) if the model does not run them."
        )


def unwrapped_optimizer_warning(what: str) -> str:
    """Pruned weights changed, or a training epoch passed, without an optimizer step Lightning saw (``what``)."""
    return (
        f"PruningCallback: {what} without an optimizer step Lightning saw (trainer.global_step did not advance): the "
        "module steps an optimizer Lightning does not wrap (self.optimizers(use_pl_optimizer=False), or one it built "
        "itself). The masks are now applied after every training batch, and a schedule counted in steps "
        "(update_every_n_steps) does not advance; step the optimizers self.optimizers() returns."
    )
