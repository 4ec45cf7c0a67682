"""A sweep's results as files: every trial (``trials.csv``), the Pareto front (CSV, Markdown, a plot
and one runnable YAML per member) and the seed re-runs (mean ± standard error)."""

from __future__ import annotations

import csv
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.tuning.config import write_config
from lightning_compress.tuning.space import MEASURED, SweepSpec
from lightning_compress.tuning.trial import trial_base_config

__all__ = ["pareto_front", "write_front", "write_seeds", "mean_se"]


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    better_or_equal = all(s * x <= s * y for x, y, s in zip(a, b, signs))
    return better_or_equal and any(s * x < s * y for x, y, s in zip(a, b, signs))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (``directions``: minimize/maximize per column).

    Example:
        >>> pareto_front([(1, 0.9), (2, 0.95), (3, 0.9), (1, 0.8)], ["minimize", "maximize"])
        [0, 1]
    """
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    return [i for i, p in enumerate(points) if not any(_dominates(q, p, signs) for j, q in enumerate(points) if j != i)]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def _columns(spec: SweepSpec) -> list[str]:
    metrics = [*spec.objectives, *(c.metric for c in spec.constraints), *MEASURED]
    return list(dict.fromkeys(metrics))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _write_table(path: Path, header: list[str], rows: list[list[Any]], title: str) -> Path:
    with path.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    md = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    return path.with_suffix(".md")


def _plot(spec: SweepSpec, trials: Sequence[Any], front: Sequence[Any], path: Path) -> Path | None:
    # the quality axis: an objective that is not a size or speed measure, else a constrained metric that is not
    quality = next((m for m in [*spec.objectives, *(c.metric for c in spec.constraints)] if m not in MEASURED), None)
    if quality is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def xy(ts: Sequence[Any]) -> tuple[list[float], list[float], list[float]]:
        ms = [t.user_attrs["metrics"] for t in ts]
        return ([m.get("artifact_bytes", math.nan) / 1024 for m in ms], [m.get(quality, math.nan) for m in ms],
                [m.get("latency_ms", math.nan) for m in ms])

    x, y, _ = xy(trials)
    if not any(math.isfinite(a) and a > 0 and math.isfinite(b) for a, b in zip(x, y)):
        return None  # no trial measured both (every quality NaN): nothing to draw on a log axis
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(x, y, c="lightgrey", s=18, label="trials")
    fx, fy, fl = xy(sorted(front, key=lambda t: t.user_attrs["metrics"].get("artifact_bytes", math.nan)))
    points = ax.scatter(fx, fy, c=fl, cmap="viridis", s=46, edgecolors="black", label="Pareto front (constraints met)")
    ax.plot(fx, fy, color="black", lw=0.8)
    fig.colorbar(points, ax=ax, label="latency (ms, batch 64, 1 thread)")
    for c in spec.constraints:
        if c.metric == quality and not c.relative:
            ax.axhline(c.value, color="tab:red", ls="--", lw=0.8, label=str(c))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("artifact (KB, compact export)")
    bounds = [c.value for c in spec.constraints if c.metric == quality and not c.relative]
    shown = [v for v in [*fy, *bounds] if math.isfinite(v)]
    if shown:  # the front decides the axis; trials far below it are counted in the title instead
        span = max(shown) - min(shown) + 0.01 * max(1.0, abs(max(shown)))
        low, high = min(shown) - 2 * span, max(shown) + span
        outside = sum(1 for v in y if math.isfinite(v) and not low <= v <= high)
        ax.set_ylim(low, high)
        if outside:
            ax.set_title(f"study {spec.study}: {len(trials)} finished trials ({outside} outside the axis)")
    ax.set_ylabel(quality)
    if not ax.get_title():
        ax.set_title(f"study {spec.study}: {len(trials)} finished trials")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics(trial: Any) -> dict[str, float]:
    """A trial's metrics; a pruned trial has only its monitored metric's last reported value."""
    if "metrics" in trial.user_attrs:
        return trial.user_attrs["metrics"]
    monitor = trial.user_attrs.get("monitor")
    steps = trial.intermediate_values
    return {monitor: steps[max(steps)]} if monitor and steps else {}


def _meets(spec: SweepSpec, metrics: Mapping[str, float], baseline: Mapping[str, float] | None) -> bool:
    """Whether ``metrics`` meet every constraint of ``spec`` as it is now (a resumed study may have changed them)."""
    return all(c.violation(metrics, baseline) <= 0 for c in spec.constraints)


def _write_member(spec: SweepSpec, trial: Any, path: Path) -> None:
    """A front member's runnable config: the base config with the trial's values, writing where the base config
    writes (the trial's own config writes its logs and checkpoints into the trial's folder, which a fit of it would
    overwrite). A trial recorded without its values: a copy of its own config."""
    if trial.user_attrs.get("values") is None:
        shutil.copyfile(trial.user_attrs["config"], path)
        return
    config = trial_base_config(spec.config, trial)
    params = ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
    write_config(config, path, f"trial {trial.number} of study {spec.study!r} ({params}): the base config with its values")


def write_front(spec: SweepSpec, study: Any, baseline: Mapping[str, float] | None) -> tuple[list[Any], dict[str, Path]]:
    """Write ``trials.csv`` and the Pareto front's files; returns the front (trials, best first) and the paths.

    Each complete trial's stored metrics are checked against the spec's constraints and ``baseline`` here,
    not at the time it ran; a stopped (pruned) trial never meets them."""
    import optuna

    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "metrics" in t.user_attrs]
    feasible = [t for t in complete if _meets(spec, t.user_attrs["metrics"], baseline)]
    meets = {t.number for t in feasible}
    directions = list(spec.objectives.values())
    points = [[t.user_attrs["metrics"].get(m, math.nan) for m in spec.objectives] for t in feasible]
    front = [feasible[i] for i in pareto_front(points, directions)]
    first, sign = next(iter(spec.objectives)), 1 if directions[0] == "minimize" else -1
    front.sort(key=lambda t: sign * t.user_attrs["metrics"].get(first, math.nan))
    columns, params = _columns(spec), [p.key.key for p in spec.space]
    out = spec.out
    header = ["trial", "state", *params, *columns, "meets constraints", "config", "error"]
    rows = [[t.number, t.state.name.lower(), *(t.params.get(k) for k in params), *(_metrics(t).get(c, math.nan) for c in columns),
             t.number in meets, t.user_attrs.get("config", ""), t.user_attrs.get("error", "")] for t in trials]
    _write_table(out / "trials", header, rows, f"study {spec.study}: every trial")
    (out / "pareto").mkdir(parents=True, exist_ok=True)
    members = {f"{t.number:04d}.yaml" for t in front}
    for stale in (out / "pareto").glob("*.yaml"):  # a member of an earlier front that these constraints judge again
        if stale.name not in members:
            stale.unlink(missing_ok=True)
    front_rows = []
    for t in front:
        keep = out / "pareto" / f"{t.number:04d}.yaml"
        _write_member(spec, t, keep)
        front_rows.append([t.number, *(t.params.get(k) for k in params), *(t.user_attrs["metrics"].get(c, math.nan) for c in columns), str(keep)])
    constraints = ", ".join(map(str, spec.constraints)) or "none"
    where = f"; baseline {', '.join(f'{c.metric}={baseline[c.metric]:.4g}' for c in spec.constraints if c.relative)}" if baseline else ""
    md = _write_table(out / "pareto", ["trial", *params, *columns, "config"], front_rows,
                      f"Pareto front of study {spec.study} ({len(front)} of {len(complete)} complete trials; "
                      f"objectives {spec.objectives}; constraints {constraints}{where})")
    files = {"trials_csv": out / "trials.csv", "pareto_csv": out / "pareto.csv", "pareto_md": md}
    plot = _plot(spec, complete, front, out / "pareto.png") if complete else None
    if plot is not None:
        files["pareto_png"] = plot
    return front, files


def _earlier_seed_runs(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier ``seed_runs.csv`` (trial and seed as integers, metrics as floats; empty cells NaN)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    parsed = []
    for row in rows:
        try:
            parsed.append({k: int(v) if k in ("trial", "seed") else float(v) if v != "" else math.nan for k, v in row.items()})
        except (TypeError, ValueError):  # not a table this library wrote: its rows are left out of the summary
            continue
    return parsed


def write_seeds(spec: SweepSpec, rows: Sequence[Mapping[str, Any]], front: Sequence[Any]) -> dict[str, Path]:
    """``seed_runs.csv``: the seed re-runs of the study's trials, ``rows`` replacing every earlier run of their trials.
    ``seeds.csv``/``seeds.md``: per member of ``front`` (in its order) that has re-runs, the mean ± s.e. of each
    metric over its seeds; removed when no member has any, so they never describe an earlier front."""
    runs_csv = spec.out / "seed_runs.csv"
    rerun = {r["trial"] for r in rows}
    runs = [r for r in _earlier_seed_runs(runs_csv) if r["trial"] not in rerun] + [dict(r) for r in rows]
    files: dict[str, Path] = {}
    if runs:
        with runs_csv.open("w", newline="") as f:
            keys = list(dict.fromkeys(k for r in runs for k in r))
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(runs)
        files["seed_runs_csv"] = runs_csv
    columns = _columns(spec)
    table = []
    for trial in front:
        member = sorted((r for r in runs if r["trial"] == trial.number), key=lambda r: r["seed"])
        if member:
            cells = []
            for c in columns:
                mean, se = mean_se([float(r.get(c, math.nan)) for r in member])
                cells.append(f"{_fmt(mean)} ± {_fmt(se)}")
            table.append([trial.number, len(member), *cells])
    if not table:
        for stale in ("seeds.csv", "seeds.md"):
            (spec.out / stale).unlink(missing_ok=True)
        return files
    md = _write_table(spec.out / "seeds", ["trial", "seeds", *columns], table, f"study {spec.study}: Pareto configs over seeds (mean ± s.e.)")
    return {**files, "seeds_md": md, "seeds_csv": spec.out / "seeds.csv"}
