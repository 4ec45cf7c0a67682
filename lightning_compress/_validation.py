"""Argument checks shared by the callbacks."""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")


def as_flag(value: Any, what: str) -> bool:
    """``value`` as a ``bool``: ``True``/``False``, numpy's booleans and ``0``/``1`` are taken; a string
    (``"false"`` is truthy in Python), ``None`` or any other value is refused.

    Raises:
        ValueError: naming the option and the value.

    Example:
        >>> as_flag(1, "shrink"), as_flag(False, "shrink")
        (True, False)
    """
    try:
        taken = not isinstance(value, (str, float)) and value is not None and value in (True, False)
    except (TypeError, ValueError):  # an array compares element-wise
        taken = False
    if not taken:
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def as_count(value: Any, what: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` of at least ``minimum`` (numpy integers taken); a boolean, a float, a string, or
    ``None`` unless ``allow_none``, is refused.

    Raises:
        ValueError: naming the option, the value and what is valid.

    Example:
        >>> as_count(3, "repeats"), as_count(None, "num_threads", allow_none=True)
        (3, None)
    """
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError("a boolean")
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {bound}{' or None' if allow_none else ''}, got {value!r}")
    return count


def as_patterns(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    """``value`` as a list of regexes (``None`` stays ``None``; one string becomes a list of one).

    An empty ``include`` would select nothing, so it is refused; an empty ``exclude`` excludes nothing.

    Raises:
        ValueError: an item that is not a non-empty string, an invalid regex, or ``include=[]``.

    Example:
        >>> as_patterns("fc", "include"), as_patterns(None, "exclude"), as_patterns([], "exclude")
        (['fc'], None, [])
    """
    if value is None:
        return None
    if not isinstance(value, str) and not (isinstance(value, Iterable) and not isinstance(value, Mapping)):
        raise ValueError(f"{what} must be a regex string or a list of them (module names), got {value!r}")
    items = [value] if isinstance(value, str) else list(value)
    if not items and what == "include":
        raise ValueError("include=[] selects nothing; leave include unset (None) for the default layers")
    for p in items:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{what} must be non-empty regex strings (module names), got {p!r}")
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"{what} pattern {p!r} is not a valid regex: {err}") from err
    return items


def regex_map(value: Mapping[Any, Any], what: str, check: Callable[[Any, str], T]) -> dict[str, T]:
    """An ordered ``{regex: value}`` map with every key a valid, non-empty regex and every value passed
    through ``check(value, "what[regex]")``.

    Example:
        >>> regex_map({"fc": 0.5}, "target_sparsity", lambda v, name: float(v))
        {'fc': 0.5}
    """
    out: dict[str, T] = {}
    for pattern, item in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{what} map keys must be regex strings (module names), got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{what} regex {pattern!r} is invalid: {err}") from err
        out[pattern] = check(item, f"{what}[{pattern!r}]")
    return out


def renamed_option(who: str, old: str, old_value: Any, new: str, new_value: Any, new_default: Any) -> Any:
    """The value of option ``new`` given under its former name ``old`` too: ``old_value`` when only the former name
    is set (with a ``FutureWarning``, which Python shows by default, unlike a ``DeprecationWarning`` raised from
    a config parser's frame), ``new_value`` when only the new one is.

    Raises:
        ValueError: both names set to different values (a printed config edited under one of them).

    Example:
        >>> renamed_option("PruningCallback", "granularity", None, "structure", "2:4", "unstructured")
        '2:4'
    """
    if old_value is None:
        return new_value
    if new_value != new_default and new_value != old_value:
        raise ValueError(
            f"{who}: {old}={old_value!r} and {new}={new_value!r} set the same option ({old} is its former name); "
            f"set only {new}"
        )
    warnings.warn(f"{who}({old}={old_value!r}) is now {new}={old_value!r}", FutureWarning, stacklevel=3)
    return old_value


def sample_shape(value: Any) -> tuple[int, ...] | None:
    """``value`` (a tuple, list, ``torch.Size`` or array of integers) as positive sizes, else ``None`` (a string, a
    boolean or a size below 1 among them)."""
    try:
        if isinstance(value, str) or any(isinstance(d, bool) for d in value):
            return None
        shape = tuple(operator.index(d) for d in value)
    except TypeError:  # not a sequence, or not integers
        return None
    return shape if all(d > 0 for d in shape) else None


_FACTORY_EXAMPLES = {
    "optimizer": "taking the parameters (e.g. lambda p: torch.optim.AdamW(p, lr=1e-3)",
    "scheduler": "taking the optimizer (e.g. lambda o: torch.optim.lr_scheduler.StepLR(o, 10)",
}


#: When a module's learning-rate scheduler steps: Lightning's ``interval``.
SCHEDULER_INTERVALS = ("step", "epoch")


def check_factories(optimizer: Any, scheduler: Any, scheduler_interval: Any = "epoch") -> None:
    """A module's ``optimizer`` factory and optional ``scheduler`` factory are callables: a name such as
    ``"adam"`` failed only when the fit started; ``scheduler_interval`` is one of :data:`SCHEDULER_INTERVALS`.

    Raises:
        ValueError: naming the option, the value and what is valid.
    """
    for name, value in (("optimizer", optimizer), ("scheduler", scheduler)):
        if (value is not None or name == "optimizer") and not callable(value):
            raise ValueError(
                f"{name} must be a callable {_FACTORY_EXAMPLES[name]}, or its class in a config's class_path), got {value!r}"
            )
    if scheduler_interval not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval must be one of {list(SCHEDULER_INTERVALS)}, got {scheduler_interval!r}")


def check_network(model: Any, what: str, owner: Any = None) -> None:
    """``model`` is an ``nn.Module``, or ``None`` when ``owner`` (the LightningModule taking it) builds it later: a
    subclass with its own ``configure_model``. A string failed at the fit's first step, ``None`` with "an empty
    parameter list"."""
    from lightning.pytorch import LightningModule

    built_later = owner is not None and type(owner).configure_model is not LightningModule.configure_model
    if not (isinstance(model, nn.Module) or (model is None and built_later)):
        raise ValueError(f"{what} must be an nn.Module (the network to train), got {type(model).__name__}: {model!r:.80}")
