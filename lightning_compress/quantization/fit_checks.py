"""Checks of ``QuantizeCallback``'s schedule against the fit it joins, run in ``setup`` before the model changes:
a start past the last epoch, schedule milestones that never apply, PTQ without training batches, and PTQ
calibrating while another plugin still changes the weights; and, when training starts, what ``max_steps`` or
the validations of the fit leave undone (:func:`warn_unreached_schedule`); and, when a fit stopped early ends,
what it did not reach (:func:`uncalibrated_note`, :func:`unstarted_note`, :func:`unreached_bits_note`)."""

from __future__ import annotations

import math

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.guard import validation_skipped, warn_if_change_unvalidated
from lightning_compress.plugin import CompressionCallback, fast_dev_run_note, unit_removers, weight_averaging
from lightning_compress.quantization.options import QuantizeOptions
from lightning_compress.schedules import max_steps_end

__all__ = ["check_averaging_order", "check_fit_epochs", "check_groups_after_removal", "warn_unreached_schedule"]


def check_fit_epochs(opts: QuantizeOptions, trainer: Trainer, own: Callback) -> None:
    """Raise (or warn, for milestones after the end) when ``opts`` cannot do what it asks in ``trainer``'s fit;
    ``own`` is the callback holding ``opts`` (left out when reading the other plugins)."""
    max_epochs = trainer.max_epochs
    if opts.method == "ptq" and not float(opts.start_epoch).is_integer():
        raise ValueError(f"method='ptq' calibrates at an epoch boundary; start_epoch={opts.start_epoch:g} must be whole")
    if opts.method == "ptq":
        _check_calibrated_last(opts, trainer, own, max_epochs if max_epochs is not None and max_epochs >= 0 else None)
    if max_epochs is None or max_epochs < 0:
        return
    last = max_epochs if opts.method == "ptq" else max_epochs - 1e-9
    if opts.start_epoch > last:
        raise ValueError(
            f"start_epoch={opts.start_epoch:g} is not before max_epochs={max_epochs}: no {opts.method.upper()} would run "
            f"and the converted model would not be what was asked for. Lower start_epoch or raise max_epochs."
            + fast_dev_run_note(trainer)
        )
    late = [m for m in opts.schedule.milestones() if m >= max_epochs]
    if late:
        rank_zero_warn(f"weight_bits schedule epochs {late} are at or after max_epochs={max_epochs}; they never apply")
    frozen = {k: v for k, v in (("freeze_observers_epoch", opts.freeze_observers_epoch), ("freeze_bn_epoch", opts.freeze_bn_epoch))
              if opts.method == "qat" and v is not None and v >= max_epochs}
    if frozen:  # ranges or BatchNorm statistics keep updating to the end: the run is not the one asked for
        rank_zero_warn(
            f"QuantizeCallback: {', '.join(f'{k}={v:g}' for k, v in frozen.items())} is at or after max_epochs={max_epochs}; "
            "nothing is frozen in this fit. Lower it or raise max_epochs"
        )
    if opts.method == "ptq" and trainer.limit_train_batches == 0:
        raise ValueError("method='ptq' needs training batches to calibrate on, but limit_train_batches=0")


def _check_calibrated_last(opts: QuantizeOptions, trainer: Trainer, own: Callback, max_epochs: int | None) -> None:
    """PTQ observes the activation ranges once, after ``start_epoch`` float epochs, and ends the fit: a plugin
    still changing the weights then (pruning's last mask update) would leave ranges of other weights."""
    start = opts.start_epoch
    for other in trainer.callbacks:  # type: ignore[attr-defined]
        if other is own or not isinstance(other, CompressionCallback):
            continue
        until = other.last_weight_change(max_epochs)
        if until is not None and until + 1e-9 >= start:
            raise ValueError(
                f"method='ptq' calibrates the activation ranges after start_epoch={start:g} float epochs and ends the "
                f"fit, but {type(other).__name__} changes the weights until epoch {until:g}: the converted model would "
                f"keep ranges observed on other weights. Calibrate after it (start_epoch={math.floor(until) + 1} "
                "or later, with max_epochs at least that), or use method='qat', whose ranges follow the weights"
            )


def check_groups_after_removal(opts: QuantizeOptions, trainer: Trainer, own: Callback) -> None:
    """A group size (``granularity=g``) must divide every quantised layer's weights per output channel, and pruning
    that removes channels or neurons (``shrink=True``) changes those counts mid-fit: refused unless each layer keeps a
    multiple of ``g`` channels (``round_to`` a multiple of ``g``). Neuron removal has no such rounding. Heads-only
    removal leaves multiples of each module's width per head: ``PruningCallback`` checks that one, where it finds the
    heads (:func:`~lightning_compress.pruning.run_plan.plan_run`)."""
    g = opts.granularity
    if not isinstance(g, int) or isinstance(g, bool):
        return
    for other, popts in unit_removers(trainer.callbacks):  # type: ignore[attr-defined]
        units = popts.units
        if other is own or units == ("heads",):
            continue
        if units or (popts.round_to or 1) % g:
            fix = ("keep the units masked (shrink=False), or quantise with granularity='per_channel'" if units else
                   f"set its round_to to a multiple of {g} (round_to={g}), or keep the channels masked (shrink=False)")
            raise ValueError(
                f"QuantizeCallback(granularity={g}) needs a multiple of {g} weights per output channel in every "
                f"quantised layer, but {type(other).__name__}(structure={popts.structure!r}, shrink=True) removes "
                f"channels mid-fit, which leaves other counts: {fix}"
            )


def check_averaging_order(trainer: Trainer, own: Callback) -> None:
    """A weight-averaging callback (``EMAWeightAveraging``, ``StochasticWeightAveraging``) copies the model in its
    ``setup``: listed before ``own``, it copies the float model, whose buffers then no longer line up with the
    fake-quantised one's (Lightning pairs them by position: a BatchNorm model fails at its first validation, and
    the observer ranges are never averaged)."""
    listed = list(trainer.callbacks)  # type: ignore[attr-defined]
    before = weight_averaging(listed[: listed.index(own)]) if own in listed else []
    if before:
        raise ValueError(
            f"{before[0]} is listed before QuantizeCallback: it copies the model when the fit starts, before the "
            f"layers are fake-quantised, and its copy no longer matches the model. List QuantizeCallback before {before[0]} "
            "in the callbacks"
        )


def warn_unreached_schedule(opts: QuantizeOptions, trainer: Trainer, pl_module: LightningModule, rolled_back: bool) -> None:
    """Warnings, when QAT training starts: ``max_steps`` ending training before ``start_epoch`` or a ``weight_bits``
    milestone (the epoch length it needs is known only now; ``max_epochs`` is checked in ``setup``), and the last bit
    lowering coming after the fit's last validation, where a guard (``monitor``) never judges it (not once the guard
    has ``rolled_back`` the widths)."""
    ends = max_steps_end(trainer)
    milestones = opts.schedule.milestones()
    if ends is not None:
        late = [f"start_epoch={opts.start_epoch:g}"] if opts.start_epoch >= ends - 1e-9 else []
        after = sorted({m for m in milestones if m >= ends - 1e-9})
        late += [f"the weight_bits schedule epochs {after}"] if after else []
        if late:
            rank_zero_warn(
                f"QuantizeCallback: max_steps={trainer.max_steps} ends training at epoch {ends:.3g}, before "
                f"{' and '.join(late)}: what they set never applies. Lower them or raise max_steps"
            )
    lowered = [m for m in milestones if opts.schedule(m) != opts.schedule(m - 1e-6)]
    if lowered and not rolled_back and not (ends is not None and max(lowered) >= ends - 1e-9):  # said above if so
        warn_if_change_unvalidated(
            trainer, pl_module, "QuantizeCallback", opts.monitor, max(lowered), "the last weight_bits lowering",
            "Lower the bits earlier or validate after the change.",
        )


def warn_unvalidated_calibration(opts: QuantizeOptions, trainer: Trainer, pl_module: LightningModule) -> None:
    """A warning, when training starts, that PTQ ends the fit after an epoch the fit does not validate
    (``check_val_every_n_epoch``): the calibrated model is never measured in it."""
    every, start = trainer.check_val_every_n_epoch, int(opts.start_epoch)
    if opts.method != "ptq" or start < 1 or every is None or start % every == 0 or validation_skipped(trainer, pl_module):
        return
    rank_zero_warn(
        f"QuantizeCallback(method='ptq') calibrates at the end of epoch {start - 1} and ends the fit there, but "
        f"check_val_every_n_epoch={every} does not validate that epoch: no validation measures the calibrated model "
        f"(the report has no compressed metrics). Make start_epoch a multiple of {every}, or run trainer.validate after fit"
    )


# ------------------------------------------------------------------ at the end of a fit stopped early (EarlyStopping,
# max_steps, max_time): what it did not reach, said and kept in the summary's notes
def uncalibrated_note(opts: QuantizeOptions, trainer: Trainer) -> str:
    """PTQ stopped before its calibration: no converted model (an error when no training batch was seen at all)."""
    if trainer.global_step == 0:
        raise ValueError("method='ptq' needs training batches to calibrate on, but none were seen")
    return (
        f"QuantizeCallback: the fit ended at step {trainer.global_step}, before PTQ's calibration after "
        f"start_epoch={opts.start_epoch:g} float epochs, so the model trained in float only and no "
        "converted model is made (quantized_model stays None). Calibrate earlier (a lower start_epoch), or "
        "quantise the trained model in a fit with method='ptq', start_epoch=0"
    )


def unstarted_note(opts: QuantizeOptions, trainer: Trainer) -> str:
    """QAT stopped before ``start_epoch``: no converted model."""
    return (
        f"QuantizeCallback: the fit ended at step {trainer.global_step}, before QAT started (start_epoch="
        f"{opts.start_epoch:g}), so the model trained in float only and no converted model is made "
        "(quantized_model stays None). Start QAT earlier, or quantise the trained model with method='ptq'"
    )


def unreached_bits_note(opts: QuantizeOptions, trainer: Trainer, current_bits: int) -> str | None:
    """QAT stopped before a ``weight_bits`` milestone: the model converts at the width it trained with last."""
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    scheduled = int(opts.schedule(1e9 if max_epochs is None else max_epochs - 1e-9))  # the last width the fit could reach
    if current_bits == scheduled:
        return None
    return (
        f"QuantizeCallback: the fit ended at step {trainer.global_step}, before the weight_bits schedule reached "
        f"{scheduled} bits; the model is converted at the {current_bits} bits it trained with last"
    )

