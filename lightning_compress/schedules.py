"""One vocabulary for everything that changes over training.

A schedule maps a (fractional) epoch ``t`` to a value: the sparsity target of pruning, the weight
bit width of quantisation, the temperature or ``alpha`` of distillation. Every schedule is a small
callable object, can be built from a name (``"cubic"``) or an explicit ``{epoch: value}`` map, and
can be written in YAML either way.

Example:
    >>> from lightning_compress.schedules import make_schedule
    >>> s = make_schedule("cubic", initial=0.0, final=0.9, start=0, end=10)
    >>> round(s(0), 3), round(s(5), 4), round(s(10), 3), round(s(20), 3)
    (0.0, 0.7875, 0.9, 0.9)
    >>> bits = make_schedule({0: 8, 3: 6, 6: 4})
    >>> bits(2.9), bits(3), bits(7.5)
    (8.0, 6.0, 4.0)
"""

from __future__ import annotations

import math
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Union

__all__ = [
    "SCHEDULES",
    "epoch_position",
    "Constant",
    "Cubic",
    "Iterative",
    "Linear",
    "OneShot",
    "Schedule",
    "ScheduleSpec",
    "StepMap",
    "make_schedule",
    "max_steps_end",
]


class Schedule(ABC):
    """A value as a function of the (fractional) epoch.

    ``start`` is the first epoch at which the value may differ from ``initial``; ``end`` the epoch
    from which it equals ``final``. Both are ``float`` so schedules can run in fractions of an epoch.
    """

    initial: float
    final: float
    start: float
    end: float

    @abstractmethod
    def __call__(self, t: float) -> float:
        """The value at epoch ``t``."""

    def milestones(self) -> list[float]:
        """Epochs at which the value changes discontinuously (empty for smooth schedules)."""
        return []

    def validate(self, max_epochs: float | None = None) -> None:
        """Raise ``ValueError`` if the schedule ends after ``max_epochs``."""
        if max_epochs is not None and max_epochs >= 0 and self.end > max_epochs:
            raise ValueError(
                f"{self!r} ends at epoch {self.end}, after the run's max_epochs={max_epochs}; "
                "lower its end or raise max_epochs."
            )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items(), key=str))))


def _check_range(start: float, end: float) -> None:
    for name, value in (("start", start), ("end", end)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"schedule {name} must be a finite epoch >= 0, got {value!r}")
    if end < start:
        raise ValueError(f"schedule end ({end}) precedes its start ({start}); the end must be >= the start")


def _progress(t: float, start: float, end: float) -> float:
    """Fraction of the way from ``start`` to ``end`` at ``t``, clamped to [0, 1]."""
    if t < start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start) / (end - start)


class Cubic(Schedule):
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3``.

    Fast early, gentle near the end, where the network has the least redundancy left.
    """

    def __init__(self, initial: float = 0.0, final: float = 1.0, start: float = 0.0, end: float = 1.0) -> None:
        _check_range(start, end)
        self.initial, self.final, self.start, self.end = float(initial), float(final), float(start), float(end)

    def __call__(self, t: float) -> float:
        p = _progress(t, self.start, self.end)
        return self.final + (self.initial - self.final) * (1.0 - p) ** 3


class Linear(Schedule):
    """Straight line from ``initial`` at ``start`` to ``final`` at ``end``."""

    def __init__(self, initial: float = 0.0, final: float = 1.0, start: float = 0.0, end: float = 1.0) -> None:
        _check_range(start, end)
        self.initial, self.final, self.start, self.end = float(initial), float(final), float(start), float(end)

    def __call__(self, t: float) -> float:
        return self.initial + (self.final - self.initial) * _progress(t, self.start, self.end)


class OneShot(Schedule):
    """``initial`` before epoch ``start``, ``final`` from it on (``end`` is ignored and set to ``start``)."""

    def __init__(self, initial: float = 0.0, final: float = 1.0, start: float = 0.0, end: float | None = None) -> None:
        _check_range(start, start if end is None else end)
        self.initial, self.final, self.start, self.end = float(initial), float(final), float(start), float(start)

    def __call__(self, t: float) -> float:
        return self.final if t >= self.start else self.initial

    def milestones(self) -> list[float]:
        return [self.start]


class Iterative(Schedule):
    """``steps`` equal jumps from ``initial`` to ``final``, at equally spaced epochs in [start, end].

    The first jump happens at ``start`` and the last at ``end`` (one jump at ``start`` when
    ``steps == 1``): prune, retrain, prune again.
    """

    def __init__(
        self, initial: float = 0.0, final: float = 1.0, start: float = 0.0, end: float = 1.0, steps: int = 3
    ) -> None:
        _check_range(start, end)
        if int(steps) != steps or steps < 1:
            raise ValueError(f"iterative schedule needs steps >= 1 (an integer), got {steps!r}")
        self.initial, self.final, self.start, self.end = float(initial), float(final), float(start), float(end)
        self.steps = int(steps)

    def milestones(self) -> list[float]:
        if self.steps == 1:
            return [self.start]
        gap = (self.end - self.start) / (self.steps - 1)
        return [self.start + i * gap for i in range(self.steps)]

    def __call__(self, t: float) -> float:
        done = sum(1 for m in self.milestones() if t >= m - 1e-9)
        return self.initial + (self.final - self.initial) * done / self.steps


class Constant(Schedule):
    """The same value at every epoch."""

    def __init__(self, value: float = 0.0) -> None:
        self.initial = self.final = float(value)
        self.start = self.end = 0.0

    def __call__(self, t: float) -> float:
        return self.final


class StepMap(Schedule):
    """Piecewise-constant values from an explicit ``{epoch: value}`` map.

    Before the first key the value is ``initial`` (default: the first key's value); from each key on,
    that key's value holds until the next key.
    """

    def __init__(self, values: Mapping[float, float], initial: float | None = None) -> None:
        if not values:
            raise ValueError("a {epoch: value} schedule needs at least one entry")
        try:
            items = sorted((float(k), float(v)) for k, v in values.items())
        except (TypeError, ValueError) as err:
            raise ValueError(f"a {{epoch: value}} schedule needs numeric keys and values, got {dict(values)!r}") from err
        for epoch, _ in items:
            if not math.isfinite(epoch) or epoch < 0:
                raise ValueError(f"schedule epochs must be finite and >= 0, got {epoch!r}")
        self.values = dict(items)
        self.initial = float(items[0][1] if initial is None else initial)
        self.final = items[-1][1]
        self.start = items[0][0]
        self.end = items[-1][0]

    def __call__(self, t: float) -> float:
        value = self.initial
        for epoch, v in self.values.items():
            if t >= epoch:
                value = v
        return value

    def milestones(self) -> list[float]:
        return list(self.values)


SCHEDULES: dict[str, type[Schedule]] = {
    "cubic": Cubic,
    "linear": Linear,
    "one_shot": OneShot,
    "iterative": Iterative,
    "constant": Constant,
}

ScheduleSpec = Union[str, Mapping[float, float], Schedule, float, int]


def make_schedule(
    spec: ScheduleSpec,
    *,
    initial: float = 0.0,
    final: float = 1.0,
    start: float = 0.0,
    end: float | None = None,
    steps: int = 3,
) -> Schedule:
    """Build a :class:`Schedule` from a name, a ``{epoch: value}`` map, a number or a schedule.

    Args:
        spec: ``"cubic"``, ``"linear"``, ``"one_shot"``, ``"iterative"`` or ``"constant"``; a map
            ``{epoch: value}``; a plain number (constant); or a ready :class:`Schedule` (returned as is).
        initial: Value before ``start`` (named schedules).
        final: Value from ``end`` on (named schedules; the value of ``"constant"``).
        start: First epoch of change (fractional allowed).
        end: Epoch at which ``final`` is reached; defaults to ``start + 1``.
        steps: Number of jumps of the ``"iterative"`` schedule.

    Raises:
        ValueError: unknown name (the message lists the valid ones), end before start, bad map.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"a schedule cannot be a boolean, got {spec!r}")
    if isinstance(spec, (int, float)):
        return Constant(float(spec))
    if isinstance(spec, Mapping):
        return StepMap(spec)
    if isinstance(spec, str):
        name = spec.strip().lower().replace("-", "_")
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {spec!r}; valid names: {sorted(SCHEDULES)} or an {{epoch: value}} map")
        if name == "constant":
            return Constant(final)
        end_ = start + 1.0 if end is None else end
        if name == "iterative":
            return Iterative(initial, final, start, end_, steps)
        if name == "one_shot":
            return OneShot(initial, final, start, end_)
        return SCHEDULES[name](initial, final, start, end_)
    raise ValueError(f"cannot build a schedule from {spec!r} (type {type(spec).__name__}); {_hint()}")


def _hint() -> str:
    return f"give a name from {sorted(SCHEDULES)}, an {{epoch: value}} map, a number or a Schedule"


def schedule_state(schedule: Schedule) -> dict[str, Any]:
    """A plain-dict description of a schedule (for logs and reports)."""
    return {"type": type(schedule).__name__, **{k: v for k, v in vars(schedule).items()}}


_WARNED_UNSIZED: weakref.WeakSet[Any] = weakref.WeakSet()


def epoch_position(trainer: Any, batches: int, fractional: bool = True) -> float:
    """The (fractional) epoch a fit is at after ``batches`` training batches of the current epoch: ``epoch +
    batches / length``. The length is the loader's; for a loader without one (an ``IterableDataset``), the mean
    length of the epochs this fit has completed, so settings at fractional epochs (a ``start_epoch`` of 0.5, a
    schedule updated every n steps) apply from the second epoch on; in the first the position stays at the
    epoch's start, which a warning says once per fit when the caller has such settings (``fractional``).

    Example:
        >>> from types import SimpleNamespace
        >>> epoch_position(SimpleNamespace(num_training_batches=8, current_epoch=2), 2)
        2.25
    """
    epoch = int(trainer.current_epoch)
    n = trainer.num_training_batches
    length = n if isinstance(n, int) and n > 0 else None
    if length is None and epoch > 0:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done = progress.total.ready - progress.current.ready  # batches of the completed epochs
        length = max(1, round(done / epoch)) if done > 0 else None
    if length is None:
        # before the fit loop has its loader (a plugin's batch run in setup), the length is not known yet, not unknown
        sized_yet = getattr(trainer, "train_dataloader", None) is not None
        if fractional and sized_yet and trainer not in _WARNED_UNSIZED:
            _WARNED_UNSIZED.add(trainer)
            warnings.warn(
                "the training loader has no length, so the first epoch's fraction is unknown: what is set within epochs "
                "(a fractional start or end epoch, a schedule updated every n steps) takes effect from the second epoch "
                "on, whose length the first one gives; what the first epoch would have done is done at once then",
                UserWarning,
                stacklevel=2,
            )
        return float(epoch)
    return epoch + min(batches / length, 1.0)


def max_steps_end(trainer: Any) -> float | None:
    """The (fractional) epoch at which ``max_steps`` ends this fit, when it ends it before ``max_epochs``; else
    ``None`` (no ``max_steps``, or an epoch of unknown length). Optimizer steps per epoch are the epoch's batches
    over ``accumulate_grad_batches``, rounded up (the last, short accumulation steps too).

    Example:
        >>> from types import SimpleNamespace
        >>> max_steps_end(SimpleNamespace(max_steps=8, max_epochs=None, num_training_batches=4, accumulate_grad_batches=1))
        2.0
    """
    max_steps, n = getattr(trainer, "max_steps", -1), getattr(trainer, "num_training_batches", None)
    if max_steps is None or max_steps < 0 or not isinstance(n, int) or n <= 0:
        return None
    end = max_steps / math.ceil(n / max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)))
    max_epochs = getattr(trainer, "max_epochs", None)
    return end if max_epochs is None or max_epochs < 0 or end < max_epochs else None
