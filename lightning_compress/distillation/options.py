"""The options of :class:`~lightning_compress.DistillationModule` that need no model, checked on construction.

Every error names the bad value and what would be accepted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch

from lightning_compress._validation import as_flag, check_factories, sample_shape
from lightning_compress.distillation import tokens
from lightning_compress.distillation.losses import checked_ignore_index, resolve_distill_loss, resolve_task_loss
from lightning_compress.lm import check_shift_labels
from lightning_compress.schedules import Schedule, StepMap, make_schedule

__all__ = ["ModelFreeOptions", "ScheduleArg", "check_call_options", "check_options", "loss_schedules", "model_free_options", "sample_shape"]

ScheduleArg = Union[float, dict[float, float], Schedule]


def _schedule(spec: ScheduleArg, name: str) -> Schedule:
    try:
        return make_schedule(spec)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def _schedule_values(schedule: Schedule) -> list[float]:
    """Values a schedule can take (end points for monotone schedules, every value for step maps)."""
    if isinstance(schedule, StepMap):
        return [schedule.initial, *schedule.values.values()]
    return [schedule.initial, schedule.final]


def loss_schedules(temperature: ScheduleArg, alpha: ScheduleArg) -> tuple[Schedule, Schedule]:
    """The temperature and alpha schedules, every value they can take checked (temperature > 0, alpha in [0, 1])."""
    temperature_schedule, alpha_schedule = _schedule(temperature, "temperature"), _schedule(alpha, "alpha")
    for value in _schedule_values(temperature_schedule):
        if not (math.isfinite(value) and value > 0):
            if isinstance(temperature, str):  # a schedule name: its values run from 0 to 1
                raise ValueError(
                    f"temperature must be > 0 at every epoch, but {temperature!r} names a schedule that runs from 0 "
                    "to 1 (it gives 0.0 at epoch 0); give a number > 0, an {epoch: value} map such as {0: 8.0, 5: 4.0}, "
                    "or a Schedule whose values are all > 0 such as lightning_compress.schedules.Linear(8.0, 2.0, 0, 5)"
                )
            raise ValueError(f"temperature must be > 0 at every epoch, got {value!r} from {temperature!r}")
    for value in _schedule_values(alpha_schedule):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] at every epoch, got {value!r} from {alpha!r}")
    return temperature_schedule, alpha_schedule


def check_options(
    num_classes: int | None,
    feature_weight: float,
    feature_loss: str,
    divergence_factor: float | None,
    features: Any,
    cache_teacher_outputs: bool,
    shift_labels: Any,
    class_dim: Any,
) -> dict[str, str]:
    """Check the options that need no model and return ``features`` as a ``{student module: teacher module}`` dict.

    Raises:
        ValueError: naming the bad value and the valid ones.
    """
    if num_classes is not None and (not _is_integer(num_classes) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2 or None (read from the logits), got {num_classes!r}")
    if not (_is_number(feature_weight) and math.isfinite(feature_weight) and feature_weight >= 0):
        raise ValueError(f"feature_weight must be a finite number >= 0, got {feature_weight!r}")
    if feature_loss not in ("mse", "attention"):
        raise ValueError(f"feature_loss must be 'mse' or 'attention', got {feature_loss!r}")
    if divergence_factor is not None and not (_is_number(divergence_factor) and divergence_factor > 1):
        raise ValueError(f"divergence_factor must be > 1 or None, got {divergence_factor!r}")
    if features is not None and not isinstance(features, Mapping):
        raise ValueError(f"features must be a {{student_module: teacher_module}} map, got {features!r}")
    as_flag(cache_teacher_outputs, "cache_teacher_outputs")
    if cache_teacher_outputs and features:
        raise ValueError(
            "cache_teacher_outputs caches teacher logits only, but features need the teacher's intermediate "
            "outputs every step; drop one of the two"
        )
    check_shift_labels(shift_labels)
    if isinstance(class_dim, bool) or not isinstance(class_dim, int) or not (class_dim == -1 or class_dim >= 1):
        raise ValueError(
            f"class_dim must be -1 (classes in the last dimension) or a dimension >= 1 (1 for channel-first "
            f"logits such as (N, C, H, W)), got {class_dim!r}"
        )
    return dict(features or {})


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_call_options(ignore_index: Any, save_teacher: Any, optimizer: Any, scheduler: Any, scheduler_interval: Any = "epoch") -> None:
    """Check the options read while training (the label to ignore, what the checkpoint holds, the optimizer and
    when its scheduler steps).

    Raises:
        ValueError: naming the bad value and the valid ones.
    """
    checked_ignore_index(ignore_index)
    as_flag(save_teacher, "save_teacher")
    check_factories(optimizer, scheduler, scheduler_interval)


@dataclass(frozen=True)
class ModelFreeOptions:
    """What :func:`model_free_options` made of the options: the schedules, the losses and the parsed values."""

    temperature_schedule: Schedule
    alpha_schedule: Schedule
    features: dict[str, str]
    trust_pickle: bool
    distill_fn: Callable[..., Any]
    distill_loss_name: str
    task_fn: Callable[..., Any] | None
    task_loss_name: str
    teacher_dtype: torch.dtype | None


def model_free_options(
    *,
    temperature: ScheduleArg,
    alpha: ScheduleArg,
    num_classes: Any,
    feature_weight: Any,
    feature_loss: Any,
    divergence_factor: Any,
    features: Any,
    cache_teacher_outputs: Any,
    shift_labels: Any,
    class_dim: Any,
    ignore_index: Any,
    save_teacher: Any,
    optimizer: Any,
    scheduler: Any,
    scheduler_interval: Any,
    trust_pickle: Any,
    distill_loss: Any,
    task_loss: Any,
    teacher_dtype: Any,
) -> ModelFreeOptions:
    """Check every :class:`~lightning_compress.DistillationModule` option that needs no network, as its constructor
    does (it calls this), and parse them. The pipeline calls it on the student stage's config before the teacher
    stage trains, so a bad option is refused then, not after the teacher's fit.

    Raises:
        ValueError, TypeError: naming the bad value and the valid ones.
    """
    temperature_schedule, alpha_schedule = loss_schedules(temperature, alpha)
    checked_features = check_options(
        num_classes, feature_weight, feature_loss, divergence_factor, features, cache_teacher_outputs, shift_labels, class_dim
    )
    check_call_options(ignore_index, save_teacher, optimizer, scheduler, scheduler_interval)
    flag = as_flag(trust_pickle, "trust_pickle")
    distill_fn, distill_loss_name = resolve_distill_loss(distill_loss)
    task_fn, task_loss_name = resolve_task_loss(task_loss, ignore_index)
    return ModelFreeOptions(
        temperature_schedule, alpha_schedule, checked_features, flag, distill_fn, distill_loss_name, task_fn,
        task_loss_name, tokens.parse_teacher_dtype(teacher_dtype),
    )
