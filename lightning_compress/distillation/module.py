"""``DistillationModule``: train a student to reproduce a frozen teacher, inside an ordinary Lightning run."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, SequentialSampler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_compress.distillation.losses import attention_transfer_loss, hint_loss, resolve_distill_loss
from lightning_compress.distillation.teacher import TeacherCache, closest_names, load_teacher_weights
from lightning_compress.schedules import Schedule, StepMap, make_schedule, schedule_state

__all__ = ["DistillationModule"]

ScheduleArg = Union[float, dict[float, float], Schedule]

_X_KEYS = ("x", "input", "inputs", "image", "images")
_Y_KEYS = ("y", "label", "labels", "target", "targets")
_I_KEYS = ("index", "idx", "indices")


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(inputs, labels or None, sample indices or None)`` from a batch.

    Understood: a tensor (inputs only); a tuple/list ``(x,)``, ``(x, y)`` or ``(x, y, index)``; a dict
    with keys ``x``/``input``/``inputs``/``image(s)``, optional ``y``/``label(s)``/``target(s)`` and
    ``index``/``idx``/``indices`` (what :class:`IndexedDataset` yields).

    Example:
        >>> x, y, i = split_batch((torch.zeros(2, 3), torch.tensor([1, 0])))
        >>> x.shape, y.tolist(), i
        (torch.Size([2, 3]), [1, 0], None)
    """
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        if x is None:
            raise ValueError(f"batch dict needs the inputs under one of {list(_X_KEYS)}, got keys {list(batch)}")
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        i = next((batch[k] for k in _I_KEYS if k in batch), None)
        return x, y, i
    if isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        i = batch[2] if len(batch) > 2 else None
        return x, y, i
    raise ValueError(f"cannot read inputs from a batch of type {type(batch).__name__}")


def _schedule(spec: ScheduleArg, name: str) -> Schedule:
    try:
        return make_schedule(spec)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def _schedule_values(schedule: Schedule) -> list[float]:
    """Values a schedule can take (end points for monotone schedules, every value for step maps)."""
    if isinstance(schedule, StepMap):
        return [schedule.initial, *schedule.values.values()]
    return [schedule.initial, schedule.final]


class _Projection(nn.Module):
    """Learned map from a student feature to the teacher feature's shape (FitNets regressor).

    ``conv``: 1×1 convolution on ``(N, C, H, W)`` maps, then adaptive average pooling to the
    teacher's spatial size if it differs. ``linear``: both features flattened to ``(N, D)``.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, out_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.proj: nn.Module = nn.Conv2d(in_dim, out_dim, 1, bias=False)
            self.register_buffer("out_size", torch.tensor(out_hw or (0, 0), dtype=torch.long))
        else:
            self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, feature: Tensor) -> Tensor:
        if self.kind == "conv":
            out = self.proj(feature)
            h, w = (int(v) for v in self.out_size)
            if h > 0 and tuple(out.shape[-2:]) != (h, w):
                out = F.adaptive_avg_pool2d(out, (h, w))
            return out
        return self.proj(feature.flatten(1))


def _proj_key(student_name: str) -> str:
    return student_name.replace(".", "__") or "_root"


class DistillationModule(LightningModule):
    r"""Train ``student`` to reproduce a frozen ``teacher`` (knowledge distillation).

    Per training batch (labels ``y`` optional):

    .. math::
        \mathcal{L} = \alpha\,\mathcal{L}_\text{distill}(z^s, z^t; T) + (1 - \alpha)\,\mathrm{CE}(z^s, y)
            + \lambda_f \sum_{(a, b) \in \text{features}} \mathcal{L}_\text{feat}(r_a(f^s_a), f^t_b)

    On unlabeled batches the cross-entropy term is dropped and the distillation term has weight 1.
    Labels equal to ``-100`` are ignored by the cross-entropy.

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
            linear layer otherwise, omitted when shapes already match) or ``"attention"`` (attention
            transfer between conv maps; no projection, any channel counts).
        num_classes: Classes of the accuracy metrics.
        optimizer: ``params -> Optimizer`` (a class path with ``init_args`` in YAML); it receives the
            student's and the projections' parameters only. Default Adam, ``lr=1e-3``.
        scheduler: Optional ``optimizer -> LRScheduler``, stepped every epoch.
        save_teacher: Keep the teacher's weights in checkpoints.
        cache_teacher_outputs: Compute the teacher's training logits once and reuse them. Only for
            deterministic training data (no random augmentation): batches carrying sample indices
            (``(x, y, index)`` or :class:`IndexedDataset` dicts) may be shuffled; without indices the
            batch index is the key and the train loader must not shuffle. Each cached entry keeps a
            fingerprint of its input; a changed input raises an error. Not with ``features``.
        divergence_factor: Warn when the training loss (running average) climbs above this multiple of
            its lowest value — the sign of a learning rate too high for the T²-scaled loss. ``None``
            disables the warning. A non-finite loss always stops the run with an error.
        example_input_shape: Shape of one input sample (no batch dimension); sizes the feature
            projections at construction and sets ``example_input_array``. Without it, projections are
            sized in ``setup`` from one training batch.
        teacher_ckpt_prefix: Force the key prefix of the teacher's weights in ``teacher_ckpt``.

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
        num_classes: int = 10,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        save_teacher: bool = False,
        cache_teacher_outputs: bool = False,
        divergence_factor: float | None = 10.0,
        example_input_shape: tuple[int, ...] | None = None,
        teacher_ckpt_prefix: str | None = None,
    ) -> None:
        super().__init__()
        # --- options that need no model -------------------------------------------------------
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError(
                f"student and teacher must be nn.Modules, got {type(student).__name__} and {type(teacher).__name__}"
            )
        if student is teacher:
            raise ValueError("student and teacher are the same module object; give two separate networks")
        self.temperature_schedule = _schedule(temperature, "temperature")
        self.alpha_schedule = _schedule(alpha, "alpha")
        for value in _schedule_values(self.temperature_schedule):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"temperature must be > 0 at every epoch, got {value!r} from {temperature!r}")
        for value in _schedule_values(self.alpha_schedule):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] at every epoch, got {value!r} from {alpha!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not (math.isfinite(feature_weight) and feature_weight >= 0):
            raise ValueError(f"feature_weight must be a finite number >= 0, got {feature_weight!r}")
        if feature_loss not in ("mse", "attention"):
            raise ValueError(f"feature_loss must be 'mse' or 'attention', got {feature_loss!r}")
        if divergence_factor is not None and not divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 or None, got {divergence_factor!r}")
        if features is not None and not isinstance(features, Mapping):
            raise ValueError(f"features must be a {{student_module: teacher_module}} map, got {features!r}")
        features = dict(features or {})
        if cache_teacher_outputs and features:
            raise ValueError(
                "cache_teacher_outputs caches teacher logits only, but features need the teacher's intermediate "
                "outputs every step; drop one of the two"
            )
        distill_fn, self.distill_loss_name = resolve_distill_loss(distill_loss)
        criterion = distill_fn if isinstance(distill_fn, nn.Module) else getattr(distill_fn, "fn", None)
        if isinstance(criterion, nn.Module):
            self.distill_criterion = criterion  # registered once: its parameters train, move and are saved
        object.__setattr__(self, "_distill_fn", distill_fn)  # plain attribute, not a second submodule
        ignore = ["student", "teacher", "optimizer", "scheduler"] + ([] if isinstance(distill_loss, str) else ["distill_loss"])
        self.save_hyperparameters(ignore=ignore)

        # --- the two networks ---------------------------------------------------------------------
        self.student = student
        self.teacher = teacher
        self.teacher_ckpt = teacher_ckpt
        self.teacher_prefix: str | None = None
        if teacher_ckpt is not None:
            self.teacher_prefix = load_teacher_weights(teacher, teacher_ckpt, teacher_ckpt_prefix)
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
        self._check_feature_names()
        self.projections = nn.ModuleDict()
        self._projections_ready = not features or feature_loss == "attention"
        self._capturing = False
        self._student_feats: dict[str, Tensor] = {}
        self._teacher_feats: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

        # --- training options -------------------------------------------------------------------------
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.save_teacher = save_teacher
        self.cache_teacher_outputs = cache_teacher_outputs
        self.teacher_cache = TeacherCache()
        self._train_shuffled = False
        self.divergence_factor = divergence_factor
        self._loss_ema: float | None = None
        self._loss_min: float | None = None
        self._ema_steps = 0
        self._warned_divergence = False
        self._shapes_checked = False

        # --- metrics ------------------------------------------------------------------------------------
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.test_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_val_accuracy: float | None = None
        self.teacher_test_accuracy: float | None = None
        self.last_agreement: float | None = None

        if example_input_shape is not None:
            self.example_input_array = torch.zeros(1, *example_input_shape)
            if not self._projections_ready:
                self._build_projections(self.example_input_array)

        self.register_load_state_dict_post_hook(_forgive_missing_teacher)
        self._register_load_state_dict_pre_hook(_rebuild_projections, with_module=True)

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
        optimizer = self.optimizer_factory(list(self.trainable_parameters()))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.save_teacher:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    # ------------------------------------------------------------------------------------------------
    # features
    # ------------------------------------------------------------------------------------------------
    def _check_feature_names(self) -> None:
        s_names = [n for n, _ in self.student.named_modules()]
        t_names = [n for n, _ in self.teacher.named_modules()]
        for s, t in self.features.items():
            for side, name, names in (("student", s, s_names), ("teacher", t, t_names)):
                if name not in names:
                    raise ValueError(
                        f"features: the {side} has no module named {name!r}; closest names: "
                        f"{closest_names(name, [n for n in names if n])}"
                    )

    def _add_hooks(self) -> None:
        if self._hooks or not self.features:
            return
        s_mods, t_mods = dict(self.student.named_modules()), dict(self.teacher.named_modules())
        for s, t in self.features.items():
            self._hooks.append(s_mods[s].register_forward_hook(self._capture_hook(self._student_feats, s)))
            self._hooks.append(t_mods[t].register_forward_hook(self._capture_hook(self._teacher_feats, t)))

    def _capture_hook(self, store: dict[str, Tensor], key: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._capturing:
                store[key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def _build_projections(self, x: Tensor) -> None:
        """Size the projections from one forward of both networks on ``x`` (modes restored after)."""
        self._add_hooks()
        was_training = self.student.training
        self.student.eval()
        self._capturing = True
        try:
            self.student(x)
            self.teacher(x)
        finally:
            self._capturing = False
            self.student.train(was_training)
        for s, t in self.features.items():
            fs, ft = self._student_feats[s], self._teacher_feats[t]
            if fs.shape[1:] == ft.shape[1:]:
                continue
            if fs.dim() == 4 and ft.dim() == 4:
                proj = _Projection("conv", fs.shape[1], ft.shape[1], (int(ft.shape[-2]), int(ft.shape[-1])))
            else:
                proj = _Projection("linear", fs[0].numel(), ft[0].numel())
            self.projections[_proj_key(s)] = proj.to(fs.device)
        self._student_feats.clear()
        self._teacher_feats.clear()
        self._remove_hooks()  # re-added for training in on_train_start; closures must not outlive it (pickling)
        self._projections_ready = True

    def _feature_loss(self) -> Tensor:
        total: Tensor | None = None
        for s, t in self.features.items():
            if s not in self._student_feats or t not in self._teacher_feats:
                raise RuntimeError(f"features: module {s!r} or {t!r} did not run in this forward pass")
            fs, ft = self._student_feats[s], self._teacher_feats[t].detach()
            if self.feature_loss_name == "attention":
                term = attention_transfer_loss(fs, ft)
            else:
                key = _proj_key(s)
                if key in self.projections:
                    fs = self.projections[key](fs)
                term = hint_loss(fs.reshape(ft.shape), ft)
            total = term if total is None else total + term
        assert total is not None
        return total

    # ------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            if all(m.training for n, m in self.named_modules() if not (n == "teacher" or n.startswith("teacher."))):
                # Lightning warns about modules in eval mode at fit start; here only the (intentionally frozen) teacher is.
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
            self.temperature_schedule.validate(self.trainer.max_epochs)
            self.alpha_schedule.validate(self.trainer.max_epochs)
            if not self._projections_ready:
                self._build_projections(self._one_training_input())

    def _one_training_input(self) -> Tensor:
        loader = None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            loader = datamodule.train_dataloader()
        else:
            source = getattr(self.trainer.fit_loop, "_data_source", None)
            if source is not None and source.is_defined():
                loader = source.dataloader()
        if loader is None:
            raise ValueError("features: cannot size the projections; pass example_input_shape to DistillationModule")
        x, _, _ = split_batch(next(iter(loader)))
        return x[:2].to(self.device)

    @override
    def on_train_start(self) -> None:
        self._add_hooks()
        self.teacher.eval()
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        # Only a sequential order is known to repeat: any other sampler may shuffle.
        order = inner if inner is not None else sampler
        if isinstance(order, DistributedSampler):
            self._train_shuffled = order.shuffle
        else:
            self._train_shuffled = order is not None and not isinstance(order, SequentialSampler)

    @override
    def on_train_end(self) -> None:
        self._remove_hooks()
        self.teacher.eval()

    # ------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The student's logits."""
        return self.student(x)

    def teacher_forward(self, x: Tensor) -> Tensor:
        """The teacher's logits, without gradients."""
        with torch.no_grad():
            return self.teacher(x)

    def _remember_input(self, x: Tensor) -> None:
        if self.example_input_array is None:
            self.example_input_array = torch.zeros(1, *x.shape[1:], dtype=x.dtype)

    def _epoch_fraction(self, batch_idx: int) -> float:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 0.0
        n = trainer.num_training_batches
        frac = batch_idx / n if isinstance(n, int) and n > 0 else 0.0
        return trainer.current_epoch + frac

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

    def _check_logits(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "differ in shape; distillation needs the same output shape (same classes) from both networks. "
                "Adapt the student's head or the teacher's instead of relying on broadcasting."
            )
        self._shapes_checked = True

    def _teacher_train_logits(self, x: Tensor, index: Tensor | None, batch_idx: int) -> Tensor:
        if not self.cache_teacher_outputs:
            return self.teacher_forward(x)
        if index is None and self._train_shuffled:
            raise ValueError(
                "cache_teacher_outputs: the training dataloader shuffles and the batches carry no sample indices, so "
                "cached teacher outputs cannot be matched to samples. Wrap the training dataset in "
                "lightning_compress.distillation.IndexedDataset (batches become {'x', 'y', 'index'} dicts), yield "
                "(x, y, index) tuples, or turn shuffling off."
            )
        cached = self.teacher_cache.lookup(x, index, batch_idx)
        if cached is not None:
            return cached
        logits = self.teacher_forward(x)
        self.teacher_cache.store(x, index, batch_idx, logits)
        return logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = split_batch(batch)
        self._remember_input(x)
        temperature = self.current_temperature(batch_idx)
        alpha = self.current_alpha(batch_idx)
        self._capturing = bool(self.features)
        try:
            student_logits = self.student(x)
            teacher_logits = self._teacher_train_logits(x, index, batch_idx)
        finally:
            self._capturing = False
        self._check_logits(student_logits, teacher_logits)
        distill = self._distill_fn(student_logits, teacher_logits, temperature=temperature)
        batch_size = x.shape[0]
        log = {"on_step": False, "on_epoch": True, "batch_size": batch_size}
        if y is not None and bool((y != -100).any()):
            ce = F.cross_entropy(student_logits, y)
            loss = alpha * distill + (1.0 - alpha) * ce
            self.log("ce_loss", ce, **log)
        else:
            loss = distill
        if self.features:
            feat = self._feature_loss()
            loss = loss + self.feature_weight * feat
            self.log("feature_loss", feat, **log)
            self._student_feats.clear()
            self._teacher_feats.clear()
        self.log("distill_loss", distill, **log)
        self.log("train_loss", loss, prog_bar=True, **log)
        self.log("temperature", temperature, **log)
        self.log("alpha", alpha, **log)
        self._watch_loss(loss, temperature)
        return loss

    def _watch_loss(self, loss: Tensor, temperature: float) -> None:
        value = float(loss.detach())
        lr = None
        if getattr(self, "_trainer", None) is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0].get("lr")
        advice = (
            f"The {self.distill_loss_name!r} term at T={temperature:g}"
            + (f" is scaled by T^2 = {temperature**2:g}" if self.distill_loss_name == "kl" else "")
            + (f"; the learning rate is {lr:g}" if lr is not None else "")
            + ". Lower the learning rate (e.g. divide it by T for T >> 1), lower T, or set Trainer(gradient_clip_val=...)."
        )
        if not math.isfinite(value):
            raise FloatingPointError(f"the distillation training loss became {value} at step {self.global_step}. {advice}")
        if self.divergence_factor is None or self._warned_divergence:
            return
        self._ema_steps += 1
        self._loss_ema = value if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * value
        if self._ema_steps < 20:
            return
        self._loss_min = self._loss_ema if self._loss_min is None else min(self._loss_min, self._loss_ema)
        if self._loss_min > 0 and self._loss_ema > self.divergence_factor * self._loss_min:
            self._warned_divergence = True
            rank_zero_warn(
                f"the distillation training loss is blowing up: its running average rose from {self._loss_min:.4g} "
                f"to {self._loss_ema:.4g} (more than divergence_factor={self.divergence_factor:g} times). {advice}",
                category=RuntimeWarning,
            )

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y, _ = split_batch(batch)
        self._remember_input(x)
        student_logits = self.student(x)
        teacher_logits = self.teacher_forward(x)
        self._check_logits(student_logits, teacher_logits)
        if student_logits.dim() != 2:
            return
        agreement = self.val_agreement if stage == "val" else self.test_agreement
        agreement(student_logits, teacher_logits.argmax(-1))
        self.log(f"{stage}_agreement", agreement, batch_size=x.shape[0])
        if y is None:
            return
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(student_logits, y)
        self.log(f"{stage}_loss", F.cross_entropy(student_logits, y), prog_bar=stage == "val", sync_dist=True, batch_size=x.shape[0])
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val", batch_size=x.shape[0])
        if stage == "test" or (self.teacher_val_accuracy is None and not self.trainer.sanity_checking):
            (self.teacher_val_acc if stage == "val" else self.teacher_test_acc).update(teacher_logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        value = self.trainer.callback_metrics.get("val_agreement")
        if value is not None:
            self.last_agreement = float(value)
        if self.teacher_val_accuracy is None and self.teacher_val_acc.update_count > 0:
            self.teacher_val_accuracy = float(self.teacher_val_acc.compute())
            self.teacher_val_acc.reset()
            self.log("teacher_val_acc", self.teacher_val_accuracy, sync_dist=True)

    @override
    def on_test_epoch_end(self) -> None:
        if self.teacher_test_acc.update_count > 0:
            self.teacher_test_accuracy = float(self.teacher_test_acc.compute())
            self.teacher_test_acc.reset()
            self.log("teacher_test_acc", self.teacher_test_accuracy, sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _, _ = split_batch(batch)
        return self.student(x).argmax(-1)

    # ------------------------------------------------------------------------------------------------
    # export and report contract
    # ------------------------------------------------------------------------------------------------
    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's weights, detached CPU copies, loadable into the student's class with strict loading."""
        return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}

    def export_student(self, path: str | os.PathLike[str]) -> Path:
        """Write the student's ``state_dict`` (``.safetensors`` by suffix, else ``torch.save``); return the path.

        Example:
            >>> import tempfile
            >>> from lightning_compress.models import MLP
            >>> m = DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10))
            >>> with tempfile.TemporaryDirectory() as d:
            ...     p = m.export_student(f"{d}/student.pt")
            ...     MLP(64, (8,), 10).load_state_dict(torch.load(p))
            <All keys matched successfully>
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.student_state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        return path

    def compression_baseline(self) -> nn.Module:
        """The teacher: the model the report compares against."""
        return self.teacher

    def compressed_artifact(self) -> nn.Module:
        """The student: the model the report measures as compressed."""
        return self.student

    def compression_state(self) -> dict[str, float]:
        """Temperature and alpha at the current epoch (for the report's per-epoch plot)."""
        trainer = getattr(self, "_trainer", None)
        epoch = float(trainer.current_epoch) if trainer is not None else 0.0
        return {"temperature": float(self.temperature_schedule(epoch)), "alpha": float(self.alpha_schedule(epoch))}

    def compression_summary(self) -> dict[str, Any]:
        """Parameters of teacher and student, teacher accuracy, agreement and the loss settings."""
        t_params = sum(p.numel() for p in self.teacher.parameters())
        s_params = sum(p.numel() for p in self.student.parameters())
        p_params = sum(p.numel() for p in self.projections.parameters())
        return {
            "teacher": type(self.teacher).__name__,
            "student": type(self.student).__name__,
            "teacher_params": t_params,
            "student_params": s_params,
            "projection_params": p_params,
            "param_ratio": t_params / s_params if s_params else None,
            "teacher_val_acc": self.teacher_val_accuracy,
            "teacher_test_acc": self.teacher_test_accuracy,
            "val_agreement": self.last_agreement,
            "distill_loss": self.distill_loss_name,
            "temperature": schedule_state(self.temperature_schedule),
            "alpha": schedule_state(self.alpha_schedule),
            "features": dict(self.features),
            "feature_loss": self.feature_loss_name if self.features else None,
            "feature_weight": self.feature_weight if self.features else None,
            "teacher_ckpt": self.teacher_ckpt,
            "teacher_ckpt_prefix": self.teacher_prefix,
            "teacher_cache": {"entries": len(self.teacher_cache), "hits": self.teacher_cache.hits}
            if self.cache_teacher_outputs
            else None,
        }

    def compression_baseline_metrics(self) -> dict[str, float]:
        """The teacher's measured accuracy, as the baseline's metrics (``val_acc``, ``test_acc`` once known)."""
        out = {}
        if self.teacher_val_accuracy is not None:
            out["val_acc"] = self.teacher_val_accuracy
        if self.teacher_test_accuracy is not None:
            out["test_acc"] = self.teacher_test_accuracy
        return out

    def is_active(self) -> bool:
        """Distillation changes training from the first step."""
        return True


def _forgive_missing_teacher(module: nn.Module, incompatible: Any) -> None:
    """Load-state post hook: checkpoints written without the teacher load strictly (the teacher is given again)."""
    missing = incompatible.missing_keys
    for key in [k for k in missing if k.startswith("teacher.")]:
        missing.remove(key)


def _rebuild_projections(module: DistillationModule, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load-state pre hook: create projections stored in ``state_dict`` that were not built yet (sized in setup)."""
    head = prefix + "projections."
    for key, value in state_dict.items():
        if not (key.startswith(head) and key.endswith(".proj.weight")):
            continue
        name = key[len(head) : -len(".proj.weight")]
        if name in module.projections:
            continue
        if value.dim() == 4:
            size = state_dict.get(f"{head}{name}.out_size")
            out_hw = (int(size[0]), int(size[1])) if size is not None else None
            module.projections[name] = _Projection("conv", int(value.shape[1]), int(value.shape[0]), out_hw)
        else:
            module.projections[name] = _Projection("linear", int(value.shape[1]), int(value.shape[0]))
    if module.features and len(module.projections):
        module._projections_ready = True
