"""A sweep's spec, read from YAML and checked before any trial runs.

.. code-block:: yaml

    config: configs/prune.yaml        # the LightningCLI config every trial fits
    trials: 20
    objectives: {artifact_bytes: minimize}      # or several: a Pareto front
    constraints: ["val_acc >= 0.95"]            # also "val_loss <= 1.05 * baseline"
    space:
      PruningCallback.target_sparsity: {low: 0.5, high: 0.97}
      model.optimizer.lr: {low: 0.01, high: 0.3, log: true}
      data.batch_size: [32, 64, 128]
    overrides: {trainer.max_epochs: 6}          # fixed for every trial
    pruner: {warmup_epochs: 4}                  # from epoch 4 on, stop a trial whose best val_acc since then misses 0.95

Keys follow :mod:`lightning_compress.tuning.config`. ``baseline`` in a constraint is the metric of the
same config fitted once with the compression callbacks removed.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from lightning_compress.tuning.devices import check_one_device
from lightning_compress.tuning.config import ConfigKey, check_lr_takes_effect, load_config, refuse_resumed_keys, resolve_key

__all__ = ["Constraint", "Param", "SweepSpec", "MEASURED", "load_spec", "parse_constraint"]

#: what each trial measures on its compressed model (besides the metrics the run logs), and its direction
MEASURED = {"artifact_bytes": "minimize", "latency_ms": "minimize", "macs": "minimize", "parameters": "minimize"}
_DIRECTIONS = ("minimize", "maximize")
#: the direction of a list-form objective, known from a token of its name (``val_f1`` -> ``f1``)
_KNOWN_DIRECTIONS = {
    **dict.fromkeys(("acc", "accuracy", "f1", "auroc", "auc", "precision", "recall", "iou", "dice", "bleu", "rouge", "map", "r2"),
                    "maximize"),
    **dict.fromkeys(("loss", "error", "err", "ppl", "perplexity", "mse", "mae", "rmse", "nll", "bytes", "latency", "time"),
                    "minimize"),
}
#: Tokens that make a name a change or a spread of a metric (``val_acc_drop``, ``acc_gap``, ``f1_std``), whose
#: direction the metric's own token does not tell.
_UNCLEAR = frozenset(("drop", "gap", "std", "var", "variance", "delta", "diff", "change", "degradation", "increase", "decrease"))
_OPS = (">=", "<=", ">", "<")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w/.\-]*)\s*(>=|<=|>|<)\s*(?:([-+0-9.eE]+)\s*\*\s*)?(baseline|[-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``; the bound is ``factor * baseline`` when ``relative``."""

    metric: str
    op: str
    value: float
    relative: bool = False

    def bound(self, baseline: Mapping[str, float] | None) -> float:
        if not self.relative:
            return self.value
        if not baseline or self.metric not in baseline:
            raise ValueError(f"constraint on {self.metric} is relative to the baseline, which has no {self.metric}")
        return self.value * baseline[self.metric]

    def violation(self, metrics: Mapping[str, float], baseline: Mapping[str, float] | None) -> float:
        """How far ``metrics`` is from meeting it: ``<= 0`` when met (Optuna's constraint convention)."""
        value = metrics.get(self.metric, float("nan"))
        if value != value:  # a NaN metric never meets a constraint
            return float("inf")
        bound = self.bound(baseline)
        gap = bound - value if self.op in (">=", ">") else value - bound
        if gap == 0 and self.op in (">", "<"):  # a strict bound is missed at equality: by the smallest amount
            return math.ulp(abs(bound)) if bound else math.ulp(0.0)
        return gap

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {f'{self.value:g} * baseline' if self.relative else f'{self.value:g}'}"


def parse_constraint(text: Any) -> Constraint:
    """``"val_acc >= 0.97"`` or ``"val_ppl <= 1.05 * baseline"``."""
    m = _CONSTRAINT.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"constraint {text!r} is not 'metric OP number' or 'metric OP factor * baseline' (OP one of {list(_OPS)})")
    metric, op, factor, bound = m.groups()
    if factor and bound != "baseline":
        raise ValueError(f"constraint {text!r}: only 'factor * baseline' may carry a factor")
    number = factor if bound == "baseline" else bound
    try:
        value = float(number) if number else 1.0
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise ValueError(
            f"constraint {text!r}: {number!r} is not a finite number; write 'metric OP number' (val_acc >= 0.97) or "
            "'metric OP factor * baseline' (val_ppl <= 1.05 * baseline)"
        )
    return Constraint(metric, op, value, relative=bound == "baseline")


@dataclass(frozen=True)
class Param:
    """One search-space entry: a categorical list, or a ``low``/``high`` range (int when both are ints)."""

    key: ConfigKey
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and (self.step is None or float(self.step).is_integer())

    def suggest(self, trial: Any) -> Any:
        name = self.key.key
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)  # type: ignore[arg-type]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _yaml_number(value: Any) -> Any:
    """A number YAML 1.1 reads as a string (``1e-4``, without a dot before the exponent) as the float it writes; any
    other value as it is. LightningCLI's configs read these as numbers too."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d*)?[eE][-+]?\d+\s*", value):
        return float(value)
    return value


def _check_range(key: str, low: Any, high: Any, log: Any, step: Any) -> None:
    """Optuna's own rules for a ``low``/``high`` range, checked here so a bad range fails before any trial."""
    if not (_number(low) and _number(high) and math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"space[{key!r}]: needs finite numbers low < high, got low={low!r} high={high!r}")
    if not isinstance(log, bool):
        raise ValueError(f"space[{key!r}]: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ValueError(f"space[{key!r}]: a log range needs low > 0, got {low!r}")
    if step is None:
        return
    if not _number(step) or step <= 0:
        raise ValueError(f"space[{key!r}]: step must be a positive number, got {step!r}")
    is_int = isinstance(low, int) and isinstance(high, int) and float(step).is_integer()
    if log and not (is_int and step == 1):
        raise ValueError(f"space[{key!r}]: Optuna takes no step with log: true (an integer range only step 1), got step={step!r}; "
                         "drop one of them")
    if (Decimal(str(high)) - Decimal(str(low))) % Decimal(str(step)) != 0:
        raise ValueError(f"space[{key!r}]: step={step!r} does not divide high - low = {high!r} - {low!r} "
                         "(Optuna would silently lower high); make high = low + a whole number of steps")


def _param(config: Mapping[str, Any], key: str, entry: Any) -> Param:
    where = resolve_key(config, key)
    if isinstance(entry, list):
        if not entry:
            raise ValueError(f"space[{key!r}]: an empty list of choices")
        return Param(where, choices=tuple(_yaml_number(v) for v in entry))
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"low", "high", "log", "step", "choices"})
        if unknown:
            raise ValueError(f"space[{key!r}]: unknown field(s) {unknown}; valid: low, high, log, step, or choices")
        if "choices" in entry:
            if set(entry) != {"choices"}:
                raise ValueError(f"space[{key!r}]: give either choices or low/high, got {sorted(entry)}")
            return _param(config, key, list(entry["choices"]))
        low, high, step = (_yaml_number(entry.get(k)) for k in ("low", "high", "step"))
        log = entry.get("log", False)
        _check_range(key, low, high, log, step)
        return Param(where, low=low, high=high, log=log, step=step)
    raise ValueError(f"space[{key!r}]: give a list of choices or {{low, high[, log, step]}}, got {entry!r}")


@dataclass
class SweepSpec:
    """A checked sweep: the base config, the space, objectives and constraints, and where results go."""

    config_path: Path
    config: dict[str, Any]
    space: list[Param]
    objectives: dict[str, str]
    constraints: list[Constraint] = field(default_factory=list)
    overrides: dict[ConfigKey, Any] = field(default_factory=dict)
    trials: int = 20
    study: str = "sweep"
    storage: str | None = None
    out: Path = Path("runs/sweep")
    sampler_seed: int = 0
    pruner_warmup_epochs: int | None = None
    pruner_monitor: str | None = None

    @property
    def pruner_constraint(self) -> Constraint | None:
        """The absolute constraint the pruner stops trials against (``None`` without a pruner)."""
        if self.pruner_warmup_epochs is None:
            return None
        return next(c for c in self.constraints if c.metric == self.pruner_monitor and not c.relative)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{os.fspath(self.out / 'study.db')}"

    @property
    def needs_baseline(self) -> bool:
        return any(c.relative for c in self.constraints)


def metric_direction(name: str) -> str | None:
    """``"minimize"`` or ``"maximize"``: a measured metric's own direction, else the one a token of the name tells
    (``val_loss``, ``valid/acc``); ``None`` when no token tells, tokens disagree, or a token makes the name a change
    or a spread of the metric (``val_acc_drop``: to minimize, though ``acc`` is to maximize).

    Example:
        >>> metric_direction("valid/loss"), metric_direction("val_f1"), metric_direction("score"), metric_direction("val_acc_drop")
        ('minimize', 'maximize', None, None)
    """
    if name in MEASURED:
        return MEASURED[name]
    tokens = re.split(r"[^0-9a-z]+", name.lower())
    if _UNCLEAR.intersection(tokens):
        return None
    found = {_KNOWN_DIRECTIONS[t] for t in tokens if t in _KNOWN_DIRECTIONS}
    return found.pop() if len(found) == 1 else None


def warn_if_direction_contradicts(name: str, direction: str, where: str) -> None:
    """Warn when ``direction`` (``minimize``/``maximize``) is the opposite of the one ``name`` tells."""
    known = metric_direction(name)
    if known is not None and known != direction:
        warnings.warn(f"{where}: {name!r} is to {direction}, but its name says it is a metric to {known} (a loss is "
                      "minimised, an accuracy maximised); check the direction", UserWarning, stacklevel=3)


def _direction(name: str) -> str:
    """The direction of a list-form objective: the measured metrics' own, else known from the name's tokens."""
    found = metric_direction(name)
    if found is None:
        raise ValueError(f"objectives: cannot tell whether to minimize or maximize {name!r} from its name; give the direction: "
                         f"objectives: {{{name}: minimize}} or {{{name}: maximize}}")
    return found


def _objectives(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {name: _direction(str(name)) for name in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"objectives: give a metric name, a list, or {{metric: minimize|maximize}}, got {raw!r}")
    for name, direction in raw.items():
        if direction not in _DIRECTIONS:
            raise ValueError(f"objectives[{name!r}]: direction {direction!r}; valid: {list(_DIRECTIONS)}")
        warn_if_direction_contradicts(str(name), direction, f"objectives[{name!r}]")
    return dict(raw)


def _pruner_monitor(pruner: Mapping[str, Any], constraints: list[Constraint]) -> str:
    """The metric the pruner watches: the given ``monitor``, else the first absolute constraint's metric that the
    run logs per epoch. It needs an absolute constraint to compare with, and cannot be a measured metric."""
    absolute = [c for c in constraints if not c.relative]
    shown = [str(c) for c in constraints]
    name = pruner.get("monitor")
    if name is None:
        logged = [c for c in absolute if c.metric not in MEASURED]
        if not logged:
            raise ValueError(f"pruner: needs an absolute constraint on a metric the run logs per epoch (e.g. 'val_acc >= 0.9') "
                             f"to prune against; the constraints are {shown}")
        return logged[0].metric
    if name in MEASURED:
        raise ValueError(f"pruner: monitor {name!r} is measured once on the final model ({sorted(MEASURED)} are), never "
                         "logged per epoch, so it could never stop a trial; monitor a metric the run logs, e.g. val_acc")
    if not any(c.metric == name for c in absolute):
        raise ValueError(f"pruner: monitor {name!r} needs an absolute constraint on it (e.g. '{name} >= 0.9') to prune "
                         f"against; the constraints are {shown}")
    return str(name)


_FIELDS = ("config", "trials", "study", "storage", "out", "objectives", "constraints", "space", "overrides", "pruner", "sampler_seed")


def load_spec(source: str | os.PathLike[str] | Mapping[str, Any], **changes: Any) -> SweepSpec:
    """Read and check a sweep spec (a YAML file or a dict); ``changes`` override its top-level fields.

    Raises:
        ValueError: unknown fields, keys naming no argument, malformed ranges, objectives or constraints.
        FileNotFoundError: the spec or its ``config`` is missing.
    """
    if isinstance(source, Mapping):
        raw, base = dict(source), Path.cwd()
    else:
        raw, base = load_config(source), Path.cwd()
    raw.update({k: v for k, v in changes.items() if v is not None})
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"sweep spec: unknown field(s) {unknown}; valid: {list(_FIELDS)}")
    if "config" not in raw or "space" not in raw:
        raise ValueError("sweep spec needs 'config' (a LightningCLI config) and 'space' (what to search)")
    config_path = base / raw["config"]
    if not config_path.is_file() and not Path(raw["config"]).is_absolute():
        raise FileNotFoundError(f"sweep spec: no config at {os.fspath(raw['config'])!r}, read from the current directory "
                                f"({os.fspath(base)}) as every relative path of a spec and a config is")
    config = load_config(config_path)
    overrides = {resolve_key(config, k): v for k, v in (raw.get("overrides") or {}).items()}
    trainer = {**(config.get("trainer") or {}), **{w.path[1]: v for w, v in overrides.items() if w.path[0] == "trainer" and len(w.path) == 2}}
    check_one_device(trainer, "sweep")  # trials run in the sweep's own process
    space = raw["space"]
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"space: give {{key: range or choices}}, got {space!r}")
    params = [_param(config, k, v) for k, v in space.items()]
    from lightning_compress.tuning.trial import with_values

    applied = with_values(config, overrides)  # as the trials run it: a rate a OneCycleLR replaces makes every trial alike
    for p in params:
        if p.key.path[-1] in ("lr", "learning_rate"):
            check_lr_takes_effect(applied, p.key, "space key")
    fixed = {**config, **{"ckpt_path": v for w, v in overrides.items() if w.path == ("ckpt_path",)}}
    if any(p.key.path == ("ckpt_path",) for p in params):  # some trials resume
        fixed["ckpt_path"] = fixed.get("ckpt_path") or "(searched)"
    refuse_resumed_keys(fixed, [p.key for p in params], "space: searches")
    constraints = raw.get("constraints") or []
    if isinstance(constraints, str):
        constraints = [constraints]
    constraints = [parse_constraint(c) for c in constraints]
    pruner = raw.get("pruner") or {}
    if not isinstance(pruner, Mapping) or set(pruner) - {"warmup_epochs", "monitor"}:
        raise ValueError(f"pruner: give {{warmup_epochs: N[, monitor: metric]}}, got {pruner!r}")
    warmup = pruner.get("warmup_epochs", 0 if pruner else None)
    if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
        raise ValueError(f"pruner: warmup_epochs must be an integer >= 0, got {warmup!r}")
    monitor = _pruner_monitor(pruner, constraints) if warmup is not None else None
    max_epochs = trainer.get("max_epochs")
    searched = {p.key.path for p in params}
    if warmup and isinstance(max_epochs, int) and max_epochs > 0 and warmup >= max_epochs and ("trainer", "max_epochs") not in searched:
        raise ValueError(f"pruner: warmup_epochs={warmup} is not below trainer.max_epochs={max_epochs}, so the pruner could "
                         f"never stop a trial; give warmup_epochs < {max_epochs}, or remove 'pruner'")
    sampler_seed = raw.get("sampler_seed", 0)
    if not isinstance(sampler_seed, int) or isinstance(sampler_seed, bool) or sampler_seed < 0:
        raise ValueError(f"sampler_seed must be an integer >= 0, got {sampler_seed!r}")
    trials = raw.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    study, storage, out = raw.get("study", Path(raw["config"]).stem), raw.get("storage"), raw.get("out")
    named = (str, os.PathLike, int, float)  # a YAML `study: 2024` is a number: taken as its text
    for name, value, what, kinds in (("study", study, "a name", named), ("storage", storage, "an Optuna storage URL or None", str),
                                     ("out", out, "a folder path or None", named)):
        if (value is not None or name == "study") and (
            isinstance(value, bool) or not isinstance(value, kinds) or not str(value).strip()
        ):
            raise ValueError(f"{name} must be {what} (a non-empty string), got {value!r}")
    spec = SweepSpec(
        config_path=config_path, config=config, space=params, objectives=_objectives(raw.get("objectives", "artifact_bytes")),
        constraints=constraints, overrides=overrides, trials=trials,
        study=str(study), storage=storage, out=Path(str(out) if out is not None else Path("runs/sweep") / str(study)),
        sampler_seed=sampler_seed,
        pruner_warmup_epochs=warmup, pruner_monitor=monitor,
    )
    if spec.pruner_warmup_epochs is not None and len(spec.objectives) > 1:
        raise ValueError("pruner: Optuna prunes single-objective studies only; remove 'pruner' or keep one objective")
    return spec
