"""Argument checks shared by the callbacks."""

from __future__ import annotations

import re
from collections.abc import Sequence


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
