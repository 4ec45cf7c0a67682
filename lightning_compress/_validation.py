"""Argument checks shared by the callbacks."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


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
