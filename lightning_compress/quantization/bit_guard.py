"""The accuracy guard of a lowering ``weight_bits`` schedule (``QuantizeCallback(monitor=..., max_drop=...)``).

QAT may lower the weights' width over epochs (8 → 6 → 4). At each validation the guard records the
monitored metric at the current width; at the first width it keeps the best value as the baseline, and
at a lower width a fall of more than ``max_drop`` below it (as :func:`~lightning_compress.guard.evaluate_drop`
measures it, agreed across processes by :func:`~lightning_compress.guard.guard_tripped`) locks the width
at the last one that passed: the lowering stops there. With no validation at the first width, the first
validation is the baseline, and a warning says so. The callback applies the locked width; this module
only decides it, and holds what a checkpoint needs to resume that decision.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.guard import evaluate_drop, guard_tripped

__all__ = ["BitLoweringGuard", "guard_message"]


def guard_message(monitor: str, reason: str, bits: int, new_bits: int, restored: bool | str = False) -> str:
    """The warning of the accuracy guard: how ``monitor`` moved (``reason``, from
    :func:`~lightning_compress.guard.evaluate_drop`; empty when only another process saw it), at which
    width, and the width it goes on with (``new_bits``; the same width: nothing to roll back, the lowering
    stops there); ``restored``: ``True`` when the model of the last accepted validation was put back, else only
    the width was (weights sharded by FSDP2, a checkpoint without the copy), or why it could not be (text).

    Example:
        >>> guard_message("val_loss", "rose 0.5 from the baseline 1 to 1.5 (max_drop=0.1)", 2, 4, restored=True)
        'QuantizeCallback: val_loss rose 0.5 from the baseline 1 to 1.5 (max_drop=0.1) at 2-bit weights; rolling back from 2 to 4 bits and stopping the lowering, with the weights, BatchNorm statistics and activation ranges of the last accepted validation put back'
        >>> guard_message("val_acc", "", 4, 4, restored=True).split("; ")[1]
        '4 bits passed the guard at an earlier epoch, so there is no wider width to roll back to: the weights stay at 4 bits and the lowering stops, with the weights, BatchNorm statistics and activation ranges of the last accepted validation put back'
        >>> guard_message("val_acc", "fell 0.2", 2, 4).split("; ")[1]
        'rolling back from 2 to 4 bits and stopping the lowering (the weights keep what they learned at 2 bits, and only the next validation measures them at 4 bits: run trainer.validate if none is left)'
    """
    change = f"{monitor} {reason}" if reason else f"{monitor} moved more than max_drop from its baseline on another process"
    if new_bits == bits:
        action = (
            f"{bits} bits passed the guard at an earlier epoch, so there is no wider width to roll back to: the weights "
            f"stay at {bits} bits and the lowering stops"
        )
    else:
        action = f"rolling back from {bits} to {new_bits} bits and stopping the lowering"
    if restored is True:
        action += ", with the weights, BatchNorm statistics and activation ranges of the last accepted validation put back"
    elif isinstance(restored, str) and restored:
        action += f"; the weights stay as trained ({restored})"
    elif new_bits != bits:
        action += (
            f" (the weights keep what they learned at {bits} bits, and only the next validation measures them at "
            f"{new_bits} bits: run trainer.validate if none is left)"
        )
    return f"QuantizeCallback: {change} at {bits}-bit weights; {action}"


class BitLoweringGuard:
    """What the guard has seen: the baseline (``reference``, the best ``monitor`` at the first width), the last
    width that passed, the locked width (``None`` until the guard trips) and one history entry per validation.

    Example:
        >>> guard = BitLoweringGuard("val_acc", max_drop=0.05, mode="max")
        >>> guard.observe(None, epoch=0, metric=0.90, bits=8, first_bits=8), guard.observe(None, 1, 0.88, 6, 8)
        (None, None)
        >>> guard.observe(None, 2, 0.80, 4, 8), guard.locked_bits
        ('fell 0.1 from the baseline 0.9 to 0.8 (max_drop=0.05)', 6)
    """

    def __init__(self, monitor: str | None, max_drop: float | None, mode: str) -> None:
        self.monitor, self.max_drop, self.mode = monitor, max_drop, mode
        self.reference: float | None = None
        self.last_good_bits: int | None = None
        self.locked_bits: int | None = None
        self.history: list[dict[str, Any]] = []

    def observe(self, trainer: Trainer | None, epoch: int, metric: float, bits: int, first_bits: int) -> str | None:
        """Record ``metric`` measured at ``bits`` (the schedule started at ``first_bits``). Returns ``None``, or, when
        the guard trips on any process, how the metric moved (empty if only another process saw it) and sets
        :attr:`locked_bits`."""
        entry: dict[str, Any] = {"epoch": epoch, "bits": bits, self.monitor or "metric": metric}
        self.history.append(entry)
        if bits >= first_bits:
            better = max if self.mode == "max" else min
            fresh = self.reference is None or not math.isfinite(self.reference)
            self.reference = metric if fresh else better(self.reference, metric)  # type: ignore[type-var]
            self.last_good_bits = bits
            return None
        if self.max_drop is None or self.locked_bits is not None:
            return None
        if self.reference is None:  # no validation at the first width: this first one is the only reference
            self.reference, self.last_good_bits = metric, bits
            entry["baseline"] = True
            rank_zero_warn(
                f"QuantizeCallback accuracy guard: no validation ran at the schedule's first width ({first_bits} bits), so "
                f"its baseline is this first one, {self.monitor}={metric:.4g} at {bits}-bit weights: it guards against "
                f"falls from there. For a baseline at {first_bits} bits, let a validation run before the width is lowered"
            )
            return None
        tripped, _, reason = evaluate_drop(metric, self.reference, self.max_drop, self.mode)
        if not (guard_tripped(trainer, tripped) if trainer is not None else tripped):
            self.last_good_bits = bits
            return None
        self.locked_bits = self.last_good_bits if self.last_good_bits is not None else first_bits
        entry["rolled_back_to"] = self.locked_bits
        return reason

    def state(self) -> dict[str, Any]:
        """The checkpointed part (keys of the callback's state)."""
        return {"locked_bits": self.locked_bits, "reference": self.reference, "last_good_bits": self.last_good_bits,
                "history": list(self.history)}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        self.locked_bits = state.get("locked_bits")
        self.reference = state.get("reference")
        self.last_good_bits = state.get("last_good_bits")
        self.history = list(state.get("history", []))
