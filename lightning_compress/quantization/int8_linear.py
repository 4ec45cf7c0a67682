"""The static int8 x int8 Linear of converted models (:class:`Int8Linear`), over ``torch._int_mm`` with an
exact per-layer fallback where that kernel has no support."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization.fake_quant import input_levels, quantize_weight
from lightning_compress.quantization.lowbit import _PackedLayer

__all__ = ["Int8Linear"]


class Int8Linear(_PackedLayer):
    """Static int8 Linear: int8 inputs (learned range) x int8 weights (learned scales) via ``torch._int_mm``.

    ``y = s_x s_w (x_q W_q^T) - s_x s_w z_x sum(W_q) + b`` with the zero-point term folded into the
    bias. Exactly the arithmetic of the fake-quant layer, done in integers. One buffer, ``packed``:
    the transposed int8 weight (:attr:`weight_t`), then float32 output scales and biases
    (:attr:`affine`) and the input scale and zero point (:attr:`input_qparams`). The fast CPU path
    once compiled or packaged (``compile_for_cpu``, ``export_for_cpu``).

    Called eagerly, the layer quantises its input in place on one fresh tensor (division, rounding,
    zero point, clamp: the rounding of the fake-quant layer, bit for bit), multiplies with
    ``torch._int_mm`` at every row count and dequantises with one ``addcmul``. On LeNet-300-100 (one
    thread) that is 2.2x float at batch 64 and 0.75x at batch 1: at one row each of those elementwise
    kernels costs about as much as the int8 product of a 300x100 layer, and no other exact kernel is
    cheaper there (docs/quantization.md, "Eager speed"). Under ``torch.compile``/``torch.export`` the
    same arithmetic is traced out of place (:meth:`_traced_forward`), for inductor to fuse.

    ``torch._int_mm`` takes any shape on the CPU. On CUDA it needs more than 16 rows and both sizes of
    the weight to be multiples of 8 (a 10-class head is not), and other devices have no kernel at all
    (:meth:`int_mm_unsupported` says why, or ``None``). There the layer computes the same integer
    product in float64 instead (:meth:`int_matmul_fallback`: the int8 values and their sums are exact
    in float64, so the output is the one ``torch._int_mm`` gives) and warns once per layer, naming its
    shape and the reason. On CUDA ``torch._int_mm`` is no speed path anyway (0.16-0.19x a bf16 matmul
    on an H200); this keeps converted models runnable there.
    """

    #: Compute every ``Int8Linear`` with :meth:`int_matmul_fallback` (to test or compare the two paths).
    force_fallback: bool = False

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(in_features * out_features, 2 * out_features + 2)
        self._fallback_warned = False

    @property
    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @property
    def weight_t(self) -> Tensor:
        """``(in_features, out_features)`` int8 (a view of ``packed``)."""
        return self._weight_bytes_view().view(torch.int8).view(self.in_features, self.out_features)

    @property
    def affine(self) -> Tensor:
        """Rows: output scale ``s_x s_w``, output bias (zero-point term folded in)."""
        return self.params[: 2 * self.out_features].view(2, self.out_features)

    @property
    def input_qparams(self) -> Tensor:
        """Input scale and zero point (signed: ``zp - 128``)."""
        return self.params[2 * self.out_features :]

    @classmethod
    def from_layer(cls, layer: nn.Module) -> Int8Linear:
        """The fake-quant Linear's integers and scales, computed in its weight's dtype as its evaluation
        computes them (see :meth:`LowBitLayer.from_layer`)."""
        qz = layer.quantizer
        w = layer.weight.detach()
        q, sw = quantize_weight(w, 8, qz.granularity, qz.inference_rounding)
        sx, zx = (t.float() for t in qz.activation_qparams(w.dtype))
        sw = sw.float()
        zs = zx - 128
        out = cls(layer.in_features, layer.out_features)
        sw = sw.reshape(-1).expand(layer.out_features)
        out.weight_t.copy_(q.t())
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(layer.out_features, device=q.device)
        out.affine[0].copy_(sw * sx)
        out.affine[1].copy_(bias - zs * q.float().sum(1) * sw * sx)
        out.input_qparams.copy_(torch.stack([sx, zs]))
        return out.to(layer.weight.device)

    @property
    def weight(self) -> Tensor:
        """The dequantised ``(out_features, in_features)`` float32 weight ``s_w W_q`` (detached; computed once
        and cached, not in ``state_dict``). The layer itself multiplies the int8 values."""
        return self._memo(self._float_weight, "weight")

    @property
    def bias(self) -> Tensor:
        """The float bias (the zero-point term folded into the output bias taken out again; zeros when
        the layer had none). Cached like :attr:`weight`."""
        return self._memo(self._float_bias, "bias")

    def _float_weight(self) -> Tensor:
        s_w = self.affine[0] / self.input_qparams[0]
        return (self.weight_t.t().float() * s_w[:, None]).detach()

    def _float_bias(self) -> Tensor:
        scale, folded = self.affine
        return (folded + self.input_qparams[1] * self.weight_t.float().sum(0) * scale).detach()

    def float_parameters(self) -> tuple[Tensor, Tensor | None]:
        return self._float_weight(), self._float_bias()

    def _views(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        a, qp = self.affine, self.input_qparams
        return self.weight_t, a[0], a[1], qp[0], qp[1]

    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self._memo(self._views)

    @staticmethod
    def int_mm_unsupported(device: torch.device, rows: int, in_features: int, out_features: int) -> str | None:
        """Why ``torch._int_mm`` cannot multiply ``(rows, in_features)`` by ``(in_features, out_features)``
        int8 matrices on ``device``; ``None`` when it can.

        Example:
            >>> Int8Linear.int_mm_unsupported(torch.device("cpu"), 1, 5, 10) is None
            True
            >>> Int8Linear.int_mm_unsupported(torch.device("cuda"), 64, 64, 10)
            'torch._int_mm on CUDA needs the output width (10) to be a multiple of 8'
            >>> Int8Linear.int_mm_unsupported(torch.device("cuda", 0), 17, 64, 64) is None
            True
        """
        if device.type == "cpu":
            return None
        if device.type != "cuda":
            return f"torch._int_mm has no kernel for {device.type} tensors"
        needs = []
        if rows <= 16:
            needs.append(f"more than 16 rows (got {rows})")
        if in_features % 8:
            needs.append(f"the input width ({in_features}) to be a multiple of 8")
        if out_features % 8:
            needs.append(f"the output width ({out_features}) to be a multiple of 8")
        return f"torch._int_mm on CUDA needs {' and '.join(needs)}" if needs else None

    @staticmethod
    def int_matmul_fallback(xq: Tensor, w: Tensor) -> Tensor:
        """``torch._int_mm(xq, w)`` (int8 x int8 -> int32) without it: a float64 matmul, exact for int8
        values (each product is at most 2**14, a row's sum far below 2**53), cast back to int32. Float64
        is also untouched by autocast (``bf16-mixed``) and TF32.

        Example:
            >>> a = torch.randint(-128, 128, (3, 5), dtype=torch.int8)
            >>> b = torch.randint(-128, 128, (5, 10), dtype=torch.int8)
            >>> torch.equal(Int8Linear.int_matmul_fallback(a, b), torch._int_mm(a, b))
            True
        """
        return torch.mm(xq.to(torch.float64), w.to(torch.float64)).to(torch.int32)

    @torch.compiler.disable
    def _warn_fallback(self, reason: str) -> None:
        self._fallback_warned = True
        warnings.warn(
            f"Int8Linear(in_features={self.in_features}, out_features={self.out_features}): {reason}; this layer "
            "computes its int8 product with a float64 matmul instead (the same result, slower)",
            UserWarning,
            stacklevel=3,
        )

    def _int_matmul(self, xq: Tensor, w: Tensor) -> Tensor:
        """``xq @ w`` in int32: ``torch._int_mm`` where it has a kernel for these shapes (on the CPU: every
        shape), else :meth:`int_matmul_fallback` (warned once per layer)."""
        if self.force_fallback:
            reason: str | None = "Int8Linear.force_fallback is set"
        elif xq.is_cpu:
            return torch._int_mm(xq, w)
        else:
            reason = self.int_mm_unsupported(xq.device, xq.shape[0], self.in_features, self.out_features)
            if reason is None:
                return torch._int_mm(xq, w)
        if not getattr(self, "_fallback_warned", False):
            self._warn_fallback(reason)
        return self.int_matmul_fallback(xq, w)

    def forward(self, input: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(input)
        # Eager: every elementwise kernel costs ~1-2 us at one row, as much as the int8 product of a
        # 300x100 layer, so the input is quantised in place on one fresh tensor (the same operations in
        # the same order as the traced path: the same int8 values) and the output dequantised by one
        # fused multiply-add.
        w, out_scale, out_bias, in_scale, in_zero = self._parts()
        if len(self._cache) > 1:  # its float weight or bias was read and may have been changed: this product does not
            self.check_unchanged()  # use them, so a change there would be lost; checked once per read
            self._cache = {"parts": self._cache["parts"]}
        flat = input.dim() == 2
        x = input if flat else input.reshape(-1, self.in_features)
        q = input_levels(x, in_scale, in_zero, -128, 127)
        y = torch.addcmul(out_bias, self._int_matmul(q.char(), w), out_scale)  # .char(): int8, 1 us less than .to
        if y.dtype != input.dtype:
            y = y.to(input.dtype)
        return y if flat else y.reshape(*input.shape[:-1], self.out_features)

    def _traced_forward(self, input: Tensor) -> Tensor:
        # under torch.compile/torch.export: out-of-place ops, which inductor fuses into one kernel
        # around the product
        w, out_scale, out_bias, in_scale, in_zero = self._parts()
        x = input.reshape(-1, self.in_features)
        xq = torch.clamp(torch.round(x / in_scale) + in_zero, -128, 127).to(torch.int8)
        y = torch.addcmul(out_bias, self._int_matmul(xq, w), out_scale)  # as in eager: a graph run op by op gives the same bits
        return y.to(input.dtype).reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8"
