"""One trial: an ordinary LightningCLI fit of a config, then what it produced, measured.

The metrics of a trial are every scalar the run logged (``trainer.callback_metrics``) plus, measured on
its compressed model (:func:`~lightning_compress.plugin.compressed_model`):

- ``artifact_bytes``: the bytes of the file :func:`lightning_compress.export` writes (``compact``);
- ``latency_ms``: the median CPU latency at batch 64, one thread;
- ``macs``: multiply-accumulates per sample of the model that was trained;
- ``parameters``: its non-zero parameters.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_compress.module_copy import copy_model
from lightning_compress.plugin import CompressionCallback
from lightning_compress.report_records import model_fingerprint, same_model
from lightning_compress.tuning.config import ConfigKey, builds_class, load_config, resolve_key, set_value, write_config

__all__ = [
    "ConfigParseError", "build_cli", "checkpoints_under", "fit_config", "measure_run", "trial_config", "without_checkpoints",
    "without_compression",
]


class ConfigParseError(ValueError):
    """A config the CLI's parser refuses (a value of the wrong type, an unknown key): its message."""


def build_cli(config: Mapping[str, Any]) -> Any:
    """A LightningCLI instance of ``config``: model, data and Trainer built, nothing run.

    The config's ``ckpt_path`` is left out (an instance without a subcommand takes no such argument;
    :func:`fit_config` passes it to ``fit``). A config the parser refuses raises
    :class:`ConfigParseError` with the parser's message, where the parser itself would exit the process.
    """
    from lightning_compress.cli import cli_main

    said = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="lc-build-") as tmp:
        path = write_config({k: v for k, v in config.items() if k != "ckpt_path"}, Path(tmp) / "config.yaml")
        try:
            with contextlib.redirect_stderr(said):
                cli = cli_main(["--config", str(path)], run=False)
        except SystemExit:
            text = said.getvalue()
            text = text[text.find("error:") + len("error:"):] if "error:" in text else text
            raise ConfigParseError(" ".join(text.split()) or "the config does not parse") from None
    sys.stderr.write(said.getvalue())  # what the build printed (warnings), now that it built
    return cli


def with_values(base: Mapping[str, Any], values: Mapping[ConfigKey, Any]) -> dict[str, Any]:
    """``base`` with ``values`` set (a callback set to null is left out), writing where ``base`` writes: a trial's
    settings as the project's own fit would run them."""
    config = dict(base)
    for where, value in values.items():
        config = set_value(config, where, value)
    callbacks = config.get("trainer", {}).get("callbacks")
    if isinstance(callbacks, list):  # a callback set to null by an override is left out
        config["trainer"]["callbacks"] = [c for c in callbacks if c is not None]
    return config


def trial_base_config(base: Mapping[str, Any], trial: Any) -> dict[str, Any]:
    """A finished trial's settings as the project's own fit would run them: ``base`` with the values the trial stored
    (:func:`with_values`); for a trial recorded without its values, its own ``config.yaml``."""
    values = trial.user_attrs.get("values")
    if values is None:
        return load_config(trial.user_attrs["config"])
    return with_values(base, {resolve_key(base, k): v for k, v in values.items()})


def trial_config(base: Mapping[str, Any], values: Mapping[ConfigKey, Any], run_dir: Path) -> dict[str, Any]:
    """``base`` with ``values`` set (:func:`with_values`), writing its checkpoints (those of its own
    ``ModelCheckpoint`` too) and CSV logs under ``run_dir``."""
    config = with_values(base, values)
    config = set_value(config, resolve_key(config, "trainer.default_root_dir"), str(run_dir))
    config = checkpoints_under(config, run_dir / "checkpoints")
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs", "version": 0}}
    if config.get("trainer", {}).get("logger") not in (False, None):
        config = set_value(config, resolve_key(config, "trainer.logger"), logger)
    for flag in ("enable_progress_bar", "enable_model_summary"):
        config = set_value(config, resolve_key(config, f"trainer.{flag}"), False)
    return config


def _callback_entries(config: dict[str, Any]) -> list[Any]:
    """``config``'s ``trainer.callbacks`` as a list (one entry may be written without the list)."""
    callbacks = config.get("trainer", {}).get("callbacks") or []
    return [callbacks] if isinstance(callbacks, Mapping) else list(callbacks)


def _without_callbacks(config: Mapping[str, Any], kinds: tuple[type, ...]) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    if "trainer" in out:
        out["trainer"]["callbacks"] = [c for c in _callback_entries(out) if not builds_class(c, kinds)]
    return out


def without_compression(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every compression callback (and the report on them) removed from
    ``trainer.callbacks``: the dense baseline."""
    from lightning_compress.report import CompressionReport

    return _without_callbacks(config, (CompressionCallback, CompressionReport))


def without_checkpoints(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` writing no checkpoint: its checkpoint callbacks removed (a ``ModelCheckpoint`` with its own
    ``dirpath`` would write into the project's folders) and ``trainer.enable_checkpointing`` off."""
    from lightning.pytorch.callbacks import Checkpoint

    out = _without_callbacks(config, (Checkpoint,))
    return set_value(out, resolve_key(out, "trainer.enable_checkpointing"), False)


def checkpoints_under(config: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """``config`` with every ``ModelCheckpoint`` writing into ``directory``: a trial's checkpoints are its own, never
    the files the project's fit writes (a teacher's ``dirpath``/``filename`` would be overwritten by each trial)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = copy.deepcopy(dict(config))
    for entry in _callback_entries(out):  # the entries themselves, changed in place
        if builds_class(entry, (ModelCheckpoint,)):
            entry.setdefault("init_args", {})["dirpath"] = str(directory)
    return out


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def measure_run(trainer: Any, pl_module: Any, artifact_path: Path | None) -> dict[str, float]:
    """``artifact_bytes``, ``latency_ms``, ``macs`` and ``parameters`` of what the run produced (NaN
    for a measure the model does not allow, with a warning saying why)."""
    from lightning_compress.deploy import export
    from lightning_compress.layout import input_batch_dim
    from lightning_compress.measure import _macs_or_none, count_parameters, measure_latency
    from lightning_compress.plugin import compressed_model, example_input, module_artifact

    out = {name: math.nan for name in ("artifact_bytes", "latency_ms", "macs", "parameters")}
    model, _ = compressed_model(trainer, pl_module)
    call = example_input(trainer, pl_module, full=True)
    logical = module_artifact(pl_module) or pl_module  # the trained weights, before any conversion
    out["parameters"] = float(count_parameters(logical if call is None else call.network(logical))[1])
    if call is None:
        warnings.warn("no example input (set example_input_array): artifact_bytes, latency_ms and macs are NaN", stacklevel=2)
        return out
    call = call.to("cpu")
    # what the step calls: the module's forward, or the child it runs (`self.model(**batch)`)
    model = copy_model(call.network(model)).cpu().eval()
    batch_dim = input_batch_dim(model, call.args, call.kwargs)  # 1: sequence-first inputs
    macs = _macs_or_none(copy_model(call.network(logical)).cpu(), call, batch_dim)
    out["macs"] = math.nan if macs is None else float(macs)
    timed = measure_latency([model], call, batch_size=64, repeats=15, warmup=3, batch_dim=batch_dim)
    out["latency_ms"] = float(timed[0]["median_ms"])
    if artifact_path is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "nothing compressed": the dense baseline
            out["artifact_bytes"] = float(export(model, artifact_path, call)["bytes"])  # positional and keyword inputs
    return out


class _LastValidation(Callback):
    """The fingerprint of the model the fit's last validation measured (taken before any guard acts on it)."""

    fingerprint: str | None = None
    ran = False  # a validation ran in the fit (a model of tensor subclasses has no fingerprint)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.fingerprint, self.ran = model_fingerprint(pl_module), True


def fit_config(
    config: Mapping[str, Any],
    run_dir: Path,
    *,
    callbacks: Iterable[Callback] = (),
    measure: bool = True,
    header: str = "",
) -> dict[str, float]:
    """Write ``config`` to ``run_dir/config.yaml`` (runnable with ``lightning-compress fit --config``), fit it
    in this process with ``callbacks`` added (from the config's ``ckpt_path``, if it has one), and return the
    run's scalar metrics plus (with ``measure``) :func:`measure_run`'s.

    Raises:
        ConfigParseError: the CLI's parser refuses the config.
    """
    from lightning.pytorch.cli import SaveConfigCallback

    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(config, run_dir / "config.yaml", header)
    cli = build_cli(config)
    # run_dir/config.yaml is the run's config: the CLI's own copy would overwrite it where the log dir is run_dir
    kept = [c for c in cli.trainer.callbacks if not isinstance(c, SaveConfigCallback)]
    validated = _LastValidation()
    cli.trainer.callbacks = [*kept, *callbacks, validated]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=config.get("ckpt_path"))
    metrics = _scalars(cli.trainer.callback_metrics)
    never = not validated.ran and is_overridden("validation_step", cli.model) and cli.trainer.limit_val_batches != 0
    if never or (validated.ran and not same_model(validated.fingerprint, model_fingerprint(cli.model))):
        # an accuracy guard put other weights or bits back after the last validation, or the fit ended before its
        # first (max_steps within an epoch): the row measures the model the run returns and exports
        try:
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        except MisconfigurationException:  # no validation data: nothing to measure, as the fit measured nothing
            if not never:
                raise
        metrics.update(_scalars(cli.trainer.callback_metrics))
    for callback in cli.trainer.callbacks:
        if isinstance(callback, CompressionCallback):
            metrics.update(callback.pending_metrics())
    if measure:
        metrics.update(measure_run(cli.trainer, cli.model, run_dir / "model.safetensors"))
    return metrics
