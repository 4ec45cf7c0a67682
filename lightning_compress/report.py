"""Report what compression did: size, sparsity, latency and metrics, before and after.

The measurements themselves are the functions of :mod:`lightning_compress.measure` (re-exported here).
Two entry points:

- :func:`compression_report` — a plain function for scripts: give it the baseline and the
  compressed model and an example input, get the report dict back (it lives in
  :mod:`lightning_compress.model_comparison`; re-exported here).
- :class:`CompressionReport` — a callback: it snapshots the model when ``fit`` starts, records the
  metrics and every plugin's state once per epoch, and at the end of ``fit`` measures both models
  (latency interleaved in the same process), prints a table, and writes
  ``compression_report.json`` and ``compression_report.png`` into the trainer's log dir.

The table and the plot (:func:`print_report`, :func:`plot_history`) are in
:mod:`lightning_compress.report_output` (re-exported here). The JSON schema is documented in the
README ("The report").
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress._files import check_writable
from lightning_compress._validation import as_count, as_flag
from lightning_compress.batches import check_runnable, example_call
from lightning_compress.guard import never_logged

# the measuring functions live in `measure` (a leaf module); re-exported here, where users found them first
from lightning_compress.measure import (
    SIZE_FORMATS,
    _macs_or_none,
    count_macs,
    count_parameters,
    device_of,
    floating_dtype,
    measure_latency,
    safetensors_tensors,
    sequence_length,
    serialized_size,
    storage_region,
)
from lightning_compress.layout import input_batch_dim
from lightning_compress.model_comparison import compression_report
from lightning_compress.module_copy import copy_model
from lightning_compress.plugin import (
    build_configured_model,
    sharding_strategies,
    compressed_model,
    compression_plugins,
    instance_suffix,
    module_artifact,
    run_dir,
    weight_averaging,
)
from lightning_compress.report_records import (
    VALIDATE_HINT,
    DataSeen,
    baseline_metrics,
    epoch_metrics,
    final_metrics,
    logged_by_validation,
    model_fingerprint,
    other_model_test,
    same_model,
)

# the table and the plot live in `report_output`; re-exported here, where the README points users
from lightning_compress.report_output import plot_history, print_report

__all__ = [
    "SIZE_FORMATS",
    "CompressionReport",
    "compression_report",
    "count_macs",
    "count_parameters",
    "measure_latency",
    "plot_history",
    "print_report",
    "safetensors_tensors",
    "sequence_length",
    "serialized_size",
    "storage_region",
]


def _all_float_metrics(trainer: Trainer) -> dict[str, float]:
    """Every finite float metric logged so far, whatever its name."""
    return _float_metrics(trainer.callback_metrics, None, trainer.callback_metrics)


def _logged_since(before: Mapping[str, float], trainer: Trainer, keys: Iterable[str] | None) -> set[str]:
    """The keys a validation or test logged since ``before`` (new, or changed), of ``keys`` when given: neither the
    training loss, nor a plugin's state, nor a teacher's metric (a callback's own key logged in these loops is read
    as a metric too)."""
    logged = logged_by_validation(before, _all_float_metrics(trainer))
    return {k for k in logged if k != "train_loss" and not k.startswith(_NOT_THE_MODELS) and (keys is None or k in keys)}


def _plugins_state(trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], bool]:
    """The compression plugins' state figures (``sparsity``, ``target``...), and whether any is active."""
    state: dict[str, float] = {}
    active = False
    for plugin in compression_plugins(trainer, pl_module):
        suffix = instance_suffix(plugin, trainer.callbacks)  # a second plugin of one type: its own figures
        state.update({f"{k}{suffix}": float(v) for k, v in plugin.compression_state().items()})
        active = active or bool(plugin.is_active())
    return state, active


def _partial_network_note(example: Any) -> str | None:
    """What the report leaves out when the training step calls several children directly and it measures one."""
    if not getattr(example, "others", ()):
        return None
    return (
        f"CompressionReport measures {example.target!r}, the child with the most trainable parameters the training step calls, but the step also "
        f"calls {list(example.others)}: their parameters, bytes, MACs and latency are not in the figures. To measure "
        "the whole model, give the module a forward that runs it all and call self(...) in the step, or set "
        "example_input_array to that forward's input"
    )


def _plugin_name(plugin: Any, trainer: Trainer) -> str:
    """The plugin's class name, with ``_2``, ``_3``... for the next plugins of the same class."""
    return f"{type(plugin).__name__}{instance_suffix(plugin, trainer.callbacks)}"


#: Keys that are never the compressed model's validation or test metrics: the plugins' state, and a distillation
#: teacher's metrics (the report's baseline, read from the module).
_NOT_THE_MODELS = ("pruning/", "quant/", "teacher_")


def _float_metrics(metrics: Mapping[str, Any], keys: Iterable[str] | None, learned: Collection[str] = ()) -> dict[str, float]:
    """The finite float metrics among ``metrics``: those named by ``keys``; with ``keys=None``, the ``val_*``/``test_*``
    ones and those ``learned`` (seen logged by a validation or a test of this run, whatever their names)."""
    out = {}
    for k, v in metrics.items():
        if keys is not None and k not in keys:
            continue
        if keys is None and not (k.startswith(("val_", "test_")) or k in learned):
            continue
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[k] = value
    return out


def _metric_keys(metrics: str | Sequence[str] | None) -> list[str] | None:
    """The ``metrics`` option as a list of keys (one key may be given as a string), checked."""
    if metrics is None:
        return None
    keys = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(
            f"metrics must be None (every metric a validation or test logs), a metric key or a non-empty list of metric keys "
            f"(e.g. ['val_acc', 'val_loss']), got {metrics!r}"
        )
    return list(keys)


class CompressionReport(Callback):
    """Report what compression did to the model during ``fit``.

    At the start of ``fit`` (``setup``, before compression plugins prepare the model) it keeps a copy
    of the model — or of what the module names as its baseline (a distillation teacher). Each epoch
    it records the metrics of the validation that ran in it (none when no validation ran since the
    previous epoch) and the state of every compression plugin (sparsity, bits...).
    When ``fit`` is over, after every plugin has finished (masks baked in, model converted), it
    measures baseline and compressed model — parameters, non-zero parameters, sparsity, bytes of
    the serialised artifact, MACs, CPU latency (interleaved, median), tokens per second for a sequence
    model, and GPU latency too when the model trained on a GPU — prints a table, and writes
    ``compression_report.json`` and ``compression_report.png`` into the trainer's log dir.
    ``Trainer.test`` afterwards adds the test metrics to the JSON: to the compressed row when the
    tested model is the compressed one (the same fingerprint), else under ``other_model_tests``
    (``{"ckpt_path", "metrics"}`` per test) with a warning — ``ckpt_path="best"`` may load a
    checkpoint written before compression.

    Baseline metrics are those of the last validation before any plugin changed the model (the dense
    reference of the same run); when compression was active at the first validation, or no validation
    ran, they are empty and ``baseline_note`` says why. Compressed metrics are those of the last
    validation of exactly the model ``fit`` returns (its weights and layer settings, compared by
    :func:`~lightning_compress.report_records.model_fingerprint`): when an accuracy guard restored
    earlier weights, they come from the validation of those weights; when the model was changed after
    its last validation (training went on without validation, a guard rolled bits back, a pruning step
    at the end) or no validation ran, there are none, and ``compressed_note`` says why. A key of
    ``metrics`` that was never logged is a warning naming the logged keys (a ``test_*`` key at the end
    of ``Trainer.test``, which logs it).

    Each ``fit`` is reported on its own: a second ``fit`` (more epochs on the same Trainer, or a new
    Trainer with the same callbacks) starts a new history, its baseline is the model as that ``fit``
    began (already compressed by the first one), and its report replaces the first one's file. A
    ``fit`` resumed from a checkpoint (``ckpt_path``) continues the checkpoint's history instead.

    Args:
        batch_size: Batch size of the latency measurement.
        repeats: Timed forwards per model.
        warmup: Untimed forwards per model first.
        num_threads: CPU threads during timing (``None``: leave as is).
        metrics: Metric keys to report, a list or one key (default: every ``val_*``/``test_*`` metric and every
            other key a validation or a test logs, such as ``val/acc``).
        filename: Name of the JSON file (the PNG takes the same stem).
        plot: Write the PNG plot.
        print_table: Print the rich table at the end of ``fit``.
        dirpath: Where to write (default: ``trainer.log_dir``, or ``default_root_dir`` without logger).
        seq_len: Tokens per sample for ``tokens_per_s`` (default: the length of an integer
            ``(batch, seq_len)`` input, i.e. token ids; other inputs get no tokens per second).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[CompressionReport(batch_size=32)], logger=False)
    """

    def __init__(
        self,
        batch_size: int = 64,
        repeats: int = 30,
        warmup: int = 5,
        num_threads: int | None = 1,
        metrics: str | list[str] | None = None,
        filename: str = "compression_report.json",
        plot: bool = True,
        print_table: bool = True,
        dirpath: str | None = None,
        seq_len: int | None = None,
    ) -> None:
        plot, print_table = as_flag(plot, "plot"), as_flag(print_table, "print_table")
        batch_size, repeats = as_count(batch_size, "batch_size"), as_count(repeats, "repeats")
        warmup, num_threads = as_count(warmup, "warmup", minimum=0), as_count(num_threads, "num_threads", allow_none=True)
        seq_len = as_count(seq_len, "seq_len", allow_none=True)
        if not isinstance(filename, str) or not filename.endswith(".json") or Path(filename).name != filename or filename == ".json":
            raise ValueError(
                f"filename must be a file name ending with .json, without a folder (dirpath says where), got {filename!r}"
            )
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"dirpath must be a folder path (a string) or None, got {dirpath!r}")
        self.batch_size = batch_size
        self.repeats = repeats
        self.warmup = warmup
        self.num_threads = num_threads
        self.metrics = _metric_keys(metrics)
        self.filename = filename
        self.plot = plot
        self.print_table = print_table
        self.dirpath = dirpath
        self.seq_len = seq_len
        self.history: list[dict[str, Any]] = []
        #: One entry per validation in fit: epoch, step, metrics, whether a plugin had changed the model
        #: then, and the fingerprint of the model validated.
        self.validations: list[dict[str, Any]] = []
        self._validated: tuple[str | None, bool] = (None, False)  # taken when the running validation started
        self._state_validated: dict[str, float] = {}  # the plugins' state figures then
        self._fingerprint_due = False  # the running validation's fingerprint is still to be taken
        self._logged_before_validation: dict[str, float] = {}  # the logged metrics when it started
        self._validation_keys: set[str] = set()  # the keys validations logged (besides val_*/test_*)
        self._validations_recorded = 0  # validations before the last epoch record
        self._compressed_fingerprint: str | None = None  # of the module fit returned, for Trainer.test
        self._tested: str | None = None  # of the module the running Trainer.test tests
        self._logged_before_test: dict[str, float] = {}  # the logged metrics when it started
        self._data_seen = DataSeen()  # by the running validation or test
        self._fit_validation_data: DataSeen | None = None  # what the fit's last validation with a batch ran
        self._report_dir = Path()  # where the fit's report was written (rank 0's report is written there again)
        self._keep_records = False  # the checkpoint being loaded is not resumed (validate/test/predict)
        self.report: dict[str, Any] | None = None
        self.report_path: Path | None = None
        self._baseline: nn.Module | None = None
        self._fit_device: torch.device | None = None  # where the module trained (it is on the CPU by teardown)

    # -- baseline ---------------------------------------------------------------------------------
    def take_baseline(self, pl_module: LightningModule) -> None:
        """Keep a copy of the model as it is now (idempotent within a fit).

        Compression callbacks call this through :meth:`CompressionCallback.setup` before they change
        the model, whatever the order of the callbacks.
        """
        if self._baseline is not None:
            return
        self._baseline = copy_model(_baseline_source(pl_module)).cpu().eval()

    def _baseline_in_training_dtype(self, pl_module: LightningModule) -> None:
        """The baseline copy in the floating dtype the trained network has now: under ``bf16-true``/``16-true``/
        ``64-true`` the precision plugin casts the module after ``setup`` took the copy, and both models are
        measured (bytes, latency, on one input) as they train. The network's dtype, not the baseline source's: a
        distillation teacher kept in bfloat16 to save time (``teacher_dtype``) is measured as the float model it is."""
        if self._baseline is None:
            return
        own = module_artifact(pl_module)
        live, kept = floating_dtype(own if own is not None else pl_module), floating_dtype(self._baseline)
        if live is not None and kept is not None and live != kept:
            self._baseline.to(dtype=live)

    def check_trainer(self, trainer: Trainer) -> None:
        """A clear error, before any plugin changes the model, when the run cannot be reported.

        Raises:
            ValueError: under a strategy that shards the model.
        """
        if sharding_strategies(trainer):
            raise ValueError(
                f"CompressionReport does not support strategy {type(trainer.strategy).__name__}: it copies the whole model "
                "and measures it on one device, and this strategy splits the model across processes. Leave the report "
                "out of sharded runs; measure the trained model on one device (a fit with strategy='ddp' or one device)."
            )

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_trainer(trainer)
        if self.dirpath and stage == "fit" and trainer.is_global_zero:  # written after the fit by rank 0: said now
            check_writable(self.dirpath, "CompressionReport: dirpath", folder=True)
        build_configured_model(trainer, pl_module)  # layers built in configure_model are part of the baseline
        if stage == "fit":  # each fit is reported on its own (a resumed one gets its records back from the checkpoint)
            self.report = None
            self.history, self.validations, self._validations_recorded = [], [], 0
            self.take_baseline(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_device = device_of(pl_module)
        self._fit_validation_data = None  # this fit's
        self._baseline_in_training_dtype(pl_module)
        # after the module's own setup (which may set example_input_array), before training: a module with
        # manual optimisation and no example input cannot be reported (its training_step would update weights)
        if getattr(pl_module, "example_input_array", None) is None:
            check_runnable(pl_module, "CompressionReport")
            self._example_call(trainer, pl_module)  # found now, not after training: a step that runs no forward fails here

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "validations": copy.deepcopy(self.validations)}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # validate/test/predict from a checkpoint: the records stay those of the last fit, which the report describes
        self._keep_records = trainer.state.fn != "fit"

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._keep_records:
            self._keep_records = False
            return
        self.history = copy.deepcopy(state_dict.get("history", []))
        self.validations = copy.deepcopy(state_dict.get("validations", []))
        self._validations_recorded = len(self.validations)

    @staticmethod
    def _example_call(trainer: Trainer, pl_module: LightningModule) -> Any:
        """The call the models are measured with (the whole call: keyword forwards work too), or an error."""
        try:
            example = example_call(trainer, pl_module, "CompressionReport")
        except ValueError as err:
            raise RuntimeError(f"CompressionReport needs an example input to measure the models: {err}") from err
        if example.first_tensor() is None:
            raise RuntimeError(
                "CompressionReport needs an example input to measure the models, and the call found has no tensor "
                f"argument ({example.args!r}, {example.kwargs!r}); set example_input_array on the LightningModule."
            )
        return example

    # -- per validation ---------------------------------------------------------------------------
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before any callback's on_validation_end, where a guard may put other weights back
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        state, active = _plugins_state(trainer, pl_module)
        self._validated = (None, active)
        self._state_validated = state  # the history pairs this validation's metrics with the state it measured
        self._fingerprint_due = True  # taken at the first batch (or, with none, at the end)
        self._logged_before_validation = _all_float_metrics(trainer)
        self._data_seen = DataSeen()

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # the model the batches run: after every on_validation_epoch_start, where a weight-averaging callback
        # (EMAWeightAveraging) puts its average in for the validation
        if self._fingerprint_due and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._take_fingerprint(pl_module)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and trainer.state.fn in ("fit", "validate"):
            self._data_seen.add(batch, dataloader_idx)

    def _take_fingerprint(self, pl_module: LightningModule) -> None:
        self._fingerprint_due = False
        self._validated = (model_fingerprint(pl_module), self._validated[1])

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate" and self.report is not None:
            self._record_validate(trainer)
            return
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._fingerprint_due:  # a validation that ran no batch
            self._take_fingerprint(pl_module)
        if self._data_seen.sizes:
            self._fit_validation_data = self._data_seen
        self._validation_keys |= _logged_since(self._logged_before_validation, trainer, self.metrics)
        logged = _float_metrics(trainer.callback_metrics, self.metrics, self._validation_keys)
        metrics = {k: v for k, v in logged.items() if k != "train_loss"}
        fingerprint, active = self._validated
        self.validations.append({
            "epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics, "active": active,
            "fingerprint": fingerprint, "state": dict(self._state_validated),
        })

    # -- per epoch --------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        state, active = _plugins_state(trainer, pl_module)
        logged = _float_metrics(trainer.callback_metrics, self.metrics, self._validation_keys)
        if "train_loss" in trainer.callback_metrics and (self.metrics is None or "train_loss" in self.metrics):
            logged["train_loss"] = float(trainer.callback_metrics["train_loss"])
        # Lightning keeps the last value of every key: an epoch without validation would show an earlier one's
        validated = len(self.validations) > self._validations_recorded
        if validated:  # the state the validation measured: a guard may have put another one back since
            state, active = self._state_validated, self.validations[-1]["active"]
        metrics = epoch_metrics(logged, validated, self._validation_keys)
        self._validations_recorded = len(self.validations)
        self.history = [h for h in self.history if h["epoch"] != trainer.current_epoch]
        self.history.append({"epoch": trainer.current_epoch, "metrics": metrics, "state": state, "active": active})

    # -- end of fit -------------------------------------------------------------------------------
    def _out_dir(self, trainer: Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return run_dir(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._keep_records = False
        # teardown runs after every callback's on_fit_end: masks are baked in, conversions done.
        if stage != "fit" or self._baseline is None:
            return
        try:
            if not trainer.interrupted:
                self._finish_fit(trainer, pl_module)
        finally:
            self._baseline = None
            self._fit_device = None

    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plugins = compression_plugins(trainer, pl_module)
        compressed, source = compressed_model(trainer, pl_module)
        size_fn = getattr(source, "compressed_size_bytes", None)
        artifact_size: int | None = size_fn() if callable(size_fn) else None
        self._compressed_fingerprint = model_fingerprint(pl_module)  # before anything runs the model
        compressed_metrics, final_epoch, final_note = final_metrics(
            self.validations, self.history, self._compressed_fingerprint, trainer.global_step, self._validation_keys,
            weight_averaging(trainer.callbacks),  # type: ignore[attr-defined]
            [f for plugin in compression_plugins(trainer, pl_module) if (f := getattr(plugin, "same_outputs_as", None))],
        )
        self._warn_unlogged(trainer, test=False)
        # a plugin that converted a child of the module (a forward handing its inputs to self.model by keyword) knows
        # that child's own call, which the converted copy takes; the module's call would not fit it
        call_of = getattr(source, "compressed_call", None)  # a plugin's; a module's own artifact has none
        own_call = call_of() if callable(call_of) else None
        example = own_call if own_call is not None else self._example_call(trainer, pl_module)
        partial = _partial_network_note(example)
        example = example.to("cpu")
        batch_dim = input_batch_dim(example.network(self._baseline), example.args, example.kwargs)  # 1: sequence-first
        counts = macs = None
        converted = getattr(compressed, "quantization_spec", None) is not None  # weights in integer buffers
        if compressed is not pl_module and (converted or count_parameters(compressed)[0] == 0):
            # a converted artifact stores its weights as integer buffers: count the logical weights
            # (and MACs) of the trained model it was converted from
            own = module_artifact(pl_module)
            logical = own if own is not None else example.network(pl_module)
            counts = count_parameters(logical)
            macs = _macs_or_none(logical, example, batch_dim)
        # measured on the CPU; a converted model on the GPU (weights in buffers, no parameters) is copied over
        compressed_cpu = compressed if device_of(compressed).type == "cpu" else copy_model(compressed).cpu()
        # what the step calls: the module's forward, or the child it runs (`self.model(**batch)`)
        baseline, compressed_cpu = example.network(self._baseline), example.network(compressed_cpu)  # type: ignore[arg-type]
        base_metrics, base_epoch, base_note = baseline_metrics(self.validations, self.history, self._validation_keys)
        first = next((v for v in self.validations if v["active"]), None)
        after_training = {getattr(p, "compressed_after_training_epoch", None) for p in compression_plugins(trainer, pl_module)}
        if base_epoch is not None and first is not None and first["epoch"] > base_epoch and first["epoch"] in after_training:
            base_note = (  # PTQ: the float model it quantised trained on after the baseline's validation, unmeasured
                f"Baseline metrics: from the validation at epoch {base_epoch}. The model then trained uncompressed through "
                f"epoch {first['epoch']}, and was compressed after that training (PTQ calibrates after its last float "
                "epoch), so no validation measured the model compression started from: the difference includes that "
                "training. For a like-for-like baseline, validate the trained float model before compressing it."
            )
        own_baseline = _module_baseline_metrics(pl_module)
        if own_baseline:  # the module measured its baseline itself (a distillation teacher)
            base_metrics, base_epoch = own_baseline, None
            base_note = f"Baseline metrics: measured by {type(pl_module).__name__} on its baseline model."
        out_dir = self._out_dir(trainer)  # on every rank (the log dir is broadcast)
        # rank 0 measures, holds and writes the report; the others would time their copies beside it. They still run
        # the rest, which may gather from the shards (a plugin's summary)
        measured = trainer.is_global_zero
        report = {"baseline": {}, "compressed": {}} if not measured else compression_report(
            baseline,
            compressed_cpu,
            example,
            baseline_metrics={k: v for k, v in base_metrics.items() if k != "train_loss"},
            compressed_metrics={k: v for k, v in compressed_metrics.items() if k != "train_loss"},
            batch_size=self.batch_size,
            repeats=self.repeats,
            warmup=self.warmup,
            num_threads=self.num_threads,
            compressed_size_bytes=artifact_size,
            compressed_counts=counts,
            compressed_macs=macs,
            seq_len=self.seq_len,
            cuda=self._fit_device is not None and self._fit_device.type == "cuda",
            batch_dim=batch_dim,
        )
        report["title"] = f"Compression report — {type(pl_module).__name__}"
        if partial is not None:
            rank_zero_warn(partial)
            report["network_note"] = partial
        if base_epoch is not None:
            report["baseline"]["metrics_epoch"] = base_epoch
        if base_note:
            report["baseline_note"] = base_note
        if final_epoch is not None:
            report["compressed"]["metrics_epoch"] = final_epoch
        if final_note:
            report["compressed_note"] = final_note
        report["plugins"] = {_plugin_name(p, trainer): _jsonable(p.compression_summary()) for p in plugins}
        report["history"] = copy.deepcopy(self.history)
        report["validations"] = [  # one per validation: several an epoch with val_check_interval
            {k: copy.deepcopy(v.get(k, {} if k == "state" else None)) for k in ("epoch", "step", "metrics", "state", "active")}
            for v in self.validations
        ]
        self.report = report if measured else None
        self._report_dir = out_dir
        self._write(out_dir, print_table=self.print_table)

    def _warn_unlogged(self, trainer: Trainer, test: bool) -> None:
        """A warning naming the keys of ``metrics`` that were never logged and the keys that were: at the end
        of fit for all but ``test_*`` keys, at the end of ``Trainer.test`` for those."""
        if self.metrics is None:
            return
        logged = set(trainer.callback_metrics)
        missing = [k for k in self.metrics if k.startswith("test_") == test and k not in logged]
        log_in = "test_step" if test else "validation_step (or training_step; a test metric of another name in test_step, read after trainer.test)"
        if missing:
            rank_zero_warn(never_logged("CompressionReport", "metrics", self.metrics, logged, missing, log_in))

    @rank_zero_only
    def _write(self, out: Path, print_table: bool) -> None:
        assert self.report is not None
        out.mkdir(parents=True, exist_ok=True)
        self.report_path = out / self.filename
        self.report_path.write_text(json.dumps(_jsonable(self.report), indent=2))
        history = self.report.get("history")  # this fit's (a test from a checkpoint loads the checkpoint's records)
        validations = self.report.get("validations") or []
        if self.plot and len(validations) > len(history or []):  # several validations an epoch: plotted by step
            plot_history(validations, self.report_path.with_suffix(".png"), title=self.report.get("title", ""), x="step")
        elif self.plot and history:
            plot_history(history, self.report_path.with_suffix(".png"), title=self.report.get("title", ""))
        if print_table:
            print_report(self.report)
            print(f"report written to {self.report_path}")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after every callback's on_test_start (where a plugin may restore a checkpoint's state), before any test_step
        self._start_evaluation(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.validate after the fit, as the report's note advises when no validation measured the returned model
        if trainer.state.fn == "validate":
            self._start_evaluation(trainer, pl_module)

    def _start_evaluation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The model a ``test``/``validate`` after the fit measures, and the metrics logged before it."""
        self._tested = model_fingerprint(pl_module) if self.report is not None else None
        self._logged_before_test = _all_float_metrics(trainer)
        self._data_seen = DataSeen()

    def _record_validate(self, trainer: Trainer) -> None:
        """The metrics of a ``trainer.validate`` of the model the fit returned become its compressed metrics (and the
        note that asked for them goes); a validation of another model (a checkpoint) changes nothing here."""
        assert self.report is not None
        validated = _logged_since(self._logged_before_test, trainer, self.metrics)
        metrics = _float_metrics(trainer.callback_metrics, self.metrics, validated)
        same = same_model(self._tested, self._compressed_fingerprint)
        self._tested = None
        if not same or not metrics:
            return
        batch_dim = int(self.report.get("latency_setup", {}).get("batch_dim") or 0)
        fit_samples = self._fit_validation_data.samples(batch_dim) if self._fit_validation_data is not None else None
        samples = self._data_seen.samples(batch_dim)
        if fit_samples is not None and samples is not None and samples != fit_samples:
            rank_zero_warn(
                f"CompressionReport: this trainer.validate ran {_count(samples)} samples where the fit's validation ran "
                f"{_count(fit_samples)}: other data, whose metrics are not compared with the baseline's; the report keeps "
                "the fit's compressed metrics"
            )
            return
        self.report["compressed"]["metrics"].update(metrics)
        if VALIDATE_HINT in str(self.report.get("compressed_note") or ""):
            self.report["compressed_note"] = "Compressed metrics: from trainer.validate of the model fit returned."
        self._write(self._report_dir, print_table=False)  # not _out_dir: rank 0 alone holds a report

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.report is None:
            return
        self._warn_unlogged(trainer, test=True)
        tested = _logged_since(self._logged_before_test, trainer, self.metrics)  # whatever their names
        test = {k: v for k, v in _float_metrics(trainer.callback_metrics, self.metrics, tested).items()
                if k.startswith("test_") or k in tested}  # fmt: skip
        if same_model(self._tested, self._compressed_fingerprint):
            self.report["compressed"]["metrics"].update(test)
        else:  # e.g. ckpt_path="best": a checkpoint written before compression, now loaded into the module
            ckpt = str(trainer.ckpt_path) if trainer.ckpt_path is not None else None
            entry, warning = other_model_test(ckpt, test)
            self.report.setdefault("other_model_tests", []).append(entry)
            rank_zero_warn(warning)
        self._tested = None
        own_baseline = _module_baseline_metrics(pl_module)
        self.report["baseline"]["metrics"].update({k: v for k, v in own_baseline.items() if k.startswith("test_")})
        self._write(self._report_dir, print_table=False)  # not _out_dir: rank 0 alone holds a report


def _count(samples: Mapping[int, int]) -> str:
    return str(samples[0]) if list(samples) == [0] else str(dict(sorted(samples.items())))


def _baseline_source(pl_module: LightningModule) -> nn.Module:
    """What the baseline copies: the module's ``compression_baseline()`` (a distillation teacher), else the module."""
    return pl_module.compression_baseline() if callable(getattr(pl_module, "compression_baseline", None)) else pl_module


def _module_baseline_metrics(pl_module: LightningModule) -> dict[str, float]:
    fn = getattr(pl_module, "compression_baseline_metrics", None)
    return {k: float(v) for k, v in fn().items()} if callable(fn) else {}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
