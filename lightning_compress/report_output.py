"""How a compression report is shown: the rich table and the PNG of the per-epoch history.

- :func:`print_report` prints the report dict that :func:`~lightning_compress.report.compression_report`
  returns (and :class:`~lightning_compress.report.CompressionReport` writes) as a table, with its notes.
- :func:`plot_history` plots that dict's ``history`` (metrics and compression state per epoch), or its ``validations``
  when there are more of them (several an epoch), into a PNG.

Nothing here measures a model. ``_fmt`` and ``_fmt_bytes`` format the table's cells; ``_is_perplexity``
picks out perplexity metrics, which both show apart (fixed decimals in the table, a log axis in the plot).
rich and matplotlib are imported when a function is called.
Both functions are re-exported by :mod:`lightning_compress.report`, where users import them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_history", "print_report"]


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return _fmt_bytes(value)
    if kind == "int":
        return f"{int(value):,}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "ppl":
        return f"{value:,.2f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_perplexity(key: str) -> bool:
    """``val_ppl``, ``test_perplexity``, ``ppl``...: a metric where lower is better, often in the hundreds."""
    return key.rsplit("_", 1)[-1].lower() in ("ppl", "perplexity")


def print_report(report: Mapping[str, Any], console: Any = None) -> None:
    """Print a report dict as a rich table (to ``console``, default a new ``rich.console.Console``)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    base, comp, ratios = report["baseline"], report["compressed"], report["ratios"]
    table = Table(title=report.get("title", "Compression report"))
    table.add_column("")
    table.add_column("baseline", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("ratio", justify="right")
    setup = report.get("latency_setup", {})
    batch = setup.get("batch_size", "?")
    shape = f"batch {batch} × {setup['seq_len']} tokens" if setup.get("seq_len") else f"batch {batch}"
    rows = [
        ("parameters", "params", "int", "params"),
        ("non-zero parameters", "nonzero_params", "int", "nonzero_params"),
        ("sparsity", "sparsity", "pct", None),
        ("size on disk", "size_bytes", "bytes", "size"),
        ("MACs per sample", "macs", "int", "macs"),
        (f"latency (ms, CPU, {shape})", "latency_ms", "", "latency"),
        ("tokens/s (CPU)", "tokens_per_s", "int", "latency"),  # throughput ratio = latency ratio
        (f"latency (ms, CUDA, {shape})", "cuda_latency_ms", "", "cuda_latency"),
        ("tokens/s (CUDA)", "cuda_tokens_per_s", "int", "cuda_latency"),
    ]
    for label, key, kind, ratio_key in rows:
        if key.startswith(("tokens", "cuda")) and base.get(key) is None and comp.get(key) is None:
            continue  # not a sequence model, or not timed on a GPU
        table.add_row(
            label, _fmt(base.get(key), kind), _fmt(comp.get(key), kind), _fmt(ratios.get(ratio_key), "ratio")
        )
    for key in sorted(set(base.get("metrics", {})) | set(comp.get("metrics", {}))):
        b, c = base["metrics"].get(key), comp["metrics"].get(key)
        if _is_perplexity(key):  # values in the tens or thousands: fixed decimals, not 4 significant digits
            table.add_row(f"{key} (lower is better)", _fmt(b, "ppl"), _fmt(c, "ppl"), "")
        else:
            table.add_row(key, _fmt(b), _fmt(c), "")
    console.print(table)
    for name, section in report.get("plugins", {}).items():
        notes = section.get("notes") if isinstance(section, Mapping) else None
        if notes:
            for note in notes if isinstance(notes, list) else [notes]:
                note = str(note).removeprefix(f"{name}: ")  # a plugin's warning already names it
                console.print(f"[bold]{name}[/bold]: {note}")
    for key in ("baseline_note", "compressed_note", "latency_note", "cuda_note", "network_note"):
        if report.get(key):
            console.print(report[key])
    for test in report.get("other_model_tests", []):
        tested = f"checkpoint {test['ckpt_path']}" if test.get("ckpt_path") else "a model other than the compressed one"
        values = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(test["metrics"].items()))
        console.print(f"Test of {tested} (not the compressed model): {values or 'no test metrics'}")


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "", x: str = "epoch") -> Path:
    """Plot metrics (left) and compression state (right: sparsity, bits, ...) per epoch into a PNG; with
    ``x="step"``, per record of the report's ``validations`` (each at its global step)."""
    if x not in ("epoch", "step"):
        raise ValueError(f"x must be 'epoch' or 'step', got {x!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [h[x] for h in history]
    metric_keys = sorted({k for h in history for k in h.get("metrics", {})})
    state_keys = sorted({k for h in history for k in h.get("state", {})})

    def series(section: str, key: str) -> list[float]:
        return [h.get(section, {}).get(key, float("nan")) for h in history]

    # fractions (sparsity, targets) and counts (bits, temperature) get separate axes
    fractions = [k for k in state_keys if all(0.0 <= v <= 1.0 for v in series("state", k) if v == v)]
    others = [k for k in state_keys if k not in fractions]
    panels = 2 + bool(others and fractions)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    groups = [("metrics", "metrics", metric_keys), ("state", "compression state", fractions or others)]
    if panels == 3:
        groups.append(("state", "compression state", others))
    for ax, (section, label, keys) in zip(axes, groups):
        # perplexity (hundreds at first, lower is better) on its own log axis, so it does not flatten the rest
        ppl = [k for k in keys if section == "metrics" and _is_perplexity(k)]
        plain = [k for k in keys if k not in ppl]
        ppl_ax = (ax.twinx() if plain else ax) if ppl else None
        for axis, group in ((ax, plain), (ppl_ax, ppl)):
            for key in group:  # one colour sequence over both axes (a twin axis restarts its own)
                axis.plot(epochs, series(section, key), marker="o" if section == "metrics" else "s",
                          linestyle="--" if key in ppl else "-", color=f"C{keys.index(key) % 10}", label=key)
        if ppl_ax is not None:
            ppl_ax.set_yscale("log")
            ppl_ax.set_ylabel("perplexity (log scale)")
        ax.set_xlabel("global step" if x == "step" else "epoch")
        ax.set_title(label)
        if keys:
            axes_used = [ax] if ppl_ax in (None, ax) else [ax, ppl_ax]
            handles = [h for axis in axes_used for h in axis.get_legend_handles_labels()[0]]
            ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
        elif section == "state":
            ax.text(0.5, 0.5, "no compression plugin", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
