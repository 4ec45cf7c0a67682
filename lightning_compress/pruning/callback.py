"""``PruningCallback``: absolute-target, scheduled, resumable, DDP-safe pruning inside ``Trainer.fit``.

Glue only: options are checked by :class:`~lightning_compress.pruning.options.PruningOptions`, what a run
prunes is found by :func:`~lightning_compress.pruning.run_plan.plan_run`, each mask update is
:func:`~lightning_compress.pruning.mask_update.update_masks`, the masks and their checkpoint state live in
:class:`~lightning_compress.pruning.state.PruningState` (restored by :mod:`~lightning_compress.pruning.resume`),
validations are judged by :func:`~lightning_compress.pruning.accuracy_guard.judge_validation` and masked units are
removed by :func:`~lightning_compress.pruning.removal.remove_pruned`; logging is the shared core's.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_compress._validation import as_flag, renamed_option
from lightning_compress.guard import warn_if_change_unvalidated, warn_if_guard_cannot_run
from lightning_compress.guard_snapshot import state_buffers
from lightning_compress.plugin import CompressionCallback, configured_again
from lightning_compress.pruning.accuracy_guard import judge_validation
from lightning_compress.pruning.criteria import Criterion
from lightning_compress.pruning.mask_storage import broadcast_masks
from lightning_compress.pruning.masks import zero_optimizer_state
from lightning_compress.pruning.mask_update import keeps_zeros, newly_collapsed, update_masks
from lightning_compress.pruning.options import Progress, PruningOptions, build_schedule
from lightning_compress.pruning.reload import resize_on_load, resizes_on_load
from lightning_compress.pruning.removal import remove_pruned
from lightning_compress.pruning.resume import replan_to_checkpoint_end, restore_run
from lightning_compress.pruning.run_plan import RunPlan, plan_run
from lightning_compress.pruning.shrink import check_optimizer_reads_groups
from lightning_compress.pruning.state import PruningState
from lightning_compress.pruning.step_watch import StepWatch, unwrapped_optimizer_warning
from lightning_compress.pruning.summary import pruning_summary
from lightning_compress.report_records import model_fingerprint
from lightning_compress.schedules import ScheduleSpec, epoch_position, max_steps_end
from lightning_compress.sharding import reshard

__all__ = ["PruningCallback"]

class PruningCallback(CompressionCallback):
    r"""Prune a model during ``Trainer.fit`` to an absolute sparsity, following a schedule.

    Every update scores the selected weights with ``criterion``, and masks the least important ones
    so that the fraction of zeros equals the schedule's value at that moment (absolute: ``0.9`` means
    90% of the selected weights are zero, not "90% of what remains"). Masks are bool tensors kept by
    the callback and applied *in place* after every optimizer step; the gradients of pruned entries
    are zeroed before the step, and the optimizer state that moves them (momentum, Adam's first moment) is
    zeroed when they are pruned, so they never grow back. No ``torch.nn.utils.prune`` re-parametrisation: the model keeps
    its own ``state_dict`` keys, ``deepcopy`` and ``torch.compile`` work, and a checkpoint loads into
    the plain model class with strict loading.

    Args:
        target_sparsity: Fraction of the selected weights that are zero when the schedule ends, in
            ``[0, 1)``; or an ordered ``{regex: sparsity}`` map searched in parameter names (first
            match wins; unmatched weights are not pruned; a map implies ``scope="layer"``).
        schedule: ``"cubic"`` (Zhu & Gupta 2017), ``"linear"``, ``"one_shot"`` (all at ``start_epoch``),
            ``"iterative"`` (``schedule_steps`` equal jumps), ``"constant"`` (the target from the
            start), an ``{epoch: sparsity}`` map or a :class:`~lightning_compress.schedules.Schedule`
            (a map or Schedule must end at ``target_sparsity``).
        start_epoch: (Fractional) epoch at which pruning starts.
        end_epoch: (Fractional) epoch at which the target is reached. Default: ``start_epoch`` plus
            75% of the remaining epochs (rounded), leaving the rest to fine-tune.
        criterion: ``"magnitude"``, ``"random"``, ``"taylor"``, ``"wanda"`` (|w| times the input norm,
            per output row), ``"entropy"`` (channel only), ``"bn_scale"`` (channel only), a
            :class:`~lightning_compress.pruning.Criterion`, a function ``fn(name, weight) -> scores`` or
            an import path to either.
        structure: What is removed together: ``"unstructured"`` (single weights), ``"channel"`` (whole
            output channels / neurons, coupled layers and their BatchNorm together), ``"heads"``, ``"neurons"``
            or ``"heads+neurons"`` (attention heads and feed-forward neurons of transformer blocks,
            :mod:`~lightning_compress.pruning.units`) or ``"N:M"`` (e.g. ``"2:4"``: keep N of every M
            consecutive input weights; the target must equal ``1 - N/M``).
        scope: ``"global"`` (one threshold across all layers) or ``"layer"`` (each layer to the target). A per-row
            criterion (``wanda``) selects within each output row whatever is given, and reads back as ``"row"``
            (which it also takes). Whole units (channels, heads, neurons) are removed whole, so there the share of
            weights lands near the target, not on it (0.48-0.51 for 0.5 on a small MLP at ``"global"``).
        include: Regexes on module names restricting which matmul weights are pruned (default: all of
            them: Linear, Conv, ``MultiheadAttention`` projections, GPT-2 ``Conv1D``). Biases, norm and
            embedding weights, other modules' parameters and a ``teacher``'s weights are pruned only if a
            pattern matches their full parameter name exactly (:mod:`~lightning_compress.pruning.weights`,
            :func:`~lightning_compress.selection.select_weights`).
        exclude: Regexes on module/parameter names never to prune; each must match a selected weight.
        make_permanent: At the end of fit, apply the masks a last time, remove the callback's hooks
            and stop enforcing masks (a later ``fit`` with the same callback trains freely). With
            ``False`` masks stay enforced across later fits.
        monitor: Metric watched by the accuracy guard (e.g. ``"val_acc"``); needs ``max_drop``.
        max_drop: Largest allowed fall of ``monitor`` below its pre-pruning baseline (absolute, in
            the metric's units). When a pruning step makes it fall further, the last good masks and
            weights are restored, sparsity stops rising, and a warning says so.
        mode: ``"max"`` if higher ``monitor`` is better (accuracy), ``"min"`` for losses.
        update_every_n_steps: Update the masks every N optimizer steps (gradient accumulation
            respected: N *optimizer* steps) instead of at the start of every epoch.
        schedule_steps: Number of jumps of the ``"iterative"`` schedule.
        rewind_epoch: Lottery-ticket rewinding (Frankle & Carbin 2019): copy the weights at this
            (fractional) epoch (``0``: at initialisation) and, after every mask update, reset the
            surviving weights to that copy (and their optimizer state to zero). ``None``: off.
        seed: Seed of the ``random`` criterion (the same on every rank).
        shrink: Physically remove the masked channels, heads or neurons (``structure`` ``"channel"``, ``"heads"``,
            ``"neurons"``, ``"heads+neurons"``) at ``shrink_epoch``: smaller layers, optimizer remapped,
            checkpoints record the structure.
        shrink_epoch: When to shrink (default: when the schedule makes its last change; with an accuracy guard,
            at the epoch after it, once a validation has judged it). A fit that ends before it (EarlyStopping,
            ``max_steps``) but after the schedule's last change removes them when training ends (with
            ``make_permanent``, with a warning).
        round_to: Keep a multiple of this many channels per group (channel structure).
        log_per_layer: Also send the sparsity of every layer to the loggers at each update.
        verbose: Print a line at every update.
        on_nonfinite: ``"error"`` (default): a NaN or infinite selected weight at a mask update stops
            the run with an error naming the layer and the step; ``"warn"``: warn, prune it first and
            go on. The reported sparsity counts only pruned entries that are exactly zero.
        granularity: Former name of ``structure`` (deprecated; still read).

    Sharded weights: under ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` applied in
    ``configure_model``, every process scores and masks the rows it holds; global thresholds and counts
    are reduced across the processes (the masks are those one process would make), the masks take 1
    byte per local weight, and checkpoints hold them at 1 bit per weight. Unstructured and N:M
    structures with ``magnitude``, ``random``, ``wanda`` or a function of the weight are supported
    there; the others are refused in ``setup`` with the reason. ``sparsity``, ``nonzero``,
    ``compression_state()`` and ``compression_summary()`` then sum over the processes: read them on
    every process, not inside a rank-0-only branch.

    Logged (``trainer.callback_metrics``, so ``ModelCheckpoint``/``EarlyStopping`` can monitor them):
    ``pruning/sparsity``, ``pruning/target``, ``pruning/nonzero``, and ``pruning/guard_tripped``
    after the guard restores; per-layer sparsities go to the loggers only.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_compress import ClassifierModule, DigitsDataModule
        >>> from lightning_compress.models import MLP
        >>> prune = PruningCallback(target_sparsity=0.8, schedule="cubic", end_epoch=1, verbose=False)
        >>> trainer = Trainer(max_epochs=2, callbacks=[prune], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
        ...                   limit_val_batches=1)
        >>> trainer.fit(ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule())
        >>> round(prune.compression_state()["sparsity"], 2)
        0.8
    """

    supports_fsdp2 = True

    def __init__(
        self,
        target_sparsity: float | dict[str, float] = 0.5,
        schedule: ScheduleSpec = "cubic",
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        criterion: str | Criterion | Callable[[str, Tensor], Tensor] = "magnitude",
        structure: str = "unstructured",
        scope: str = "global",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        make_permanent: bool = True,
        monitor: str | None = None,
        max_drop: float | None = None,
        mode: str = "max",
        update_every_n_steps: int | None = None,
        schedule_steps: int = 3,
        rewind_epoch: float | None = None,
        seed: int = 0,
        shrink: bool = False,
        shrink_epoch: float | None = None,
        round_to: int | None = None,
        log_per_layer: bool = True,
        verbose: bool = True,
        on_nonfinite: str = "error",
        granularity: str | None = None,
    ) -> None:
        super().__init__()
        structure = renamed_option("PruningCallback", "granularity", granularity, "structure", structure, "unstructured")
        self.options = PruningOptions(
            target_sparsity, schedule, start_epoch, end_epoch, criterion, structure, scope, include, exclude,
            make_permanent, monitor, max_drop, mode, update_every_n_steps, schedule_steps, rewind_epoch, seed,
            shrink, shrink_epoch, round_to, on_nonfinite,
        )
        for f in fields(PruningOptions):  # the checked values, readable as attributes
            setattr(self, f.name, getattr(self.options, f.name))
        self.log_per_layer, self.verbose = as_flag(log_per_layer, "log_per_layer"), as_flag(verbose, "verbose")
        self._run: PruningState | None = None  # from setup on
        self._pending: dict[str, Any] | None = None
        self._sched: Callable[[float], float] = Progress(None, 0.0)
        self._end = self.options.end_epoch
        self._shrink_at: float | None = None
        self._example: Tensor | None = None
        self._network = ""  # the child the training step calls, whose channel graph is traced ("": the module's forward)
        self._last_step = -1
        self._collapsed: set[str] = set()  # weights already said to be pruned whole
        #: the fingerprint of the model the removal of pruned channels started from (it computes what the removed one
        #: does): the report takes a validation of it as one of the returned model
        self.same_outputs_as: str | None = None
        self._grads_masked_step = -1
        self._others_write = False  # something besides the optimizer wrote pruned weights: mask after every step
        self._writers_checked = False  # the weights were checked after this fit's first zero-keeping step
        self._watch: StepWatch | None = None  # the first training epoch of a fit
        #: Wall seconds of each mask update in this process (scoring, selection, masking, counting); not
        #: checkpointed, it differs between ranks and runs.
        self.update_seconds: list[float] = []
        self._log_due = False
        self._epoch_begun: int | None = None  # the epoch whose boundary work (update, shrink) has run
        self._reached = 0.0  # the (fractional) epoch training has got to: the batches done
        self._fitting = False  # the stage the Trainer set up last is "fit" (checkpoint state restores a fit's run)
        self._max_epochs: int | None = None  # that fit's
        self._resize_hook: Any = None  # the resize-on-load hook this callback put on a module, until teardown

    @property
    def granularity(self) -> str:
        """Former name of :attr:`structure`."""
        return self.structure

    # ------------------------------------------------------------------ public read-only views
    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Read-only ``{parameter name (relative to the LightningModule): bool mask}`` of every masked
        parameter (the pruned weights and, for channels and units, their biases and BatchNorm parameters
        and the input columns of the layers that read them, the output head's included).
        ``True`` = kept. Do not modify the tensors. Of weights sharded by FSDP2: the rows this process
        holds."""
        return types.MappingProxyType(self._run.all_masks() if self._run else {})

    @property
    def sparsity(self) -> float:
        """Fraction of the selected weights that are pruned and exactly zero (of the original weights once shrunk)."""
        return self._run.sparsity if self._run else 0.0

    @property
    def nonzero(self) -> int:
        """Entries of the selected weights that are not pruned-and-zero (the masks' kept entries while they hold)."""
        return self._run.nonzero if self._run else 0

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:  # Lightning asks at every hook call: build it once (the label stays "granularity")
            key = self._state_key = self._generate_state_key(
                granularity=self.structure, include=self.include, exclude=self.exclude
            )
        return key

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"
        if self.options.shrink and not resizes_on_load(pl_module):
            # a checkpoint written after removal holds smaller layers: resuming and trainer.test(ckpt_path=...) with
            # this callback load it (the hook is removed again in teardown); a bare load_from_checkpoint needs the
            # class to say so itself
            self._resize_hook = resize_on_load(pl_module)
            if stage == "fit":
                rank_zero_warn(
                    f"PruningCallback(shrink=True): checkpoints written after the removal hold smaller layers than "
                    f"{type(pl_module).__name__} builds. Resuming and trainer.test/validate(ckpt_path=...) with this "
                    f"callback load them; for {type(pl_module).__name__}.load_from_checkpoint, call "
                    "lightning_compress.allow_shrunk_checkpoints(self) in its __init__ (or use load_pruned)"
                )
        self._max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        if stage != "fit":
            return
        if self.prepared_other_module(pl_module):  # the masks and record held are another model's: a new run
            self.discard_setup()
            self.update_seconds, self._collapsed, self._others_write = [], set(), False
        if self._run is not None and self._run.finished and self.make_permanent:
            return
        # a later fit of a run that reached its target (make_permanent=False) holds its masks: its schedule, which
        # this fit's epochs do not reach again, is neither checked against them nor replaced
        reached = self._run is not None and self._run.level >= 1.0 - 1e-12 and self._pending is None
        plan = plan_run(trainer, pl_module, self.options, schedule=not reached, fitting=True)
        # --- all checks passed: commit
        self._commit(plan, new_run=self._run is None or self._run.names != list(plan.params), schedule=not reached)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._restore(state)

    def _commit(self, plan: RunPlan, new_run: bool, schedule: bool = True) -> None:
        if schedule:
            self._sched, self._end, self._shrink_at = plan.progress, plan.end, plan.shrink_at
        self._network, self._example = plan.network, plan.example
        if new_run:
            self._run = plan.new_state(self.options.kind)
            self.same_outputs_as = None

    @override
    def discard_setup(self) -> None:
        self.options.criterion.teardown()
        self._run = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._resize_hook is not None:  # the module loads as its class does again
            self._resize_hook.remove()
            self._resize_hook = None

    # ------------------------------------------------------------------ training hooks
    def _enforcing(self) -> bool:
        run = self._run
        return run is not None and run.shrunk is None and not (run.finished and self.make_permanent)

    @override
    def schedule_value(self, epoch: float) -> float | None:
        return float(self._sched(epoch))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # after the checkpoint's restore (none: a new run, whose plan this is) and before any mask is applied
        if not trainer.ckpt_path and self._end is not None and self._enforcing():
            self.options.check_shrink_epoch(self._end)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        warn_if_guard_cannot_run(trainer, pl_module, "PruningCallback", self.monitor)
        self._last_step = trainer.global_step
        self._epoch_begun, self._reached = None, float(trainer.current_epoch)
        self._writers_checked = False  # the weights are checked once after this fit's first zero-keeping step
        run = self._run
        if run is not None and run.finished and self.make_permanent and run.shrunk is None:
            rank_zero_warn(
                f"PruningCallback: this run reached {run.sparsity:.1%} sparsity in an earlier fit and made it permanent "
                "(make_permanent=True): this fit trains every weight, so the pruned ones can grow back. To keep the masks "
                "in later fits, prune with make_permanent=False"
            )
        if self._enforcing():
            if self.shrink and self._run.shrunk is None:  # type: ignore[union-attr] - before any step, not at the removal
                check_optimizer_reads_groups(trainer.optimizers, self._run.params.values())  # type: ignore[union-attr]
            self._watch = StepWatch(self._run.params)  # type: ignore[union-attr]
            self._apply(pl_module)
            ends, run = max_steps_end(trainer), self._run
            last = self.options.last_step(self._end) if self._end is not None else None  # start_epoch for one_shot
            if last is None or run.frozen or run.level >= 1.0:  # type: ignore[union-attr]
                return
            if ends is not None and last > ends + 1e-9:
                self.warn_in_report(  # max_epochs is checked in setup; the epoch length max_steps needs is known here
                    f"PruningCallback: max_steps={trainer.max_steps} ends training at epoch {ends:.3g}, before the "
                    f"schedule's end at epoch {last:g}: the target will not be reached. Lower end_epoch or raise max_steps"
                )
            else:
                at_end = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= last + 1e-9
                warn_if_change_unvalidated(
                    trainer, pl_module, "PruningCallback", self.monitor, last, "the schedule's last mask change",
                    "It is not taken, and the fit ends below its target. End the schedule earlier (end_epoch)." if at_end
                    else "End the schedule earlier (end_epoch) or validate after it.",
                )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin_epoch(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # a fit resumed from a checkpoint written at an epoch's last batch enters the next epoch without
        # on_train_epoch_start: its boundary work runs here (it is idempotent where the hook did run)
        if self._epoch_begun != trainer.current_epoch:
            self._begin_epoch(trainer, pl_module)
        if self.options.criterion.reads_inputs:
            self.count_tokens_of(pl_module, batch)

    def _begin_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The epoch-boundary work: the rewind copy, the epoch's mask update, channel removal when due."""
        self._epoch_begun = trainer.current_epoch
        if not self._enforcing():
            # a later fit of a finished run (trained freely) or of removed channels: its metrics still say what the
            # model holds, for a ModelCheckpoint or EarlyStopping monitoring them
            self._log_due = self._run is not None
            return
        t = float(trainer.current_epoch)
        self._maybe_snapshot(t)
        if self.update_every_n_steps is None:
            self._maybe_update(trainer, pl_module, t)
        self._maybe_shrink(trainer, pl_module, t)
        self._log_due = True

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # manual optimisation clips (self.clip_gradients) between its backward and the optimizer's step: masked now, the
        # pruned gradients are not in the clipped norm (Lightning's own loop masks them before it clips)
        if not pl_module.automatic_optimization and self._enforcing():
            self._run.apply_fast(grads=True)  # type: ignore[union-attr]

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        run = self._run
        if run is not None and run.last_good is not None:  # a parameter unfrozen since the guard's snapshot joins it
            run.keep_newly_trained()
        if not self._enforcing():
            return
        if self._watch is not None:
            self._watch.before_optimizer_step(run.params)  # type: ignore[union-attr]
        if not run.frozen and run.level < 1.0:  # type: ignore[union-attr]
            self.options.criterion.on_before_optimizer_step(run.local_params())  # type: ignore[union-attr]
        run.apply_fast(grads=True)  # type: ignore[union-attr]
        self._grads_masked_step = trainer.global_step + 1  # the step this optimizer step completes

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stop_counting_tokens()
        if self._log_due:
            self._log(trainer, pl_module)
        self.flush_metrics(pl_module)
        t = epoch_position(trainer, batch_idx + 1, fractional=self.options.within_epochs())
        self._reached = t
        if not self._enforcing():
            return
        step, previous = trainer.global_step, self._last_step
        if step == previous:  # no optimizer step Lightning saw: gradients accumulating, or an optimizer it does not wrap
            if self._others_write or (not pl_module.automatic_optimization and self._written_without_step()):
                self._run.apply_fast()  # type: ignore[union-attr]
            return
        self._last_step = step
        if not self._zero_preserving(trainer):
            self._run.apply_fast()  # type: ignore[union-attr]
        elif not self._writers_checked:  # one device read per fit
            self._writers_checked = True
            self._catch_writers("after this fit's first optimizer step")
        run = self._run
        if run.moments_pending:  # type: ignore[union-attr] - pruned before the optimizer's first step made its state
            run.moments_pending = not zero_optimizer_state(trainer.optimizers, run.masked_params(), run.all_masks())  # type: ignore[union-attr]
        # due when a multiple of n was reached since the last batch (several optimizers step several at once)
        if self.update_every_n_steps is not None and step // self.update_every_n_steps > max(previous, 0) // self.update_every_n_steps:
            self._maybe_snapshot(t)
            self._maybe_update(trainer, pl_module, t)
            self._maybe_shrink(trainer, pl_module, t)

    def _written_without_step(self) -> bool:
        # this process's rows only: a manual step may skip its optimizer on one process, which then alone asks
        revived = self._run.revived(over_shards=False)  # type: ignore[union-attr]
        if revived:
            message = unwrapped_optimizer_warning(f"{revived:,} pruned weights were written in a training batch")
            if self._run.shards is None:  # type: ignore[union-attr]
                self._others_write = True
                rank_zero_warn(message)
            else:  # said where it was seen; the flag, which decides collectives, is set by the next check of all shards
                warnings.warn(message, UserWarning, stacklevel=2)
        return revived > 0

    def _apply(self, pl_module: LightningModule) -> None:
        """Zero the pruned entries (of the shards, once every FSDP2 unit is back in them)."""
        run = self._run
        assert run is not None
        if run.shards is not None:
            reshard(pl_module)
        run.apply()

    def _zero_preserving(self, trainer: Trainer) -> bool:
        """Whether this step's optimizers kept the pruned weights zero (their gradients were masked, nothing
        else writes them): re-masking the weights is then skipped (it is still done at every epoch end)."""
        return self._grads_masked_step == trainer.global_step and not self._others_write and keeps_zeros(trainer.optimizers)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A validation in fit sees the masked weights, whatever wrote them since the last step (the per-step
        multiply is skipped where the optimizer keeps zeros zero)."""
        if trainer.state.fn != "fit" or not self._enforcing():
            return
        self._catch_writers("at this validation")

    def _catch_writers(self, when: str) -> None:
        """Zero pruned weights found non-zero ``when``, and from then on mask after every optimizer step (the
        per-step multiply is skipped where the optimizer keeps zeros zero, so a write to the weights or to their
        masked gradients after this callback's hook would otherwise last until the epoch's end)."""
        revived = self._run.revived()  # type: ignore[union-attr]
        if not revived:
            return
        self._run.apply_fast()  # type: ignore[union-attr]
        if not self._others_write:
            self._others_write = True
            rank_zero_warn(
                f"PruningCallback: {revived:,} pruned weights were non-zero {when}, so something besides the optimizer "
                "writes the weights or their gradients during training (another callback, the module's own hooks such as "
                "on_before_optimizer_step); they are zeroed again, and from now on the masks are applied after every "
                "optimizer step"
            )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_counting_tokens()  # a last step skipped with -1 had no on_train_batch_end
        nb = trainer.num_training_batches
        if not (isinstance(nb, int) and nb > 0) and not 0 <= trainer.max_steps <= trainer.global_step:
            self._reached = float(trainer.current_epoch + 1)  # an epoch of unknown length that ran to its end
        if self._enforcing():
            self._catch_writers("at the end of this epoch")  # with no validation, nothing else would say so
            self._run.apply_fast()  # type: ignore[union-attr]
        watch, self._watch = self._watch, None
        if watch is not None and (note := watch.unreached_note()):
            rank_zero_warn(note)
        if watch is not None and not watch.stepped and not pl_module.automatic_optimization and not self._others_write:
            self._others_write = True
            rank_zero_warn(unwrapped_optimizer_warning("a training epoch passed"))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_counting_tokens()
        run = self._run
        if not self._enforcing():
            return
        # the epoch training got to (Lightning has already advanced current_epoch, even when it stopped mid-epoch)
        t = self._reached
        ends = self._end is not None and t + 1e-9 >= self._end
        due = ends and self._sched(t) > run.level + 1e-12 and not run.frozen  # type: ignore[union-attr]
        # EarlyStopping (or another callback) ended the fit before its limits (should_stop stays set when min_epochs or the
        # last epoch ran on anyway)
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        ran_out = (max_epochs is not None and t + 1e-9 >= max_epochs) or (max_steps is not None and trainer.global_step >= max_steps)
        stopped = bool(trainer.should_stop) and not ran_out
        if due and (stopped or self.monitor is not None):
            # a step no training follows: under a guard, and after an early stop, no validation would judge it either
            why = ("training was stopped early (trainer.should_stop)" if stopped else
                   f"the accuracy guard on {self.monitor!r} could not judge it: no validation follows")
            self.warn_in_report(
                f"PruningCallback: training ended at epoch {t:g} with the schedule's last pruning step still due; it is "
                f"not taken, since {why}; the model keeps the sparsity it trained and was validated with, "
                f"{run.sparsity:.2%} (target {run.overall_target(1.0):.2%}). Leave epochs after end_epoch"  # type: ignore[union-attr]
            )
        elif due:
            late = t > self._end + 1e-9  # type: ignore[operator]
            self.warn_in_report(  # the schedule ends with training (or was due before and did not run): its last step is due
                f"PruningCallback: the schedule reaches its target only at epoch {self._end}, the end of training; "
                "the last pruning step gets no fine-tuning. Leave epochs after end_epoch." if not late else
                f"PruningCallback: the schedule was due to reach its target at epoch {self._end}, but training ended at "
                f"epoch {t:g} at {run.sparsity:.2%}; the last pruning step runs now and gets no fine-tuning."  # type: ignore[union-attr]
            )
            self._maybe_update(trainer, pl_module, t)
        elif not ends and not run.frozen and run.level < 1.0:  # type: ignore[union-attr]
            # stopped early (EarlyStopping, max_steps, max_time): no pruning that no training follows
            begun = "" if run.has_pruned() else " and before its first pruning step"  # type: ignore[union-attr]
            self.warn_in_report(
                f"PruningCallback: training stopped after {t:.3g} epochs (step {trainer.global_step}), before the "
                f"schedule's end at epoch {self._end}{begun}; the model keeps the sparsity it trained with, "
                f"{run.sparsity:.2%} (target {run.overall_target(1.0):.2%})"  # type: ignore[union-attr]
            )
        # stopped (EarlyStopping, max_steps, max_time) before shrink_epoch with something pruned: a run that ends with
        # this fit (make_permanent) at its last sparsity (its schedule done, or its guard stopped it) prunes no further,
        # so the removal it asked for comes now; one that goes on (make_permanent=False) or had not ended keeps its masks
        before = self.shrink and run.shrunk is None and self._shrink_at is not None and t + 1e-9 < self._shrink_at and run.has_pruned()  # type: ignore[union-attr]
        early = before and self.make_permanent and (run.level >= 1.0 - 1e-12 or run.frozen)  # type: ignore[union-attr]
        if before:
            kept = "its schedule had not ended" if self.make_permanent else (
                "with make_permanent=False the run goes on in a later fit, which removes them at shrink_epoch")
            self.warn_in_report(
                f"PruningCallback: training ended at epoch {t:.3g}, before shrink_epoch={self._shrink_at:g}: the masked "
                + ("channels are removed now (the smaller model computes what the masked one does)" if early else
                   f"channels stay in place; {kept}")
            )
        self._maybe_shrink(trainer, pl_module, t, due=early)
        if self.make_permanent and run.shrunk is None:  # type: ignore[union-attr]
            self._apply(pl_module)
            self.options.criterion.teardown()
            run.finished = True  # type: ignore[union-attr]

    # ------------------------------------------------------------------ updates
    def _maybe_snapshot(self, t: float) -> None:
        run = self._run
        if self.rewind_epoch is not None and run.rewind is None and t + 1e-9 >= self.rewind_epoch:  # type: ignore[union-attr]
            run.take_rewind_copy()  # type: ignore[union-attr]

    def _maybe_update(self, trainer: Trainer, pl_module: LightningModule, t: float) -> None:
        run = self._run
        if run is None or run.frozen or run.finished or run.shrunk is not None:
            return
        p = float(self._sched(t))
        if p > run.level + 1e-12:
            self._update(trainer, pl_module, p, t)

    def _update(self, trainer: Trainer, pl_module: LightningModule, p: float, t: float) -> None:
        run = self._run
        assert run is not None
        started = time.perf_counter()
        if run.shards is not None:
            reshard(pl_module)  # the masks go into the shards: no whole copy (kept after validation) may outlive them
        where = f"PruningCallback mask update at epoch {t:.3g}, step {trainer.global_step}"
        zeros = update_masks(run, self.options, p, trainer.optimizers, lambda masks: self._share(trainer, masks), where)
        if p >= 1.0 and self.make_permanent:  # the last update: the criterion's hooks have nothing left to collect
            self.options.criterion.teardown()
        if collapsed := newly_collapsed(run, zeros, self._collapsed):
            self._collapsed.update(collapsed)
            rank_zero_warn(
                f"PruningCallback: {collapsed} lost every weight (scope={self.options.scope!r} prunes the lowest scores "
                "of all layers together, and these had the lowest): their layers now output a constant. Use "
                "scope='layer', a lower target, start pruning after some training, or exclude them"
            )
        record = {
            "epoch": float(t),
            "step": int(trainer.global_step),
            "target": run.overall_target(p),
            "sparsity": run.sparsity_from(zeros),
        }
        self.update_seconds.append(time.perf_counter() - started)  # the counts above waited for the device
        run.history.append(record)
        self._log(trainer, pl_module, zeros)
        if self.verbose:
            rank_zero_info(
                f"PruningCallback: epoch {t:.3g}, step {trainer.global_step}: sparsity {record['sparsity']:.2%} "
                f"(target {record['target']:.2%}, {run.nonzero_from(zeros):,} {self._kept_weights_named()})"
            )

    def _kept_weights_named(self) -> str:
        """What ``pruning/nonzero`` counts: for channels, heads or neurons the weights outside the pruned rows (the
        columns their consumers zero as a result are not subtracted; the report's ``nonzero_params`` counts them)."""
        if self.options.kind != "channel":
            return "non-zero weights"
        return f"weights outside pruned {' and '.join(self.options.units or ('channels',))}"

    def _share(self, trainer: Trainer, masks: Any) -> Any:
        """Rank 0's masks on every rank (DDP); sharded weights' masks were made together and stay as they are."""
        sharded = self._run is not None and self._run.shards is not None
        return masks if sharded else broadcast_masks(trainer.strategy, trainer.world_size, masks)

    def _log(self, trainer: Trainer, pl_module: LightningModule, update_zeros: dict[str, int] | None = None) -> None:
        """The sparsity metrics; at a mask update (``update_zeros`` given) also straight to the loggers."""
        run = self._run
        if run is None:
            return
        self._log_due = False
        zeros = update_zeros if update_zeros is not None else ({} if run.shrunk is not None else run.layer_zeros())
        metrics = {"pruning/sparsity": run.sparsity_from(zeros),
                   "pruning/target": self._target(),
                   "pruning/nonzero": float(run.nonzero_from(zeros))}
        detail = None
        if update_zeros is not None:  # a mask update: the loggers get it at this step, whatever their logging interval
            detail = dict(metrics)
            if self.log_per_layer and run.masks:
                detail.update({f"pruning/sparsity/{n}": zeros[n] / max(1, run.params[n].numel()) for n in run.names})
        self.log_metrics(trainer, pl_module, metrics, detail)

    # ------------------------------------------------------------------ shrink
    def _maybe_shrink(self, trainer: Trainer, pl_module: LightningModule, t: float, due: bool = False) -> None:
        """Remove the masked units when ``shrink_epoch`` is reached at ``t`` (or, ``due``, now)."""
        run = self._run
        if not self.shrink or run is None or run.shrunk is not None or self._shrink_at is None:
            return
        if t + 1e-9 < self._shrink_at and not due:
            return
        # the model the removal starts from computes what the removed one does: its validations stand for it
        self.same_outputs_as = model_fingerprint(pl_module)
        result = remove_pruned(trainer, pl_module, run, self.options, self._example, self._network, t)
        self.options.criterion.teardown()  # the parameters were replaced: nothing left to mask
        if self.verbose:
            rank_zero_info(f"PruningCallback: removed masked channels at epoch {t:.3g}: {result}")

    # ------------------------------------------------------------------ accuracy guard
    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_monitor(trainer, self.monitor)
        if self.monitor is None or trainer.sanity_checking or trainer.state.fn != "fit" or not self._enforcing():
            return  # the guard acts in fit only: trainer.validate(ckpt_path=...) measures, it does not restore
        if judge_validation(trainer, pl_module, self._run, self.monitor, float(self.max_drop or 0.0), self.mode):  # type: ignore[arg-type]
            self.tell_weights_restored(trainer, pl_module)
            self.log_metrics(trainer, pl_module, {"pruning/guard_tripped": 1.0}, {"pruning/guard_tripped": 1.0})
            # the restored sparsity, to the loggers and callback_metrics at once (per layer to the loggers), and
            # through pl_module.log from the next step (a hook after a validation cannot log)
            self._log(trainer, pl_module, self._run.layer_zeros())  # type: ignore[union-attr]

    @override
    def weights_restored(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enforcing():
            # the guard's copy takes the weights as restored, before this run's current masks: its own restore applies
            # the masks of its last accepted validation (these current ones may be a step it is about to reject)
            self._run.refresh_good_weights(state_buffers(pl_module))  # type: ignore[union-attr]
            self._apply(pl_module)  # the restored copy may hold weights pruned since it was taken

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._run is None:
            return {}
        # the end the run was planned with: a default one follows max_epochs, which a resumed fit may change
        return {**self._run.state_dict(self.options.criterion.state_dict()), "end_epoch": self._end}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._run is not None:
            self._restore(state_dict)
        else:
            self._pending = dict(state_dict)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        run = self._run
        if state and run is not None and run.shrunk is not None and state.get("shrunk") is None:
            # written before this run removed its channels (a best checkpoint from an earlier epoch): Lightning has
            # put the model back at the shapes it had then, so the run starts again over them, traced with the same
            # input, and load_state_dict restores the checkpoint's masks onto them (an evaluation keeps the fit's schedule)
            fit = trainer.state.fn == "fit"
            self.options.criterion.teardown()
            plan = plan_run(trainer, pl_module, self.options, (self._network, self._example), schedule=fit)
            self._commit(plan, new_run=True, schedule=fit)
            configured_again(pl_module)

    def _restore(self, state: Mapping[str, Any]) -> None:
        assert self._run is not None
        restore_run(self._run, state, self._fitting, self.options)
        if self._fitting and self._run.shrunk is None:  # once the channels are removed the schedule has no more to do
            plan = replan_to_checkpoint_end(self.options, state.get("end_epoch"), self._end, self._max_epochs)
            if plan is not None:
                self._sched, self._end, self._shrink_at = plan

    # ------------------------------------------------------------------ report contract
    def _target(self) -> float:
        """The overall target at the run's level; after removal, the one the removed masks had (the weights are gone)."""
        run = self._run
        if run is not None and run.shrunk is not None:
            return float(run.shrunk.get("target", run.shrunk["sparsity"]))
        return run.overall_target(run.level) if run and run.names else 0.0

    @override
    def compression_state(self) -> dict[str, float]:
        return {"sparsity": self.sparsity, "target": self._target()}

    @override
    def compression_summary(self) -> dict[str, Any]:
        return pruning_summary(self, self._run)

    @override
    def last_weight_change(self, max_epochs: int | None) -> float | None:
        """The epoch of its schedule's last mask change (``start_epoch`` for ``one_shot``), or of the channels'
        removal when later."""
        opts = self.options
        try:
            _, end, shrink_at = opts.plan(max_epochs)
        except ValueError:  # a plan that cannot run is this callback's own error, raised in its setup
            return None
        last = build_schedule(opts.schedule, opts.start_epoch, end, opts.schedule_steps)[2].end
        return max(last, shrink_at) if shrink_at is not None else last

    @override
    def is_active(self) -> bool:
        run = self._run
        return run is not None and (run.shrunk is not None or run.level > 0 or run.has_pruned())
