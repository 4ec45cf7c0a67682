"""One check of a call to a loaded artifact (compact, ``.pt2`` or ONNX) against the inputs it was exported with.

Each format's runtime has its own words for a call that does not fit: torch's "Ran into a kwarg keyword mismatch"
for the compact graph and the ``.pt2`` package, onnxruntime's missing feed. Here all three say which inputs are
missing, unknown or given twice, and how the artifact is called. A setting fixed at export (``use_cache=False``) may be
passed again with the value it was fixed to, and is left out of the call; another value is refused, naming the fixed one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_call"]


def check_call(
    where: str,
    positional: int | Sequence[str],
    keywords: Sequence[str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Refuse a call whose inputs are not those the artifact takes; return its keyword inputs to pass on.

    Args:
        where: The artifact, as messages name it (its path).
        positional: How many inputs are passed by position (compact, ``.pt2``: they must be), or their names (ONNX:
            each may be passed by position, in this order, or by keyword).
        keywords: The inputs passed by keyword.
        fixed: The keyword settings fixed in the artifact at export, with their values (``{"use_cache": False}``).

    Returns:
        ``kwargs`` without the fixed settings (given with the values they were fixed to).

    Raises:
        TypeError: too many positional inputs, or missing, unknown or doubly given ones, or a fixed setting given
            another value; the message lists the inputs.

    Example:
        >>> check_call("m.pt2", 0, ["input_ids", "attention_mask"], [], {"input_ids": 1})
        Traceback (most recent call last):
        ...
        TypeError: 'm.pt2': missing input(s) ['attention_mask']; it takes ['input_ids', 'attention_mask'] by keyword
        >>> check_call("m.pt2", 0, ["input_ids"], [], {"input_ids": 1, "use_cache": False}, {"use_cache": False})
        {'input_ids': 1}
        >>> check_call("m.pt2", 0, ["input_ids"], [], {"input_ids": 1, "use_cache": True}, {"use_cache": False})
        Traceback (most recent call last):
        ...
        TypeError: 'm.pt2': use_cache=False was fixed when it was exported, got use_cache=True; export it again with use_cache=True in its example
    """
    fixed = dict(fixed or {})
    changed = {k: v for k, v in kwargs.items() if k in fixed and not _same_setting(v, fixed[k])}
    if changed:
        name, value = next(iter(changed.items()))
        raise TypeError(
            f"{where!r}: {name}={fixed[name]!r} was fixed when it was exported, got {name}={value!r}; export it again "
            f"with {name}={value!r} in its example"
        )
    kwargs = {k: v for k, v in kwargs.items() if k not in fixed}
    names = None if isinstance(positional, int) else list(positional)
    count = len(names) if names is not None else int(positional)  # type: ignore[arg-type]
    if len(args) > count:
        shown = f" ({', '.join(names) or 'none'})" if names is not None else ""
        others = f"; pass the others by keyword: {', '.join(keywords)}" if keywords else ""
        raise TypeError(f"{where!r} takes {count} positional input(s){shown}, got {len(args)}{others}")
    if names is None:
        accepted, filled = list(keywords), set()
        parts = ([f"{count} input(s) by position"] if count else []) + ([f"{accepted} by keyword"] if accepted else [])
        takes = f"it takes {' then '.join(parts) or 'no inputs'}"
        if len(args) < count:
            raise TypeError(f"{where!r} takes {count} positional input(s), got {len(args)}; {takes}")
    else:
        accepted, filled = list(dict.fromkeys([*names, *keywords])), set(names[: len(args)])
        takes = f"its inputs are {accepted}"
    twice = sorted(filled & set(kwargs))
    unknown = sorted(set(kwargs) - set(accepted))
    missing = [n for n in accepted if n not in filled and n not in kwargs]
    if twice or unknown or missing:
        problem = (f"{twice} given both positionally and by keyword" if twice
                   else f"unknown input(s) {unknown}" if unknown else f"missing input(s) {missing}")  # fmt: skip
        settings = f"; fixed at export: {', '.join(f'{k}={v!r}' for k, v in fixed.items())}" if fixed else ""
        raise TypeError(f"{where!r}: {problem}; {takes}{settings}")
    return kwargs


def _same_setting(given: Any, fixed: Any) -> bool:
    """Whether a setting passed at call is the value it was fixed to, as it was recorded (JSON): numbers by value (a
    numpy scalar too; NaN is NaN), text by its characters (a ``str`` enum too); ``True`` is not ``1`` here.

    Example:
        >>> _same_setting(1, 1.0), _same_setting(True, 1), _same_setting(float("nan"), float("nan")), _same_setting("1", 1)
        (True, False, True, False)
    """
    if isinstance(given, bool) or isinstance(fixed, bool) or given is None or fixed is None:
        return given is fixed  # True, False and None are each one object
    if isinstance(given, numbers.Real) and isinstance(fixed, numbers.Real):
        return given == fixed or (math.isnan(given) and math.isnan(fixed))
    if isinstance(given, str) and isinstance(fixed, str):
        return str.__str__(given) == fixed
    return False
