"""``lightning-compress sweep``: an Optuna study whose trials are ordinary Trainer fits of a LightningCLI config.

    lightning-compress sweep --spec configs/sweep.yaml [--trials N] [--storage URL] [--seeds N]

Before any trial: the spec is checked (:func:`~lightning_compress.tuning.space.load_spec`), the storage
opened, and a probe fit of two batches per epoch lists the metrics the run logs, so a constraint or
objective on a metric nobody logs is an error then. Each trial writes ``trials/NNNN/config.yaml`` (runnable
with ``lightning-compress fit --config``), fits it, exports the compressed model and records its
metrics. Trials whose monitored metric still misses its constraint after ``pruner.warmup_epochs`` are
stopped by Optuna's ``PyTorchLightningPruningCallback``. The study lives in SQLite (``out/study.db``) by
default: run the same command again to resume it, or on several machines with one SQLAlchemy URL to
share it. At the end: the Pareto front over the objectives among trials meeting every constraint
(``pareto.csv``, ``pareto.md``, ``pareto.png``, one ``pareto/NNNN.yaml`` per member) and, with
``--seeds N``, every front member re-run over seeds 0..N-1 (``seeds.csv``, ``seeds.md``: mean ± s.e.).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_compress.tuning.config import load_config, resolve_key
from lightning_compress.tuning.space import MEASURED, SweepSpec, load_spec
from lightning_compress.tuning.trial import fit_config, trial_config, without_compression

__all__ = ["main", "open_study", "probe_metrics", "run_sweep", "rerun_seeds"]

_INSTALL = "lightning-compress sweep needs Optuna: pip install 'lightning-compress[sweep]' (optuna, optuna-integration)"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as err:  # pragma: no cover - the dev setup installs it
        raise ImportError(_INSTALL) from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(spec: SweepSpec) -> Any:
    """Create or resume the spec's study in its storage (an error naming the URL when it cannot be opened)."""
    optuna = _optuna()
    spec.out.mkdir(parents=True, exist_ok=True)
    url = spec.storage_url
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use since Optuna 2.8
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=30, grace_period=120,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed)
        pruner = (optuna.pruners.ThresholdPruner(**_threshold(spec), n_warmup_steps=spec.pruner_warmup_epochs)
                  if spec.pruner_warmup_epochs is not None else optuna.pruners.NopPruner())
        return optuna.create_study(study_name=spec.study, storage=storage, sampler=sampler, pruner=pruner, load_if_exists=True,
                                   directions=list(spec.objectives.values()))
    except ValueError as err:
        if "direction" in str(err).lower():
            raise ValueError(f"study {spec.study!r} in {url} was created with other objectives: {err}") from err
        raise ValueError(f"cannot open the study storage {url!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors for a URL that cannot be opened
        raise ValueError(f"cannot open the study storage {url!r}: {type(err).__name__}: {err}") from err


def _monitored(spec: SweepSpec) -> Any:
    name = spec.pruner_monitor or (spec.constraints[0].metric if spec.constraints else next(iter(spec.objectives)))
    constraint = next((c for c in spec.constraints if c.metric == name and not c.relative), None)
    if constraint is None:
        raise ValueError(f"pruner: monitor {name!r} needs an absolute constraint on it (e.g. '{name} >= 0.9') to prune against")
    return constraint


def _threshold(spec: SweepSpec) -> dict[str, float]:
    c = _monitored(spec)
    return {"lower": c.value} if c.op in (">=", ">") else {"upper": c.value}


def probe_metrics(spec: SweepSpec) -> set[str]:
    """The metric names a fit of the config on two batches per epoch logs, plus the measured ones; fails on a config
    that cannot fit, and when an objective or constraint names a metric outside that set."""
    # two batches an epoch, validated at every epoch end (a step-based val_check_interval would exceed the epoch)
    quick = {resolve_key(spec.config, f"trainer.{k}"): v for k, v in
             {"limit_train_batches": 2, "limit_val_batches": 2, "val_check_interval": 1.0, "check_val_every_n_epoch": 1,
              "enable_checkpointing": False}.items()}
    with tempfile.TemporaryDirectory(prefix="lc-probe-") as tmp, warnings.catch_warnings():  # one per worker
        warnings.simplefilter("ignore")
        logged = set(fit_config(trial_config(spec.config, {**spec.overrides, **quick}, Path(tmp)), Path(tmp), measure=False))
    known = logged | set(MEASURED)
    wanted = [*spec.objectives, *(c.metric for c in spec.constraints)]
    missing = [m for m in wanted if m not in known]
    if missing:
        raise ValueError(f"no run logs {missing}: the metrics available are {sorted(known)}")
    return known


def _baseline(spec: SweepSpec, study: Any) -> dict[str, float] | None:
    if not spec.needs_baseline:
        return None
    if "baseline" not in study.user_attrs:
        dense = without_compression(trial_config(spec.config, spec.overrides, spec.out / "baseline"))
        study.set_user_attr("baseline", fit_config(dense, spec.out / "baseline", header="the dense baseline of the sweep"))
    return study.user_attrs["baseline"]


def _objective(spec: SweepSpec, baseline: dict[str, float] | None) -> Any:
    optuna = _optuna()
    monitor = _monitored(spec).metric if spec.pruner_warmup_epochs is not None else None

    def objective(trial: Any) -> Any:
        values = {**spec.overrides, **{p.key: p.suggest(trial) for p in spec.space}}
        run_dir = spec.out / "trials" / f"{trial.number:04d}"
        callbacks = []
        if monitor is not None:
            from optuna_integration import PyTorchLightningPruningCallback

            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=monitor))
            trial.set_user_attr("monitor", monitor)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("config", str(run_dir / "config.yaml"))
        params = ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
        metrics = fit_config(trial_config(spec.config, values, run_dir), run_dir, callbacks=callbacks,
                             header=f"trial {trial.number} of study {spec.study!r}: {params}")
        trial.set_user_attr("metrics", metrics)
        violations = [c.violation(metrics, baseline) for c in spec.constraints]
        trial.set_user_attr("violations", violations)
        for c, v in zip(spec.constraints, violations):  # the sampler favours trials that meet them (<= 0)
            trial.set_constraint(str(c), v)
        result = [metrics.get(name, math.nan) for name in spec.objectives]
        if any(math.isnan(v) for v in result):
            raise optuna.TrialPruned(f"objective(s) {list(spec.objectives)} not measured: {result}")
        return result[0] if len(result) == 1 else result

    return objective


def run_sweep(spec: SweepSpec, *, trials: int | None = None, seeds: int = 0) -> dict[str, Any]:
    """Probe, then run trials until the study holds ``trials`` finished ones, then write the results.

    Returns ``{"study", "front", "table", "seeds"}``: the Optuna study, the Pareto front (finished
    trials meeting every constraint), the written file paths and the seed table (``None`` without seeds).
    """
    from lightning_compress.tuning.results import write_front, write_seeds

    optuna = _optuna()
    study = open_study(spec)
    probe_metrics(spec)
    baseline = _baseline(spec, study)
    target = trials or spec.trials
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = target - len(study.get_trials(deepcopy=False, states=done))
    if remaining > 0:
        study.optimize(_objective(spec, baseline), n_trials=remaining, catch=(ValueError, RuntimeError),
                       callbacks=[optuna.study.MaxTrialsCallback(target, states=done)])
    front, files = write_front(spec, study, baseline)
    seed_table = rerun_seeds(spec, front, seeds) if seeds else None
    if seed_table is not None:
        files.update(write_seeds(spec, seed_table))
    return {"study": study, "front": front, "files": files, "seeds": seed_table}


def rerun_seeds(spec: SweepSpec, front: list[Any], seeds: int) -> list[dict[str, Any]]:
    """Every front member's config fitted again with ``seed_everything`` 0..seeds-1: per-seed metrics."""
    rows = []
    for trial in front:
        base = load_config(trial.user_attrs["config"])
        for seed in range(seeds):
            run_dir = spec.out / "seeds" / f"{trial.number:04d}" / f"seed{seed}"
            config = trial_config(base, {resolve_key(base, "seed_everything"): seed}, run_dir)
            metrics = fit_config(config, run_dir, header=f"trial {trial.number}, seed {seed}")
            rows.append({"trial": trial.number, "seed": seed, **metrics})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``lightning-compress sweep``."""
    p = argparse.ArgumentParser(prog="lightning-compress sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="the sweep's YAML (config, space, objectives, constraints, ...)")
    p.add_argument("--trials", type=int, default=None, help="finished trials the study should hold (default: the spec's)")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL of the study (default: sqlite:///<out>/study.db)")
    p.add_argument("--study", default=None, help="study name (default: the spec's, else the config's stem)")
    p.add_argument("--out", default=None, help="results folder (default: runs/sweep/<study>)")
    p.add_argument("--seeds", type=int, default=0, help="re-run every Pareto config over seeds 0..N-1 and report mean ± s.e.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more fixed override for every trial (YAML value), e.g. --set data.root=/data/mnist")
    args = p.parse_args(list(argv) if argv is not None else None)
    raw = load_config(args.spec)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        raw["overrides"] = {**(raw.get("overrides") or {}), key: yaml.safe_load(value)}
    spec = load_spec(raw, storage=args.storage, study=args.study, out=args.out)
    result = run_sweep(spec, trials=args.trials, seeds=args.seeds)
    print(Path(result["files"]["pareto_md"]).read_text())
    if result["seeds"] is not None:
        print(Path(result["files"]["seeds_md"]).read_text())
    print(json.dumps({k: os.fspath(v) for k, v in result["files"].items()}, indent=1))
    return result
