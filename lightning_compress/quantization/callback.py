"""``QuantizeCallback``: scheduled quantisation-aware training (QAT) or post-training quantisation (PTQ).

Glue only: options are checked by :class:`~lightning_compress.quantization.options.QuantizeOptions`,
:mod:`~lightning_compress.quantization.layer_selection` chooses and swaps the layers that
:mod:`~lightning_compress.quantization.layers` fake-quantises, and
:mod:`~lightning_compress.quantization.artifact` builds, measures and writes the converted model,
:mod:`~lightning_compress.quantization.fit_checks` says what a fit leaves undone and
:mod:`~lightning_compress.quantization.state` keeps the checkpoint state; batches, the guard, selection and
logging are the shared core's.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress._files import check_writable
from lightning_compress._validation import renamed_option
from lightning_compress.batches import BatchForward, ForwardCall, check_batches_runnable
from lightning_compress.deploy import ONNX_TOLERANCE
from lightning_compress.guard import checkpoint_score_note, read_monitor, warn_if_guard_cannot_run
from lightning_compress.guard_snapshot import GuardSnapshot, state_buffers, trained_parameters
from lightning_compress.plugin import CompressionCallback, example_input, run_dir
from lightning_compress.quantization import artifact
from lightning_compress.quantization.batchnorm import batchnorm_layers
from lightning_compress.quantization.bit_guard import BitLoweringGuard, guard_message
from lightning_compress.quantization.calibration import calibrate_ranges, reestimate_in_fit
from lightning_compress.quantization.fit_checks import (
    check_averaging_order,
    check_fit_epochs,
    check_groups_after_removal,
    uncalibrated_note,
    unreached_bits_note,
    unstarted_note,
    warn_unreached_schedule,
    warn_unvalidated_calibration,
)
from lightning_compress.quantization.layer_selection import check_tied_bits, prepare_fake_quant, quantised_fraction, select_layers
from lightning_compress.quantization.layers import (
    QuantSettings,
    fake_quant_layers,
    is_supported_type,
    quantised_weights,
    strip_fake_quant,
)
from lightning_compress.quantization.read_check import FirstStepReadCheck
from lightning_compress.quantization.options import METHODS, BitsSpec, QuantizeOptions, layer_bits
from lightning_compress.quantization.summary import epoch_detail, quantization_summary
from lightning_compress.quantization.state import (
    STATE_VERSION,
    apply_layer_states,
    check_layer_bits,
    check_state_version,
    evaluation_state,
    layer_states,
    settings_changed,
)
from lightning_compress.report_records import model_fingerprint
from lightning_compress.schedules import epoch_position
from lightning_compress.sharding import check_row_sharded, has_sharded_parameters
from lightning_compress.selection import check_teacher_cache, is_protected, preview, training_only_modules

__all__ = ["QuantizeCallback", "guard_message"]  # guard_message: bit_guard's, where it was first defined


def _is_last_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether this training batch is the epoch's last (before its validation): by the batch count, or for
    a loader without a length, as the loop's progress knows it (it looks one batch ahead)."""
    nb = trainer.num_training_batches
    if isinstance(nb, int):
        return batch_idx + 1 == nb
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))


class QuantizeCallback(CompressionCallback):
    r"""Quantise ``nn.Linear``, ``nn.Conv1d/2d/3d`` (and GPT-2 ``Conv1D``), ``nn.MultiheadAttention`` and
    (weight-only) ``nn.Embedding`` during ``fit``.

    **QAT** (``method="qat"``): from ``start_epoch`` every selected layer computes with fake-quantised
    weights (symmetric, straight-through gradient) and inputs (asymmetric 8-bit over an EMA min/max
    range observed in training steps only). ``weight_bits`` may follow an ``{epoch: bits}`` schedule
    (8 → 6 → 4); with ``monitor``/``max_drop`` the lowering stops, rolling back to the last good bit
    width and the model its last accepted validation measured, as soon as the metric falls more than ``max_drop``
    below its value at the first bit width.
    Or it may differ per layer: ``{regex: bits}`` (``{"net\\.0": 4, ".*": 8}``), the first regex found in
    a layer's module name giving its bits; every selected layer must be matched (see
    :func:`~lightning_compress.quantization.options.layer_bits`).
    **PTQ** (``method="ptq"``): no weight update; ranges are calibrated over ``calibration_batches``
    training batches (progress bar), then training stops and the model is converted. With
    ``start_epoch=k`` the run first trains ``k`` float epochs, then calibrates and stops.

    The model is prepared in ``setup("fit")`` by swapping each layer's class in place (same
    ``forward`` signature, same parameters, same ``state_dict`` keys); observer ranges, bits and the
    rollback state live in this callback's ``state_dict``, so the checkpoint loads strictly into the
    float model and resuming continues bit-identically. At the end of fit a converted copy is stored
    in :attr:`quantized_model` (the trained module itself stays fake-quantised, so
    ``trainer.test(ckpt_path=...)`` keeps working).

    Batches run outside the training step (PTQ calibration, BatchNorm re-estimation) go through the
    module's own ``training_step``, stopped after its ``forward`` (see :mod:`lightning_compress.batches`),
    so tuples, dicts and keyword-forward models work; one batch is tried in ``setup``, before the model
    changes, so a batch that cannot run fails before training, not after it.

    Args:
        method: ``"qat"`` (``None``: the default) or ``"ptq"``.
        weight_bits: 2..8, ``{epoch: bits}`` for progressive lowering (QAT only), or ``{regex: bits}``
            per layer (module names; number keys, or numbers as text, are epochs, fractional too).
            Checked against the model in ``setup``, before it changes: each regex must match a selected
            layer and each selected layer a regex.
        activation_bits: 8 (static input quantisation) or ``None`` (weight-only).
        granularity: Weight scales ``"per_channel"`` (default), ``"per_tensor"``, or a group size (int).
        rounding: ``"nearest"`` (default), ``"floor"`` (truncation, for study; evaluation and conversion
            floor too) or ``"stochastic"`` (training only; evaluation and conversion round to nearest).
        start_epoch: (Fractional) epoch of the first fake-quantised step (QAT). In PTQ, the number of
            float training epochs before calibration (a whole number; 0: calibrate at once).
        freeze_observers_epoch: (Fractional) epoch from which activation ranges stop updating (``None``: never).
        freeze_bn_epoch: (Fractional) epoch from which BatchNorm layers use their running statistics.
        calibration_batches: Training batches used to calibrate ranges in PTQ.
        include: Regular expressions searched in module names; only matching layers are quantised.
            The rule (and its errors: a pattern that matches nothing) is
            :func:`~lightning_compress.selection.select_weights`, shared with pruning. Default: all
            supported layers outside a ``teacher`` (at any depth), except subclasses with their own
            ``forward`` (OPT's positional embedding, Gemma 3's scaled embedding), which stay in float with
            one warning naming them; named by ``include``, such a layer is an error.
        exclude: Regular expressions of module names to leave in float; each must match a selected layer.
        convert_on_fit_end: Build :attr:`quantized_model` at the end of fit.
        monitor: Logged metric watched when the bit width is lowered (e.g. ``"val_acc"``).
        max_drop: Largest tolerated fall of ``monitor`` from its value at the first bit width. A fall past it rolls
            the width back and puts back the weights, BatchNorm statistics and activation ranges of the last accepted
            validation (the guard keeps one copy of the trained parameters; under FSDP2 only the width rolls back).
        mode: ``"max"`` if larger ``monitor`` is better, ``"min"`` otherwise.
        backend: Conversion path, ``"auto"`` (fastest CPU path per layer: static int8 ``torch._int_mm``
            Linear, torchao int8 weight-only, packed low-bit) or ``"torchao"``.
        latency: Measure float vs converted CPU latency at fit end (batch 64, one intra-op thread, whatever
            the report's own ``batch_size``): ``"both"`` (eager and compiled with :func:`~lightning_compress.compile_for_cpu`), ``"eager"``
            or ``"none"``; warns when the converted model is slower.
        observer_momentum: EMA factor of the activation ranges in QAT.
        batch_forward: ``(module, batch) -> output`` running one batch outside the training step, for
            modules whose ``training_step`` cannot be run there (manual optimisation).
        quantize_teacher: Also quantise a distillation ``teacher`` (default: left alone).
        bn_reestimate_batches: QAT: after the last batch of every fake-quantised epoch (before its
            validation and checkpoint), recompute the BatchNorm running statistics over this many
            training batches with the current fake-quantised weights (``0``: off). Weights that jump
            between grid points during QAT leave the running averages stale; this is what keeps
            low-bit models with BatchNorm accurate.
        save_to: Write :attr:`quantized_model` at the end of fit with
            :func:`~lightning_compress.quantization.save_quantized`; relative paths are under the run's
            log directory. Global rank 0 writes.
        export_to: Write a deployable artifact of :attr:`quantized_model` at the end of fit with
            :func:`~lightning_compress.export`, the suffix picking it: ``.pt2`` an AOTInductor package for the
            fastest CPU serving, ``.onnx`` an ONNX file checked in onnxruntime (the ``[onnx]`` extra),
            ``.safetensors`` a compact artifact; relative paths are under the run's log directory. A failed
            export is a warning.
        export_dynamic_sequence: The ``export_to`` artifact also takes any sequence length of token inputs
            (and their mask) within the range the model allows (its position table), not only the training
            step's length; ``export_for_cpu(..., dynamic_sequence=True)``. Needs ``export_to``.
        onnx_tolerance: How far onnxruntime's outputs of an ``export_to`` ONNX file may be from PyTorch's, as
            a fraction of the largest output (``export(..., onnx_tolerance=)``).
        on_nonfinite: ``"error"`` (default): a NaN or infinite weight or observed range at calibration
            or conversion stops with an error naming the layer; ``"warn"``: warn and go on.
        monitor_mode: Former name of ``mode`` (deprecated). ``mode="qat"``/``"ptq"`` (the former name
            of ``method``) and ``calibrate_fn`` (of ``batch_forward``) are still read, with a warning.

    Logged (``trainer.callback_metrics``): ``quant/weight_bits``, ``quant/fraction_quantized``;
    per-layer bits and activation ranges go to the loggers.

    Sharded weights: under ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` (applied in
    ``configure_model``), the fake-quantised layers round the whole weights FSDP2 gathers for each
    forward, the input observers agree across processes, and at the end of fit rank 0 gathers the network
    one parameter at a time and converts, measures and writes it (``quantized_model`` is ``None`` on
    the other ranks).

    Raises:
        ValueError: on any invalid option, naming the value and the valid choices.

    Example:
        >>> cb = QuantizeCallback(weight_bits={0: 8, 2: 6, 4: 4}, monitor="val_acc", max_drop=0.01)
        >>> cb.bits_at(0), cb.bits_at(3), cb.bits_at(5)
        (8, 6, 4)
        >>> QuantizeCallback(weight_bits=1)
        Traceback (most recent call last):
        ...
        ValueError: weight_bits must be an integer from 2 to 8, got 1
    """

    supports_fsdp2 = True

    def __init__(
        self,
        method: str | None = None,
        weight_bits: BitsSpec = 8,
        activation_bits: int | None = 8,
        granularity: str | int = "per_channel",
        rounding: str = "nearest",
        start_epoch: float = 0,
        freeze_observers_epoch: float | None = None,
        freeze_bn_epoch: float | None = None,
        calibration_batches: int = 32,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        convert_on_fit_end: bool = True,
        monitor: str | None = None,
        max_drop: float | None = None,
        mode: str = "max",
        backend: str = "auto",
        latency: str = "both",
        observer_momentum: float = 0.1,
        batch_forward: BatchForward | None = None,
        quantize_teacher: bool = False,
        bn_reestimate_batches: int = 32,
        save_to: str | None = None,
        export_to: str | None = None,
        on_nonfinite: str = "error",
        export_dynamic_sequence: bool = False,
        onnx_tolerance: float = ONNX_TOLERANCE,
        monitor_mode: str | None = None,
        calibrate_fn: BatchForward | None = None,
    ) -> None:
        super().__init__()
        former = mode if mode in METHODS else None  # mode="qat"/"ptq": the former name of method
        method = renamed_option("QuantizeCallback", "mode", former, "method", method, None) or "qat"
        mode = "max" if former else mode
        mode = renamed_option("QuantizeCallback", "monitor_mode", monitor_mode, "mode", mode, "max")
        batch_forward = renamed_option("QuantizeCallback", "calibrate_fn", calibrate_fn, "batch_forward", batch_forward, None)
        self.options = QuantizeOptions(
            method, weight_bits, activation_bits, granularity, rounding, start_epoch, freeze_observers_epoch,
            freeze_bn_epoch, calibration_batches, include, exclude, convert_on_fit_end, monitor, max_drop, mode,
            backend, latency, observer_momentum, batch_forward, quantize_teacher, bn_reestimate_batches, save_to,
            export_to, on_nonfinite, export_dynamic_sequence, onnx_tolerance,
        )
        for f in fields(QuantizeOptions):  # the checked values, readable as attributes
            setattr(self, f.name, getattr(self.options, f.name))
        self.quantized_model: nn.Module | None = None
        self._quantized_call: ForwardCall | None = None  # the call that runs it, found when it was converted
        self._reads = FirstStepReadCheck()  # the first training step of each fit is watched
        self._observe_steps = False  # the input observers update in this batch's forwards (not in backward's reruns)
        self._log_due = False
        self._report: dict[str, Any] = {}
        self._forget_layers()

    def _forget_layers(self) -> None:
        """No layer prepared, nothing calibrated or guarded: the state of a callback that has seen no module."""
        self._layers: dict[str, nn.Module] = {}
        self._bits_of: dict[str, int] = {}  # per-layer bits of a {regex: bits} map, resolved in setup
        self._total_candidates = 0
        self._weight_fraction = 0.0
        self._pending_state: dict[str, Any] | None = None
        self._phase: tuple[bool, bool, bool, int] | None = None
        self._enabled = self._observers_frozen = self._bn_frozen = False
        self._current_bits = self.bits_at(0)
        self._guard = BitLoweringGuard(self.monitor, self.max_drop, self.mode)
        #: the weights, buffers and activation ranges of the last validation the guard accepted (until it trips)
        self._accepted: tuple[GuardSnapshot, dict[str, Any]] | None = None
        self._calibrated = False
        self._bn_step: int | None = None
        self._bn_weights: str | None = None  # the model's fingerprint after the last BatchNorm re-estimation
        #: The epoch whose training PTQ calibrated after, before its validation: what the report's baseline note reads
        #: (the float model that training gave was never validated).
        self.compressed_after_training_epoch: int | None = None

    # ------------------------------------------------------------------------------------ schedule
    def bits_at(self, epoch: float) -> int:
        """Weight bits the schedule asks for at ``epoch`` (before any rollback)."""
        return int(self.options.schedule(epoch))

    @override
    def schedule_value(self, epoch: float) -> float | None:
        return float(self.bits_at(epoch)) if self.method == "qat" else None

    def _apply_phase(self, t: float) -> None:
        """Bits, fake quantisation on/off, observers and BatchNorm frozen, at (fractional) epoch ``t``."""
        opts = self.options
        scheduled = self.bits_at(t)
        locked = self._guard.locked_bits
        bits = scheduled if locked is None else max(scheduled, locked)
        enabled = self._calibrated if opts.method == "ptq" else t + 1e-9 >= opts.start_epoch
        frozen_obs = opts.method == "ptq" or (opts.freeze_observers_epoch is not None and t + 1e-9 >= opts.freeze_observers_epoch)
        frozen_bn = opts.freeze_bn_epoch is not None and t + 1e-9 >= opts.freeze_bn_epoch
        phase = (enabled, frozen_obs, frozen_bn, bits)
        if phase == self._phase:
            return
        # the metrics say the new width from this batch on (one within an epoch, or a fit resumed at an epoch's last
        # batch, which enters the next epoch without on_train_epoch_start, said the last epoch's until the next)
        self._log_due = bool(self._layers)
        self._phase = phase
        self._enabled, self._observers_frozen, self._bn_frozen, self._current_bits = phase
        for name, layer in self._layers.items():
            layer.quantizer.bits = self._bits_of.get(name, bits)
            layer.quantizer.enabled = enabled
            layer.quantizer.observing = False

    # --------------------------------------------------------------------------------------- setup
    def _protected_names(self, pl_module: LightningModule) -> list[str]:
        training_only = training_only_modules(pl_module)  # not part of the trained model: never quantised
        if self.quantize_teacher:
            return list(training_only)
        return [n for n, _ in pl_module.named_modules() if n and is_protected(n, training_only)]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._reads.close()
        self._reads.done = False  # the first step of each fit is watched
        self.quantized_model = self._quantized_call = None  # this fit's, made at its end: an earlier fit's is another
        self._report = {}  # and what it reports (sizes, formats, latency, notes)
        if self.prepared_other_module(pl_module):  # the layers, ranges and guard held are another model's
            self._forget_layers()
        check_averaging_order(trainer, self)
        check_fit_epochs(self.options, trainer, self)  # every fit follows the schedule from its epoch 0
        check_groups_after_removal(self.options, trainer, self)
        for option in ("save_to", "export_to"):  # written at the end of fit, by rank 0: a path it cannot write is said now
            if getattr(self.options, option):
                where = run_dir(trainer) / getattr(self.options, option)  # as written; on every rank (log_dir broadcasts)
                if trainer.is_global_zero:
                    check_writable(where, f"QuantizeCallback: {option}")
        if self._layers:  # a second fit on the same module: already prepared
            return
        if self._needs_batches(pl_module):
            check_batches_runnable(trainer, pl_module, "QuantizeCallback", self.batch_forward)
        self._prepare(trainer, pl_module)

    def quantised_layers(self, pl_module: LightningModule) -> list[str] | None:
        """The names of the layers this callback quantises in ``pl_module`` (those it has prepared, else those its
        ``include``/``exclude`` select; nothing is changed); ``None`` when the selection fails (its own error, in
        its ``setup``)."""
        if self._layers:
            return list(self._layers)
        opts = self.options
        try:
            return [n for n, _ in select_layers(pl_module, opts.include, opts.exclude, opts.quantize_teacher)]
        except ValueError:
            return None

    def _watch_weight_reads(self, pl_module: LightningModule) -> None:
        """Watch the forward of this fit's first training step (:mod:`~lightning_compress.quantization.read_check`)."""
        self._reads.open(pl_module, self._layers, artifact.network_of(pl_module, len(self._layers)))

    def _check_no_stray_layers(
        self, trainer: Trainer, pl_module: LightningModule, selected: set[str], protected: list[str]
    ) -> None:
        """Refuse layers fake-quantised earlier (an earlier fit's callback) that neither this callback nor another
        of the Trainer's selects: they stayed fake-quantised and were converted, whatever ``include``/``exclude`` said."""
        others = {n for cb in trainer.callbacks if isinstance(cb, QuantizeCallback) and cb is not self  # type: ignore[attr-defined]
                  for n in cb.quantised_layers(pl_module) or ()}  # fmt: skip
        inside = tuple(f"{p}." for p in protected)  # with quantize_teacher, the training-only modules' own layers
        stray = [n for n in fake_quant_layers(pl_module)
                 if n not in selected and n not in others and n not in protected and not n.startswith(inside)]  # fmt: skip
        if stray:
            raise ValueError(
                f"QuantizeCallback: {preview(stray)} were fake-quantised earlier but this callback's include/exclude does "
                "not select them: they would stay fake-quantised and be converted. Select them, or strip the earlier "
                "layers first (lightning_compress.quantization.strip_fake_quant(model))"
            )

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Swap the selected layers to their fake-quantised classes (checks first, then all at once)."""
        opts = self.options
        settings = QuantSettings(
            bits=self._current_bits,
            activation_bits=opts.activation_bits,
            granularity=opts.granularity,
            rounding=opts.rounding,
            observer_momentum=None if opts.method == "ptq" else opts.observer_momentum,
        )
        protected = self._protected_names(pl_module)
        candidates = [
            n for n, m in pl_module.named_modules() if is_supported_type(m) and n not in protected
        ]
        selected = select_layers(pl_module, opts.include, opts.exclude, opts.quantize_teacher)  # checked before any change
        weights = {f"{n}.{p}": w for n, m in selected for p, w in quantised_weights(m).items()}
        check_teacher_cache(pl_module, weights, "QuantizeCallback")
        self._check_no_stray_layers(trainer, pl_module, {n for n, _ in selected}, protected)
        check_row_sharded(weights, "QuantizeCallback")
        if opts.layer_bits is not None:
            bits_of = layer_bits([n for n, _ in selected], opts.layer_bits, candidates)
            check_tied_bits(pl_module, dict(selected), bits_of)
            self._bits_of = bits_of
        notes: list[str] = []  # layers left in float: warned, and kept for the summary's notes
        self._layers = prepare_fake_quant(pl_module, settings, opts.include, opts.exclude, opts.quantize_teacher, notes)
        for note in notes:
            self.warn_in_report(f"QuantizeCallback: {note}")
        self._total_candidates = len(candidates)
        self._weight_fraction = quantised_fraction(pl_module, self._layers.values(), opts.quantize_teacher)
        self._phase = None
        self._apply_phase(float(trainer.current_epoch))
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        widths = f"{self._mean_bits():.2f} bits per weight on average" if self._bits_of else f"{self._current_bits}-bit weights"
        rank_zero_info(
            f"QuantizeCallback: {len(self._layers)} layers fake-quantised ({opts.method}, "
            f"{widths}, activations {opts.activation_bits or 'float'})"
        )

    def _needs_batches(self, pl_module: LightningModule) -> bool:
        if self.options.method == "ptq":
            return True
        return self.bn_reestimate_batches > 0 and bool(batchnorm_layers(pl_module, self._protected_names(pl_module), training_only=True))

    def _restore_for_evaluation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``validate``/``test``/``predict`` from a checkpoint (Lightning restores no callback state
        outside fit): the checkpoint's quantisation state, on a model prepared as the fit's was."""
        if trainer.state.fn == "fit":
            return
        # read only without a checkpoint: whether an earlier fit left the model fake-quantised
        quantised = not trainer.ckpt_path and any(m.quantizer.enabled for m in fake_quant_layers(pl_module).values())
        state = evaluation_state(trainer, self.state_key, fitted=bool(self._layers), quantised=quantised)
        if state is None:
            return
        if changed := settings_changed(state, self._settings()):
            stage = getattr(trainer.state.fn, "value", trainer.state.fn)
            raise ValueError(
                f"QuantizeCallback: trainer.{stage}(ckpt_path={trainer.ckpt_path!r}) with other settings than the checkpoint's "
                f"run was trained with ({changed}): the model measured would be neither's. Give this callback the fit's "
                "settings to measure the checkpoint, or fit with the new ones"
            )
        # these hooks run under inference mode; the observers made here must take later in-place loads and training
        with torch.inference_mode(False):
            if self.prepared_other_module(pl_module):
                self._forget_layers()
            if not self._layers:
                self._prepare(trainer, pl_module)
            self.load_state_dict(state)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_for_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_for_evaluation(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_for_evaluation(trainer, pl_module)

    @override
    def discard_setup(self) -> None:
        self._forget_layers()

    # ---------------------------------------------------------------------------------- training
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        warn_if_guard_cannot_run(trainer, pl_module, "QuantizeCallback", self.monitor)
        if self.options.export_to and self._layers and self.convert_on_fit_end:
            try:  # here, once the module's own setup and configure_model have run: the call is the step's
                artifact.check_export_call(trainer, pl_module, len(self._layers), self.options.export_to)
            except ValueError:
                strip_fake_quant(pl_module, self._layers.values())  # refused before training: the model as it was given
                self._forget_layers()
                raise
        if self.method == "ptq" and self._calibrated:  # PTQ never updates weights once calibrated: nothing to train
            if not trainer.ckpt_path:  # not a resume: a later fit of the same callback, which would end in silence
                self.warn_in_report(
                    "QuantizeCallback(method='ptq') calibrated this model in an earlier fit, and PTQ trains nothing after "
                    "its calibration: this fit stops before its first step and keeps the calibrated model. For more "
                    "float training before calibrating, fit that first, then add QuantizeCallback(method='ptq')"
                )
            trainer.should_stop = True
            return
        if self.method == "ptq" and not self._calibrated and trainer.current_epoch < self.start_epoch:
            warn_unvalidated_calibration(self.options, trainer, pl_module)
        if self.method == "ptq" and not self._calibrated and trainer.current_epoch >= self.start_epoch:
            self.calibrate(trainer, pl_module)
            trainer.should_stop = True
            self.warn_in_report(
                f"QuantizeCallback(method='ptq', start_epoch={self.options.start_epoch:g}) calibrated before any training "
                "step and ended the fit there, so no validation of this fit measured the calibrated model (no val_* "
                "metric, none in the report); run trainer.validate(model, datamodule) after the fit for its metrics"
            )
            return
        if self._layers and self.method == "qat":
            warn_unreached_schedule(self.options, trainer, pl_module, rolled_back=self._guard.locked_bits is not None)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_phase(float(trainer.current_epoch))
        self._log_due = bool(self._layers)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._reads.done:
            self._watch_weight_reads(pl_module)
        self._apply_phase(epoch_position(trainer, batch_idx, fractional=self.options.within_epochs()))
        self._observe_steps = self._enabled and not self._observers_frozen
        self._set_observing(self._observe_steps)
        if self._observe_steps:
            self.count_tokens_of(pl_module, batch)
        if self._bn_frozen:
            for m in pl_module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._reads.close()  # the step failed with the watch open: never leave it watching
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        self._reads.report()  # the forward is over; the optimizer's reads are not the model's
        # activation checkpointing runs the forward again inside backward: the ranges take each batch once, and
        # the rerun quantises as the forward did; a forward after this backward (a second optimizer's) observes
        self._set_observing(False)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_observing(self._observe_steps)

    def _set_observing(self, observing: bool) -> None:
        for layer in self._layers.values():  # a plain attribute: written directly, not through nn.Module.__setattr__
            layer.quantizer.__dict__["observing"] = observing  # (4 times a step: 53 against 2.3 us for 19 layers)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._reads.report()  # a step without backward
        self._observe_steps = False
        self._set_observing(False)
        self.stop_counting_tokens()
        if self._log_due:
            self._log_due = False
            active = self.is_active()
            self.log_metrics(trainer, pl_module, {
                "quant/weight_bits": self._mean_bits() if active else 32.0,
                "quant/fraction_quantized": self._fraction() if active else 0.0,
            })
        self.flush_metrics(pl_module)
        last = _is_last_batch(trainer, batch_idx)
        if self._bn_due() and last:
            # the last batch of an epoch: re-estimate now, so that the epoch's validation, the
            # checkpoints written after it and a max_drop guard all see the statistics of these weights
            self.reestimate_batchnorm(trainer, pl_module)
        if self._ptq_due(trainer) and last:
            # the last batch of float training: calibrate now, so that this epoch's validation (and the
            # report, the checkpoint after it) measures the calibrated model; the fit stops at the epoch's end
            self._calibrate_after_training(trainer, pl_module)

    def _calibrate_after_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.compressed_after_training_epoch = trainer.current_epoch
        self.calibrate(trainer, pl_module)

    def _ptq_due(self, trainer: Trainer) -> bool:
        """PTQ, not calibrated yet, and this epoch is the last float one (``start_epoch`` epochs trained)."""
        return self.method == "ptq" and not self._calibrated and trainer.current_epoch + 1 >= self.start_epoch

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reads.close()  # a first step skipped (on_train_batch_start returned -1) left it open
        self.stop_counting_tokens()  # as it left the step's padding mask current
        if not self._layers:
            return
        self.log_metrics(trainer, pl_module, {}, epoch_detail(self, self._ranges()))
        if self._ptq_due(trainer):  # an epoch whose length was not known, or one cut short: calibrate now
            nb = trainer.num_training_batches
            if (isinstance(nb, int) and nb > 0) or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
                rank_zero_warn(
                    f"QuantizeCallback: training stopped at step {trainer.global_step}, in epoch {trainer.current_epoch} of "
                    f"the start_epoch={self.options.start_epoch:g} float epochs; PTQ calibrates the model as trained so far"
                )
            self._calibrate_after_training(trainer, pl_module)
        if self.method == "ptq" and self._calibrated:  # float training done (start_epoch epochs), calibrated: stop
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reads.close()
        self.stop_counting_tokens()
        if self._bn_due() and self._bn_step != trainer.global_step:  # steps since the last re-estimation
            self.reestimate_batchnorm(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.method != "ptq":
            self.check_monitor(trainer, self.monitor)
        if trainer.sanity_checking or self.monitor is None or not self._enabled or self.method == "ptq":
            return
        if trainer.state.fn != "fit":  # trainer.validate(...) after fit measures the model; the guard acts in fit only
            return
        metric = read_monitor(trainer, self.monitor, "QuantizeCallback")
        bits = self._current_bits
        reason = self._guard.observe(trainer, trainer.current_epoch, metric, bits, self.bits_at(self.start_epoch))
        if reason is None:
            self._keep_accepted(pl_module)
            return
        kept = self._restore_accepted(trainer, pl_module)
        # the next epoch starts at the rolled-back width; apply it now so the checkpoint of this epoch holds it
        self._phase = None
        self._apply_phase(float(trainer.current_epoch))
        self._log_due = True
        # logged now too: at the fit's last validation no later step would log the width the model is returned at
        self.log_metrics(trainer, pl_module, {"quant/weight_bits": self._mean_bits(), "quant/fraction_quantized": self._fraction()})
        rank_zero_warn(guard_message(self.monitor, reason, bits, self._current_bits, kept) + checkpoint_score_note(trainer))

    def _keep_accepted(self, pl_module: LightningModule) -> None:
        """Copy the model this validation measured, for the guard to give back if a later one trips it: while it can
        still trip (a lowering schedule, ``max_drop`` set, not tripped), and not of weights sharded by FSDP2 (there
        only the width rolls back)."""
        self._accepted = None
        if self.max_drop is None or not self.options.lowers_bits() or self._guard.locked_bits is not None:
            return
        if has_sharded_parameters(pl_module):
            return
        params = trained_parameters(dict(pl_module.named_parameters()))
        self._accepted = (GuardSnapshot.take(params, state_buffers(pl_module)), layer_states(self._layers))

    def _restore_accepted(self, trainer: Trainer, pl_module: LightningModule) -> bool | str:
        """Put back the weights, buffers and activation ranges of the last accepted validation, and let the other
        plugins enforce what they hold on the restored weights. Returns ``True``, ``False`` (no copy: sharded weights,
        or a checkpoint without one) or why the copy could not be put back."""
        accepted, self._accepted = self._accepted, None
        if accepted is None:
            return False
        snapshot, ranges = accepted
        params, buffers = dict(pl_module.named_parameters()), state_buffers(pl_module)
        if (changed := snapshot.mismatch(params, buffers)) is not None:  # channels or units removed since
            return f"its copy of the last accepted model no longer fits the layers, which changed since ({changed})"
        snapshot.restore(params, buffers, trainer.optimizers)
        apply_layer_states(self._layers, ranges)
        self.tell_weights_restored(trainer, pl_module)
        return True

    @override
    def weights_restored(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._accepted is not None:  # the copy takes the restored model: a later trip must not bring back the other's reject
            self._keep_accepted(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._accepted is not None:  # a parameter unfrozen since the guard's copy joins it, as validated
            self._accepted[0].add_missing(dict(pl_module.named_parameters()))

    # ----------------------------------------------------------------------------- batches
    def calibrate(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """Run up to ``calibration_batches`` training batches through the model in eval mode (no grad)."""
        artifact.check_quantization_finite(self._layers, "QuantizeCallback before PTQ calibration", self.on_nonfinite)
        self._enabled = True
        seen = calibrate_ranges(trainer, pl_module, self._layers, self.calibration_batches, self.batch_forward)
        if seen == 0:
            raise ValueError(
                "method='ptq' needs training batches to calibrate on, but the training dataloader is empty or "
                "training_step skipped (returned None for) every batch; pass batch_forward=lambda module, batch: ..."
            )
        artifact.check_quantization_finite(self._layers, f"QuantizeCallback PTQ calibration ({seen} batches)", self.on_nonfinite)
        self._calibrated = True
        self._phase = None
        self._apply_phase(float(trainer.current_epoch))  # quantisation on from here: a validation now measures it
        # the metrics say so from here (the float values logged before would stand for the rest of the fit)
        self.log_metrics(trainer, pl_module, {"quant/weight_bits": self._mean_bits(), "quant/fraction_quantized": self._fraction()})
        rank_zero_info(f"QuantizeCallback: calibrated activation ranges on {seen} training batches")
        return seen

    def _bn_due(self) -> bool:
        return bool(self.method == "qat" and self._layers and self._enabled and not self._bn_frozen and self.bn_reestimate_batches)

    def reestimate_batchnorm(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """Recompute the module's BatchNorm running statistics over ``bn_reestimate_batches`` training
        batches with the current fake-quantised weights (averaged over processes under DDP)."""
        protected = self._protected_names(pl_module)
        seen = reestimate_in_fit(trainer, pl_module, self._layers, self.bn_reestimate_batches, self.batch_forward, protected)
        self._bn_step = trainer.global_step
        # what the statistics were estimated for: a plugin changing the weights when training ends (pruning's last
        # step, after this callback's on_train_end in either order) is seen in on_fit_end
        self._bn_weights = model_fingerprint(pl_module) if seen else None
        if seen:
            n = len(batchnorm_layers(pl_module, protected, training_only=True))
            if "bn_reestimated" not in self._report:  # said once; it repeats every QAT epoch
                rank_zero_info(
                    f"QuantizeCallback: re-estimating the statistics of {n} BatchNorm layers on {seen} training batches "
                    "after every QAT epoch"
                )
            self._report["bn_reestimated"] = {"layers": n, "batches": seen}
        return seen

    # --------------------------------------------------------------------------------- conversion
    def convert(self, pl_module: LightningModule) -> nn.Module | None:
        """A converted (real low-bit) copy of the trained network; the module itself is unchanged. Of a
        network sharded by FSDP2, the whole network on rank 0 (every rank must call this) and ``None`` on
        the other ranks."""
        trainer = getattr(pl_module, "_trainer", None)  # the call the step makes says which network that is
        call = example_input(trainer, pl_module, full=True) if trainer is not None else None
        network = artifact.network_of(pl_module, len(self._layers), call)
        return artifact.converted_copy(network, self.backend, self.on_nonfinite)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._accepted = None  # the guard acts in fit only: no copy beside the converted model or in a later checkpoint
        if not self._layers:
            return
        if self.method == "ptq" and not self._calibrated:
            strip_fake_quant(pl_module, self._layers.values())  # the model is the float one it trained as (another callback's layers stay)
            self._layers = {}
            self.warn_in_report(uncalibrated_note(self.options, trainer))
            return
        if self._bn_due() and self._bn_weights is not None and model_fingerprint(pl_module) != self._bn_weights:
            self.reestimate_batchnorm(trainer, pl_module)  # the weights changed after the last estimate
        if not self.convert_on_fit_end:
            return
        if self.method == "qat" and not self._enabled:  # stopped early (EarlyStopping, max_steps) before start_epoch
            self.warn_in_report(unstarted_note(self.options, trainer))
            return
        if self.method == "qat" and self._guard.locked_bits is None and (note := unreached_bits_note(self.options, trainer, self._current_bits)):
            self.warn_in_report(note)
        self.quantized_model, example = artifact.convert_at_fit_end(trainer, pl_module, self._layers, self.options, self._report)
        self._quantized_call = example
        # kept before the files are written: a save_to that fails leaves the converted model here
        artifact.write_at_fit_end(trainer, self.quantized_model, example, self.options, self._report)

    # ------------------------------------------------------------------------------------- report
    def _fraction(self) -> float:
        """The share of the model's weights (parameters of 2+ dimensions outside a teacher) that are quantised."""
        return self._weight_fraction

    def _mean_bits(self) -> float:
        """Bits per quantised weight: the current width, or the weight-count-weighted mean of a per-layer map."""
        if not self._bits_of:
            return float(self._current_bits)
        weights = {id(w): (w.numel(), int(m.quantizer.bits)) for m in self._layers.values() for w in quantised_weights(m).values()}
        return sum(n * bits for n, bits in weights.values()) / max(1, sum(n for n, _ in weights.values()))  # a tied weight once

    def _ranges(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, layer in self._layers.items():
            obs = layer.quantizer.observer
            if obs is not None and obs.is_initialized():
                out[name] = (float(obs.min_val), float(obs.max_val))
        return out

    @override
    def compression_state(self) -> dict[str, float]:
        if not self._layers:
            return {}
        active = self.is_active()
        return {"weight_bits": self._mean_bits() if active else 32.0, "fraction_quantized": self._fraction() if active else 0.0}

    @override
    def compression_summary(self) -> dict[str, Any]:
        return quantization_summary(self, self._ranges())

    @override
    def compressed_artifact(self) -> nn.Module | None:
        return self.quantized_model

    @override
    def compressed_call(self) -> ForwardCall | None:
        return self._quantized_call if self.quantized_model is not None else None

    @override
    def is_active(self) -> bool:
        return bool(self._layers) and (self._calibrated if self.method == "ptq" else self._enabled)

    # --------------------------------------------------------------------------------- persistence
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "current_bits": self._current_bits,
            **self._guard.state(),
            "accepted": None if self._accepted is None else {**self._accepted[0].state(), "layers": self._accepted[1]},
            "calibrated": self._calibrated,
            "layers": layer_states(self._layers),
            "layer_bits": dict(self._bits_of) or None,
            "settings": self._settings(),
            # the step BatchNorm was last re-estimated at: a fit resumed there (a checkpoint of the last step) has
            # nothing to re-estimate at its end
            "bn_step": self._bn_step,
        }

    def _settings(self) -> dict[str, Any]:
        """What the run trains with, kept in checkpoints so that a resume with other options says so."""
        opts = self.options
        return {"method": self.method, "weight_bits": self.bits_at(1e9), "activation_bits": opts.activation_bits,
                "granularity": opts.granularity}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict)
        self._current_bits = int(state_dict["current_bits"])
        self._guard.load(state_dict)
        accepted = state_dict.get("accepted")
        self._accepted = None if accepted is None else (GuardSnapshot.from_state(accepted), dict(accepted["layers"]))
        self._calibrated = bool(state_dict.get("calibrated", False))
        self._bn_step = state_dict.get("bn_step")
        if self._layers:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        check_layer_bits(state, self._bits_of)
        if changed := settings_changed(state, self._settings()):
            rank_zero_warn(
                f"QuantizeCallback: the checkpoint's run was trained with other settings than this callback's "
                f"({changed}); this callback's apply from here, to the checkpoint's weights and ranges"
            )
        apply_layer_states(self._layers, state.get("layers", {}))
        self._enabled = any(m.quantizer.enabled for m in self._layers.values())
        self._phase = None
        self._pending_state = None
