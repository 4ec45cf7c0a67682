"""The files of a sensitivity scan: ``sensitivity.csv`` (one row per probe), ``sensitivity.md`` (the
tables), ``sensitivity.png`` (a heat-map of the drops) and ``suggested.yaml`` (the per-layer maps)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from lightning_compress.tuning.sensitivity import SensitivityTable, Suggestion

__all__ = ["heatmap", "markdown", "write_outputs"]


def _columns(table: SensitivityTable) -> list[tuple[str, str, float]]:
    """``(header, kind, setting)`` of the heat-map and table columns: sparsities, then widths."""
    sparsities = sorted({s for probes in table.sparsity.values() for s in probes})
    widths = sorted({b for probes in table.bits.values() for b in probes}, reverse=True)
    return [(f"s={s:g}", "sparsity", s) for s in sparsities] + [(f"{b} bits", "bits", b) for b in widths]


def _drops(table: SensitivityTable) -> list[list[float]]:
    grid = []
    for u in table.units:
        probes = {"sparsity": table.sparsity.get(u.name, {}), "bits": table.bits.get(u.name, {})}
        grid.append([table.drop(probes[k][v]) if v in probes[k] else math.nan for _, k, v in _columns(table)])
    return grid


def markdown(table: SensitivityTable, suggestions: Sequence[Suggestion] = ()) -> str:
    """The drops as a Markdown table (rows: units; columns: settings), then each suggestion."""
    cols = _columns(table)
    lines = [
        f"Baseline {table.monitor} = {table.baseline:.4f} ({table.mode}). Cells: drop of {table.monitor} "
        "(positive = worse) with that layer alone changed.",
        "",
        "| layer | weights | " + " | ".join(c[0] for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for u, row in zip(table.units, _drops(table)):
        cells = ["-" if math.isnan(d) else f"{d:+.4f}" for d in row]
        lines.append(f"| {_cell(u.name)} | {max(u.weights, u.qweights):,} | " + " | ".join(cells) + " |")
    for s in suggestions:
        lines += ["", f"Suggested {s.kind}: weighted mean {s.mean:.4g}, summed drop {s.drop:+.4f}", "", f"| layer | {s.kind} |", "|---|---:|"]
        lines += [f"| {_cell(name)} | {value:g} |" for name, value in s.choice.items()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    r"""``text`` in a Markdown table cell: a ``|`` (a ``--groups`` regex's alternation) escaped, not a new column.

    >>> print(_cell("intermediate|output"))
    intermediate\|output
    """
    return text.replace("|", "\\|")


def heatmap(table: SensitivityTable, path: str | Path) -> None:
    """``sensitivity.png``: units x settings, colour = drop (white: no change or better)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols, grid = _columns(table), _drops(table)
    vmax = max([1e-6, *(d for row in grid for d in row if math.isfinite(d))])
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cols), 1.2 + 0.45 * len(table.units)))
    image = ax.imshow([[min(d, vmax) for d in row] for row in grid], cmap="Reds", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), [c[0] for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(table.units)), [u.name for u in table.units])
    if len(table.units) * len(cols) <= 400:
        for i, row in enumerate(grid):
            for j, d in enumerate(row):
                if not math.isnan(d):
                    ax.text(j, i, f"{d:.3f}", ha="center", va="center", fontsize=7, color="white" if d > vmax / 2 else "black")
    fig.colorbar(image, ax=ax, label=f"drop of {table.monitor}")
    ax.set_title(f"Sensitivity ({table.monitor} baseline {table.baseline:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(table: SensitivityTable, suggestions: Sequence[Suggestion], out: str | Path) -> dict[str, Path]:
    """``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.png`` and (with a suggestion) ``suggested.yaml``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"sensitivity.{k}" for k in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["unit", "layers", "weights", "kind", "setting", table.monitor, "drop"])
        writer.writeheader()
        writer.writerows(table.rows())
    paths["md"].write_text(markdown(table, suggestions))
    heatmap(table, paths["png"])
    if suggestions:
        paths["yaml"] = out / "suggested.yaml"
        keys = {"sparsity": "target_sparsity", "bits": "weight_bits"}
        notes = [f"#   {keys[s.kind]}: weighted mean {s.mean:.4g}, summed drop of {table.monitor} {s.drop:+.4f}" for s in suggestions]
        header = (
            f"# Per-layer settings suggested by `lightning-compress sensitivity` (baseline {table.monitor} "
            f"{table.baseline:.4f}).\n# target_sparsity goes to PruningCallback, weight_bits to QuantizeCallback.\n"
        )
        body = yaml.safe_dump({keys[s.kind]: s.map for s in suggestions}, sort_keys=False)
        paths["yaml"].write_text(header + "\n".join(notes) + "\n" + body)
    return paths


# ------------------------------------------------------------------------------------------------- main
