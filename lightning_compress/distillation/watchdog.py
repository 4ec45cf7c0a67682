"""The loss watchdog: a non-finite distillation loss stops the run, a runaway one warns once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["LossWatch", "blowup_advice"]


def blowup_advice(loss_name: str, temperature: float, lr: float | None) -> str:
    """What to change when the distillation loss blows up (the T² scaling of the KL term is the usual cause).

    Example:
        >>> blowup_advice("kl", 20.0, 0.05)[:60]
        "The 'kl' term at T=20 is scaled by T^2 = 400; the learning r"
    """
    return (
        f"The {loss_name!r} term at T={temperature:g}"
        + (f" is scaled by T^2 = {temperature**2:g}" if loss_name == "kl" else "")
        + (f"; the learning rate is {lr:g}" if lr is not None else "")
        + ". Lower the learning rate (e.g. divide it by T for T >> 1), lower T, or set Trainer(gradient_clip_val=...)."
    )


@dataclass
class LossWatch:
    """Running average of the training loss, and when it says something is wrong.

    :meth:`update` returns ``"nonfinite"`` for a NaN/inf loss, ``"diverging"`` once (the first time
    the running average, after 20 steps, exceeds ``factor`` times its lowest value), else ``None``.
    ``factor=None`` disables the divergence check.

    Example:
        >>> watch = LossWatch(factor=10.0)
        >>> [watch.update(1.0) for _ in range(20)][-1], watch.update(float("nan"))
        (None, 'nonfinite')
        >>> next(v for v in (watch.update(1000.0) for _ in range(50)) if v)
        'diverging'
    """

    factor: float | None = 10.0
    ema: float | None = None
    lowest: float | None = None
    steps: int = 0
    warned: bool = False

    def update(self, value: float) -> str | None:
        if not math.isfinite(value):
            return "nonfinite"
        if self.factor is None or self.warned:
            return None
        self.steps += 1
        self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        if self.steps < 20:
            return None
        self.lowest = self.ema if self.lowest is None else min(self.lowest, self.ema)
        if self.lowest > 0 and self.ema > self.factor * self.lowest:
            self.warned = True
            return "diverging"
        return None

    def alarm(self, verdict: str, value: float, step: int, advice: str) -> None:
        """Act on a verdict of :meth:`update`: raise ``FloatingPointError`` (non-finite) or warn once (diverging)."""
        if verdict == "nonfinite":
            raise FloatingPointError(f"the distillation training loss became {value} at step {step}. {advice}")
        rank_zero_warn(
            f"the distillation training loss is blowing up: its running average rose from {self.lowest:.4g} "
            f"to {self.ema:.4g} (more than divergence_factor={self.factor:g} times). {advice}",
            category=RuntimeWarning,
        )
