"""The loss watchdog (a non-finite distillation loss stops the run, a runaway one warns once) and the
training loss terms' epoch-mean logging of :class:`~lightning_compress.DistillationModule`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_compress.sharding import data_parallel_group

__all__ = ["WATCHED_TERMS", "LossWatch", "TrainingLogMixin", "blowup_advice"]

#: The loss terms the watchdog follows besides the loss (those a distillation step may have).
WATCHED_TERMS = ("distill_loss", "ce_loss", "feature_loss")

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

    _Base = LightningModule
else:
    _Base = object


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
    """Running averages of the training loss's terms, and when they say something is wrong.

    :meth:`update` returns ``"nonfinite"`` for a NaN/inf loss, ``"diverging"`` once (the first time the loss's
    running average and that of one of its terms, after 20 steps, exceed ``factor`` times their lowest values), else
    ``None``. Both must rise: a scheduled ``alpha`` moves the weighted sum between terms of different sizes with no
    term rising, and a small term can rise tenfold without moving the loss. ``factor=None`` disables the
    divergence check.

    Example:
        >>> watch = LossWatch(factor=10.0)
        >>> [watch.update(1.0) for _ in range(20)][-1], watch.update(float("nan"))
        (None, 'nonfinite')
        >>> [watch.update(1.0, {"distill_loss": 0.01, "ce_loss": 5.0}) for _ in range(30)][-1]  # alpha 1 -> 0.5: the sum rose
        >>> [watch.update(1.0, {"distill_loss": 1.0, "ce_loss": 5.0}) for _ in range(50)][-1]  # a small term alone rose
        >>> next(v for v in (watch.update(100.0, {"distill_loss": 100.0, "ce_loss": 5.0}) for _ in range(50)) if v), watch.term
        ('diverging', 'distill_loss')
    """

    factor: float | None = 10.0
    emas: dict[str, float] = field(default_factory=dict)
    lowest: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    warned: bool = False
    term: str | None = None  # the term that diverged

    def update(self, value: float, terms: Mapping[str, float] | None = None) -> str | None:
        if not math.isfinite(value):
            return "nonfinite"
        if self.factor is None or self.warned:
            return None
        risen = [name for name, v in {"loss": value, **(terms or {})}.items() if math.isfinite(v) and self._rose(name, v)]
        # the loss and one of its terms: a small term's rise moves no loss, and a schedule's move between terms none
        term = next((n for n in risen if n != "loss"), None) if terms else "loss"
        if "loss" in risen and term is not None:
            self.warned, self.term = True, term
            return "diverging"
        return None

    def _rose(self, name: str, v: float) -> bool:
        """Update ``name``'s running average with ``v``; whether it is above ``factor`` times its lowest (after 20 steps)."""
        n = self.steps[name] = self.steps.get(name, 0) + 1
        ema = self.emas[name] = v if name not in self.emas else 0.9 * self.emas[name] + 0.1 * v
        if n < 20:
            return False
        low = self.lowest[name] = min(self.lowest.get(name, ema), ema)
        return low > 0 and ema > self.factor * low  # type: ignore[operator]

    def alarm(self, verdict: str, value: float, step: int, advice: str) -> None:
        """Act on a verdict of :meth:`update`: raise ``FloatingPointError`` (non-finite) or warn once (diverging)."""
        if verdict == "nonfinite":
            raise FloatingPointError(f"the distillation training loss became {value} at step {step}. {advice}")
        term = self.term or "loss"
        rank_zero_warn(
            f"the distillation training loss is blowing up: the running average of its {term} rose from "
            f"{self.lowest[term]:.4g} to {self.emas[term]:.4g} (more than divergence_factor={self.factor:g} times). {advice}",
            category=RuntimeWarning,
        )


class TrainingLogMixin(_Base):
    """Epoch means of the loss terms and the loss watchdog, mixed into :class:`~lightning_compress.DistillationModule`."""

    _epoch_sums: dict[str, Tensor | float]
    _epoch_counts: dict[str, int]

    def _log_epoch_means(
        self, parts: dict[str, Tensor | float], batch_size: int, batch_idx: int, weights: dict[str, int] | None = None
    ) -> None:
        """The loss terms and schedule values as epoch means, summed here and logged once, at the epoch's
        last batch: one ``self.log`` per step instead of five (Lightning's logging is most of a cached
        distillation step's overhead). An epoch that ends before its last batch (``max_steps``, a stop
        request) logs them in ``on_train_epoch_end`` (:meth:`_log_unlogged_epoch_means`). With an epoch of
        unknown length they are logged every step. ``batch_size`` is the weight of the batch (0: left out);
        ``weights`` gives a term its own (the labelled samples a cross-entropy counts): each term's mean is
        over the batches that have it, so a batch without labels does not dilute the task loss."""
        weights = {k: (batch_size if weights is None else weights.get(k, batch_size)) for k in parts}
        n = getattr(self._trainer, "num_training_batches", None) if self._trainer is not None else None
        if not isinstance(n, int) or n <= 0 or n == float("inf"):
            for key, value in parts.items():
                if weights[key] > 0:
                    self.log(key, value, on_step=False, on_epoch=True, batch_size=weights[key], sync_dist=True)
            return
        if batch_idx == 0 or not self._epoch_sums:
            self._epoch_sums, self._epoch_counts = {}, {}
        for key, value in parts.items():
            if weights[key] <= 0:
                continue
            value = value.detach() if isinstance(value, Tensor) else value
            self._epoch_sums[key] = self._epoch_sums.get(key, 0.0) + value * weights[key]
            self._epoch_counts[key] = self._epoch_counts.get(key, 0) + weights[key]
        if batch_idx + 1 == n:
            self._log_unlogged_epoch_means()

    def _log_unlogged_epoch_means(self) -> None:
        """Log the means summed since the last time they were logged, if any (then forget them)."""
        if self._epoch_sums:
            means = {k: v / self._epoch_counts[k] for k, v in self._epoch_sums.items()}
            self.log_dict(means, on_step=False, on_epoch=True, batch_size=max(self._epoch_counts.values()), sync_dist=True)
        self._epoch_sums, self._epoch_counts = {}, {}

    def _watch_loss(self, loss: Tensor, temperature: float, parts: Mapping[str, Tensor | float], weight: int) -> None:
        """Watch this step's loss and its terms (``weight``: the positions it counts; 0 leaves the step out). With
        several processes, each watches the means over those whose batch has a term: every process then
        decides the same at the same step (a NaN on one alone stopped that one, and the others failed in the next
        gradient all-reduce with "Connection closed by peer")."""
        trainer = getattr(self, "_trainer", None)
        processes = data_parallel_group(trainer) if trainer is not None else None
        if weight <= 0 and processes is None:
            return
        named = {"loss": loss, **{k: parts.get(k) for k in WATCHED_TERMS}}
        held = {k: isinstance(v, Tensor) and weight > 0 for k, v in named.items()}
        sums = torch.stack([v.detach().float().reshape(()) if held[k] else loss.new_zeros((), dtype=torch.float32)
                            for k, v in named.items()])  # fmt: skip
        counts = torch.tensor([float(h) for h in held.values()], device=sums.device)
        both = torch.cat([sums, counts])
        if processes is not None:
            both = processes.sum(both)  # one all-reduce (the strategy's reduce adds a barrier)
        totals = both.tolist()  # one read from the device for the loss and its terms
        n = len(named)
        means = {k: totals[i] / totals[n + i] for i, k in enumerate(named) if totals[n + i] > 0}
        if "loss" not in means:  # no process counted a position in this step
            return
        value = means.pop("loss")
        verdict = self.loss_watch.update(value, means or None)  # type: ignore[attr-defined]
        if verdict is not None:
            lr = trainer.optimizers[0].param_groups[0].get("lr") if trainer is not None and trainer.optimizers else None
            advice = blowup_advice(self.distill_loss_name, temperature, lr)  # type: ignore[attr-defined]
            self.loss_watch.alarm(verdict, value, self.global_step, advice)  # type: ignore[attr-defined]
