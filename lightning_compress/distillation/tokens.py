r"""Logits of any shape ``(..., V)``: which positions count, the loss over them, and the checks made in ``setup``.

``(N, C)`` logits are a classifier's: every sample counts in the distillation term, and labels equal to
``ignore_index`` only leave the hard-label term (an unlabeled sample still learns from the teacher).
Logits with more than two dimensions (``(B, T, V)`` for a language model) are per position: a
position counts when its label is not ``ignore_index`` (when the batch has labels) and its
``attention_mask`` entry is not 0 (when the batch has one). Both terms are then computed on the
counted positions only, flattened to ``(M, V)``, and averaged over them:

.. math::
    \mathcal{L} = \alpha \frac{1}{M}\sum_{i=1}^{M} \ell_\text{distill}(z^s_i, z^t_i; T)
        + (1 - \alpha) \frac{1}{M}\sum_{i=1}^{M} -\log \mathrm{softmax}(z^s_i)_{y_i}

A batch with no counted position gives a loss of exactly 0 that is still part of the graph (zero
gradients, so DDP and the optimizer step see every parameter), and is left out of the logged means.

The classes are the last dimension. Channel-first logits, ``(N, C, H, W)`` for segmentation, are read
with ``DistillationModule(class_dim=1)``, which moves dimension 1 last (:func:`classes_last`) before
anything here sees them; ``setup`` refuses labels ``(N, H, W)`` next to such logits without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.batches import ForwardCall, eval_mode
from lightning_compress.distillation.losses import TokenCrossEntropy
from lightning_compress.outputs import logits_of

__all__ = [
    "TEACHER_DTYPES",
    "check_class_dimension",
    "check_logits",
    "check_output_shapes",
    "check_teacher_dtype",
    "classes_last",
    "distillation_terms",
    "term_weights",
    "parse_teacher_dtype",
    "position_mask",
    "warn_once",
]

TEACHER_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_teacher_dtype(name: str | None) -> torch.dtype | None:
    """The ``torch.dtype`` of the ``teacher_dtype`` option (``None``: the teacher keeps its own).

    Example:
        >>> parse_teacher_dtype("bfloat16"), parse_teacher_dtype(None)
        (torch.bfloat16, None)
    """
    if name is None:
        return None
    if name not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype must be None or one of {sorted(TEACHER_DTYPES)}, got {name!r}")
    return TEACHER_DTYPES[name]


#: The dtype a Lightning ``precision`` converts the whole module to after ``setup`` (the others leave it alone
#: or widen it: ``"64-true"`` holds any teacher dtype exactly).
_HALF_PRECISION_DTYPES: dict[str, torch.dtype] = {"16-true": torch.float16, "bf16-true": torch.bfloat16}


def check_teacher_dtype(dtype: torch.dtype | None, precision: str | None) -> None:
    """A ``ValueError`` when a teacher in ``dtype`` (the ``teacher_dtype`` option, parsed) cannot be kept under
    the Trainer's ``precision``.

    Lightning casts the whole module, teacher included, after ``setup``; the module puts the teacher
    back in ``teacher_dtype`` when the run starts. That is exact after a cast to float32 or float64, but
    not after ``"16-true"`` (float16 has a narrower range than bfloat16) or ``"bf16-true"`` (bfloat16 keeps
    fewer digits than float16): the teacher's weights would be rounded.

    Example:
        >>> check_teacher_dtype(torch.bfloat16, "64-true")  # widened, then put back exactly
        >>> check_teacher_dtype(torch.float16, "16-true")  # the module's dtype already
        >>> check_teacher_dtype(torch.bfloat16, "16-true")
        Traceback (most recent call last):
        ...
        ValueError: teacher_dtype='bfloat16' cannot be kept under precision='16-true': ...
    """
    target = _HALF_PRECISION_DTYPES.get(str(precision))
    if dtype is None or target is None or dtype == target:
        return
    names = {v: k for k, v in TEACHER_DTYPES.items()}
    name, same = names.get(dtype, str(dtype)), names[target]
    raise ValueError(
        f"teacher_dtype={name!r} cannot be kept under precision={precision!r}: Lightning casts the whole module, "
        f"teacher included, to {same} after setup, which rounds {name} weights. Use teacher_dtype={same!r} or None "
        f"with precision={precision!r}, or keep teacher_dtype={name!r} with precision '32-true', '64-true', "
        "'16-mixed' or 'bf16-mixed'"
    )


def warn_once(seen: set[str], key: str, message: str) -> None:
    """Warn (rank 0) the first time ``key`` comes up; ``seen`` remembers it."""
    if key not in seen:
        seen.add(key)
        rank_zero_warn(message)


def classes_last(logits: Tensor, class_dim: int) -> Tensor:
    """``logits`` with dimension ``class_dim`` (the classes) moved last: ``(N, C, H, W)`` -> ``(N, H, W, C)``
    for ``class_dim=1``; ``-1`` leaves them as they are.

    Example:
        >>> classes_last(torch.zeros(2, 4, 6, 7), 1).shape
        torch.Size([2, 6, 7, 4])
    """
    if class_dim == -1:
        return logits
    if logits.dim() <= class_dim:
        raise ValueError(
            f"class_dim={class_dim} names a dimension the logits {tuple(logits.shape)} do not have; class_dim must "
            f"be -1 (the last) or between 1 and {logits.dim() - 1}"
        )
    return logits.movedim(class_dim, -1)


def _channel_first_hint(labels_shape: tuple[int, ...], logits_shape: tuple[int, ...]) -> str:
    """A hint when labels look like channel-first logits' positions (``(N, H, W)`` next to ``(N, C, H, W)``)."""
    if len(logits_shape) > 2 and labels_shape == logits_shape[:1] + logits_shape[2:] and labels_shape != logits_shape[:-1]:
        return (
            ". The labels have the logits' shape without dimension 1: if dimension 1 holds the classes (channel-first "
            "logits, such as (N, C, H, W) segmentation outputs with (N, H, W) labels), set "
            "DistillationModule(class_dim=1); the classes are read from the last dimension otherwise"
        )
    return ""


def position_mask(
    logits_shape: torch.Size, labels: Tensor | None, attention_mask: Tensor | None, ignore_index: int = -100
) -> Tensor | None:
    """Boolean ``(...)`` mask of the positions that count for ``(..., V)`` logits (more than 2 dims), or
    ``None`` when every position counts.

    Example:
        >>> labels = torch.tensor([[5, 6, -100]])
        >>> position_mask(torch.Size([1, 3, 10]), labels, torch.tensor([[1, 0, 1]]))
        tensor([[ True, False, False]])
    """
    positions = tuple(logits_shape[:-1])
    mask: Tensor | None = None
    if labels is not None:
        if tuple(labels.shape) != positions:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match the logits {tuple(logits_shape)}: token-level distillation "
                f"needs one label per position, shape {positions}, aligned with the logits (labels[..., t] is the "
                "target of logits[..., t, :]; labels equal to the inputs are shifted for next-token prediction, and "
                "DistillationModule(shift_labels=True) shifts any)"
                + _channel_first_hint(tuple(labels.shape), tuple(logits_shape))
            )
        mask = labels != ignore_index
    if attention_mask is not None:
        if tuple(attention_mask.shape) != positions:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match the logits' positions {positions} "
                f"(logits {tuple(logits_shape)}); set attention_mask_key=None to count every position"
            )
        attended = attention_mask != 0
        mask = attended if mask is None else mask & attended.to(mask.device)
    return mask


def _flat(logits: Tensor, mask: Tensor | None) -> Tensor:
    """``(M, V)``: the counted positions (a view when every position counts)."""
    if mask is None:
        return logits.reshape(-1, logits.shape[-1])
    return logits[mask.to(logits.device)]


def distillation_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    attention_mask: Tensor | None,
    distill_fn: Callable[..., Tensor],
    task_fn: Callable[[Tensor, Tensor], Tensor] | None,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
) -> tuple[Tensor, dict[str, Tensor | float], int]:
    """``(loss, logged terms, weight)`` of one training batch; ``weight`` is what the logged means count:
    samples for ``(N, C)`` logits, counted positions otherwise (0: nothing counted, loss 0).

    Example:
        >>> from lightning_compress.distillation.losses import kl_div_distill, TokenCrossEntropy
        >>> s, t = torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)
        >>> labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
        >>> loss, parts, n = distillation_terms(s, t, labels, None, kl_div_distill, TokenCrossEntropy(), 4.0, 0.5)
        >>> n, round(float(loss), 4), round(float(parts["ce_loss"]), 4)  # 0.5 * 0 + 0.5 * log(5)
        (3, 0.8047, 1.6094)
    """
    parts: dict[str, Tensor | float] = {"temperature": temperature, "alpha": alpha}
    check_class_dimension(student_logits)
    if student_logits.dim() <= 2:  # a classifier: every sample is distilled, ignored labels leave the CE only
        distill = distill_fn(student_logits, teacher_logits, temperature=temperature)
        parts["distill_loss"] = distill
        weight = student_logits.shape[0] if student_logits.dim() else 1
        if task_fn is None or labels is None or not bool((labels != ignore_index).any()):
            return distill, parts, weight
        if not (isinstance(task_fn, TokenCrossEntropy) or bool((labels != ignore_index).all())):
            keep = labels != ignore_index  # a user's loss sees labeled samples only
            student_logits, labels = student_logits[keep], labels[keep]
        ce = task_fn(student_logits, labels)
        parts["ce_loss"] = ce
        return alpha * distill + (1.0 - alpha) * ce, parts, weight
    mask = position_mask(student_logits.shape, labels, attention_mask, ignore_index)
    s, t = _flat(student_logits, mask), _flat(teacher_logits, mask)
    if s.shape[0] == 0:
        return s.sum(), parts, 0  # exactly 0, connected to the graph: zero gradients
    distill = distill_fn(s, t, temperature=temperature)
    parts["distill_loss"] = distill
    if task_fn is None or labels is None:
        return distill, parts, s.shape[0]
    ce = task_fn(s, labels[mask] if mask is not None else labels.reshape(-1))
    parts["ce_loss"] = ce
    return alpha * distill + (1.0 - alpha) * ce, parts, s.shape[0]


def term_weights(
    student_logits: Tensor, labels: Tensor | None, parts: Mapping[str, Any], weight: int, ignore_index: int = -100
) -> dict[str, int]:
    """What each term of :func:`distillation_terms` counts in an epoch mean: the batch's ``weight``, except a
    classifier's cross-entropy, which counts its labelled samples (token positions are counted alike for both)."""
    out = {key: weight for key in parts}
    if "ce_loss" in parts and student_logits.dim() <= 2 and labels is not None:
        out["ce_loss"] = int((labels != ignore_index).sum())
    return out


def check_class_dimension(logits: Tensor) -> None:
    """A ``ValueError`` for logits with one value per sample or position, ``(N,)`` or ``(..., 1)``: the losses
    compare distributions over the last dimension, where a single logit's softmax is always 1 (no teacher signal),
    and an ``(N,)`` vector would be read as one distribution over the batch."""
    if logits.dim() < 2 or logits.shape[-1] == 1:
        raise ValueError(
            f"the logits have shape {tuple(logits.shape)}: one logit per sample (a binary classifier read with a "
            "sigmoid). Distillation compares distributions over the last dimension (classes), where a single "
            "logit has none; return two logits, torch.stack([torch.zeros_like(z), z], -1) for z of shape (N,) (their "
            "softmax is [1 - sigmoid(z), sigmoid(z)]), with integer labels 0/1"
        )


def check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """A ``ValueError`` naming both shapes when student and teacher logits differ (never broadcast)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; distillation needs the same output shape (same classes) from both networks. "
            "Adapt the student's head or the teacher's instead of relying on broadcasting."
        )


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def check_output_shapes(
    student: nn.Module,
    student_call: ForwardCall,
    teacher_forward: Callable[[ForwardCall], Tensor],
    teacher_call: ForwardCall,
    labels: Tensor | None = None,
    class_dim: int = -1,
    num_classes: int | None = None,
) -> None:
    """Run the first two samples of a training batch through both networks (no gradients, the student in
    eval mode and restored after; each called as its call says) and raise a ``ValueError`` naming both
    shapes when their logits differ, or when ``labels`` (the batch's) have the shape of channel-first
    logits' positions, ``(N, H, W)`` next to ``(N, C, H, W)``, and ``class_dim`` is ``-1`` (the classes
    would be read from the last dimension, W).

    The shapes are reported for the whole batch, as the training step would see them.
    """
    first = student_call.first_tensor()
    batch_size = first.shape[0] if first is not None and first.dim() else 0
    device = _device(student)
    with eval_mode(student), torch.no_grad():
        s = logits_of(student_call.sliced(2).to(device)(student), "student")
        t = teacher_forward(teacher_call.sliced(2).to(device))

    def whole(shape: torch.Size) -> tuple[int, ...]:
        return (batch_size, *shape[1:]) if shape and shape[0] == min(batch_size, 2) else tuple(shape)

    if s.shape == t.shape:
        if class_dim == -1 and isinstance(labels, Tensor) and labels.dim() > 0:
            logits_shape = whole(s.shape)
            hint = _channel_first_hint(tuple(labels.shape), logits_shape)
            if hint:
                raise ValueError(
                    f"labels {tuple(labels.shape)} do not match the logits {logits_shape} on the first training batch "
                    f"(checked in setup, before any step){hint}."
                )
        logits = classes_last(s, class_dim)  # a class_dim the logits do not have fails here too
        check_class_dimension(logits)
        if num_classes is not None and logits.dim() == 2 and logits.shape[-1] != num_classes:
            rank_zero_warn(  # said before training, not at the first validation; a fit without one needs no metric
                f"DistillationModule: the logits have {logits.shape[-1]} classes (student and teacher, first training "
                f"batch) but num_classes={num_classes}: val_acc, val_agreement and teacher_val_acc will not be computed "
                f"(nor anything that monitors them); set num_classes={logits.shape[-1]}"
            )
        return

    what = (
        f"they differ in the last dimension (classes / vocabulary size): student {s.shape[-1]}, teacher {t.shape[-1]}. "
        "Both must predict over the same classes or tokens: give the student the teacher's vocabulary (same "
        "tokenizer, same output head size), or wrap one network in an nn.Module that maps its logits onto the other's"
        if s.shape[:-1] == t.shape[:-1]
        else "distillation compares them position by position, so both networks must give the same output shape; "
        "adapt the student's head or the teacher's instead of relying on broadcasting"
    )
    raise ValueError(
        f"student logits {whole(s.shape)} and teacher logits {whole(t.shape)} differ in shape on the first training "
        f"batch (checked in setup, before any step): {what}."
    )
