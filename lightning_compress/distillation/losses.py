r"""Distillation losses: pure functions on tensors, and ``nn.Module`` wrappers for YAML.

Every logit loss takes ``student_logits`` and ``teacher_logits`` of the same shape ``(..., C)``
(``(N, C)`` for classifiers, ``(N, L, C)`` for sequences), an optional boolean ``mask`` of shape
``(...)`` that marks the positions to count (padding excluded), and returns the mean over the counted
positions (``reduction="mean"``; 0 when none counts), their sum (``"sum"``) or one value per position
(``"none"``, 0 at the others). The counted positions are picked out before any arithmetic, so the
values elsewhere (even ``inf``) change neither the loss nor its gradients.

Notation: :math:`z^s, z^t` student and teacher logits of one position, :math:`T` the temperature,
:math:`p^{(T)} = \mathrm{softmax}(z / T)`, :math:`M` the number of counted positions.

Example:
    >>> import torch
    >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(kl_div_distill(s, t, temperature=4.0))
    0.0
    >>> float(mse_distill(s, t + 1.0))
    1.0
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DISTILL_LOSSES",
    "AttentionTransferLoss",
    "CosineDistillLoss",
    "HintLoss",
    "KLDivDistillLoss",
    "MSEDistillLoss",
    "attention_map",
    "attention_transfer_loss",
    "cosine_distill",
    "hint_loss",
    "kl_div_distill",
    "mse_distill",
    "resolve_distill_loss",
    "resolve_task_loss",
    "token_cross_entropy",
]

Reduction = Literal["mean", "sum", "none"]


def _check_pair(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; adapt one of the models (e.g. a projection head) instead of "
            "relying on broadcasting"
        )


def _positions(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The counted positions only: ``(M, C)`` rows picked by ``mask`` before any arithmetic, so the values
    at padded positions (even ``inf``) change neither the loss nor its gradients."""
    _check_pair(student, teacher)
    if mask is None:
        return student, teacher, None
    if mask.shape != student.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(student.shape[:-1])}")
    mask = mask.to(device=student.device, dtype=torch.bool)
    return student[mask], teacher[mask], mask


def _reduce(per_position: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce the losses of the counted positions (``(M,)`` when ``mask`` picked them, else ``(...)``)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "none":
        return per_position if mask is None else per_position.new_zeros(mask.shape).masked_scatter(mask, per_position)
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = torch.as_tensor(per_position.numel(), dtype=total.dtype, device=total.device)
    return total / torch.clamp(count, min=1)  # no counted position: 0, not NaN


def _check_positive(value: Any, what: str) -> None:
    """A finite number > 0 (a one-element tensor too; one on an accelerator is taken as it is: reading it would wait
    for its device)."""
    if isinstance(value, Tensor):
        if value.device.type != "cpu":
            return
        if value.numel() != 1:  # one per sample: every one of them
            if not bool(torch.isfinite(value).all() and (value > 0).all()):
                raise ValueError(f"{what} must be > 0 and finite, got {value!r}")
            return
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be > 0 and finite (a number), got {value!r}")


def checked_ignore_index(value: Any) -> int:
    """``value`` as the label that counts for nothing (an integer; a boolean or a string is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"ignore_index must be an integer (the label that counts for nothing, -100 by default), got {value!r}")
    return int(value)


def kl_div_distill(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Hinton et al. (2015): KL divergence between softened distributions, scaled by :math:`T^2`.

    .. math::
        \mathcal{L} = \frac{T^2}{M} \sum_{i} \sum_{c} p^{t,(T)}_{ic}
            \left(\log p^{t,(T)}_{ic} - \log p^{s,(T)}_{ic}\right)

    The :math:`T^2` factor keeps the gradient of the soft term comparable across temperatures: its
    gradient with respect to :math:`z^s` is :math:`T (p^{s,(T)} - p^{t,(T)})`, which for large
    :math:`T` tends to :math:`(z^s - z^t)/C` (zero-mean logits) — logit matching, whose gradient
    grows with the teacher's logit range. Lower the learning rate when raising :math:`T`.

    Args:
        student_logits: ``(..., C)``.
        teacher_logits: ``(..., C)``, same shape.
        temperature: :math:`T > 0`.
        mask: Optional boolean ``(...)``; ``False`` positions (padding) are not counted.
        reduction: ``"mean"`` over counted positions (``batchmean``), ``"sum"`` or ``"none"``.

    Example:
        >>> s = torch.tensor([[0.0, 0.0]]); t = torch.tensor([[0.0, 2.0 * 4.0]])
        >>> p = torch.softmax(t / 4.0, -1)  # teacher at T=4: [0.1192, 0.8808]
        >>> manual = 16.0 * float((p * (p.log() - torch.tensor(0.5).log())).sum())
        >>> round(float(kl_div_distill(s, t, temperature=4.0)), 4) == round(manual, 4)
        True
    """
    _check_positive(temperature, "temperature")
    student_logits, teacher_logits, mask = _positions(student_logits, teacher_logits, mask)
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p_t = log_pt.exp()
    # a class the teacher gives no mass (a masked vocabulary entry, logit -inf) adds nothing: 0 * log 0 is 0, not NaN
    gap = torch.where(p_t > 0, log_pt - log_ps, torch.zeros((), dtype=log_pt.dtype, device=log_pt.device))
    per_position = (p_t * gap).sum(-1) * (temperature**2)
    return _reduce(per_position, mask, reduction)


def mse_distill(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Mean squared error between student and teacher logits (the temperature is ignored).

    .. math::
        \mathcal{L} = \frac{1}{M} \sum_i \frac{1}{C} \sum_c (z^s_{ic} - z^t_{ic})^2

    With ``reduction="mean"`` and no mask this equals ``F.mse_loss(student_logits, teacher_logits)``.

    Example:
        >>> s = torch.tensor([[1.0, 2.0], [0.0, 0.0]]); t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> float(mse_distill(s, t)), float(F.mse_loss(s, t))
        (1.5, 1.5)
    """
    student_logits, teacher_logits, mask = _positions(student_logits, teacher_logits, mask)
    per_position = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return _reduce(per_position, mask, reduction)


def cosine_distill(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""One minus the cosine similarity of student and teacher logit vectors (temperature ignored).

    .. math::
        \mathcal{L} = \frac{1}{M} \sum_i \left(1 - \frac{z^s_i \cdot z^t_i}{\lVert z^s_i\rVert \, \lVert z^t_i\rVert}\right)

    Example:
        >>> float(cosine_distill(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])))
        1.0
        >>> round(float(cosine_distill(torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 1.0]]))), 6)
        0.0
    """
    student_logits, teacher_logits, mask = _positions(student_logits, teacher_logits, mask)
    per_position = 1.0 - F.cosine_similarity(student_logits.float(), teacher_logits.float(), dim=-1, eps=1e-8)
    return _reduce(per_position, mask, reduction)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    r"""FitNets hint (Romero et al. 2015): mean squared error between (projected) features.

    .. math::
        \mathcal{L} = \frac{1}{N D} \sum_{i} \lVert r(f^s_i) - f^t_i \rVert_2^2

    where :math:`r` is the learned projection (applied by the caller) and :math:`D` the feature size.

    Example:
        >>> float(hint_loss(torch.zeros(2, 3), torch.ones(2, 3)))
        1.0
    """
    _check_pair(student_feature, teacher_feature, "features")
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention map of a conv feature (Zagoruyko & Komodakis 2017), L2-normalised.

    .. math::
        Q_i = \mathrm{vec}\Big(\frac{1}{C}\sum_c |f_{ic}|^p\Big), \qquad a_i = Q_i / \lVert Q_i \rVert_2

    Args:
        feature: ``(N, C, H, W)``.
        p: Exponent (2 in the paper).

    Returns:
        ``(N, H * W)``, each row of unit L2 norm.

    Example:
        >>> a = attention_map(torch.ones(1, 3, 2, 2))
        >>> a
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """
    if feature.dim() != 4:
        raise ValueError(f"attention maps need (N, C, H, W) features, got shape {tuple(feature.shape)}")
    q = feature.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, dim=1)


def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention transfer: distance between normalised spatial attention maps, any channel counts.

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_i \lVert a^s_i - a^t_i \rVert_2

    If the spatial sizes differ, the student's map is resized (bilinear) to the teacher's first.

    Example:
        >>> f = torch.rand(2, 4, 3, 3)
        >>> float(attention_transfer_loss(f, torch.cat([f, f], 1)))  # same map, other channel count
        0.0
        >>> round(float(attention_transfer_loss(torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, 0.0]]]]))), 4)
        0.7654
    """
    _check_positive(p, "p")
    if student_feature.dim() != 4 or teacher_feature.dim() != 4:
        raise ValueError(
            f"attention transfer needs (N, C, H, W) features, got student {tuple(student_feature.shape)} and "
            f"teacher {tuple(teacher_feature.shape)}"
        )
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(f"batch sizes differ: student {student_feature.shape[0]}, teacher {teacher_feature.shape[0]}")
    if student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        student_feature = F.interpolate(
            student_feature.float(), size=teacher_feature.shape[-2:], mode="bilinear", align_corners=False
        )
    diff = attention_map(student_feature, p) - attention_map(teacher_feature, p)
    return diff.norm(dim=1).mean()


class _LogitLoss(nn.Module):
    _fn: Callable[..., Tensor]

    def __init__(self, temperature: float | None = None, reduction: Reduction = "mean") -> None:
        super().__init__()
        if temperature is not None:
            _check_positive(temperature, "temperature")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.temperature = temperature
        self.reduction = reduction

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, temperature: float | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """``temperature`` given here wins over the one given at construction (default 1)."""
        t = temperature if temperature is not None else (self.temperature if self.temperature is not None else 1.0)
        return type(self)._fn(student_logits, teacher_logits, t, mask, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class KLDivDistillLoss(_LogitLoss):
    """Module form of :func:`kl_div_distill` (Hinton KD, :math:`T^2`-scaled).

    Example:
        >>> loss = KLDivDistillLoss(temperature=2.0)
        >>> float(loss(torch.zeros(3, 5), torch.zeros(3, 5)))
        0.0
    """

    _fn = staticmethod(kl_div_distill)


class MSEDistillLoss(_LogitLoss):
    """Module form of :func:`mse_distill`.

    Example:
        >>> float(MSEDistillLoss()(torch.zeros(2, 2), torch.ones(2, 2)))
        1.0
    """

    _fn = staticmethod(mse_distill)


class CosineDistillLoss(_LogitLoss):
    """Module form of :func:`cosine_distill`.

    Example:
        >>> round(float(CosineDistillLoss()(torch.ones(2, 2), torch.ones(2, 2))), 6)
        0.0
    """

    _fn = staticmethod(cosine_distill)


class HintLoss(nn.Module):
    """Module form of :func:`hint_loss`.

    Example:
        >>> float(HintLoss()(torch.zeros(1, 4), torch.zeros(1, 4)))
        0.0
    """

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return hint_loss(student_feature, teacher_feature)


class AttentionTransferLoss(nn.Module):
    """Module form of :func:`attention_transfer_loss`.

    Example:
        >>> float(AttentionTransferLoss()(torch.ones(1, 2, 2, 2), torch.ones(1, 8, 2, 2)))
        0.0
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        _check_positive(p, "p")
        self.p = p

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return attention_transfer_loss(student_feature, teacher_feature, self.p)


DISTILL_LOSSES: dict[str, Callable[..., Tensor]] = {
    "kl": kl_div_distill,
    "mse": mse_distill,
    "cosine": cosine_distill,
}


def _import(path: str, what: str = "distill_loss", names: Any = DISTILL_LOSSES) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"unknown {what} {path!r}; valid names: {sorted(names)}, or the import path of a "
            "function or nn.Module class (e.g. 'mypkg.losses.MyLoss')"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"cannot import {what} {path!r} ({err}); valid names: {sorted(names)} or an import path"
        ) from err


def _takes_temperature(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn)
    except (TypeError, ValueError):
        return False
    return any(p.name == "temperature" or p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def resolve_distill_loss(spec: str | Callable[..., Tensor]) -> tuple[Callable[[Tensor, Tensor, float], Tensor], str]:
    """Turn ``"kl"``/``"mse"``/``"cosine"``, an import path or a callable into ``fn(student, teacher, T)``.

    The returned callable is called as ``fn(student_logits, teacher_logits, temperature=T)``. A user
    callable gets ``temperature=T`` only when its signature has a ``temperature`` parameter (or
    ``**kwargs``); otherwise it is called as ``fn(student_logits, teacher_logits)``. An import path
    to a class is instantiated without arguments.

    Returns:
        The loss callable and a name for logs and reports.

    Example:
        >>> fn, name = resolve_distill_loss("kl")
        >>> name, float(fn(torch.zeros(1, 3), torch.zeros(1, 3), temperature=4.0))
        ('kl', 0.0)
        >>> fn, name = resolve_distill_loss("torch.nn.functional.l1_loss")
        >>> name, float(fn(torch.zeros(1, 3), torch.ones(1, 3), temperature=4.0))
        ('torch.nn.functional.l1_loss', 1.0)
    """
    name: str
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in DISTILL_LOSSES:
            return DISTILL_LOSSES[key], key
        obj = _import(spec.strip())
        name = spec.strip()
        if inspect.isclass(obj):
            obj = obj()
    else:
        obj = spec
        name = getattr(spec, "__qualname__", None) or type(spec).__name__
    if not callable(obj):
        raise ValueError(
            f"distill_loss must be one of {sorted(DISTILL_LOSSES)}, an import path or a callable, got {spec!r}"
        )
    if _takes_temperature(obj):
        return obj, name
    return _IgnoreTemperature(obj), name


class _IgnoreTemperature:
    """Adapter (picklable, unlike a lambda) calling a two-argument loss with the temperature dropped."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        return self.fn(student_logits, teacher_logits)


def token_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, mask: Tensor | None = None) -> Tensor:
    r"""Cross-entropy over the last dimension of ``(..., V)`` logits, averaged over the counted positions.

    .. math::
        \mathcal{L} = \frac{1}{M} \sum_{i:\, y_i \ne \text{ignore},\ \text{mask}_i} -\log \mathrm{softmax}(z_i)_{y_i}

    ``labels`` has the logits' leading shape ``(...)`` and is aligned with them: ``labels[..., t]`` is
    the target of ``logits[..., t, :]`` (no shift). No counted position gives 0, not NaN. ``(N, C)``
    logits without ``mask`` go through ``F.cross_entropy`` unchanged; other shapes are computed in
    float32 on the counted positions only (values elsewhere change neither loss nor gradients).

    Example:
        >>> z = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # (1, 2, 2): two positions
        >>> round(float(token_cross_entropy(z, torch.tensor([[0, -100]]))), 4)  # the second is ignored
        0.6931
        >>> float(token_cross_entropy(z, torch.tensor([[-100, -100]])))
        0.0
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(logits.shape[:-1])} "
            f"(logits {tuple(logits.shape)}): one label per position, aligned with the logits (shift them yourself "
            "for next-token prediction)"
        )
    keep = labels != ignore_index
    if mask is not None:
        keep = keep & mask.to(device=keep.device, dtype=torch.bool)
    if logits.dim() == 2 and mask is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index) if bool(keep.any()) else logits[:0].sum()
    picked = logits[keep].float()
    total = F.cross_entropy(picked, labels[keep], reduction="sum")
    return total / torch.clamp(torch.as_tensor(picked.shape[0], dtype=total.dtype, device=total.device), min=1)


class TokenCrossEntropy:
    """``token_cross_entropy`` with a fixed ``ignore_index``, as a ``(logits, labels) -> loss`` callable.

    Example:
        >>> float(TokenCrossEntropy()(torch.zeros(2, 4), torch.tensor([1, -100]))) == float(torch.tensor(4.0).log())
        True
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = checked_ignore_index(ignore_index)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return token_cross_entropy(logits, labels, self.ignore_index)


TASK_LOSSES = ("cross_entropy", "none")


def resolve_task_loss(
    spec: str | Callable[[Tensor, Tensor], Tensor] | None, ignore_index: int = -100
) -> tuple[Callable[[Tensor, Tensor], Tensor] | None, str]:
    """The hard-label loss: ``"cross_entropy"`` (:class:`TokenCrossEntropy`), ``"none"`` (``None``: no
    hard-label term), the import path of a function or ``nn.Module`` class (instantiated without
    arguments), or a callable ``fn(student_logits, labels) -> loss``.

    Returns:
        The callable (or ``None``) and a name for logs and reports.

    Example:
        >>> fn, name = resolve_task_loss("cross_entropy")
        >>> name, type(fn).__name__
        ('cross_entropy', 'TokenCrossEntropy')
        >>> resolve_task_loss("none")
        (None, 'none')
        >>> resolve_task_loss("torch.nn.functional.nll_loss")[1]
        'torch.nn.functional.nll_loss'
    """
    if spec is None:
        return None, "none"
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "cross_entropy":
            return TokenCrossEntropy(ignore_index), key
        if key == "none":
            return None, key
        obj = _import(spec.strip(), "task_loss", TASK_LOSSES)
        obj = obj() if inspect.isclass(obj) else obj
        name = spec.strip()
    else:
        obj, name = spec, getattr(spec, "__qualname__", None) or type(spec).__name__
    if not callable(obj):
        raise ValueError(f"task_loss must be one of {list(TASK_LOSSES)}, an import path or a callable, got {spec!r}")
    return obj, name
