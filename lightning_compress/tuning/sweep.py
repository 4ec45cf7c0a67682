"""``lightning-compress sweep``: an Optuna study whose trials are ordinary Trainer fits of a LightningCLI config.

    lightning-compress sweep --spec configs/sweep.yaml [--trials N] [--storage URL] [--seeds N]

Before any trial: the spec is checked (:func:`~lightning_compress.tuning.space.load_spec`), the storage
opened, and a probe fit of two batches per epoch lists the metrics the run logs, so a constraint or
objective on a metric nobody logs is an error then. Each trial writes ``trials/NNNN/config.yaml`` (runnable
with ``lightning-compress fit --config``), fits it, exports the compressed model and records its
metrics. From epoch ``pruner.warmup_epochs`` on, a trial whose best value since then of the monitored metric
still misses its constraint is stopped (every validation of the fit is reported: several in an epoch with
``val_check_interval`` or ``max_steps``; not the validation that follows the fit).
Every value of the space (each choice, each range's ends) is built once through the CLI without fitting,
so a value a class refuses is an error before any trial too. The study lives in SQLite (``out/study.db``)
by default: run the same command again to resume it, or on several machines with one SQLAlchemy URL to
share it; the sampler is seeded per trial number, so a resumed study or a second worker samples new
configs while one uninterrupted run is reproducible. At the end: the Pareto front over the objectives
among trials meeting every constraint (``pareto.csv``, ``pareto.md``, ``pareto.png``, one
``pareto/NNNN.yaml`` per member) and, with ``--seeds N``, every front member re-run over seeds 0..N-1
(``seeds.csv``, ``seeds.md``: mean ± s.e.).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_compress.cli import CommandError, command_parser, config_error, raised_by_this_library, settings_checked
from lightning_compress.tuning.config import ConfigKey, get_value, load_config, resolve_key
from lightning_compress.tuning.space import MEASURED, Constraint, SweepSpec, load_spec
from lightning_compress.tuning.trial import (
    ConfigParseError, build_cli, fit_config, trial_base_config, trial_config, without_checkpoints, without_compression,
)

__all__ = ["BoundPruner", "INTERRUPTED", "TrialSeededSampler", "ValidationReports", "check_space_values", "claim_out", "main", "open_study",
           "probe_metrics", "retry_interrupted", "run_sweep", "rerun_seeds"]

try:
    from optuna.pruners import BasePruner as _BasePruner
    from optuna.samplers import BaseSampler as _BaseSampler
except ImportError:  # pragma: no cover - without the [sweep] extra; _optuna() says what to install
    _BasePruner = _BaseSampler = object  # type: ignore[assignment,misc]

_INSTALL = "lightning-compress sweep needs Optuna: pip install 'lightning-compress[sweep]' (optuna)"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as err:  # pragma: no cover - the dev setup installs it
        raise ImportError(_INSTALL) from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class TrialSeededSampler(_BaseSampler):
    """Optuna's ``TPESampler``, built afresh for every trial with a seed drawn from ``(seed, trial.number)``.

    One fixed seed per process would replay the same random start-up configs in every process: a
    resumed study, or a second worker on the same storage, would re-run the first trials. Trial numbers
    are unique within a study, so each trial gets its own stream, and one uninterrupted run still
    samples the same configs for the same ``seed``.

    Example:
        >>> import optuna
        >>> study = optuna.create_study(sampler=TrialSeededSampler(seed=0))
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._number: int | None = None
        self._inner: Any = None

    def _for(self, trial: Any) -> Any:
        if self._inner is None or self._number != trial.number:
            stream = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self._number, self._inner = trial.number, _optuna().samplers.TPESampler(seed=stream)
        return self._inner

    def before_trial(self, study: Any, trial: Any) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._inner is not None:
            self._inner.reseed_rng()


class BoundPruner(_BasePruner):
    """Stop a trial from step ``warmup_steps`` on when the best value it reported since that step still misses
    ``constraint`` (the highest for ``>=``/``>``, the lowest for ``<=``/``<``): a dip below the bound after it was
    met does not stop it, since the constraint is judged on the final value. Values before ``warmup_steps`` do not
    count: a recipe's dense epochs meet the bound before any compression starts.

    Example:
        >>> from lightning_compress.tuning.space import parse_constraint
        >>> pruner = BoundPruner(parse_constraint("val_acc >= 0.95"), warmup_steps=2)
        >>> pruner.misses([0.5, 0.96, 0.9]), pruner.misses([0.5, 0.9, 0.94])
        (False, True)
    """

    def __init__(self, constraint: Constraint, warmup_steps: int = 0) -> None:
        if constraint.relative:
            raise ValueError(f"BoundPruner needs an absolute constraint, got {constraint}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"BoundPruner: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.constraint = constraint
        self.warmup_steps = warmup_steps

    def misses(self, values: Sequence[float]) -> bool:
        """Whether the best of ``values`` misses the bound (no finite value misses it too)."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return True
        best = max(finite) if self.constraint.op in (">=", ">") else min(finite)
        return self.constraint.violation({self.constraint.metric: best}, None) > 0

    def prune(self, study: Any, trial: Any) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        return self.misses([v for s, v in trial.intermediate_values.items() if s >= self.warmup_steps])


class ValidationReports(Callback):
    """Report ``monitor`` to an Optuna trial after every validation of its fit from epoch ``warmup_epochs`` on (the
    n-th report is step n), and stop the fit when the study's pruner prunes the trial. Optuna's own Lightning
    callback reports at ``step=current_epoch``: a second validation in an epoch (``val_check_interval``, a
    ``max_steps`` fit) was dropped, and the validation run after the fit was reported as one more step, which
    pruned a trial that had finished training."""

    def __init__(self, trial: Any, monitor: str, warmup_epochs: int = 0) -> None:
        self.trial, self.monitor, self.warmup_epochs, self.reported = trial, monitor, warmup_epochs, 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when the fit ends before epoch ``warmup_epochs``: nothing would be reported (the spec's
        check against ``max_epochs`` cannot see a step budget before the loaders are built)."""
        batches = trainer.num_training_batches
        if not self.warmup_epochs or trainer.max_steps is None or trainer.max_steps < 0 or not math.isfinite(batches) or batches < 1:
            return
        per_epoch = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))  # optimizer steps
        last_epoch = (trainer.max_steps - 1) // per_epoch
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            last_epoch = min(last_epoch, trainer.max_epochs - 1)
        if last_epoch < self.warmup_epochs:
            warnings.warn(
                f"sweep pruner: trainer.max_steps={trainer.max_steps} ends the fit in epoch {last_epoch} ({per_epoch} steps an "
                f"epoch), before the pruner's warmup_epochs={self.warmup_epochs}: no validation is reported, so no trial can "
                f"be stopped early; give warmup_epochs <= {last_epoch}, or remove 'pruner'",
                UserWarning,
            )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.current_epoch < self.warmup_epochs:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self.__dict__.get("_said"):
                self._said = True
                warnings.warn(f"sweep pruner: the validation at epoch {trainer.current_epoch} logged no {self.monitor!r} "
                              f"(it logged {sorted(trainer.callback_metrics)}), so this trial cannot be stopped early", UserWarning)
            return
        self.trial.report(float(value), step=self.reported)
        self.reported += 1
        if self.trial.should_prune():
            raise _optuna().TrialPruned(f"{self.monitor}={float(value):.4g} at validation {self.reported}, epoch {trainer.current_epoch}")


def claim_out(spec: SweepSpec) -> None:
    """Make ``out`` the spec's study's folder (``study.json`` names it, created once, atomically), refusing one that
    holds another study's files: its trials write ``trials/NNNN`` too, over the other's (a second study started with
    ``--study`` alone overwrote the first one's trial configs). A folder with trials made before the file existed is
    refused when its default storage (``study.db`` there) holds another study. Called once the study has opened and its
    search is checked, so a run that fails before claims nothing."""
    spec.out.mkdir(parents=True, exist_ok=True)
    marker = spec.out / "study.json"
    release = f"(delete {marker} to give the folder to another study)"
    if not marker.exists():
        others = [n for n in _studies_in(spec.out / "study.db") if n != spec.study] if (spec.out / "trials").is_dir() else []
        if others:
            raise ValueError(f"out folder {os.fspath(spec.out)!r} holds the trials of study {others} (its study.db), and "
                             f"study {spec.study!r} would write its trials over them; give it its own folder (out: DIR in "
                             f"the spec, or --out) {release}")
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # two workers: one creates it, the other reads it
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"study": spec.study}) + "\n")
            return
    try:
        held = json.loads(marker.read_text())["study"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"out folder {os.fspath(spec.out)!r}: {marker} does not say which study the folder holds ({err}) "
                         f"{release}") from None
    if held != spec.study:
        raise ValueError(f"out folder {os.fspath(spec.out)!r} holds the trials of study {held!r}, and study {spec.study!r} "
                         f"would write its trials over them; give it its own folder (out: DIR in the spec, or --out) {release}")


def _studies_in(db: Path) -> list[str]:
    """The study names of an SQLite storage file (none when there is no such file)."""
    if not db.is_file():
        return []
    try:
        return list(_optuna().get_all_study_names(storage=f"sqlite:///{db}"))
    except Exception:  # noqa: BLE001 - not a storage this version reads: no owner to tell
        return []


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
        sampler = TrialSeededSampler(spec.sampler_seed)
        bound = spec.pruner_constraint
        # the warmup is counted in epochs by the reporting callback (ValidationReports), which reports nothing before it
        pruner = BoundPruner(bound) if bound is not None else optuna.pruners.NopPruner()
        return optuna.create_study(study_name=spec.study, storage=storage, sampler=sampler, pruner=pruner, load_if_exists=True,
                                   directions=list(spec.objectives.values()))
    except ValueError as err:
        if "direction" in str(err).lower():
            raise ValueError(f"study {spec.study!r} in {url} was created with other objectives: {err}") from err
        raise ValueError(f"cannot open the study storage {url!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors for a URL that cannot be opened
        raise ValueError(f"cannot open the study storage {url!r}: {type(err).__name__}: {err}") from err


def probe_metrics(spec: SweepSpec) -> set[str]:
    """The metric names a fit of the config on two batches per epoch logs, plus the measured ones; fails on a config
    that cannot fit, when an objective or constraint names a metric outside that set, and when one of the measured
    metrics it names cannot be measured on this run (no example input: NaN in every trial)."""
    # two batches an epoch, validated at every epoch end (a step-based val_check_interval would exceed the epoch)
    quick = {resolve_key(spec.config, f"trainer.{k}"): v for k, v in
             {"limit_train_batches": 2, "limit_val_batches": 2, "val_check_interval": 1.0, "check_val_every_n_epoch": 1}.items()}
    wanted = [*spec.objectives, *(c.metric for c in spec.constraints)]
    measured = [m for m in dict.fromkeys(wanted) if m in MEASURED]
    with tempfile.TemporaryDirectory(prefix="lc-probe-") as tmp, warnings.catch_warnings(record=True) as said:  # one per worker
        warnings.simplefilter("always")
        probe = without_checkpoints(trial_config(spec.config, {**spec.overrides, **quick}, Path(tmp)))
        try:
            metrics = fit_config(probe, Path(tmp), measure=bool(measured))
        except (ValueError, TypeError) as err:  # a setting this library refuses: said as the probe's, in one line
            if not raised_by_this_library(err):
                raise
            raise CommandError(f"the probe fit of the config{_with_overrides(spec)} (two batches per epoch, run before any "
                               f"trial to list the metrics it logs; no value of the space is in it) failed: {err}") from err
    known = set(metrics) | set(MEASURED)
    missing = [m for m in wanted if m not in known]
    if missing:
        raise CommandError(f"no run logs {missing}: the metrics available are {sorted(known)}")
    unmeasured = [m for m in measured if not math.isfinite(metrics.get(m, math.nan))]
    if unmeasured:
        why = [str(w.message) for w in said if "NaN" in str(w.message)]
        raise CommandError(f"the sweep needs {unmeasured}, measured on each trial's compressed model, but a probe fit of the "
                         f"config could not measure them ({'; '.join(why) or 'no reason given'}); every trial would miss them")
    return known


def _with_overrides(spec: SweepSpec) -> str:
    return f" with the sweep's overrides {sorted(k.key for k in spec.overrides)}" if spec.overrides else ""


def _build_error(config: dict[str, Any]) -> str | None:
    """What the CLI says when it builds ``config`` (model, data, Trainer, callbacks) without fitting; ``None`` if it builds."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_cli(config)
    except ConfigParseError as err:  # the parser refused a value's type
        return str(err)
    except (ValueError, TypeError, RuntimeError) as err:
        return config_error(err) or f"{type(err).__name__}: {err}"
    return None


def check_space_values(spec: SweepSpec) -> None:
    """Build the config through the CLI, without fitting, with each value of the space in turn: every choice of a
    list, both ends of a range (the other keys as the base config and overrides have them).

    Raises:
        ValueError: naming the key, the value and what the class (or the CLI) said about it.
    """
    candidates = {param.key: _candidates(param) for param in spec.space}
    with tempfile.TemporaryDirectory(prefix="lc-space-") as tmp:
        if (error := _build_error(trial_config(spec.config, spec.overrides, Path(tmp)))) is not None:
            raise ValueError(f"the config{_with_overrides(spec)} does not build, before any value of the space is in it (the "
                             f"probe fit and every trial start from it): {error}")
        for param in spec.space:
            for value in candidates[param.key]:
                config = trial_config(spec.config, {**spec.overrides, param.key: value}, Path(tmp))
                if _callback_builds(config, param.key):
                    continue
                error = _build_error(config)
                if error is not None and not _builds_with_the_others(spec, candidates, param.key, value, Path(tmp)):
                    hint = ""
                    ends = (float(param.low), float(param.high)) if param.choices is None else ()
                    whole = {**spec.overrides, param.key: round(value)} if ends else {}
                    if (ends and not param.is_int and all(e.is_integer() for e in ends)
                            and _build_error(trial_config(spec.config, whole, Path(tmp))) is None):  # an integer is taken
                        hint = (f" (a range with float ends samples fractions; for whole numbers write the ends as integers: "
                                f"{{low: {int(param.low)}, high: {int(param.high)}}})")
                    raise ValueError(f"space[{param.key.key!r}]: the value {value!r} is refused: {error}{hint}")


def _callback_builds(config: dict[str, Any], key: Any) -> bool:
    """Whether the callback that ``key`` sets builds from its entry alone: the cheap check, before building
    the whole config (model and data too) only where it does not (or the key is not a callback's)."""
    from lightning.pytorch.cli import instantiate_class

    path = key.path
    if len(path) < 4 or path[:2] != ("trainer", "callbacks") or path[-2] != "init_args":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            instantiate_class((), get_value(config, ConfigKey(key.key, path[:-2], key.owner)))
    except Exception:  # noqa: BLE001 - any refusal: the whole build decides, and words it
        return False
    return True


def _candidates(param: Any) -> list[Any]:
    """What :func:`check_space_values` builds of one entry: every choice, or a range's two ends (and, for a
    float range, a fractional value inside it: ``{low: 2.0, high: 8.0}`` samples 5.21, which an integer
    argument refuses)."""
    if param.choices is not None:
        return list(param.choices)
    if param.is_int:
        return [int(param.low), int(param.high)]
    low, high = float(param.low), float(param.high)
    inside = low * (high / low) ** 0.382 if param.log else low + (high - low) * 0.382
    if param.step:
        inside = low + round((inside - low) / param.step) * param.step
    return [low, high, inside]


def _builds_with_the_others(spec: SweepSpec, candidates: dict[Any, list[Any]], key: Any, value: Any, tmp: Path, limit: int = 8) -> bool:
    """Whether ``key=value`` builds together with some candidates of the other entries: a value may be refused
    only next to the base config's value of another searched key (``start_epoch=4`` beside a base ``end_epoch: 3``
    while ``end_epoch`` is searched over 6-10)."""
    others = [k for k in candidates if k != key]
    for combination in itertools.islice(itertools.product(*(candidates[k] for k in others)), limit):
        values = {**spec.overrides, **dict(zip(others, combination)), key: value}
        if others and _build_error(trial_config(spec.config, values, tmp)) is None:
            return True
    return False


def check_counts(trials: Any, seeds: Any) -> None:
    """``trials`` (finished trials the study should hold) >= 1 and ``seeds`` (re-runs per front member) >= 0."""
    for name, value, least in (("trials", trials, 1), ("seeds", seeds, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _search_of(spec: SweepSpec) -> str:
    """What a study's trials were sampled from, fitted with and scored by: the base config, the fixed overrides, the
    space and the objectives, in order (the constraints and the trial count may change when a study is resumed: the
    front is judged again from each trial's stored metrics)."""
    space = [[p.key.key, list(p.choices) if p.choices is not None else None, p.low, p.high, p.log, p.step] for p in spec.space]
    search = {"config": spec.config, "overrides": {k.key: v for k, v in spec.overrides.items()}, "space": space,
              "objectives": [[name, direction] for name, direction in spec.objectives.items()]}  # fmt: skip
    return json.dumps(search, sort_keys=True, default=str)


def check_same_search(spec: SweepSpec, study: Any) -> Any:
    """The study to run: ``study`` with the spec's search recorded; a new one in its place when every trial it holds
    failed under another search (the fix of what made them fail: Optuna refuses a parameter's changed choices, and
    the baseline of other overrides no longer holds). Refuses to resume a study whose finished or running trials
    came from another search (another base config, other overrides, another space, other objectives or their
    order), which would mix them into one front or delete another worker's study."""
    optuna = _optuna()
    mine, held = json.loads(_search_of(spec)), study.user_attrs.get("search")
    before = json.loads(held) if held is not None else None
    changed = [k for k in mine if before is not None and k in before and before[k] != mine[k]]
    other_directions = [d.name.lower() for d in study.directions] != list(spec.objectives.values())
    if other_directions:  # (a study recorded before its search held the objectives: its directions tell)
        changed.append("objectives")
    with warnings.catch_warnings():  # Optuna marks the function experimental, on every run
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial is not one that runs
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    # a killed worker's trial is failed, and its retry waits (it holds the failed trial's number): failed too
    all_failed = bool(trials) and all(
        t.state == states.FAIL or (t.state == states.WAITING and "failed_trial" in t.system_attrs) for t in trials
    )
    if (not trials and other_directions) or (all_failed and changed):
        optuna.delete_study(study_name=spec.study, storage=spec.storage_url)
        study = open_study(spec)
    elif changed and trials:
        raise ValueError(f"study {spec.study!r} in {spec.storage_url} holds trials of another search: its {sorted(set(changed))} "
                         "differ from this spec's. Give this search its own study and folder (study: NAME and out: DIR in the spec, or "
                         "--study NAME --out DIR), or delete the old study to start again")
    study.set_user_attr("search", json.dumps(mine, sort_keys=True))
    return study


class AllTrialsFailed(CommandError, RuntimeError):
    """Every trial of a sweep failed (the ``lightning-compress`` command prints its message as one line)."""


def _first_failure(spec: SweepSpec, study: Any) -> None:
    """An error quoting the first failed trial's reason when the study holds failures and no finished trial."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    if failed and not any(t.state in states for t in trials):
        first = failed[0]
        reason = first.user_attrs.get("error", "no reason recorded (see the log)")
        raise AllTrialsFailed(
            f"all {len(failed)} trial(s) of study {spec.study!r} failed, none completed (each one's reason is in "
            f"{spec.out / 'trials.csv'}); the first, trial {first.number} ({first.user_attrs.get('config', '')}): {reason}"
        )


def _baseline(spec: SweepSpec, study: Any) -> dict[str, float] | None:
    if not spec.needs_baseline:
        return None
    if "baseline" not in study.user_attrs:
        dense = without_compression(trial_config(spec.config, spec.overrides, spec.out / "baseline"))
        study.set_user_attr("baseline", fit_config(dense, spec.out / "baseline", header="the dense baseline of the sweep"))
    baseline = study.user_attrs["baseline"]
    missing = [str(c) for c in spec.constraints if c.relative and c.metric not in baseline]
    if missing:  # every trial would train, then fail its constraint check
        raise CommandError(
            f"the constraints {missing} are relative to the dense baseline (the config without its compression callbacks), "
            f"which logs no {sorted({c.metric for c in spec.constraints if c.relative and c.metric not in baseline})}; "
            f"it logs {sorted(baseline)}. Give those constraints an absolute bound"
        )
    return baseline


def _objective(spec: SweepSpec, baseline: dict[str, float] | None) -> Any:
    optuna = _optuna()
    monitor = spec.pruner_monitor if spec.pruner_constraint is not None else None

    def objective(trial: Any) -> Any:
        try:
            values = {**spec.overrides, **{p.key: p.suggest(trial) for p in spec.space}}
        except Exception as err:  # the study refused a value (Optuna's checks): recorded as the trial's reason
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        run_dir = spec.out / "trials" / f"{trial.number:04d}"
        callbacks = []
        if monitor is not None:
            callbacks.append(ValidationReports(trial, monitor, spec.pruner_warmup_epochs or 0))
            trial.set_user_attr("monitor", monitor)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("config", str(run_dir / "config.yaml"))
        trial.set_user_attr("values", {k.key: v for k, v in values.items()})  # the front's configs are built from them
        params = ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
        try:
            metrics = fit_config(trial_config(spec.config, values, run_dir), run_dir, callbacks=callbacks,
                                 header=f"trial {trial.number} of study {spec.study!r}: {params}")
        except optuna.TrialPruned:  # stopped by the pruner: not a failure
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Ctrl-C, which Lightning's fit turns into sys.exit(1) while handling it: recorded, and the sweep stops as
            # interrupted (Optuna marks the trial failed); the next run of the command retries it (retry_interrupted)
            if not isinstance(err, KeyboardInterrupt) and not isinstance(err.__context__, KeyboardInterrupt):
                raise
            trial.set_user_attr("error", INTERRUPTED)
            raise KeyboardInterrupt from err
        except Exception as err:  # any failure of the user's code: the study records the trial as failed and goes on
            trial.set_user_attr("error", config_error(err) or f"{type(err).__name__}: {err}")
            raise
        trial.set_user_attr("metrics", metrics)
        violations = [c.violation(metrics, baseline) for c in spec.constraints]
        trial.set_user_attr("violations", violations)
        for c, v in zip(spec.constraints, violations):  # the sampler favours trials that meet them (<= 0)
            trial.set_constraint(str(c), v)
        result = [metrics.get(name, math.nan) for name in spec.objectives]
        if any(math.isnan(v) for v in result):  # a failed trial, with the reason: "pruned" is the pruner's word
            unmeasured = [name for name, v in zip(spec.objectives, result) if math.isnan(v)]
            reason = f"objective(s) {unmeasured} are NaN in this trial (a diverged run, or a model that could not be measured)"
            trial.set_user_attr("error", reason)
            raise ValueError(reason)
        return result[0] if len(result) == 1 else result

    return objective


#: The reason recorded for a trial stopped by Ctrl-C.
INTERRUPTED = "interrupted (KeyboardInterrupt); the next run of the same command retries it"


def retry_interrupted(study: Any) -> list[int]:
    """Enqueue once, with the same parameters, every trial an earlier run stopped by Ctrl-C (a killed process's
    trial is retried by Optuna once its heartbeat is stale); returns their numbers."""
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = [t for t in trials if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("error") == INTERRUPTED
             and t.number not in retried]
    for t in again:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in again]


def run_sweep(spec: SweepSpec, *, trials: int | None = None, seeds: int = 0) -> dict[str, Any]:
    """Probe, check every value of the space, then run trials until the study holds ``trials`` finished ones, then
    write the results.

    Returns ``{"study", "front", "files", "seeds"}``: the Optuna study, the Pareto front (finished
    trials meeting every constraint), the written file paths and the seed table (``None`` without seeds).

    Raises:
        ValueError: a metric no run logs, or a value of the space that a class refuses (before any trial).
        RuntimeError: every trial failed (quoting the first one's reason).
    """
    from lightning_compress.tuning.results import write_front, write_seeds

    optuna = _optuna()
    target = spec.trials if trials is None else trials
    with settings_checked():
        check_counts(target, seeds)
        study = check_same_search(spec, open_study(spec))
        claim_out(spec)
    with settings_checked():  # built, not fitted: before the probe fit spends the config's epochs
        check_space_values(spec)
    probe_metrics(spec)
    baseline = _baseline(spec, study)
    retry_interrupted(study)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = target - len(study.get_trials(deepcopy=False, states=done))
    if remaining > 0:
        failed = []

        def stop_after_failures(study: Any, trial: Any) -> None:  # a failed trial does not count towards `target`
            if trial.state == optuna.trial.TrialState.FAIL:
                failed.append(trial.number)
                if len(failed) >= target:
                    study.stop()

        study.optimize(_objective(spec, baseline), n_trials=remaining + target, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(target, states=done), stop_after_failures])
        held = len(study.get_trials(deepcopy=False, states=done))
        if failed and held < target:
            warnings.warn(f"sweep: {len(failed)} trials failed in this run (trials {failed}; the reason of each is in "
                          f"trials.csv), so it stopped with {held} of the {target} finished trials asked for; fix the cause "
                          "and run the same command again to add the missing ones", UserWarning, stacklevel=2)
    front, files = write_front(spec, study, baseline)  # trials.csv holds each failed trial's reason
    _first_failure(spec, study)
    seed_table = rerun_seeds(spec, front, seeds) if seeds else None
    files.update(write_seeds(spec, seed_table or [], front))  # without --seeds: the earlier re-runs of this front
    return {"study": study, "front": front, "files": files, "seeds": seed_table}


def rerun_seeds(spec: SweepSpec, front: list[Any], seeds: int) -> list[dict[str, Any]]:
    """Every front member's config (:func:`~lightning_compress.tuning.trial.trial_base_config`) fitted again with
    ``seed_everything`` 0..seeds-1: per-seed metrics. A data module's own ``seed`` stays as configured: this
    library's choose the validation split with it, which would measure every seed on another split than the trial's."""
    rows = []
    for trial in front:
        base = trial_base_config(spec.config, trial)
        for seed in range(seeds):
            run_dir = spec.out / "seeds" / f"{trial.number:04d}" / f"seed{seed}"
            config = trial_config(base, {resolve_key(base, "seed_everything"): seed}, run_dir)
            metrics = fit_config(config, run_dir, header=f"trial {trial.number}, seed {seed}")
            rows.append({"trial": trial.number, "seed": seed, **metrics})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``lightning-compress sweep``."""
    p = command_parser("lightning-compress sweep", __doc__)
    p.add_argument("--spec", required=True, help="the sweep's YAML (config, space, objectives, constraints, ...)")
    p.add_argument("--trials", type=int, default=None, help="finished trials the study should hold (default: the spec's)")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL of the study (default: sqlite:///<out>/study.db)")
    p.add_argument("--study", default=None, help="study name (default: the spec's, else the config's stem)")
    p.add_argument("--out", default=None, help="results folder (default: runs/sweep/<study>)")
    p.add_argument("--seeds", type=int, default=0, help="re-run every Pareto config over seeds 0..N-1 and report mean ± s.e.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more fixed override for every trial (YAML value), e.g. --set data.root=/data/mnist")
    args = p.parse_args(list(argv) if argv is not None else None)
    with settings_checked():
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
