"""``DistillationModule``: train a student to reproduce a frozen teacher, inside an ordinary Lightning run."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from typing_extensions import override

from lightning_compress.batches import LABEL_KEYS, ForwardCall
from lightning_compress.distillation import tokens
from lightning_compress.distillation.batch import (
    check_layout,
    first_training_input,
    flat_batch,
    split_batch,
)
from lightning_compress.distillation.calls import (
    cast_floating, input_tensors, is_seq2seq, labels_are_inputs, network_call, shift_for_next_token, target_mask,
    with_input,
)
from lightning_compress.distillation.cache import TeacherCache
from lightning_compress.distillation.evaluation import DistillationEvalMixin
from lightning_compress.distillation.features import (
    FeatureCapture,
    build_projections,
    feature_matching_loss,
    hints_reshaped_by_removal,
    rebuild_projections,
)
from lightning_compress.distillation.options import ScheduleArg, model_free_options, sample_shape
from lightning_compress.distillation.report_contract import DistillationReportMixin
from lightning_compress.distillation.teacher import load_teacher_weights
from lightning_compress.distillation.watchdog import LossWatch, TrainingLogMixin
from lightning_compress.lm import shift_labels_note
from lightning_compress.module import build_optimizers
from lightning_compress.plugin import fast_dev_run_note, unit_removers
from lightning_compress.selection import TRAINING_ONLY_FLAG
from lightning_compress.token_mask import DEFAULT_MASK_KEY, mask_entry
from lightning_compress.outputs import logits_of
from lightning_compress.schedules import Constant, Cubic, Iterative, Linear, OneShot, Schedule, StepMap, epoch_position

__all__ = ["DistillationModule", "split_batch"]

def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


#: The schedule classes a temperature or alpha in the hyperparameters may be: allowed in ``torch.load(weights_only=True)``,
#: which Lightning reads checkpoints with, so a checkpoint of a scheduled fit resumes and loads.
CHECKPOINTED_SCHEDULES = (Constant, Cubic, Iterative, Linear, OneShot, StepMap)
torch.serialization.add_safe_globals(list(CHECKPOINTED_SCHEDULES))


class DistillationModule(DistillationReportMixin, DistillationEvalMixin, TrainingLogMixin, LightningModule):
    r"""Train ``student`` to reproduce a frozen ``teacher`` (knowledge distillation).

    Per training batch (labels ``y`` optional):

    .. math::
        \mathcal{L} = \alpha\,\mathcal{L}_\text{distill}(z^s, z^t; T) + (1 - \alpha)\,\mathrm{CE}(z^s, y)
            + \lambda_f \sum_{(a, b) \in \text{features}} \mathcal{L}_\text{feat}(r_a(f^s_a), f^t_b)

    On unlabeled batches the cross-entropy term is dropped and the distillation term has weight 1.
    Labels equal to ``ignore_index`` are ignored by the cross-entropy. Logits ``(..., V)`` beyond ``(N, C)``
    are per position: :mod:`~lightning_compress.distillation.tokens` says which positions count.

    The teacher (attribute ``teacher``, a name the pruning and quantisation callbacks skip unless
    asked) is frozen: ``requires_grad_(False)``, kept in ``eval()`` mode whatever ``train()`` is called
    on the module (and re-asserted at every training epoch start), run under ``torch.no_grad``, left
    out of the optimizer, ignored by DDP (no gradient reduction, no buffer broadcast) and left out of
    checkpoints unless ``save_teacher=True``. Loading a checkpoint without teacher weights works with
    strict loading when the teacher is given again.

    Args:
        student: The network to train (a class path in YAML).
        teacher: The frozen network to imitate (a class path in YAML).
        teacher_ckpt: Lightning checkpoint, ``state_dict`` file or ``.safetensors`` file with the
            teacher's trained weights. The key prefix of the module that trained it (``model.`` for a
            :class:`~lightning_compress.ClassifierModule`) is found automatically. ``None``: the
            teacher is used as given.
        distill_loss: ``"kl"`` (Hinton: KL divergence at temperature T, scaled by T²), ``"mse"``
            (mean squared error of the logits), ``"cosine"`` (1 − cosine similarity of the logits), the
            import path of a function or ``nn.Module`` class, or a callable
            ``fn(student_logits, teacher_logits[, temperature=T])``.
        temperature: T > 0, a number, an ``{epoch: value}`` map or a
            :class:`~lightning_compress.schedules.Schedule` (evaluated at fractional epochs).
        alpha: Weight of the distillation term in [0, 1] (number, map or schedule); ``1 - alpha``
            weighs the cross-entropy on labels.
        features: FitNets hints ``{student_module_name: teacher_module_name}``; the outputs of these
            modules are captured with forward hooks during training.
        feature_weight: :math:`\lambda_f`, weight of the feature term.
        feature_loss: ``"mse"`` (FitNets hint through a learned projection: a 1×1 conv for conv maps, a
            linear map of the last dimension at every position for ``(N, T, D)`` features that differ in ``D``
            only (positions where the batch's attention mask is 0 left out), a linear layer on flattened
            features otherwise, omitted when shapes already match) or ``"attention"`` (attention
            transfer between conv maps; no projection, any channel counts).
        num_classes: The classifier's class count, checked against the ``(N, C)`` logits of the first training batch
            (another count is warned about in ``setup``, and the accuracies are then not computed). ``None``
            (default): whatever the logits have; the accuracies compare arg-max classes and need no count.
        optimizer: ``params -> Optimizer`` (a class path with ``init_args`` in YAML); it receives the
            student's and the projections' parameters only. Default Adam, ``lr=1e-3``.
        scheduler: Optional ``optimizer -> LRScheduler``, stepped every epoch (``scheduler_interval="epoch"``) or
            every optimizer step (``"step"``: a warm-up or cosine schedule counted in steps, as Hugging Face's).
        scheduler_interval: When ``scheduler`` steps: ``"epoch"`` or ``"step"``.
        save_teacher: Keep the teacher's weights in checkpoints.
        cache_teacher_outputs: Compute the teacher's training logits once per distinct input and reuse
            them in later epochs. Inputs are recognised by a 128-bit hash of their content computed on
            their device, so any training DataLoader works (shuffled, tuple or dict batches, no sample
            indices); under DDP each rank caches what it sees. Logits stay on the CPU in the teacher's
            output dtype for one fit (not checkpointed; a resumed run refills them). Under random
            augmentation inputs do not repeat: after the first epoch the cache warns, switches itself
            off, and training goes on with the teacher run every step. Not with ``features``.
        divergence_factor: Warn when the training loss (running average) climbs above this multiple of
            its lowest value — the sign of a learning rate too high for the T²-scaled loss. ``None``
            disables the warning. A non-finite loss always stops the run with an error.
        example_input_shape: Shape of one input sample (no batch dimension); sizes the feature
            projections at construction and sets ``example_input_array``. Without it, projections are
            sized in ``setup`` from one training batch.
        teacher_ckpt_prefix: Force the key prefix of the teacher's weights in ``teacher_ckpt``.
        input_key: For dict batches: the key of the inputs (``"pixels"``); default the first of ``x``,
            ``input``, ``inputs``, ``input_ids``, ``image``, ``images``. A network whose ``forward`` names
            this key (a Hugging Face model's ``input_ids``) is called by keyword with every entry of the
            batch its ``forward`` names, labels and indices excepted (``attention_mask``,
            ``token_type_ids``...); any other network with this tensor alone. Networks may return a tensor,
            a dict or output object with ``logits``, or a tuple whose first tensor is the logits.
        target_key: For dict batches: the key of the labels; default the first of ``y``, ``label(s)``,
            ``target(s)`` (none: distillation loss only).
        trust_pickle: **Unsafe.** Read pickled Python objects in ``teacher_ckpt`` with
            ``torch.load(weights_only=False)``, which runs whatever code the file names. Without it (the
            default) nothing from the file is run: a Lightning checkpoint whose hyper-parameters pickle
            arbitrary objects still gives its weights (those objects are skipped), and only a file that
            pickles the teacher module itself needs this. Only for files you made yourself or trust. Not
            saved with the hyper-parameters: pass it again to ``load_from_checkpoint``, which re-reads
            ``teacher_ckpt``.
        task_loss: The hard-label term: ``"cross_entropy"`` (last dimension), ``"none"``, an import path or
            a callable ``fn(student_logits, labels)`` that sees the counted positions, ``(M, V)`` and ``(M,)``.
        ignore_index: Label that leaves a sample out of the hard-label term (a position, beyond ``(N, C)``,
            out of both terms).
        attention_mask_key: Dict batches: key of the padding mask (0 = padding, out of both terms beyond
            ``(N, C)``); ``None``: read none.
        teacher_dtype: ``None``, ``"bfloat16"`` or ``"float16"``: the teacher is cast in ``setup`` and kept in
            that dtype for the whole run (put back after a ``"64-true"`` Trainer casts the module), its logits
            cast back to the student's dtype for the loss. Under ``"16-true"`` or ``"bf16-true"`` it must be
            that precision's dtype (or ``None``): casting between bfloat16 and float16 would round the weights.
        shift_labels: For logits ``(..., T, V)``: score ``logits[..., t, :]`` against the label at ``t + 1``
            (next-token prediction with labels equal to the inputs, Hugging Face's causal-LM convention).
            ``None`` (default): shift when the labels equal the input ids at every counted position of the
            first labelled batch, with a note saying so; ``False``: labels are already aligned with the
            logits.
        class_dim: The dimension of the logits that holds the classes: ``-1`` (default, the last, as in
            ``(N, C)`` and ``(B, T, V)``) or ``1`` for channel-first outputs such as ``(N, C, H, W)``
            segmentation logits (labels ``(N, H, W)``); it is moved last before the losses and metrics.

    Example:
        >>> from lightning_compress.models import MLP
        >>> module = DistillationModule(MLP(64, (16,), 10), MLP(64, (64,), 10), temperature=4.0, alpha=0.9)
        >>> module(torch.zeros(2, 1, 8, 8)).shape  # the student
        torch.Size([2, 10])
        >>> sorted(module.compression_state().items())
        [('alpha', 0.9), ('temperature', 4.0)]
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        teacher_ckpt: str | None = None,
        distill_loss: str | Callable[..., Tensor] = "kl",
        temperature: ScheduleArg = 4.0,
        alpha: ScheduleArg = 0.9,
        features: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        feature_loss: Literal["mse", "attention"] = "mse",
        num_classes: int | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        save_teacher: bool = False,
        cache_teacher_outputs: bool = False,
        divergence_factor: float | None = 10.0,
        example_input_shape: tuple[int, ...] | None = None,
        teacher_ckpt_prefix: str | None = None,
        input_key: str | None = None,
        target_key: str | None = None,
        trust_pickle: bool = False,
        task_loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        ignore_index: int = -100,
        attention_mask_key: str | None = DEFAULT_MASK_KEY,
        teacher_dtype: Literal["bfloat16", "float16"] | None = None,
        shift_labels: bool | None = None,
        class_dim: int = -1,
        scheduler_interval: Literal["step", "epoch"] = "epoch",
    ) -> None:
        super().__init__()
        # --- options that need no model -------------------------------------------------------
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError(
                f"student and teacher must be nn.Modules, got {type(student).__name__} and {type(teacher).__name__}"
            )
        if student is teacher:
            raise ValueError("student and teacher are the same module object; give two separate networks")
        held = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}  # the teacher's tensors, shared or not
        shared = [name for name, p in student.named_parameters() if id(p) in held and p.requires_grad]
        if shared:  # freezing the teacher would freeze them in the student, which would train without them
            raise ValueError(
                f"the student shares {len(shared)} trainable parameter(s) with the teacher, e.g. {shared[:3]}: the "
                "teacher is frozen, so they would not train in the student either. Give the student its own copy "
                "(copy.deepcopy of the shared module), or freeze them first (requires_grad_(False)) if they are meant "
                "not to train"
            )
        if teacher_dtype is not None:
            cast = [name for name, t in (*student.named_parameters(), *student.named_buffers()) if id(t) in held]
            if cast:  # casting the teacher casts them in the student, which then mixes dtypes
                raise ValueError(
                    f"teacher_dtype={teacher_dtype!r} casts the teacher's tensors, and the student shares {len(cast)} of them "
                    f"(e.g. {cast[:3]}): they would compute in {teacher_dtype} in the student too. Give the student its own "
                    "copy (copy.deepcopy of the shared module), or leave teacher_dtype unset"
                )
        options = model_free_options(
            temperature=temperature, alpha=alpha, num_classes=num_classes, feature_weight=feature_weight,
            feature_loss=feature_loss, divergence_factor=divergence_factor, features=features,
            cache_teacher_outputs=cache_teacher_outputs, shift_labels=shift_labels, class_dim=class_dim,
            ignore_index=ignore_index, save_teacher=save_teacher, optimizer=optimizer, scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            trust_pickle=trust_pickle, distill_loss=distill_loss, task_loss=task_loss, teacher_dtype=teacher_dtype,
        )
        self.temperature_schedule, self.alpha_schedule = options.temperature_schedule, options.alpha_schedule
        features, trust_pickle = options.features, options.trust_pickle
        num_classes = None if num_classes is None else int(num_classes)  # a numpy scalar from a config as well
        feature_weight = float(feature_weight)
        distill_fn, self.distill_loss_name = options.distill_fn, options.distill_loss_name
        criterion = distill_fn if isinstance(distill_fn, nn.Module) else getattr(distill_fn, "fn", None)
        if isinstance(criterion, nn.Module):
            self.distill_criterion = criterion  # registered once: its parameters train, move and are saved
        object.__setattr__(self, "_distill_fn", distill_fn)  # plain attribute, not a second submodule
        task_fn, self.task_loss_name = options.task_fn, options.task_loss_name
        if isinstance(task_fn, nn.Module):
            self.task_criterion = task_fn
        object.__setattr__(self, "_task_fn", task_fn)
        self._teacher_dtype = options.teacher_dtype
        self.ignore_index, self.attention_mask_key = int(ignore_index), attention_mask_key
        self.shift_labels, self.class_dim = shift_labels, class_dim
        self._shift: bool | None = shift_labels  # decided on the first labelled batch when None
        for name, value in (("temperature", temperature), ("alpha", alpha)):
            if isinstance(value, Schedule) and type(value) not in (*CHECKPOINTED_SCHEDULES, *torch.serialization.get_safe_globals()):
                warnings.warn(
                    f"{name} is a {type(value).__qualname__}, a schedule class of your own: checkpoints hold it in the "
                    "hyperparameters, and torch.load(weights_only=True), which Lightning reads them with, refuses it. "
                    f"Allow it first: torch.serialization.add_safe_globals([{type(value).__qualname__}])",
                    UserWarning,
                    stacklevel=2,
                )
        ignore = ["student", "teacher", "optimizer", "scheduler", "trust_pickle"]
        ignore += [k for k, v in (("distill_loss", distill_loss), ("task_loss", task_loss)) if not isinstance(v, str)]
        self.save_hyperparameters(ignore=ignore)

        # --- the two networks ---------------------------------------------------------------------
        self.student = student
        self.teacher = teacher
        #: the student's shapes as built: its export says when channel or unit removal changed them since
        self._student_shapes = {
            k: tuple(v.shape) for k, v in student.state_dict().items() if isinstance(v, Tensor) and not is_lazy(v)
        }
        self.input_key, self.target_key = input_key, target_key
        self._epoch_sums: dict[str, Tensor | float] = {}
        self._epoch_counts: dict[str, int] = {}
        self.teacher_ckpt = teacher_ckpt
        self.teacher_prefix: str | None = None
        if teacher_ckpt is not None:
            self.teacher_prefix = load_teacher_weights(teacher, teacher_ckpt, teacher_ckpt_prefix, trust_pickle=trust_pickle)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # DDP: neither reduce gradients for nor broadcast buffers of the teacher.
        self._ddp_params_and_buffers_to_ignore = [f"teacher.{n}" for n, _ in teacher.named_parameters()] + [
            f"teacher.{n}" for n, _ in teacher.named_buffers()
        ]

        # --- features -------------------------------------------------------------------------------
        self.features = features
        self.feature_weight = float(feature_weight)
        self.feature_loss_name = feature_loss
        self.feature_capture = FeatureCapture(features)
        self.feature_capture.check_names(student, teacher)
        self.projections = nn.ModuleDict()
        setattr(self.projections, TRAINING_ONLY_FLAG, True)  # the plugins leave it alone: the student does not keep it
        self._projections_ready = not features  # attention transfer has none, but its shapes are checked once too

        # --- training options -------------------------------------------------------------------------
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory, self.scheduler_interval = scheduler, scheduler_interval
        self.save_teacher = save_teacher
        self.cache_teacher_outputs = cache_teacher_outputs
        self.teacher_cache = TeacherCache()  # emptied when training starts, never checkpointed
        self.divergence_factor = divergence_factor
        self.loss_watch = LossWatch(divergence_factor)

        self._init_eval_metrics()  # student and teacher accuracy, agreement (evaluation.py)

        if example_input_shape is not None:
            shape = sample_shape(example_input_shape)
            if shape is None:
                raise ValueError(f"example_input_shape must be the positive sizes of one sample, e.g. (1, 28, 28), got {example_input_shape!r}")
            weight = next((p for p in student.parameters() if p.is_floating_point()), None)
            self.example_input_array = torch.zeros(1, *shape, dtype=None if weight is None else weight.dtype)
            if not self._projections_ready:
                example = ForwardCall((self.example_input_array,))
                self._build_projections(example, example)

        self.register_load_state_dict_post_hook(_forgive_missing_teacher)
        self._register_load_state_dict_pre_hook(rebuild_projections, with_module=True)
        from lightning_compress.pruning.reload import allow_shrunk_checkpoints

        allow_shrunk_checkpoints(self)  # checkpoints written after the student's channels or heads were removed

    # ------------------------------------------------------------------------------------------------
    # the teacher stays frozen
    # ------------------------------------------------------------------------------------------------
    @override
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()
        return self

    @override
    def on_train_epoch_start(self) -> None:
        self.teacher.eval()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer receives: everything but the teacher's."""
        for name, param in self.named_parameters():
            if not name.startswith("teacher."):
                yield param

    @override
    def configure_optimizers(self) -> Any:
        return build_optimizers(list(self.trainable_parameters()), self.optimizer_factory, self.scheduler_factory, self.scheduler_interval)

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard student and teacher with FSDP2 (every block, then each
        network) over the data-parallel ranks, and any other child with parameters (feature projections, a
        loss with parameters). Each is a root of its own: the training step calls them directly. Under any
        other strategy nothing happens."""
        from lightning_compress.sharding import shard_with_fsdp2

        others = [m for n, m in self.named_children() if n not in ("student", "teacher") and any(True for _ in m.parameters())]
        shard_with_fsdp2(self, [self.student, self.teacher, *others], whole=False)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning_compress.sharding import has_sharded_parameters

        # a sharded checkpoint is loaded key by key from the model's own keys: the teacher's must be there
        if not self.save_teacher and not has_sharded_parameters(self.teacher):
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    # ------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        if self._teacher_dtype is not None:
            tokens.check_teacher_dtype(self._teacher_dtype, getattr(self.trainer, "precision", None))
        self._restore_teacher_dtype()
        if stage == "fit":
            if all(m.training for n, m in self.named_modules() if not (n == "teacher" or n.startswith("teacher."))):
                # Lightning warns about modules in eval mode before on_train_start; here only the (intentionally frozen)
                # teacher is: the filter lives until then (or the fit's teardown), not for the rest of the process
                self._drop_eval_mode_filter()
                before = list(warnings.filters)
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
                if warnings.filters[0] not in before:  # one the user set already stays theirs
                    self._eval_mode_filter = warnings.filters[0]
            for name, schedule in (("temperature", self.temperature_schedule), ("alpha", self.alpha_schedule)):
                try:
                    schedule.validate(self.trainer.max_epochs)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}{fast_dev_run_note(self.trainer)}") from None
            removing = unit_removers(self.trainer.callbacks)
            # a projection is sized once, for the widths before removal (attention maps sum over the channels)
            resized = removing if self.features and self.feature_loss_name == "mse" else []
            if any(options.units is None for _, options in resized):  # channels: the hinted widths are the channels
                raise self._removal_error(resized, None)
            first = first_training_input(
                self.trainer, self, self.input_key, self.target_key, required_for=None if self._projections_ready else "features"
            )
            if first is None:
                if resized:
                    raise self._removal_error(resized, None)
                return
            if isinstance(first[0], (list, tuple)):  # a dict batch says by its keys which entry is which
                check_layout(first[1], split_batch(first[0], self.input_key, self.target_key)[1])
            student_call, teacher_call = self.network_calls(*first)
            if self.cache_teacher_outputs and not isinstance(first[1], Tensor):
                raise ValueError(
                    f"cache_teacher_outputs recognises a sample by its input tensor, but the inputs are a "
                    f"{type(first[1]).__name__}. Drop cache_teacher_outputs, or give the networks one input tensor"
                )
            if self.cache_teacher_outputs and len(input_tensors(teacher_call)) > 1:
                raise ValueError(
                    f"cache_teacher_outputs recognises a sample by its input alone, but the teacher is called with "
                    f"{sorted(teacher_call.kwargs)}; its outputs depend on all of them. Drop cache_teacher_outputs, or "
                    "give the teacher a forward that takes the input only"
                )
            device = next(self.student.parameters(), first[1]).device
            from lightning_compress.pruning.masks import select_parameters

            for callback, options in resized:  # heads, neurons: refused where a hinted module's output would change width
                selected = [n.removeprefix("student.") for n in select_parameters(self, options.include, options.exclude)
                            if n.startswith("student.")]
                changed = hints_reshaped_by_removal(
                    self.student, list(self.features or {}), student_call.sliced(2).to(device), options.units, selected
                )
                if changed:
                    raise self._removal_error([(callback, options)], changed)
            if not self._projections_ready:
                self._build_projections(student_call.sliced(2).to(device), teacher_call.sliced(2).to(device))
            # a vocabulary or class mismatch fails here, before any step
            labels = split_batch(first[0], self.input_key, self.target_key)[1]
            tokens.check_output_shapes(
                self.student, student_call, self.teacher_forward, teacher_call, labels=labels, class_dim=self.class_dim,
                num_classes=self.num_classes,
            )

    def _removal_error(self, removing: list[tuple[Any, Any]], changed: list[str] | None) -> ValueError:
        """Why a callback removing student units is refused beside ``features`` hints through projections: every hint
        (channels, ``changed=None``) or the ``changed`` ones (measured for heads and neurons)."""
        name, structure = type(removing[0][0]).__name__, removing[0][1].structure
        units = removing[0][1].units is not None
        what = (f"changes the output width of the hinted student module(s) {changed} (measured on a copy with one unit of "
                "each group removed)" if changed is not None else
                f"removes student {'heads or neurons' if units else 'channels'} that the feature projections of "
                f"features={self.features!r} may read")
        hint = ("hint modules whose output keeps its width (a whole block, an attention or feed-forward module), "
                if units else "use feature_loss='attention' (its maps sum over the channels), ")
        return ValueError(
            f"{name}(structure={structure!r}, shrink=True) {what}, so their projections, sized once, would no longer fit; "
            f"keep the units masked (shrink=False), prune with structure='unstructured' or 'N:M', {hint}or drop those hints"
        )

    def _build_projections(self, student_call: ForwardCall, teacher_call: ForwardCall) -> None:
        """Size the feature projections from one forward of both networks (the teacher's in its own dtype)."""
        teacher_call, own_dtype = self._in_teacher_dtype(teacher_call)
        with own_dtype:
            self.projections.update(build_projections(
                self.feature_capture, self.student, self.teacher, student_call, teacher_call, self.feature_loss_name
            ))
        self._projections_ready = True

    def _restore_teacher_dtype(self) -> None:
        """Cast the teacher to ``teacher_dtype``: in ``setup``, and back again after a ``"64-true"`` Trainer
        has cast the whole module (exactly: float64 holds every bfloat16 and float16 value)."""
        if self._teacher_dtype is not None:
            self.teacher.to(self._teacher_dtype)

    @override
    def on_fit_start(self) -> None:
        self._restore_teacher_dtype()
        self._measure_teacher_again()

    @override
    def on_validation_start(self) -> None:
        self._restore_teacher_dtype()
        if self.trainer.state.fn != "fit":  # a standalone validate: the teacher on this run's data
            self._measure_teacher_again()

    @override
    def on_test_start(self) -> None:
        self._restore_teacher_dtype()

    @override
    def on_predict_start(self) -> None:
        self._restore_teacher_dtype()

    def _drop_eval_mode_filter(self) -> None:
        entry = self.__dict__.pop("_eval_mode_filter", None)
        if entry is not None and entry in warnings.filters:
            warnings.filters.remove(entry)
            warnings._filters_mutated()  # type: ignore[attr-defined] - the cache of decisions the filters made

    @override
    def teardown(self, stage: str) -> None:
        self._drop_eval_mode_filter()

    @override
    def on_train_start(self) -> None:
        self._drop_eval_mode_filter()
        self.feature_capture.attach(self.student, self.teacher)
        self.teacher.eval()
        self.teacher_cache.reset()  # the cache lives for one fit

    @override
    def on_train_end(self) -> None:
        self.feature_capture.detach()
        self.teacher.eval()

    # ------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The student's logits."""
        return logits_of(self.student(*args, **kwargs), "student")

    def network_calls(self, batch: Any, x: Tensor) -> tuple[ForwardCall, ForwardCall]:
        """How the student and the teacher are called on ``batch`` (inputs ``x``):
        :func:`~lightning_compress.distillation.calls.network_call`."""
        skip = {*LABEL_KEYS, *((self.target_key,) if self.target_key else ())}
        seq2seq = is_seq2seq(self.student)
        if isinstance(batch, Mapping) and seq2seq != is_seq2seq(self.teacher):
            which = {True: "an encoder-decoder teacher-forced on the targets", False: "a network of the input's positions"}
            raise ValueError(
                f"the student ({type(self.student).__name__}) is {which[seq2seq]} and the teacher "
                f"({type(self.teacher).__name__}) {which[not seq2seq]}: their logits are positions of different "
                "sequences and cannot be compared; distil between two encoder-decoders or two decoders"
            )
        if self._shift is None and seq2seq:  # teacher-forced on the labels: already aligned with them
            self._shift = False
        # the targets a sequence-to-sequence pair is teacher-forced on (the step's own split; read only for such a pair)
        labels = split_batch(batch, self.input_key, self.target_key)[1] if seq2seq and isinstance(batch, Mapping) else None
        return network_call(self.student, batch, x, skip, labels), network_call(self.teacher, batch, x, skip, labels)

    def positions_masks(self, batch: Any) -> tuple[Tensor | None, Tensor | dict[str, Tensor | None] | None]:
        """The padding masks of the logits' positions and of each hinted feature's: for a sequence-to-sequence
        student the target's (``decoder_attention_mask``), and for its features the target's in the decoder (a
        module path with a ``decoder`` step, as Hugging Face names them) and the source's elsewhere."""
        source = mask_entry(batch, self.attention_mask_key)
        if not is_seq2seq(self.student):
            return source, source
        target = target_mask(batch)
        return target, {s: target if re.search(r"(^|\.)decoder(\.|$)", s) else source for s in self.features or {}}

    def teacher_forward(self, inputs: Tensor | ForwardCall) -> Tensor:
        """The teacher's logits, without gradients, in its own dtype (floating inputs cast to ``teacher_dtype``)."""
        call, own_dtype = self._in_teacher_dtype(inputs if isinstance(inputs, ForwardCall) else ForwardCall((inputs,)))
        with torch.no_grad(), own_dtype:
            return logits_of(call(self.teacher), "teacher")

    def _in_teacher_dtype(self, call: ForwardCall) -> tuple[ForwardCall, Any]:
        """``call`` with its floating inputs cast to the teacher's ``teacher_dtype``, and a context that keeps the
        teacher computing in it: the Trainer's autocast (bf16-mixed) would compute a float16 teacher in bfloat16,
        and fail on its BatchNorm."""
        weight = next(self.teacher.parameters(), None)
        if self._teacher_dtype is None or weight is None:
            return call, contextlib.nullcontext()
        return cast_floating(call, weight.dtype), torch.autocast(weight.device.type, enabled=False)

    def teacher_logits(self, inputs: Tensor | ForwardCall, student_logits: Tensor, batch_idx: int | None = None) -> Tensor:
        """The teacher's logits for ``inputs`` (a tensor or a call) in the student's dtype, shape checked; in
        training (``batch_idx`` given) from the teacher-output cache when it is on, which stores them as the
        teacher returns them."""
        cache = self.teacher_cache
        if batch_idx is None or not (self.cache_teacher_outputs and cache.enabled):
            t = self.teacher_forward(inputs)
        else:
            if isinstance(inputs, Tensor):
                t = cache(inputs, self.teacher_forward)
            else:  # setup made sure the call passes one tensor, the input
                t = cache(input_tensors(inputs)[0], lambda xs: self.teacher_forward(with_input(inputs, xs)))
            if cache.due(batch_idx):
                cache.check_fit(self.trainer, self.device)
        tokens.check_logits(student_logits, t)
        return t.to(student_logits.dtype)

    def aligned(
        self, x: Any, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Logits, labels and padding mask as the losses and metrics compare them: shifted by one position
        for next-token labels (``shift_labels``; decided on the first batch with a counted label when ``None``),
        with the classes moved to the last dimension first (``class_dim``)."""
        if self.class_dim != -1:
            student_logits = tokens.classes_last(student_logits, self.class_dim)
            teacher_logits = tokens.classes_last(teacher_logits, self.class_dim)
        if self._shift is None and labels is not None and student_logits.dim() > 2:
            self._shift = labels_are_inputs(x, labels, self.ignore_index)  # None: a batch with nothing counted
            if self._shift and type(self.student).__name__.endswith("ForMaskedLM"):  # Hugging Face's masked-LM heads
                self._shift = False  # a masked LM's labels are the inputs at the masked positions, not the next tokens
                rank_zero_info(
                    f"DistillationModule: the labels equal the input ids, but {type(self.student).__name__} is a masked "
                    "language model, so each position is scored against its own label"
                )
            if self._shift:
                rank_zero_info(shift_labels_note("DistillationModule"))
        if self._shift and student_logits.dim() > 2:
            return shift_for_next_token(student_logits, teacher_logits, labels, mask)
        return student_logits, teacher_logits, labels, mask

    def _remember_input(self, call: ForwardCall) -> None:
        """``example_input_array`` as the student is called, the batch's first sample: a tensor for one positional
        input, a dict for keyword inputs (``forward(*, pixels)``); a call mixing both is left to be found in a batch.
        A real sample, not zeros: the report times it, and an ONNX export checks onnxruntime on it (an all-zero
        attention mask fails every row of a Hugging Face student; zeros leave a first layer's weights untested)."""
        if self.example_input_array is not None:
            return

        def one(v: Any) -> Any:
            return v[:1].detach().cpu().clone() if isinstance(v, Tensor) and v.dim() > 0 else v

        if len(call.args) == 1 and not call.kwargs:
            self.example_input_array = one(call.args[0])
        elif call.kwargs and not call.args:
            self.example_input_array = {k: one(v) for k, v in call.kwargs.items()}

    def _epoch_fraction(self, batch_idx: int) -> float:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 0.0
        varies = not (isinstance(self.temperature_schedule, Constant) and isinstance(self.alpha_schedule, Constant))
        return epoch_position(trainer, batch_idx, fractional=varies)

    def current_temperature(self, batch_idx: int = 0) -> float:
        value = float(self.temperature_schedule(self._epoch_fraction(batch_idx)))
        if not value > 0:
            raise ValueError(f"temperature schedule gave {value} at epoch {self._epoch_fraction(batch_idx):.3f}; it must be > 0")
        return value

    def current_alpha(self, batch_idx: int = 0) -> float:
        value = float(self.alpha_schedule(self._epoch_fraction(batch_idx)))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha schedule gave {value} at epoch {self._epoch_fraction(batch_idx):.3f}; it must be in [0, 1]")
        return value

    @override
    def on_train_epoch_end(self) -> None:
        self._log_unlogged_epoch_means()  # an epoch cut short (max_steps, a stop request) still logs its means
        if self.cache_teacher_outputs:
            if self.teacher_cache.due():
                self.teacher_cache.check_fit(self.trainer, self.device)
            self.teacher_cache.end_epoch()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = flat_batch(batch, self.input_key, self.student)
        x, y, _ = split_batch(batch, self.input_key, self.target_key)
        temperature = self.current_temperature(batch_idx)
        alpha = self.current_alpha(batch_idx)
        student_call, teacher_call = self.network_calls(batch, x)
        self._remember_input(student_call)
        with self.feature_capture.active(bool(self.features)):
            student_logits = student_call(self)  # through forward: the call the plugins find as the model's
            teacher_logits = self.teacher_logits(teacher_call, student_logits, batch_idx)
        logits_mask, feature_masks = self.positions_masks(batch)
        student_logits, teacher_logits, y, mask = self.aligned(x, student_logits, teacher_logits, y, logits_mask)
        loss, parts, weight = tokens.distillation_terms(
            student_logits, teacher_logits, y, mask, self._distill_fn, self._task_fn, temperature, alpha, self.ignore_index
        )
        if self.features:
            feat = feature_matching_loss(
                self.feature_capture, self.projections, self.feature_loss_name, feature_masks
            )
            loss = loss + self.feature_weight * feat
            parts["feature_loss"] = feat
            self.feature_capture.clear()
        if weight > 0:  # a batch with no counted position (all padding) is left out of the logged means
            self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=weight, sync_dist=True)
        self._log_epoch_means(parts, weight, batch_idx, tokens.term_weights(student_logits, y, parts, weight, self.ignore_index))
        self._watch_loss(loss, temperature, parts, weight)
        return loss


def _forgive_missing_teacher(module: nn.Module, incompatible: Any) -> None:
    """Load-state post hook: checkpoints written without the teacher load strictly (the teacher is given again)."""
    missing = incompatible.missing_keys
    for key in [k for k in missing if k.startswith("teacher.")]:
        missing.remove(key)
