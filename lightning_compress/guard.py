"""The accuracy guard shared by the plugins: how far a monitored metric may fall, decided on all ranks.

The shape is that of Lightning's ``EarlyStopping``: options checked once (:class:`GuardOptions`), a
pure decision (:func:`evaluate_drop`) that tests call directly, and a decision shared across
processes (:func:`guard_tripped`), so every rank restores or rolls back together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.sharding import ShardGroup, is_sharded, local

__all__ = ["MODES", "NONFINITE_ACTIONS", "GuardOptions", "check_finite", "evaluate_drop", "guard_tripped", "read_monitor"]

MODES = ("max", "min")

#: What a plugin does on a NaN or infinite weight or range: stop with an error, or warn and go on.
NONFINITE_ACTIONS = ("error", "warn")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class GuardOptions:
    """``monitor``, ``max_drop`` and ``mode``, checked together.

    Args:
        monitor: The logged metric to watch (``"val_acc"``), or ``None`` for no guard.
        max_drop: Largest allowed fall below the baseline, in the metric's units (finite, >= 0).
        mode: ``"max"`` when higher is better (accuracy), ``"min"`` for losses.

    Example:
        >>> GuardOptions("val_acc", 0.01).enabled
        True
        >>> GuardOptions("val_acc", float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: max_drop must be a finite number >= 0, got nan
    """

    monitor: str | None = None
    max_drop: float | None = None
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {list(MODES)}")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(f"monitor must be the name of a logged metric (e.g. 'val_acc'), got {self.monitor!r}")
        if self.max_drop is not None and self.monitor is None:
            raise ValueError(f"max_drop={self.max_drop!r} needs a monitor (e.g. monitor='val_acc')")
        if self.monitor is not None and self.max_drop is None:
            raise ValueError(f"monitor={self.monitor!r} needs max_drop (the largest allowed fall, e.g. 0.01)")
        if self.max_drop is not None and (
            not _is_number(self.max_drop) or not math.isfinite(self.max_drop) or self.max_drop < 0
        ):
            raise ValueError(f"max_drop must be a finite number >= 0, got {self.max_drop!r}")

    @property
    def enabled(self) -> bool:
        return self.monitor is not None


def evaluate_drop(value: float, baseline: float, max_drop: float, mode: str) -> tuple[bool, float, str]:
    """``(tripped, drop, reason)``: whether ``value`` fell more than ``max_drop`` below ``baseline``.

    ``drop`` is positive when ``value`` is worse. A non-finite ``value`` always trips (a NaN
    accuracy is never "within tolerance").

    Example:
        >>> tripped, drop, _ = evaluate_drop(0.90, 0.95, 0.01, "max")
        >>> tripped, round(drop, 3)
        (True, 0.05)
        >>> evaluate_drop(0.30, 0.31, 0.05, "min")[0]
        False
        >>> evaluate_drop(float("nan"), 0.95, 0.01, "max")[0]
        True
    """
    if not math.isfinite(value):
        return True, math.inf, f"the metric is {value}"
    drop = (baseline - value) if mode == "max" else (value - baseline)
    if drop > max_drop + 1e-12:
        return True, drop, f"fell {drop:.4g} from the baseline {baseline:.4g} (max_drop={max_drop:g})"
    return False, drop, ""


def read_monitor(trainer: Trainer, monitor: str, who: str) -> float:
    """The current value of ``monitor``, or a ``ValueError`` naming ``who`` and the logged keys."""
    metrics = trainer.callback_metrics
    if monitor not in metrics:
        raise ValueError(
            f"{who}(monitor={monitor!r}): that metric was never logged; logged keys: {sorted(metrics)}. "
            "Log it in validation_step, or pick one of these."
        )
    return float(metrics[monitor])


def guard_tripped(trainer: Trainer, tripped: bool) -> bool:
    """The decision of all processes: tripped anywhere means tripped everywhere (rank metrics may differ)."""
    if trainer.world_size <= 1:
        return bool(tripped)
    return bool(trainer.strategy.reduce_boolean_decision(bool(tripped), all=False))


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str, action: str = "error") -> list[str]:
    """The names whose tensor holds a NaN or an infinity; an error (or, with ``action="warn"``, a
    warning) naming them and ``where`` (the plugin and the step) when there is any.

    One fused reduction per tensor (``isfinite().all()``), one host sync for all of them.

    Example:
        >>> check_finite([("fc.weight", torch.ones(2)), ("fc.bias", torch.zeros(2))], "pruning at step 0")
        []
        >>> check_finite([("fc.weight", torch.tensor([1.0, float("nan")]))], "pruning at step 3")
        Traceback (most recent call last):
        ...
        ValueError: pruning at step 3: non-finite values (NaN or inf) in ['fc.weight']. The model has diverged or was loaded with bad values; lower the learning rate or check the data. on_nonfinite='warn' goes on with a warning instead.
    """
    items = [(name, t) for name, t in tensors if t.is_floating_point()]
    if not items:
        return []
    device = local(items[0][1]).device
    flags = torch.stack([local(t).detach().isfinite().all().to(device) for _, t in items])
    sharded = [t for _, t in items if is_sharded(t)]
    if sharded:  # every process holds some rows: a weight is finite where all of its rows are
        flags = ShardGroup(sharded[0].device_mesh.get_group(), device).min(flags.to(torch.int64))
    flags = flags.cpu()
    bad = [name for (name, _), ok in zip(items, flags.tolist()) if not ok]
    if bad:
        message = (
            f"{where}: non-finite values (NaN or inf) in {bad[:10]}{' ...' if len(bad) > 10 else ''}. The model has "
            "diverged or was loaded with bad values; lower the learning rate or check the data. "
            "on_nonfinite='warn' goes on with a warning instead."
        )
        if action == "error":
            raise ValueError(message)
        rank_zero_warn(message)
    return bad
