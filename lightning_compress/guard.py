"""The accuracy guard shared by the plugins: how far a monitored metric may fall, decided on all ranks.

The shape is that of Lightning's ``EarlyStopping``: options checked once (:class:`GuardOptions`), a
pure decision (:func:`evaluate_drop`) that tests call directly, and a decision shared across
processes (:func:`guard_tripped`), so every rank restores or rolls back together.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.schedules import max_steps_end
from lightning_compress.sharding import ShardGroup, is_sharded, local, wraps_tensors

__all__ = [
    "MODES",
    "NONFINITE_ACTIONS",
    "GuardOptions",
    "check_finite",
    "evaluate_drop",
    "guard_tripped",
    "never_logged",
    "read_monitor",
    "unvalidated_change",
    "validation_skipped",
    "warn_if_change_unvalidated",
    "warn_if_guard_cannot_run",
]

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
    """``(tripped, drop, reason)``: whether ``value`` is more than ``max_drop`` worse than ``baseline``
    (below it with ``mode="max"``, above it with ``"min"``); ``reason`` says how it moved.

    ``drop`` is positive when ``value`` is worse. A non-finite ``value`` always trips (a NaN
    accuracy is never "within tolerance").

    Example:
        >>> tripped, drop, _ = evaluate_drop(0.90, 0.95, 0.01, "max")
        >>> tripped, round(drop, 3)
        (True, 0.05)
        >>> evaluate_drop(0.30, 0.31, 0.05, "min")[0]
        False
        >>> evaluate_drop(0.50, 0.31, 0.05, "min")[2]
        'rose 0.19 from the baseline 0.31 to 0.5 (max_drop=0.05)'
        >>> evaluate_drop(float("nan"), 0.95, 0.01, "max")[0]
        True
    """
    if not math.isfinite(value):
        return True, math.inf, f"the metric is {value}"
    drop = (baseline - value) if mode == "max" else (value - baseline)
    if drop > max_drop + 1e-12:
        moved = "fell" if mode == "max" else "rose"  # an accuracy falls, a loss rises
        return True, drop, f"{moved} {drop:.4g} from the baseline {baseline:.4g} to {value:.4g} (max_drop={max_drop:g})"
    return False, drop, ""


def never_logged(
    who: str,
    option: str,
    value: Any,
    logged: Iterable[str],
    missing: Iterable[str] | None = None,
    log_in: str = "validation_step",
) -> str:
    """The message for metric names that were never logged: ``who``, its ``option=value``, the names
    (``missing``; default: ``value`` is the one name), the keys that were logged and where to log it.

    Example:
        >>> never_logged("CompressionReport", "metrics", ["val_ac"], ["val_acc", "train_loss"], ["val_ac"])
        "CompressionReport(metrics=['val_ac']): 'val_ac' was never logged; logged keys: ['train_loss', 'val_acc']. Log it in validation_step, or pick one of these."
    """
    names = None if missing is None else list(missing)
    if names is None:
        subject = "that metric was"
    else:
        subject = f"{', '.join(repr(n) for n in names)} {'was' if len(names) == 1 else 'were'}"
    return (
        f"{who}({option}={value!r}): {subject} never logged; logged keys: {sorted(logged)}. "
        f"Log it in {log_in}, or pick one of these."
    )


def check_monitor_logged(trainer: Trainer, monitor: str | None, who: str, validations_before: int) -> None:
    """At the end of each validation in fit (``validations_before``: the validations of this fit that ended before
    it, the sanity check not counted): a ``monitor`` that is not among the logged metrics is an error from the
    second validation on, and already at the sanity check or the first validation when a logged key of the same
    prefix is close to it (``val_accuracy`` for ``val_acc``: a misspelt name, told before any training). Another
    name may be a metric training logs once per epoch (``train_loss``), which the first validation precedes."""
    if monitor is None or trainer.state.fn != "fit" or monitor in trainer.callback_metrics:
        return
    logged = list(trainer.callback_metrics)
    message = never_logged(who, "monitor", monitor, logged)
    if not trainer.sanity_checking and validations_before > 0:
        raise ValueError(message)

    def prefix(name: str) -> str:
        return re.split(r"[/_.\-]", name, maxsplit=1)[0]

    close = [k for k in difflib.get_close_matches(monitor, logged, n=3, cutoff=0.6) if prefix(k) == prefix(monitor)]
    if close:
        raise ValueError(f"{message} Did you mean {close[0]!r}?")


def read_monitor(trainer: Trainer, monitor: str, who: str) -> float:
    """The current value of ``monitor``, or a ``ValueError`` naming ``who`` and the logged keys."""
    metrics = trainer.callback_metrics
    if monitor not in metrics:
        raise ValueError(never_logged(who, "monitor", monitor, metrics))
    return float(metrics[monitor])


def validation_skipped(trainer: Trainer, pl_module: LightningModule) -> str | None:
    """Why this fit will run no validation, or ``None`` when it will.

    Asked in ``on_train_start``, where Lightning has set up the validation loop it will run (its batch
    counts are known then); it reads the same settings Lightning does: ``validation_step``,
    ``limit_val_batches``, the validation data source and ``check_val_every_n_epoch``.
    """
    if not is_overridden("validation_step", pl_module):
        return "the LightningModule has no validation_step"
    if trainer.limit_val_batches == 0:
        return "limit_val_batches=0"
    source = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    source = getattr(source, "_data_source", None)
    if source is not None and not source.is_defined():
        return "there is no validation dataloader (none passed to fit, no val_dataloader() on the datamodule or the module)"
    batches = trainer.num_val_batches
    if batches and sum(batches) == 0:
        return "the validation dataloader has no batches"
    every, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    if every is not None and epochs is not None and 0 <= epochs < every:
        return f"check_val_every_n_epoch={every} is more than max_epochs={epochs}"
    return None


def unvalidated_change(trainer: Trainer, epoch: float) -> str | None:
    """Why no validation of this fit runs after a change made at (fractional) ``epoch``, so a guard never judges
    it, or ``None`` when one does (or the fit's epochs are not known). A change at an epoch boundary is made
    before that epoch's training and judged at its validation; one within an epoch, at that epoch's. A fit that
    ``max_steps`` ends (within an epoch, or before ``max_epochs``) validates the epochs it completes, when it
    validates at epoch ends only (``val_check_interval=1.0``)."""
    epochs, every, interval = trainer.max_epochs, trainer.check_val_every_n_epoch, trainer.val_check_interval
    at_epoch_ends = every is not None and isinstance(interval, float) and interval == 1.0  # an int 1: every batch
    ends = max_steps_end(trainer) if at_epoch_ends else None
    first = math.floor(epoch + 1e-9)
    if ends is not None:
        epochs, limit = math.floor(ends + 1e-9), f"max_steps={trainer.max_steps} ends training at epoch {ends:.3g}"
        if first >= epochs and epoch < ends - 1e-9:  # made in the epoch max_steps cuts short, whose validation never runs
            return f"{limit}, within epoch {first}, which is never validated"
    elif epochs is None or epochs < 0:
        return None
    else:
        limit = f"max_epochs={epochs}"
    if first >= epochs:
        return f"it comes when training ends ({limit})"
    if every is None:  # validation by steps (val_check_interval) runs whatever the epoch
        return None
    last_validated = (epochs // every) * every - 1  # Lightning validates after epoch e when (e + 1) % every == 0
    if 0 <= last_validated < first:
        return f"the fit's last validation is after epoch {last_validated} (check_val_every_n_epoch={every}, {limit})"
    return None


def warn_if_guard_cannot_run(trainer: Trainer, pl_module: LightningModule, who: str, monitor: str | None) -> None:
    """A warning, at the start of training, when ``who``'s guard on ``monitor`` will never be checked
    because the fit runs no validation (the reason is :func:`validation_skipped`'s)."""
    if monitor is None:
        return
    reason = validation_skipped(trainer, pl_module)
    if reason is not None:
        rank_zero_warn(
            f"{who}(monitor={monitor!r}): the accuracy guard cannot run because {reason}, so {monitor!r} is never "
            "read and max_drop is never checked: compression goes on unguarded. Give the fit a validation loop "
            "(a validation_step logging the metric, and a val dataloader) or leave monitor and max_drop out."
        )


def warn_if_change_unvalidated(
    trainer: Trainer, pl_module: LightningModule, who: str, monitor: str | None, epoch: float, change: str, fix: str
) -> None:
    """A warning, at the start of training, when ``who``'s guard on ``monitor`` will never judge ``change`` (made at
    ``epoch``) because no validation runs after it (:func:`unvalidated_change`); ``fix`` says what to change."""
    if monitor is None or validation_skipped(trainer, pl_module) is not None:  # no validation at all: said already
        return
    reason = unvalidated_change(trainer, epoch)
    if reason is not None:
        rank_zero_warn(
            f"{who}(monitor={monitor!r}): {change} comes at epoch {epoch:g}, but {reason}: no validation judges it, so "
            f"max_drop is never checked for it. {fix}"
        )


def checkpoint_score_note(trainer: Trainer) -> str:
    """What a guard that just acted says about a ``ModelCheckpoint(monitor=...)``: Lightning runs it after every other
    callback's ``on_validation_end``, so the file it writes now holds the model the guard gave back under the score of
    the model the guard rejected (empty without one)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitors = sorted({c.monitor for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor})
    if not monitors:
        return ""
    return (
        f". A ModelCheckpoint monitoring {', '.join(monitors)} saves after this validation: its file holds the model given "
        "back, under the score of the one rejected (validate a checkpoint before taking it as the best)"
    )


def guard_tripped(trainer: Trainer, tripped: bool) -> bool:
    """The decision of all processes: tripped anywhere means tripped everywhere (rank metrics may differ)."""
    if trainer.world_size <= 1:
        return bool(tripped)
    return bool(trainer.strategy.reduce_boolean_decision(bool(tripped), all=False))


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold ``t``'s values: ``t`` itself, or, for a tensor subclass that wraps others (torchao's
    quantised weights, which run no elementwise op such as ``isfinite``), its inner tensors (integers and scales),
    recursively. A sharded ``DTensor`` stays whole: :func:`check_finite` reads its local rows."""
    if not wraps_tensors(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [part for n in names for part in _plain_parts(getattr(t, n))]


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str, action: str = "error") -> list[str]:
    """The names whose tensor holds a NaN or an infinity; an error (or, with ``action="warn"``, a
    warning) naming them and ``where`` (the plugin and the step) when there is any.

    One fused reduction per tensor (``isfinite().all()``), one host sync for all of them. A tensor subclass
    that wraps others (torchao's quantised weights) is finite where its inner tensors (its scales) are.

    Example:
        >>> check_finite([("fc.weight", torch.ones(2)), ("fc.bias", torch.zeros(2)), ("fc.dtype", torch.qint8)], "pruning at step 0")
        []
        >>> check_finite([("fc.weight", torch.tensor([1.0, float("nan")]))], "pruning at step 3")
        Traceback (most recent call last):
        ...
        ValueError: pruning at step 3: non-finite values (NaN or inf) in ['fc.weight']. The model has diverged or was loaded with bad values; lower the learning rate or check the data. on_nonfinite='warn' goes on with a warning instead.
    """
    items = [  # a state_dict may hold other values (torch.ao's packed parameters keep a dtype)
        (name, part) for name, t in tensors if isinstance(t, torch.Tensor) for part in _plain_parts(t) if part.is_floating_point()
    ]
    if not items:
        return []
    device = local(items[0][1]).device
    flags = torch.stack([local(t).detach().isfinite().all().to(device) for _, t in items])
    sharded = [t for _, t in items if is_sharded(t)]
    if sharded:  # every process holds some rows: a weight is finite where all of its rows are
        flags = ShardGroup(sharded[0].device_mesh.get_group(), device).min(flags.to(torch.int64))
    flags = flags.cpu()
    bad = list(dict.fromkeys(name for (name, _), ok in zip(items, flags.tolist()) if not ok))
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
