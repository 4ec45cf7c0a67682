"""Fake quantisation in plain PyTorch: rounding, symmetric weight scales, EMA min/max observers, STE.

Everything here is a pure function on tensors or a small module, tested without a Trainer.

Weights are quantised symmetrically: with ``qmax = 2 ** (bits - 1) - 1`` and a scale per output
channel (``granularity="per_channel"``), per tensor, or per group of ``g`` consecutive input weights,

.. math::

    s = \\max |w| / q_{max}, \\qquad q = \\operatorname{clamp}(\\operatorname{round}(w / s), -q_{max}, q_{max}),
    \\qquad \\hat w = s\\, q

so a weight that is exactly zero stays exactly zero (pruning masks survive quantisation). Input
activations are quantised asymmetrically to ``[0, 255]`` over an exponential-moving-average
``[min, max]`` range that always contains zero. Gradients pass straight through the rounding (STE);
for activations they are zero outside the observed range (clipped STE).

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.75, -1.0], [0.25, 0.0, 0.5]])
    >>> fake_quantize_weight(w, bits=2).tolist()
    [[0.0, 1.0, -1.0], [0.0, 0.0, 0.5]]
    >>> q, s = quantize_weight(w, bits=8)
    >>> q.dtype, s.shape, int(q[0, 2]), int(q[0, 0])
    (torch.int8, torch.Size([2, 1]), -127, 0)
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_compress.token_mask import token_extremes

__all__ = [
    "ROUNDING",
    "Granularity",
    "MinMaxObserver",
    "activation_qparams",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "input_levels",
    "quantize_weight",
    "round_values",
    "weight_scale",
]

ROUNDING = ("nearest", "floor", "stochastic")
Granularity = Union[str, int]
_EPS = 1e-12
_INF = float("inf")
#: The smallest scale where ``_EPS`` is not representable: float16 rounds 1e-12 to 0, and an all-zero row
#: (a pruned channel) would then divide 0 by 0; its smallest subnormal, 2**-24, is the floor there.
_SCALE_FLOOR = {torch.float16: 2.0**-24}
#: The smallest input scale (float16 has its own, :data:`_SCALE_FLOOR`).
_ACTIVATION_SCALE_FLOOR = 1e-8


def round_values(x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Tensor:
    """Round ``x`` to integers: ``nearest`` (half to even), ``floor``, or ``stochastic``.

    ``stochastic`` rounds up with probability equal to the fractional part (unbiased in expectation);
    zero stays zero under all three.
    """
    if rounding == "nearest":
        return torch.round(x)
    if rounding == "floor":
        return torch.floor(x)
    if rounding == "stochastic":
        # drawn and added in float32 at least: a bfloat16 sum rounds before the floor (100 + u came out 100.25 on
        # average, fractions were skewed upward)
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        noise = torch.rand(wide.shape, generator=generator, device=x.device, dtype=wide.dtype)
        return torch.floor(wide + noise).to(x.dtype)
    raise ValueError(f"unknown rounding {rounding!r}; valid choices: {list(ROUNDING)}")


def _grouped(w: Tensor, granularity: Granularity) -> Tensor:
    """View of ``w`` as ``(out, groups, group_size)`` for the scale reduction (one view: the rounding runs
    once per layer and step, where each extra op is host time a GPU waits for)."""
    if granularity == "per_channel":
        return w.reshape(w.shape[0], 1, -1)
    if granularity == "per_tensor":
        return w.reshape(1, 1, -1)
    if isinstance(granularity, int) and not isinstance(granularity, bool):
        per_channel = w.numel() // w.shape[0] if w.shape[0] else 0
        if per_channel % granularity:
            raise ValueError(
                f"group size {granularity} does not divide the {per_channel} weights per output channel"
            )
        return w.reshape(w.shape[0], -1, granularity)
    raise ValueError(f"unknown granularity {granularity!r}; valid: 'per_channel', 'per_tensor' or a group size (int)")


def weight_scale(w: Tensor, bits: int, granularity: Granularity = "per_channel") -> Tensor:
    """Symmetric scales ``max|w| / (2**(bits-1) - 1)``, shaped ``(out, groups, 1)`` (broadcast on :func:`_grouped`).

    Per-channel gives ``(out, 1, 1)``, per-tensor ``(1, 1, 1)``, groups of ``g`` ``(out, in/g, 1)``.
    """
    return _scale_of_groups(_grouped(w.detach(), granularity), bits)


def _scale_of_groups(g: Tensor, bits: int) -> Tensor:
    """:func:`weight_scale` of a :func:`_grouped` view (divided and clamped in place on the fresh norms).

    The largest magnitude is one fused reduction (the infinity norm) on accelerators; on the CPU that
    kernel is not vectorised (1.6 ms against 0.08 ms for ``|g|.amax`` on a 768 x 768 weight, one
    thread), so there it is ``|g|.amax``, the same value.
    """
    if g.is_cpu:
        amax = g.abs().amax(dim=-1, keepdim=True)
    else:
        amax = torch.linalg.vector_norm(g, ord=_INF, dim=-1, keepdim=True)
    qmax = 2 ** (bits - 1) - 1
    scale = amax.div_(qmax).clamp_min_(_SCALE_FLOOR.get(amax.dtype, _EPS))
    if scale.dtype == torch.float16:  # near 65504 the rounded scale times qmax overflows: the largest weight became inf
        scale = torch.where(scale * qmax > torch.finfo(torch.float16).max, torch.nextafter(scale, torch.zeros_like(scale)), scale)
    return scale


def _weight_levels(
    g: Tensor, scale: Tensor, bits: int, rounding: str, generator: torch.Generator | None
) -> Tensor:
    """Integer levels ``clamp(round(g / s), -qmax, qmax)`` (as floats): the one grid that both the
    fake-quantised weights and the converted integers are taken from. One new tensor, rounded in place.

    In float32 (and float64), with the scales of :func:`weight_scale` (``s >= max|g| / qmax``, rounded),
    ``|g / s|`` exceeds ``qmax`` by a few units in the last place at most, so rounding to nearest stays
    within ``[-qmax, qmax]`` and the clamp is skipped: one kernel less per layer and step. Rounding down
    (``-qmax`` minus an ulp floors to ``-qmax - 1``), stochastic rounding, and the coarser bfloat16 and
    float16 scales (``max|g| / s`` can round to ``qmax + 0.5``) keep the clamp. Half-precision weights are
    divided in float32 (the levels come back in float32): a bfloat16 quotient has steps of 0.5 at 100, so
    rounding it put a weight up to a whole level from its nearest one. Rounding down, the weight of a group's
    largest magnitude (``qmax`` steps of its scale, by definition), when positive, is level ``qmax`` even where the
    rounded scale puts the quotient an ulp below it (unless the scale was raised to its floor).
    """
    qmax = 2 ** (bits - 1) - 1
    exact = g.dtype in (torch.float32, torch.float64)
    x = g / scale if exact else g.float() / scale.float()
    if rounding == "nearest":
        x.round_()
        return x if exact else x.clamp_(-qmax, qmax)
    if rounding == "floor":
        # the weight of a group's largest magnitude is qmax steps of its scale: when positive, level qmax (a negative
        # one floors to -qmax or below, which the clamp takes to -qmax). Not where the scale was raised to its floor
        # (a group of weights below 1e-10, or of zeros): there no weight is qmax steps, and its quotient is far below
        top = (x >= qmax - 0.5) & (g == g.abs().amax(dim=-1, keepdim=True))
        x.floor_().clamp_(-qmax, qmax)
        return x.masked_fill_(top, qmax)
    return round_values(x, rounding, generator).clamp_(-qmax, qmax)


def quantize_weight(
    w: Tensor,
    bits: int = 8,
    granularity: Granularity = "per_channel",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Integer weights (``int8`` dtype, values in ``[-qmax, qmax]``) shaped like ``w``, and their scales.

    The scales come back squeezed: ``(out, 1)`` per channel, ``(1, 1)`` per tensor, ``(out, groups)``
    for groups.
    """
    scale = weight_scale(w, bits, granularity)
    q = _weight_levels(_grouped(w.detach(), granularity), scale, bits, rounding, generator)
    return q.reshape(w.shape).to(torch.int8), scale.squeeze(-1)


def dequantize_weight(q: Tensor, scale: Tensor, granularity: Granularity = "per_channel") -> Tensor:
    """Inverse of :func:`quantize_weight`: ``s * q`` in float32, shaped like ``q``."""
    g = _grouped(q.to(scale.dtype), granularity)
    return (g * scale.unsqueeze(-1)).reshape(q.shape)


class _StraightThrough(torch.autograd.Function):
    """``s * round(w / s)`` forward, the incoming gradient unchanged backward. Nothing is saved for the
    backward pass and no graph is built through the rounding: two elementwise passes fewer than
    ``w + (q - w).detach()``, and no ``w``-sized tensors kept alive."""

    @staticmethod
    def forward(ctx: object, w: Tensor, bits: int, granularity: Granularity, rounding: str, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.dtype = w.dtype  # type: ignore[attr-defined]
        g = _grouped(w, granularity)  # autograd records nothing in here: no detach needed
        scale = _scale_of_groups(g, bits)
        levels = _weight_levels(g, scale, bits, rounding, generator)
        if dtype == levels.dtype:
            return levels.mul_(scale).view(w.shape)
        # written once in the result's dtype (the product is computed in float32, then cast: the same
        # values as .mul_ then .to, one kernel less)
        return torch.mul(levels, scale, out=torch.empty(levels.shape, dtype=dtype, device=levels.device)).view(w.shape)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dtype = ctx.dtype  # type: ignore[attr-defined]
        return grad if grad.dtype == dtype else grad.to(dtype), None, None, None, None, None


def fake_quantize_weight(
    w: Tensor,
    bits: int = 8,
    granularity: Granularity = "per_channel",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``s * round(w / s)`` in the forward pass, identity gradient (straight-through estimator).

    ``dtype``: the result's dtype (default ``w``'s). A layer whose op autocast would cast anyway passes
    the autocast dtype, so the rounded weight is written once, already in ``bfloat16``.
    """
    return _StraightThrough.apply(w, bits, granularity, rounding, generator, dtype or w.dtype)


def activation_qparams(
    min_val: Tensor, max_val: Tensor, bits: int = 8, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Asymmetric ``(scale, zero_point)`` mapping ``[min, max]`` (widened to contain 0) onto ``[0, 2**bits - 1]``.

    ``dtype``: the dtype of the inputs they quantise (default: that of ``min_val``). Both come back in it,
    the scale rounded to it, as the inputs' own arithmetic uses them. The scale is at least ``1e-8``
    (``2**-24`` in float16, where ``1e-8`` is 0): an input that was always 0 (behind a dead ReLU) has the
    range ``[0, 0]``, and a zero scale would divide 0 by 0.

    Example:
        >>> s, z = activation_qparams(torch.tensor(-1.0), torch.tensor(3.0), bits=2)
        >>> round(s.item(), 4), z.item()
        (1.3333, 1.0)
        >>> s, z = activation_qparams(torch.tensor(0.0), torch.tensor(0.0), dtype=torch.float16)
        >>> s.dtype, s.item() == 2.0**-24
        (torch.float16, True)
        >>> fake_quantize_activation(torch.tensor([0.0, 1.0], dtype=torch.float16), s, z).tolist()
        [0.0, 1.519918441772461e-05]
    """
    qmax = 2**bits - 1
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    floor = max(_ACTIVATION_SCALE_FLOOR, _SCALE_FLOOR.get(min_val.dtype, 0.0), _SCALE_FLOOR.get(dtype, 0.0))
    scale = ((hi - lo) / qmax).clamp_min(floor)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    if dtype is None or dtype == scale.dtype:
        return scale, zero_point
    return scale.to(dtype), zero_point.to(dtype)


def input_levels(x: Tensor, scale: Tensor, zero_point: Tensor, lowest: int, highest: int) -> Tensor:
    """Integer input levels ``clamp(round(x / s) + z, lowest, highest)`` (as floats) on one new tensor,
    rounded in place: the fake-quant layer's and the converted int8 layer's (which shifts ``z`` and the
    range by -128 to fit int8), so both take the same levels from the same input."""
    return x.div(scale).round_().add_(zero_point).clamp_(lowest, highest)


def _quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    """``s * (clamp(round(x / s) + z, 0, qmax) - z)`` on one new tensor (:func:`input_levels`, and back)."""
    return input_levels(x, scale, zero_point, 0, qmax).sub_(zero_point).mul_(scale)


class _ClippedStraightThrough(torch.autograd.Function):
    """:func:`_quantize_dequantize` forward; backward, the gradient where ``x`` lies in the representable
    range ``[-z s, (qmax - z) s]`` and zero outside (what ``torch.clamp`` to that range passes). Six
    elementwise kernels forward, where clamping first and adding the rounding as a detached difference
    took nine; ``x`` is saved, as the clamp saved it."""

    @staticmethod
    def forward(ctx: object, x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scale, zero_point)  # type: ignore[attr-defined]
        ctx.qmax = qmax  # type: ignore[attr-defined]
        return _quantize_dequantize(x, scale, zero_point, qmax)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, scale, zero_point = ctx.saved_tensors  # type: ignore[attr-defined]
        lo, hi = (0 - zero_point) * scale, (ctx.qmax - zero_point) * scale  # type: ignore[attr-defined]
        inside = torch.clamp(x, lo, hi) == x  # False for NaN, as x >= lo and x <= hi would be
        return torch.where(inside, grad, 0.0), None, None, None


def fake_quantize_activation(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8) -> Tensor:
    """Quantise-dequantise ``x`` on the grid ``scale * (k - zero_point)``, ``k`` in ``[0, 2**bits - 1]``.

    Clipped STE: the gradient is 1 inside the representable range, 0 outside. Without a gradient to
    compute (inference, export) it is the plain arithmetic, no autograd Function.
    """
    qmax = 2**bits - 1
    if torch.is_grad_enabled() and x.requires_grad:
        return _ClippedStraightThrough.apply(x, scale, zero_point, qmax)
    return _quantize_dequantize(x, scale, zero_point, qmax)


def _version(t: Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place write); ``None`` inside a compiled graph, which has
    no such value, and for an inference-mode tensor, which has no counter."""
    if torch.compiler.is_compiling():
        return None
    try:
        return t._version
    except RuntimeError:
        return None


class MinMaxObserver(nn.Module):
    """Running range of a tensor: exponential moving average of per-batch min/max.

    ``momentum=None`` keeps the running extreme instead (used for post-training calibration). A batch
    holding an infinite or NaN value leaves the range as it was (the first finite batch starts it). The
    padded positions of a batch with an integer ``attention_mask`` are left out
    (:func:`lightning_compress.token_mask.token_extremes`). Under
    ``torch.distributed`` the per-batch min/max are all-reduced first, so every rank holds the same
    range. Buffers are non-persistent: the callback saves them in its own state, so checkpoints keep
    the plain model's keys and load strictly into the float model.

    Example:
        >>> obs = MinMaxObserver(momentum=0.5)
        >>> obs.update(torch.tensor([-1.0, 2.0])); obs.update(torch.tensor([0.0, 4.0]))
        >>> obs.update(torch.tensor([0.0, float("inf")]))  # left out
        >>> obs.min_val.item(), obs.max_val.item()
        (-0.5, 3.0)
    """

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"observer momentum must be in (0, 1] or None, got {momentum!r}")
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0), persistent=False)
        self.register_buffer("max_val", torch.tensor(0.0), persistent=False)
        self.register_buffer("initialized", torch.tensor(False), persistent=False)
        self._remember(False)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach()
        extremes = token_extremes(x)  # a padded position of a (batch, seq_len, features) input is left out
        if extremes is not None:
            lo, hi = extremes[0].float(), extremes[1].float()
        elif x.numel():
            lo, hi = x.min().float(), x.max().float()
        else:
            lo = hi = torch.zeros((), device=self.min_val.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = torch.stack([-lo, hi])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # max of -min == -(min of mins)
            lo, hi = -stats[0], stats[1]
        # a batch with an infinite or NaN value (a float16 overflow, a step the GradScaler then skips) leaves the
        # range as it was: taken in, it would make every later forward NaN
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        if not self.is_initialized():  # the first batch, or batches so far all non-finite: no branch on a value
            self.min_val.copy_(torch.where(finite, lo, self.min_val))
            self.max_val.copy_(torch.where(finite, hi, self.max_val))
            self.initialized.copy_(self.initialized | finite)
            # taken as initialized inside a compiled graph (no graph break); read from the buffer at the next eager call
            self.__dict__["_known"] = (self.initialized, None, True)
        elif self.momentum is None:
            self.min_val.copy_(torch.where(finite, torch.minimum(self.min_val, lo), self.min_val))
            self.max_val.copy_(torch.where(finite, torch.maximum(self.max_val, hi), self.max_val))
        else:
            self.min_val.copy_(torch.where(finite, self.min_val.lerp(lo.to(self.min_val), self.momentum), self.min_val))
            self.max_val.copy_(torch.where(finite, self.max_val.lerp(hi.to(self.max_val), self.momentum), self.max_val))

    def _apply(self, fn: Any, recurse: bool = True) -> MinMaxObserver:
        """Moves follow the module; the range stays float32 when the module is cast (``precision="bf16-true"``,
        ``.half()``): a bfloat16 moving average stops moving once an update is below half its step (a range held
        at 0.80 where the data reach 0.93, with momentum 0.01)."""
        before = {name: self._buffers[name] for name in ("min_val", "max_val")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:  # cast: the float32 values, moved only
                self._buffers[name] = old.to(device=new.device)
        return self

    def is_initialized(self) -> bool:
        """``bool(initialized)``, read from the device once and then kept until the buffer is written to
        or replaced (its version counter says so): a training step on a GPU calls it for every layer, and a
        device-to-host read per layer would make the host wait for the device at each of them. (A write
        through ``.data`` does not count as one: write with :meth:`set_initialized`.)

        Inside a compiled graph (``torch.compile`` of a model holding fake-quant layers), which can branch
        neither on a tensor's value nor on its version, it is the value last read or written outside
        the graph or by :meth:`update` and :meth:`set_initialized`: no graph break per layer.
        """
        buf, known = self.initialized, self.__dict__.get("_known")
        if torch.compiler.is_compiling():
            return known[2] if known is not None else self._remember(bool(buf))
        version = _version(buf)
        if version is not None and known is not None and known[0] is buf and known[1] == version:
            return known[2]
        return self._remember(bool(buf))

    def set_initialized(self, value: bool) -> None:
        """Write ``initialized`` (restoring a saved range, or after the first observed batch)."""
        self.initialized.fill_(value)
        self._remember(value)

    def _remember(self, value: bool) -> bool:
        buf = self.initialized
        self.__dict__["_known"] = (buf, _version(buf), value)  # no version: the next eager call reads the buffer again
        return value

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"
