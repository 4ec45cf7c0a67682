"""``QuantizeCallback``: epoch-scheduled quantisation-aware training (QAT) or post-training quantisation (PTQ).

The callback is glue: :mod:`~lightning_compress.quantization.layers` does the fake quantisation,
:mod:`~lightning_compress.quantization.convert` the conversion to low-bit storage and kernels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress._validation import as_patterns
from lightning_compress.deploy import PACKAGE_SUFFIX, compile_for_cpu, export_for_cpu
from lightning_compress.plugin import CompressionCallback, example_input, module_artifact, run_dir
from lightning_compress.report import measure_latency, serialized_size
from lightning_compress.quantization.batchnorm import batchnorm_layers, reestimate_batchnorm
from lightning_compress.quantization.convert import (
    BACKENDS,
    convert_fake_quant,
    save_quantized,
)
from lightning_compress.quantization.fake_quant import ROUNDING
from lightning_compress.quantization.layers import (
    QuantSettings,
    fake_quant_layers,
    prepare_fake_quant,
    strip_fake_quant,
    under_any,
)
from lightning_compress.schedules import Schedule, make_schedule

__all__ = ["QuantizeCallback"]

MODES = ("qat", "ptq")
LATENCY = ("both", "eager", "none")
BitsSpec = Union[int, Mapping[int, int]]


def _check_epoch(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer epoch >= 0{' or None' if allow_none else ''}, got {value!r}")


def _check_bits(value: Any, what: str = "weight_bits") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or not 2 <= value <= 8:
        raise ValueError(f"{what} must be an integer from 2 to 8, got {value!r}")
    return int(value)


def _default_inputs(batch: Any) -> Any:
    """The model input of a training batch: the first element of a tuple/list, or the batch itself."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Mapping):
        raise ValueError(
            "cannot tell the model input in a dict batch; pass calibrate_fn=lambda module, batch: module(...)"
        )
    return batch


class QuantizeCallback(CompressionCallback):
    r"""Quantise ``nn.Linear``, ``nn.Conv1d/2d`` and (weight-only) ``nn.Embedding`` layers during ``fit``.

    **QAT** (``mode="qat"``): from ``start_epoch`` every selected layer computes with fake-quantised
    weights (symmetric, straight-through gradient) and inputs (asymmetric 8-bit over an EMA min/max
    range observed in training steps only). ``weight_bits`` may follow an ``{epoch: bits}`` schedule
    (8 → 6 → 4); with ``monitor``/``max_drop`` the lowering stops, rolling back to the last good bit
    width, as soon as the metric falls more than ``max_drop`` below its value at the first bit width.
    **PTQ** (``mode="ptq"``): no weight update; ranges are calibrated over ``calibration_batches``
    training batches (progress bar), then training stops and the model is converted. With
    ``start_epoch=k`` the run first trains ``k`` float epochs, then calibrates and stops.

    The model is prepared in ``setup("fit")`` by swapping each layer's class in place (same
    ``forward`` signature, same parameters, same ``state_dict`` keys); observer ranges, bits and the
    rollback state live in this callback's ``state_dict``, so the checkpoint loads strictly into the
    float model and resuming continues bit-identically. At the end of fit a converted copy is stored
    in :attr:`quantized_model` (the trained module itself stays fake-quantised, so
    ``trainer.test(ckpt_path=...)`` keeps working).

    Args:
        mode: ``"qat"`` or ``"ptq"``.
        weight_bits: 2..8, or ``{epoch: bits}`` for progressive lowering (QAT only).
        activation_bits: 8 (static input quantisation) or ``None`` (weight-only).
        granularity: Weight scales ``"per_channel"`` (default), ``"per_tensor"``, or a group size (int).
        rounding: ``"nearest"`` (default), ``"floor"`` (truncation, for study) or ``"stochastic"``
            (training only; evaluation and conversion round to nearest).
        start_epoch: First epoch with fake quantisation (QAT). In PTQ, the number of float training
            epochs before calibration (0: calibrate a trained model at once, no weight update).
        freeze_observers_epoch: Epoch from which activation ranges stop updating (``None``: never).
        freeze_bn_epoch: Epoch from which BatchNorm layers use their running statistics (``None``: never).
        calibration_batches: Training batches used to calibrate ranges in PTQ.
        include: Regular expressions searched in module names (``"model.net.1"``); only matching
            layers are quantised, and every match must be a supported layer. Default: all supported.
        exclude: Regular expressions of module names to leave in float.
        convert_on_fit_end: Build :attr:`quantized_model` at the end of fit.
        monitor: Logged metric watched when the bit width is lowered (e.g. ``"val_acc"``).
        max_drop: Largest tolerated fall of ``monitor`` from its value at the first bit width.
        monitor_mode: ``"max"`` if larger ``monitor`` is better, ``"min"`` otherwise.
        backend: Conversion path, ``"auto"`` (fastest CPU path per layer: static int8 ``torch._int_mm``
            Linear, torchao int8 weight-only, packed low-bit) or ``"torchao"`` (torchao wherever it
            has a CPU path: dynamic-activation int8 Linear, int8 Conv2d).
        latency: Measure float vs converted CPU latency at fit end: ``"both"`` (eager and compiled
            with :func:`~lightning_compress.compile_for_cpu`), ``"eager"`` or ``"none"``; warns when
            the converted model is slower.
        observer_momentum: EMA factor of the activation ranges in QAT.
        calibrate_fn: ``(module, batch) -> None`` running one calibration batch (PTQ); default calls
            the module on the batch's first element.
        quantize_teacher: Also quantise ``pl_module.teacher`` (default: a distillation teacher is left alone).
        bn_reestimate_batches: QAT: after the last batch of every fake-quantised epoch (before its
            validation and checkpoint, and at the end of training if steps followed), recompute the
            BatchNorm running statistics over this many training batches with the current
            fake-quantised weights (no weight update; skipped when ``freeze_bn_epoch`` froze them and
            for BatchNorm layers in ``eval`` mode; ``0`` turns it off). Weights that jump between grid
            points during QAT leave the running averages stale; this is what keeps low-bit models
            with BatchNorm accurate. The module keeps the new statistics, so validation, checkpoints
            and ``quantized_model`` agree.
        save_to: Write :attr:`quantized_model` at the end of fit with
            :func:`~lightning_compress.quantization.save_quantized` (``.safetensors``, or any other
            suffix for ``torch.save``); reload it with ``load_quantized(FloatModelClass(...), path)``.
            Relative paths are under the run's log directory (``trainer.log_dir``). Global rank 0 writes.
        export_to: Write an AOTInductor package (``.pt2``) of :attr:`quantized_model` at the end of fit
            with :func:`~lightning_compress.export_for_cpu` (the fastest CPU path; the example input is
            ``example_input_array`` or the first tensor of a training batch); a failed export is a
            warning, not an error, since training has finished. Relative like ``save_to``.

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

    def __init__(
        self,
        mode: str = "qat",
        weight_bits: BitsSpec = 8,
        activation_bits: int | None = 8,
        granularity: str | int = "per_channel",
        rounding: str = "nearest",
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        calibration_batches: int = 32,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        convert_on_fit_end: bool = True,
        monitor: str | None = None,
        max_drop: float | None = None,
        monitor_mode: str = "max",
        backend: str = "auto",
        latency: str = "both",
        observer_momentum: float = 0.1,
        calibrate_fn: Callable[[nn.Module, Any], Any] | None = None,
        quantize_teacher: bool = False,
        bn_reestimate_batches: int = 32,
        save_to: str | None = None,
        export_to: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {list(MODES)}")
        if isinstance(weight_bits, Mapping):
            if mode == "ptq":
                raise ValueError("an {epoch: bits} schedule needs training; mode='ptq' takes a single weight_bits")
            if not weight_bits:
                raise ValueError("weight_bits schedule {epoch: bits} is empty")
            for epoch, bits in weight_bits.items():
                _check_bits(bits, f"weight_bits[{epoch!r}]")
            try:
                self._schedule: Schedule = make_schedule({int(k): int(v) for k, v in weight_bits.items()})
            except (TypeError, ValueError) as err:
                raise ValueError(f"weight_bits schedule needs integer epochs >= 0 as keys, got {dict(weight_bits)!r}") from err
        else:
            self._schedule = make_schedule(_check_bits(weight_bits))
        if activation_bits not in (8, None) or isinstance(activation_bits, bool):
            raise ValueError(f"activation_bits must be 8 or None (weight-only), got {activation_bits!r}")
        if isinstance(granularity, bool) or not (
            granularity in ("per_channel", "per_tensor") or (isinstance(granularity, int) and granularity > 0)
        ):
            raise ValueError(
                f"unknown granularity {granularity!r}; valid: 'per_channel', 'per_tensor' or a positive group size"
            )
        if rounding not in ROUNDING:
            raise ValueError(f"unknown rounding {rounding!r}; valid choices: {list(ROUNDING)}")
        _check_epoch("start_epoch", start_epoch, allow_none=False)
        for name, value in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
            _check_epoch(name, value)
            if value is not None and value < start_epoch:
                raise ValueError(f"{name}={value} is before start_epoch={start_epoch}; it must be >= start_epoch")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be an integer >= 1, got {calibration_batches!r}")
        if isinstance(bn_reestimate_batches, bool) or not isinstance(bn_reestimate_batches, int) or bn_reestimate_batches < 0:
            raise ValueError(f"bn_reestimate_batches must be an integer >= 0 (0: off), got {bn_reestimate_batches!r}")
        if max_drop is not None:
            if monitor is None:
                raise ValueError("max_drop needs monitor (the metric whose drop is bounded), e.g. monitor='val_acc'")
            if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or max_drop < 0:
                raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"unknown monitor_mode {monitor_mode!r}; valid choices: ['max', 'min']")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid choices: {list(BACKENDS)}")
        if latency not in LATENCY:
            raise ValueError(f"unknown latency {latency!r}; valid choices: {list(LATENCY)}")
        if not 0.0 < observer_momentum <= 1.0:
            raise ValueError(f"observer_momentum must be in (0, 1], got {observer_momentum!r}")
        if (save_to or export_to) and not convert_on_fit_end:
            raise ValueError("save_to/export_to write the converted model, which convert_on_fit_end=False never builds")
        if save_to and backend == "torchao" and str(save_to).endswith(".safetensors"):
            raise ValueError(
                f"save_to={save_to!r}: torchao layers hold tensor subclasses, which safetensors cannot store; "
                "use a .pt path or backend='auto'"
            )
        if export_to and not str(export_to).endswith(PACKAGE_SUFFIX):
            raise ValueError(f"export_to={export_to!r}: an AOTInductor package path must end in {PACKAGE_SUFFIX!r}")

        self.mode = mode
        self.activation_bits = activation_bits
        self.granularity = granularity
        self.rounding = rounding
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.calibration_batches = calibration_batches
        self.include = as_patterns(include, "include")
        self.exclude = as_patterns(exclude, "exclude")
        self.convert_on_fit_end = convert_on_fit_end
        self.monitor = monitor
        self.max_drop = None if max_drop is None else float(max_drop)
        self.monitor_mode = monitor_mode
        self.backend = backend
        self.latency = latency
        self.observer_momentum = observer_momentum
        self.calibrate_fn = calibrate_fn
        self.bn_reestimate_batches = bn_reestimate_batches
        self.quantize_teacher = quantize_teacher
        self.save_to = save_to
        self.export_to = export_to

        self.quantized_model: nn.Module | None = None
        self._layers: dict[str, nn.Module] = {}
        self._total_candidates = 0
        self._pending_state: dict[str, Any] | None = None
        self._enabled = False
        self._observers_frozen = False
        self._bn_frozen = False
        self._current_bits = self.bits_at(0)
        self._locked_bits: int | None = None
        self._reference: float | None = None
        self._last_good_bits: int | None = None
        self._history: list[dict[str, Any]] = []
        self._calibrated = False
        self._bn_step: int | None = None
        self._report: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ schedule
    def bits_at(self, epoch: int) -> int:
        """Weight bits the schedule asks for at ``epoch`` (before any rollback)."""
        return int(self._schedule(epoch))

    def _bits_for(self, epoch: int) -> int:
        scheduled = self.bits_at(epoch)
        return scheduled if self._locked_bits is None else max(scheduled, self._locked_bits)

    def _apply_epoch(self, epoch: int) -> None:
        self._current_bits = self._bits_for(epoch)
        self._enabled = self._calibrated if self.mode == "ptq" else epoch >= self.start_epoch
        self._observers_frozen = self.mode == "ptq" or (
            self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch
        )
        self._bn_frozen = self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch
        for layer in self._layers.values():
            layer.quantizer.bits = self._current_bits
            layer.quantizer.enabled = self._enabled
            layer.quantizer.observing = False

    # --------------------------------------------------------------------------------------- setup
    def _skip_prefixes(self, pl_module: LightningModule) -> list[str]:
        teacher = getattr(pl_module, "teacher", None)
        return ["teacher"] if isinstance(teacher, nn.Module) and not self.quantize_teacher else []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            if self._layers and trainer.ckpt_path:
                self._restore_from_checkpoint(trainer.ckpt_path)
            return
        if self._layers:  # a second fit on the same module: already prepared
            return
        if isinstance(self._schedule, Schedule) and self._schedule.milestones() and trainer.max_epochs not in (None, -1):
            late = [m for m in self._schedule.milestones() if m >= trainer.max_epochs]
            if late:
                rank_zero_warn(f"weight_bits schedule epochs {late} are at or after max_epochs={trainer.max_epochs}; they never apply")
        if self.mode == "ptq":
            self._check_training_batches(trainer, pl_module)
        settings = QuantSettings(
            bits=self._current_bits,
            activation_bits=self.activation_bits,
            granularity=self.granularity,
            rounding=self.rounding,
            observer_momentum=None if self.mode == "ptq" else self.observer_momentum,
        )
        skip = self._skip_prefixes(pl_module)
        self._layers = prepare_fake_quant(pl_module, settings, self.include, self.exclude, skip)
        self._total_candidates = sum(
            1
            for n, m in pl_module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))
            and not under_any(n, skip)
        )
        self._apply_epoch(trainer.current_epoch)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        rank_zero_info(
            f"QuantizeCallback: {len(self._layers)} layers fake-quantised ({self.mode}, "
            f"{self._current_bits}-bit weights, activations {self.activation_bits or 'float'})"
        )

    def _check_training_batches(self, trainer: Trainer, pl_module: LightningModule) -> None:
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        try:
            loader = source.train_dataloader()
            n = len(loader)
        except Exception:  # noqa: BLE001 - iterable or lazily defined loaders: checked at calibration
            return
        if n == 0 or trainer.limit_train_batches == 0:
            raise ValueError("mode='ptq' needs training batches to calibrate on, but the training dataloader is empty")

    # ---------------------------------------------------------------------------------- training
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "ptq" and not self._calibrated and trainer.current_epoch >= self.start_epoch:
            self.calibrate(trainer, pl_module)
            trainer.should_stop = True

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_epoch(trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        observe = self._enabled and not self._observers_frozen
        for layer in self._layers.values():
            layer.quantizer.observing = observe
        if self._bn_frozen:
            for name, m in pl_module.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for layer in self._layers.values():
            layer.quantizer.observing = False
        self._after_train_batch(trainer, pl_module, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._layers:
            return
        metrics = {
            "quant/weight_bits": float(self._current_bits if self._enabled else 32),
            "quant/fraction_quantized": self._fraction() if self._enabled else 0.0,
        }
        for name, layer in self._layers.items():
            metrics[f"quant/bits/{name}"] = float(layer.quantizer.bits if self._enabled else 32)
        ranges = self._ranges()
        if ranges:
            metrics["quant/act_range_mean"] = sum(hi - lo for lo, hi in ranges.values()) / len(ranges)
            metrics["quant/act_range_max"] = max(hi - lo for lo, hi in ranges.values())
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
        if self.mode == "ptq" and not self._calibrated and trainer.current_epoch + 1 >= self.start_epoch:
            # float training done (start_epoch epochs): calibrate on training batches, then stop
            self.calibrate(trainer, pl_module)
            trainer.should_stop = True

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or not self._enabled or self.mode == "ptq":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            rank_zero_warn(f"QuantizeCallback: monitor {self.monitor!r} not found in the logged metrics {sorted(trainer.callback_metrics)}")
            return
        metric = float(value)
        bits = self._current_bits
        entry = {"epoch": trainer.current_epoch, "bits": bits, self.monitor: metric}
        self._history.append(entry)
        first_bits = self.bits_at(self.start_epoch)
        better = max if self.monitor_mode == "max" else min
        if bits >= first_bits:
            self._reference = metric if self._reference is None else better(self._reference, metric)
            self._last_good_bits = bits
            return
        if self._reference is None or self.max_drop is None or self._locked_bits is not None:
            return
        drop = self._reference - metric if self.monitor_mode == "max" else metric - self._reference
        if drop > self.max_drop:
            self._locked_bits = self._last_good_bits if self._last_good_bits is not None else first_bits
            entry["rolled_back_to"] = self._locked_bits
            rank_zero_warn(
                f"QuantizeCallback: {self.monitor} fell by {drop:.4g} (> max_drop={self.max_drop}) at {bits}-bit "
                f"weights; rolling back to {self._locked_bits} bits and stopping the lowering"
            )
            # the next epoch starts at the rolled-back width; apply it now so the checkpoint of this epoch holds it
            self._current_bits = self._locked_bits
            for layer in self._layers.values():
                layer.quantizer.bits = self._locked_bits
        else:
            self._last_good_bits = bits

    # ------------------------------------------------------------------------------------------ PTQ
    def _batch_forward(self) -> Callable[[nn.Module, Any], Any]:
        """``(module, batch) -> output`` for one training batch outside a training step: the user's
        ``calibrate_fn``, else the module on the batch's input."""
        return self.calibrate_fn or (lambda module, batch: module(_default_inputs(batch)))

    def calibrate(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """Run up to ``calibration_batches`` training batches through the model in eval mode (no grad)."""
        from tqdm.auto import tqdm

        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError("mode='ptq' needs a training dataloader to calibrate on")
        try:
            total = min(self.calibration_batches, len(loader))
        except TypeError:
            total = self.calibration_batches
        fn = self._batch_forward()
        was_training = pl_module.training
        pl_module.eval()
        for layer in self._layers.values():
            layer.quantizer.enabled = True
            layer.quantizer.observing = True
        self._enabled = True
        seen = 0
        show = trainer.progress_bar_callback is not None and trainer.is_global_zero
        try:
            with torch.no_grad():
                for batch in tqdm(loader, total=total, desc="PTQ calibration", disable=not show, leave=False):
                    if seen >= total:
                        break
                    fn(pl_module, trainer.strategy.batch_to_device(batch))
                    seen += 1
        finally:
            for layer in self._layers.values():
                layer.quantizer.observing = False
            pl_module.train(was_training)
        if seen == 0:
            strip_fake_quant(pl_module)
            self._layers = {}
            raise ValueError("mode='ptq' needs training batches to calibrate on, but the training dataloader is empty")
        self._calibrated = True
        rank_zero_info(f"QuantizeCallback: calibrated activation ranges on {seen} training batches")
        return seen

    # ----------------------------------------------------------------------------- BN statistics
    def _bn_due(self) -> bool:
        return bool(self.mode == "qat" and self._layers and self._enabled and not self._bn_frozen and self.bn_reestimate_batches)

    def _after_train_batch(self, trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> None:
        # the last batch of an epoch: re-estimate now, so that the epoch's validation, the
        # checkpoints written after it and a max_drop guard all see the statistics of these weights
        nb = trainer.num_training_batches
        if self._bn_due() and isinstance(nb, int) and batch_idx + 1 == nb:
            self.reestimate_batchnorm(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bn_due() and self._bn_step != trainer.global_step:  # steps since the last re-estimation
            self.reestimate_batchnorm(trainer, pl_module)

    def reestimate_batchnorm(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """Recompute the module's BatchNorm running statistics over ``bn_reestimate_batches`` training
        batches with the current fake-quantised weights (averaged over processes under DDP)."""
        loader = trainer.train_dataloader
        if loader is None:
            return 0
        fn = self._batch_forward()
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None
        for layer in self._layers.values():
            layer.quantizer.observing = False
        skip = self._skip_prefixes(pl_module)
        seen = reestimate_batchnorm(
            pl_module,
            (trainer.strategy.batch_to_device(b) for b in loader),
            max_batches=self.bn_reestimate_batches,
            forward=fn,
            skip=skip,
            reduce_mean=reduce,
            training_only=True,  # a BatchNorm the user put in eval mode stays as it is
        )
        self._bn_step = trainer.global_step
        if seen:
            n = len(batchnorm_layers(pl_module, skip, training_only=True))
            if "bn_reestimated" not in self._report:  # said once; it repeats every QAT epoch
                rank_zero_info(
                    f"QuantizeCallback: re-estimating the statistics of {n} BatchNorm layers on {seen} training batches "
                    "after every QAT epoch"
                )
            self._report["bn_reestimated"] = {"layers": n, "batches": seen}
        return seen

    # --------------------------------------------------------------------------------- conversion
    def _source(self, pl_module: LightningModule) -> nn.Module:
        """The network to convert: the module's own artifact (a distillation student) or its ``model``."""
        own = module_artifact(pl_module)
        inner = getattr(pl_module, "model", None)
        for candidate in (own, inner):
            # all the fake-quantised layers must be inside it, or a part of the work would be dropped
            if isinstance(candidate, nn.Module) and len(fake_quant_layers(candidate)) == len(self._layers):
                return candidate
        return pl_module

    def _detached_copy(self, module: nn.Module) -> nn.Module:
        if isinstance(module, LightningModule):
            trainer = module._trainer
            module._trainer = None
            try:
                return copy.deepcopy(module)
            finally:
                module._trainer = trainer
        return copy.deepcopy(module)

    def convert(self, pl_module: LightningModule) -> nn.Module:
        """A converted (real low-bit) copy of the trained network; the module itself is unchanged."""
        source = self._detached_copy(self._source(pl_module))
        return convert_fake_quant(source, backend=self.backend, inplace=True)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._layers:
            return
        if self.mode == "ptq" and not self._calibrated:
            strip_fake_quant(pl_module)
            self._layers = {}
            raise ValueError("mode='ptq' needs training batches to calibrate on, but none were seen")
        if not self.convert_on_fit_end:
            return
        self.quantized_model = self.convert(pl_module)
        float_model = self._detached_copy(self._source(pl_module))
        strip_fake_quant(float_model)
        self._report["size_bytes"] = {
            "float": serialized_size(float_model),
            "quantized": serialized_size(self.quantized_model),
        }
        self._report["size_ratio"] = self._report["size_bytes"]["float"] / max(1, self._report["size_bytes"]["quantized"])
        try:  # the same state as safetensors files (no per-tensor zip records); torchao layers cannot be stored so
            st = {"float": serialized_size(float_model, "safetensors"), "quantized": serialized_size(self.quantized_model, "safetensors")}
        except ValueError:
            pass
        else:
            self._report["size_bytes_safetensors"] = st
            self._report["size_ratio_safetensors"] = st["float"] / max(1, st["quantized"])
        self._report["formats"] = {k: v["format"] for k, v in self.quantized_model.quantization_spec.items()}
        example = getattr(pl_module, "example_input_array", None)
        if self.latency != "none" and isinstance(example, Tensor) and trainer.is_global_zero:
            self._report["latency"] = self._measure(float_model.eval(), self.quantized_model, example)
        if self.save_to or self.export_to:
            directory = run_dir(trainer)  # on every rank: trainer.log_dir broadcasts
            if trainer.is_global_zero:
                self._write_files(trainer, pl_module, directory)

    def _write_files(self, trainer: Trainer, pl_module: LightningModule, directory: Path) -> None:
        """``save_to`` (a :func:`save_quantized` file) and ``export_to`` (an :func:`export_for_cpu` package)."""
        assert self.quantized_model is not None
        if self.save_to:
            path = directory / self.save_to  # an absolute save_to stays itself
            path.parent.mkdir(parents=True, exist_ok=True)
            save_quantized(self.quantized_model, path)
            size = path.stat().st_size
            self._report["saved_to"] = {"path": str(path), "bytes": size}
            rank_zero_info(f"QuantizeCallback: converted model saved to {path} ({size:,} bytes)")
        if not self.export_to:
            return
        path = directory / self.export_to
        example = example_input(trainer, pl_module)
        try:
            if example is None:
                raise ValueError("no example input: set example_input_array on the LightningModule")
            export_for_cpu(self.quantized_model, example[:1], path)
        except Exception as err:  # noqa: BLE001 - the trained model and its checkpoint stand; say what failed
            msg = f"QuantizeCallback: export_to={self.export_to!r} not written: {type(err).__name__}: {err}"[:600]
            self._report.setdefault("warnings", []).append(msg)
            rank_zero_warn(msg)
            return
        self._report["exported_to"] = {"path": str(path), "bytes": path.stat().st_size}
        rank_zero_info(f"QuantizeCallback: CPU package exported to {path} (load it with lightning_compress.load_for_cpu)")

    def _measure(self, float_model: nn.Module, quant: nn.Module, example: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        float_model = float_model.to("cpu")
        quant = quant.to("cpu") if not any(p.is_cuda for p in quant.parameters()) else quant
        batch = example.to("cpu").expand(64, *example.shape[1:]).contiguous()
        variants = {"eager": (float_model, quant)}
        if self.latency == "both":
            variants["compiled"] = (compile_for_cpu(float_model), compile_for_cpu(quant))
        for name, (f, q) in variants.items():
            try:
                res = measure_latency({"float": f, "quantized": q}, batch, batch_size=None, repeats=5, warmup=3, num_threads=None, iters=None)
            except Exception as err:  # noqa: BLE001 - a backend that cannot compile is reported, not fatal
                out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
                continue
            speedup = res["float"]["median_ms"] / res["quantized"]["median_ms"]
            out[name] = {"batch": 64, **{f"{k}_ms": v["median_ms"] for k, v in res.items()}, "speedup": speedup}
        eager = out.get("eager", {}).get("speedup")
        compiled = out.get("compiled", {}).get("speedup")
        if eager is not None and eager < 1.0:
            hint = self._slow_hint(compiled)
            msg = f"QuantizeCallback: the converted model is slower than float on CPU in eager mode ({eager:.2f}x speed at batch 64){hint}"
            self._report.setdefault("warnings", []).append(msg)
            rank_zero_warn(msg)
        elif compiled is not None and compiled < 1.0:
            msg = f"QuantizeCallback: compiled for CPU, the converted model is slower than float ({compiled:.2f}x)"
            self._report.setdefault("warnings", []).append(msg)
            rank_zero_warn(msg)
        return out

    def _slow_hint(self, compiled: float | None) -> str:
        """What to tell a user whose converted model is slower than float in eager mode."""
        if compiled is not None:
            if compiled >= 1.0:
                return (f"; compiled for CPU it is {compiled:.2f}x float, so run it as "
                        "lightning_compress.compile_for_cpu(callback.quantized_model), or serve it as a package "
                        "from lightning_compress.export_for_cpu (faster still)")
            return ""
        formats = set(self._report.get("formats", {}).values())
        if formats & {"int8_linear", "torchao_int8_dynamic"}:
            return ("; the int8 Linear path is fast under lightning_compress.compile_for_cpu(callback.quantized_model) "
                    "(latency='both' measures it) and in lightning_compress.export_for_cpu packages")
        return ("; its layers are weight-only or low-bit: they store integers but compute in float (smaller, "
                "not faster); Linear layers with 8-bit inputs (activation_bits=8) get int8 kernels")

    # ------------------------------------------------------------------------------------- report
    def _fraction(self) -> float:
        return len(self._layers) / max(1, self._total_candidates)

    def _ranges(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, layer in self._layers.items():
            obs = layer.quantizer.observer
            if obs is not None and bool(obs.initialized):
                out[name] = (float(obs.min_val), float(obs.max_val))
        return out

    @override
    def compression_state(self) -> dict[str, float]:
        if not self._layers:
            return {}
        active = self.is_active()
        return {
            "weight_bits": float(self._current_bits if active else 32),
            "fraction_quantized": self._fraction() if active else 0.0,
        }

    @override
    def compression_summary(self) -> dict[str, Any]:
        ranges = self._ranges()
        notes = list(self._report.get("warnings", []))
        if "bn_reestimated" in self._report:
            bn = self._report["bn_reestimated"]
            notes.append(
                f"BatchNorm statistics of {bn['layers']} layers re-estimated on {bn['batches']} training batches "
                "at the end of each QAT epoch (before its validation and checkpoint)"
            )
        out = {
            "mode": self.mode,
            "weight_bits": self._current_bits,
            "activation_bits": self.activation_bits,
            "granularity": self.granularity,
            "rounding": self.rounding,
            "bits_per_layer": {n: int(m.quantizer.bits) for n, m in self._layers.items()},
            "layers_quantized": len(self._layers),
            "layers_total": self._total_candidates,
            "fraction_quantized": self._fraction(),
            "observer_ranges": {n: list(r) for n, r in ranges.items()},
            "observer_range_summary": {
                "min": min((r[0] for r in ranges.values()), default=None),
                "max": max((r[1] for r in ranges.values()), default=None),
            },
            "locked_bits": self._locked_bits,
            "history": list(self._history),
            **self._report,
        }
        if notes:
            out["notes"] = notes
        return out

    @override
    def compressed_artifact(self) -> nn.Module | None:
        return self.quantized_model

    @override
    def is_active(self) -> bool:
        return bool(self._layers) and (self._calibrated if self.mode == "ptq" else self._enabled)

    # --------------------------------------------------------------------------------- persistence
    @override
    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, layer in self._layers.items():
            qz = layer.quantizer
            entry: dict[str, Any] = {"bits": qz.bits, "enabled": qz.enabled}
            if qz.observer is not None:
                entry.update(
                    min=qz.observer.min_val.detach().cpu().clone(),
                    max=qz.observer.max_val.detach().cpu().clone(),
                    initialized=bool(qz.observer.initialized),
                )
            layers[name] = entry
        return {
            "version": 1,
            "current_bits": self._current_bits,
            "locked_bits": self._locked_bits,
            "reference": self._reference,
            "last_good_bits": self._last_good_bits,
            "history": list(self._history),
            "calibrated": self._calibrated,
            "layers": layers,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._current_bits = int(state_dict["current_bits"])
        self._locked_bits = state_dict.get("locked_bits")
        self._reference = state_dict.get("reference")
        self._last_good_bits = state_dict.get("last_good_bits")
        self._history = list(state_dict.get("history", []))
        self._calibrated = bool(state_dict.get("calibrated", False))
        if self._layers:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        saved = state.get("layers", {})
        missing = sorted(set(self._layers) - set(saved))
        if missing:
            raise ValueError(
                f"the checkpoint's quantisation state has no entry for layers {missing}; it was saved with a "
                f"different include/exclude selection ({sorted(saved)})"
            )
        for name, layer in self._layers.items():
            entry, qz = saved[name], layer.quantizer
            qz.bits = int(entry["bits"])
            qz.enabled = bool(entry["enabled"])
            if qz.observer is not None and "min" in entry:
                qz.observer.min_val.copy_(entry["min"])
                qz.observer.max_val.copy_(entry["max"])
                qz.observer.initialized.fill_(bool(entry["initialized"]))
        self._enabled = any(m.quantizer.enabled for m in self._layers.values())
        self._pending_state = None

    def _restore_from_checkpoint(self, path: str) -> None:
        """Re-apply the quantisation state saved in ``path`` (``trainer.test(ckpt_path=...)`` after fit)."""
        from lightning.fabric.utilities.cloud_io import _load as pl_load

        checkpoint = pl_load(path, map_location="cpu", weights_only=False)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            self.load_state_dict(state)
