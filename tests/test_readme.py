"""The README documents every argument of the public classes with its real default."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import lightning_compress as lc

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


@pytest.mark.parametrize(
    ("cls", "section"),
    [
        (lc.PruningCallback, "PruningCallback"),
        (lc.QuantizeCallback, "QuantizeCallback"),
        (lc.DistillationModule, "DistillationModule"),
        (lc.CompressionReport, "The report"),
    ],
)
def test_every_argument_is_documented_with_its_default(cls: type, section: str) -> None:
    text = _section(section)
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        row = re.search(rf"^\| `{re.escape(name)}` \| ([^|]*) \|", text, re.M)
        assert row, f"{cls.__name__}.{name} is missing from the README section {section!r}"
        documented = row.group(1).strip()
        if param.default is inspect.Parameter.empty or callable(param.default):
            continue  # required, or a callable described in words
        assert documented.startswith("`"), f"{cls.__name__}.{name}: default {documented!r} is not a literal"
        assert ast.literal_eval(documented.strip("`")) == param.default, f"{cls.__name__}.{name}: README says {documented}"
