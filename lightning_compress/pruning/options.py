"""``PruningOptions``: every option of :class:`~lightning_compress.PruningCallback`, checked on construction."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_compress._validation import as_count, as_flag, as_patterns, regex_map
from lightning_compress.guard import NONFINITE_ACTIONS, GuardOptions
from lightning_compress.pruning.criteria import Criterion, make_criterion
from lightning_compress.pruning.masks import parse_granularity
from lightning_compress.schedules import Schedule, ScheduleSpec, StepMap, make_schedule

__all__ = ["NAMED_RAMPS", "PruningOptions", "Progress", "build_schedule"]

NAMED_RAMPS = ("cubic", "linear", "iterative")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)  # numpy's numbers too (config readers hand them)


def _check_fraction(value: Any, what: str) -> float:
    if not _is_number(value) or math.isnan(float(value)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r} (1.0 would remove every weight)")
    return float(value)


def _check_positive_int(value: Any, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be a positive integer or None, got {value!r}")


class Progress:
    """Picklable ``t -> [0, 1]``: the schedule's value divided by its final value."""

    def __init__(self, schedule: Schedule | None, final: float) -> None:
        self.schedule, self.final = schedule, final

    def __call__(self, t: float) -> float:
        if self.schedule is None or self.final == 0.0:
            return 0.0
        return max(0.0, min(1.0, self.schedule(t) / self.final))


def build_schedule(spec: ScheduleSpec, start: float, end: float, steps: int) -> tuple[Progress, float, Schedule]:
    """``(progress t -> [0, 1], final sparsity, schedule)`` for a named ramp, a map or a Schedule."""
    if isinstance(spec, str):
        s = make_schedule(spec, initial=0.0, final=1.0, start=start, end=end, steps=steps)
        return Progress(s, 1.0), 1.0, s
    if _is_number(spec):
        raise ValueError(
            f"schedule={spec!r}: a number is not a pruning schedule; give a name ('cubic', 'linear', 'one_shot', "
            "'iterative', 'constant'), an {epoch: sparsity} map or a Schedule"
        )
    # a map is dense before its first epoch ({2: 0.5}: nothing pruned in epochs 0-1), not at its first value
    s = StepMap(spec, initial=0.0) if isinstance(spec, Mapping) else make_schedule(spec)
    if not 0.0 <= s.final < 1.0:
        raise ValueError(f"the schedule must end at a sparsity in [0, 1), got {s.final!r}")
    values = list(getattr(s, "values", {}).values())  # an {epoch: sparsity} map
    if any(later < earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(
            f"an {{epoch: sparsity}} schedule must not decrease (pruned weights stay pruned), got {dict(s.values)!r}"  # type: ignore[attr-defined]
        )
    return Progress(s, s.final), s.final, s


#: Structures that remove whole transformer units (:mod:`lightning_compress.pruning.units`).
UNIT_STRUCTURES = {"heads": ("heads",), "neurons": ("neurons",), "heads+neurons": ("heads", "neurons"), "neurons+heads": ("heads", "neurons")}

@dataclass
class PruningOptions:
    """The options of :class:`~lightning_compress.PruningCallback` (documented there), normalised.

    Raises:
        ValueError: any invalid value, naming it and the valid choices.
    """

    target_sparsity: float | dict[str, float] = 0.5
    schedule: ScheduleSpec = "cubic"
    start_epoch: float = 0.0
    end_epoch: float | None = None
    criterion: str | Criterion | Callable[[str, Tensor], Tensor] = "magnitude"
    structure: str = "unstructured"
    scope: str = "global"
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    make_permanent: bool = True
    monitor: str | None = None
    max_drop: float | None = None
    mode: str = "max"
    update_every_n_steps: int | None = None
    schedule_steps: int = 3
    rewind_epoch: float | None = None
    seed: int = 0
    shrink: bool = False
    shrink_epoch: float | None = None
    round_to: int | None = None
    on_nonfinite: str = "error"

    def within_epochs(self) -> bool:
        """Whether something happens inside an epoch: masks updated every n steps, or a fractional epoch setting."""
        epochs = (self.start_epoch, self.end_epoch, self.rewind_epoch, self.shrink_epoch)
        return self.update_every_n_steps is not None or any(e is not None and not float(e).is_integer() for e in epochs)

    def __post_init__(self) -> None:
        self.make_permanent, self.shrink = as_flag(self.make_permanent, "make_permanent"), as_flag(self.shrink, "shrink")
        self._check_target()
        self.units = UNIT_STRUCTURES.get(self.structure.strip().lower()) if isinstance(self.structure, str) else None
        self.kind, self.nm = ("channel", None) if self.units else parse_granularity(self.structure)
        if self.scope not in ("global", "layer", "row"):
            raise ValueError(f"unknown scope {self.scope!r}; valid: ['global', 'layer'] ('row' with a per-row criterion)")
        if isinstance(self.target_sparsity, dict):
            self.scope = "layer"
        if self.nm is not None:
            n, m = self.nm
            fixed = 1.0 - n / m
            if isinstance(self.target_sparsity, dict) or abs(self.target_sparsity - fixed) > 1e-9:
                raise ValueError(
                    f"structure {self.structure!r} keeps {n} of every {m} weights, i.e. a sparsity of {fixed:g}; "
                    f"set target_sparsity={fixed:g} (got {self.target_sparsity!r})"
                )
        self.criterion = make_criterion(self.criterion)
        if self.kind not in self.criterion.granularities:
            raise ValueError(
                f"criterion {self.criterion.name!r} does not apply to structure {self.structure!r}; it supports "
                f"{['N:M' if g == 'nm' else g for g in self.criterion.granularities]}"
            )
        if self.units and self.criterion.name in ("entropy", "bn_scale"):
            raise ValueError(
                f"criterion {self.criterion.name!r} scores convolution channels and does not apply to structure "
                f"{self.structure!r}; use 'magnitude', 'taylor' or 'random'"
            )
        if self.kind == "unstructured" and self.criterion.per_row:
            self.scope = "row"  # the criterion compares within output rows (wanda): every row loses the same share
        elif self.scope == "row":  # what a per-row criterion reads back as: given back, it must be one
            raise ValueError(f"scope 'row' compares within output rows, which criterion {self.criterion.name!r} with "
                             f"structure {self.structure!r} does not; valid: ['global', 'layer']")
        self._check_schedule()
        as_patterns(self.include, "include")
        as_patterns(self.exclude, "exclude")
        self.guard = GuardOptions(self.monitor, self.max_drop, self.mode)
        self.max_drop = None if self.max_drop is None else float(self.max_drop)
        _check_positive_int(self.update_every_n_steps, "update_every_n_steps")
        _check_positive_int(self.round_to, "round_to")
        try:
            if isinstance(self.seed, bool):
                raise TypeError("a boolean")
            self.seed = int(str(self.seed).strip()) if isinstance(self.seed, str) else operator.index(self.seed)
        except (TypeError, ValueError):
            raise ValueError(f"seed must be an integer (the random criterion's draws), got {self.seed!r}") from None
        if self.shrink and self.kind != "channel":
            raise ValueError(
                f"shrink=True physically removes whole channels and needs structure='channel', 'heads', 'neurons' or "
                f"'heads+neurons', got {self.structure!r}"
            )
        if self.shrink_epoch is not None and not self.shrink:
            raise ValueError("shrink_epoch is set but shrink=False; set shrink=True or drop shrink_epoch")
        if self.shrink_epoch is not None and (
            not _is_number(self.shrink_epoch) or not math.isfinite(self.shrink_epoch) or self.shrink_epoch < self.start_epoch
        ):
            raise ValueError(f"shrink_epoch must be a finite number >= start_epoch ({self.start_epoch:g}), got {self.shrink_epoch!r}")
        if self.round_to is not None and self.kind != "channel":
            raise ValueError(f"round_to applies to structure='channel' only, got {self.structure!r}")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"unknown on_nonfinite {self.on_nonfinite!r}; valid: {list(NONFINITE_ACTIONS)}")

    #: Criteria that score the rows a process holds from those rows alone (and inputs summed over the processes).
    SHARDED_CRITERIA = ("magnitude", "random", "wanda")

    def check_sharded(self) -> None:
        """The options that work on weights sharded across processes (FSDP2); a clear error for the others.

        Raises:
            ValueError: naming the option, its value and what works instead.
        """
        refused = []
        if self.kind == "channel":
            refused.append(f"structure={self.structure!r} (whole channels span every process's rows); use 'unstructured' or 'N:M'")
        name = self.criterion.name
        if name not in self.SHARDED_CRITERIA and not callable(getattr(self.criterion, "fn", None)):
            refused.append(
                f"criterion={name!r} (its per-weight state would be checkpointed from rank 0 only); use one of "
                f"{list(self.SHARDED_CRITERIA)} or a function of the weight"
            )
        if self.rewind_epoch is not None:
            refused.append(f"rewind_epoch={self.rewind_epoch!r} (a copy of every weight in the callback's checkpoint state)")
        if self.monitor is not None or self.max_drop is not None:
            refused.append(f"monitor={self.monitor!r}/max_drop={self.max_drop!r} (the guard keeps a copy of every weight)")
        if refused:
            raise ValueError(
                "PruningCallback under ModelParallelStrategy (FSDP2 shards) does not support: " + "; ".join(refused)
                + ". Use them with one device or strategy='ddp'."
            )

    def _check_target(self) -> None:
        target = self.target_sparsity
        if not isinstance(target, Mapping):
            self.target_sparsity = _check_fraction(target, "target_sparsity")
            return
        if not target:
            raise ValueError("target_sparsity map is empty; give {regex: sparsity} entries or a number")
        self.target_sparsity = regex_map(target, "target_sparsity", _check_fraction)

    def _check_schedule(self) -> None:
        self.schedule_steps = as_count(self.schedule_steps, "schedule_steps (the iterative schedule's jumps)")  # type: ignore[assignment]
        for name in ("start_epoch", "end_epoch", "rewind_epoch"):
            value = getattr(self, name)
            if (value is not None or name == "start_epoch") and (not _is_number(value) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            if value is not None:
                setattr(self, name, float(value))
        start, end, spec = self.start_epoch, self.end_epoch, self.schedule
        if isinstance(spec, str):
            key = spec.strip().lower().replace("-", "_")
            if end is not None and key in NAMED_RAMPS and end <= start:
                raise ValueError(f"end_epoch ({end:g}) must be after start_epoch ({start:g}) for the {key!r} schedule")
        probe = build_schedule(spec, start, end if end is not None else start + 1, self.schedule_steps)
        if not isinstance(spec, str) and isinstance(self.target_sparsity, float) and abs(probe[1] - self.target_sparsity) > 1e-9:
            raise ValueError(
                f"the schedule ends at sparsity {probe[1]:g} but target_sparsity={self.target_sparsity:g}; "
                "make them agree (the schedule's values are absolute sparsities)"
            )
        if not isinstance(spec, str) and end is not None:
            raise ValueError("end_epoch is set by the {epoch: sparsity} map / Schedule object itself; drop end_epoch")
        if not isinstance(spec, str) and start != 0:
            raise ValueError(
                f"start_epoch={start:g} beside an {{epoch: sparsity}} map / Schedule object, which says itself when pruning "
                "starts (its first epoch); drop start_epoch"
            )

    def plan(self, max_epochs: int | None) -> tuple[Progress, float, float | None]:
        """``(progress t -> [0, 1], end epoch, shrink epoch or None)`` for a fit of ``max_epochs``
        (``None``: unbounded); an error when the plan cannot be carried out in that fit."""
        if max_epochs is not None and self.start_epoch >= max_epochs:
            raise ValueError(f"start_epoch={self.start_epoch:g} is not before max_epochs={max_epochs}; pruning would never run")
        end = self.resolve_end(max_epochs)
        if isinstance(self.schedule, str) and self.schedule.strip().lower() in NAMED_RAMPS and end <= self.start_epoch:
            raise ValueError(f"end_epoch ({end:g}) must be after start_epoch ({self.start_epoch:g})")
        if max_epochs is not None and end > max_epochs:
            raise ValueError(
                f"end_epoch={end:g} is past max_epochs={max_epochs}: the target would never be reached. Lower "
                "end_epoch or raise max_epochs."
            )
        progress, _, base = build_schedule(self.schedule, self.start_epoch, end, self.schedule_steps)
        base.validate(max_epochs)
        if self.rewind_epoch is not None and max_epochs is not None and max_epochs <= self.rewind_epoch:
            raise ValueError(f"rewind_epoch={self.rewind_epoch:g} is not before max_epochs={max_epochs}")
        shrink_at = None
        if self.shrink and self.shrink_epoch is not None:
            shrink_at = self.shrink_epoch
        elif self.shrink:
            last = self._last_change(base.end)
            shrink_at = last
            if self.monitor is not None:  # the guard judges that step at the epoch's validation before removal
                shrink_at = float(math.floor(last)) + 1.0
                shrink_at = shrink_at if max_epochs is None else min(shrink_at, float(max_epochs))
        if shrink_at is not None:
            if max_epochs is not None and shrink_at > max_epochs:
                raise ValueError(f"shrink_epoch={shrink_at:g} is past max_epochs={max_epochs}")
        if self.criterion.needs_data and progress(0.0) > 0:
            raise ValueError(
                f"criterion {self.criterion.name!r} scores channels from training activations, but the schedule "
                "prunes before the first training step; start later (start_epoch > 0)"
            )
        return progress, end, shrink_at

    def check_shrink_epoch(self, end: float) -> None:
        """A ``shrink_epoch`` before the last mask change of a schedule ending at ``end`` is an error: the removal ends
        pruning, so the rest of the schedule would never run (a fit's own plan; a resumed run keeps its checkpoint's)."""
        if not self.shrink or self.shrink_epoch is None:
            return
        schedule_end = build_schedule(self.schedule, self.start_epoch, end, self.schedule_steps)[2].end
        last = self._last_change(schedule_end)
        if self.shrink_epoch + 1e-9 < last:
            raise ValueError(
                f"shrink_epoch={self.shrink_epoch:g} is before the schedule's last change at epoch {last:g} (it reaches "
                f"target_sparsity at {schedule_end:g}): removing the channels then ends pruning at the sparsity reached "
                f"by then. Set shrink_epoch >= {last:g}, end the schedule earlier (end_epoch), or drop shrink_epoch "
                "(default: after the last change)"
            )

    def last_step(self, end: float) -> float:
        """The (fractional) epoch of the schedule's last mask change when it ends at ``end`` (``start_epoch`` for
        ``one_shot``, whatever ``end_epoch`` says): within an epoch when masks are updated every n steps, else at
        the epoch boundary after it."""
        return self._last_change(build_schedule(self.schedule, self.start_epoch, end, self.schedule_steps)[2].end)

    def _last_change(self, schedule_end: float) -> float:
        """When masks change last for a schedule ending at ``schedule_end`` (see :meth:`last_step`)."""
        return schedule_end if self.update_every_n_steps else float(math.ceil(schedule_end))

    def resolve_end(self, max_epochs: int | None) -> float:
        """The epoch at which the target is reached (default: 75% of the epochs after ``start_epoch``)."""
        if self.end_epoch is not None:
            return self.end_epoch
        if not isinstance(self.schedule, str):
            return make_schedule(self.schedule).end
        if max_epochs is None or max_epochs < 0:
            if self.schedule.strip().lower().replace("-", "_") in ("one_shot", "constant"):
                return self.start_epoch  # the whole target at start_epoch (a fit bounded by max_steps)
            raise ValueError("end_epoch is needed when the Trainer has no max_epochs (pruning must end somewhere)")
        return float(max(self.start_epoch + 1e-9, round(self.start_epoch + 0.75 * (max_epochs - self.start_epoch))))
