"""Conversion of a fake-quantised model to real low-bit storage and kernels.

Per layer, :func:`convert_fake_quant` picks a path that runs on CPU and reuses the learned scales:

============================  ======================  =====================================================
layer                         ``backend="auto"``      ``backend="torchao"``
============================  ======================  =====================================================
Linear, 8-bit, act. 8-bit     :class:`Int8Linear`     torchao ``Int8Tensor`` (learned weight scales, dynamic
                              (static int8 x int8,    per-token activations: the learned activation range
                              ``torch._int_mm``)      is not used)
Linear, 8-bit, weight-only    :class:`LowBitLayer`    torchao ``Int8Tensor`` (learned scales)
Conv2d, 8-bit                 :class:`LowBitLayer`    torchao ``IntxWeightOnlyConfig(int8)`` (its own scales,
                                                      no activation quantisation)
2..7 bits, Conv1d, Embedding  :class:`LowBitLayer`    same
============================  ======================  =====================================================

:class:`LowBitLayer` stores 2..4-bit weights packed two per byte (``uint8``), 5..8-bit ones as
``int8``, with float32 scales, in one buffer per layer; it dequantises on the fly and applies the
same static input quantisation as the fake-quant layer, so its predictions match the fake-quant model. torchao's own int4 formats
need CUDA or extra packages on CPU (and ``IntxWeightOnlyConfig(int4)`` stores one value per byte),
hence the packed module.

Example:
    >>> import torch
    >>> q = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    >>> packed = pack_int4(q)
    >>> packed.dtype, packed.numel(), unpack_int4(packed, 5).tolist()
    (torch.uint8, 3, [-8, 7, 0, -1, 3])
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress._files import check_crc32_hex, crc32_hex, load_safetensors_file, load_torch_file, sniff
from lightning_compress.quantization.fake_quant import (
    dequantize_weight,
    fake_quantize_activation,
    quantize_weight,
    weight_scale,
)
from lightning_compress.quantization.layers import fake_quant_layers, layer_kind

__all__ = [
    "BACKENDS",
    "Int8Linear",
    "LowBitLayer",
    "batchnorm_pairs",
    "convert_fake_quant",
    "import_torchao",
    "load_quantized",
    "pack_int4",
    "save_quantized",
    "unpack_int4",
]

BACKENDS = ("auto", "torchao")


class _DropCudaExtensionNoise(logging.Filter):
    """Drop torchao's notices about CUDA-only extensions that cannot load on CPU (nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Failed to load") and ".so" in msg:
            return False
        return not ("KernelPreference" in msg and "register_constant" in msg)


def _install_log_filters() -> None:
    noise = _DropCudaExtensionNoise()
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropCudaExtensionNoise) for f in logger.filters):
            logger.addFilter(noise)


def import_torchao() -> Any:
    """Import ``torchao.quantization`` with its CPU-irrelevant CUDA-extension notices filtered out."""
    _install_log_filters()
    import torchao.quantization as tq

    return tq


_install_log_filters()  # also covers a later ``import torchao`` elsewhere in the process


# ----------------------------------------------------------------------------------------- packing
def pack_int4(q: Tensor) -> Tensor:
    """Pack signed 4-bit values (``int8`` tensor in ``[-8, 7]``) two per byte, low nibble first."""
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"values out of the signed 4-bit range [-8, 7]: [{int(flat.min())}, {int(flat.max())}]")
    nibbles = (flat & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` signed values as ``int8``."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    vals = torch.stack([lo, hi], dim=1).reshape(-1)[:numel]
    return torch.where(vals > 7, vals - 16, vals)


# ----------------------------------------------------------------------------------------- modules
def _clear_cache_hook(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    module.clear_cache()


def _params_offset(weight_bytes: int) -> int:
    """Byte offset of the float32 section of a packed buffer: after the weights, aligned to 4 bytes."""
    return (weight_bytes + 3) // 4 * 4


class _PackedLayer(nn.Module):
    """Base of the converted layers: one ``uint8`` buffer ``packed`` holding the integer weights, then
    (4-byte aligned) the float32 parameters. One tensor per layer keeps the file small: every tensor
    record of a ``torch.save`` archive costs a few hundred bytes, as much as the scales of a small conv.
    Views into the buffer are cached outside ``torch.compile`` and dropped whenever the buffer may
    change (``load_state_dict``, ``.to()``) or the module is copied."""

    def _init_packed(self, weight_bytes: int, n_params: int) -> None:
        self._weight_bytes = weight_bytes
        self._offset = _params_offset(weight_bytes)
        self.register_buffer("packed", torch.zeros(self._offset + 4 * n_params, dtype=torch.uint8))
        self._cache: Any = None
        self._register_load_state_dict_pre_hook(_clear_cache_hook, with_module=True)

    def _weight_bytes_view(self) -> Tensor:
        return self.packed[: self._weight_bytes]

    @property
    def params(self) -> Tensor:
        """The float32 section of ``packed`` (a view: writes go to the buffer)."""
        return self.packed[self._offset :].view(torch.float32)

    def clear_cache(self) -> None:
        """Forget cached views/unpacked weights (also dropped whenever ``packed`` is replaced or
        changed in place, and kept apart for inference mode)."""
        self._cache = None

    def _memo(self, build: Any) -> Any:
        """``build()``, cached while ``packed`` stays the same tensor at the same version, per mode:
        a replaced buffer (functional_call, assignment) has another address, an in-place change bumps
        the version, and tensors made under inference_mode cannot serve autograd later. While being
        compiled or exported the views are built in the graph (traced tensors have no address)."""
        if torch.compiler.is_compiling():
            return build()
        key = (self.packed.data_ptr(), self.packed._version, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, build())
        return self._cache[1]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_cache": None}


class LowBitLayer(_PackedLayer):
    """A Linear/Conv1d/Conv2d/Embedding whose weight is stored as packed low-bit integers.

    One buffer, ``packed`` (``uint8``): the weights (two per byte for ``bits <= 4``, else one ``int8``
    per byte), then float32 ``params``: the scales (one per channel/group), the bias, and for layers
    with quantised inputs the input scale and zero point (views: :attr:`qweight`, :attr:`scale`,
    :attr:`bias`). The forward calls the float op on the dequantised weight, which eager mode unpacks
    once and caches (not saved: the file stays packed; the cache is dropped by :meth:`clear_cache`,
    ``load_state_dict`` or ``.to()``). A storage format, not a faster kernel: the int8 Linear path is
    the fast one on CPU.

    Args:
        spec: Plain description (``kind``, ``weight_shape``, ``bits``, ``granularity``, op arguments);
            kept on ``self.spec`` so the layer can be rebuilt empty before ``load_state_dict``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        numel = math.prod(spec["weight_shape"])
        n_scale = math.prod(spec["scale_shape"])
        n_act = 2 if spec.get("activation_bits") else 0
        self._init_packed((numel + 1) // 2 if spec["bits"] <= 4 else numel, n_scale + int(spec.get("bias") or 0) + n_act)

    @property
    def qweight(self) -> Tensor:
        """The integer weights: ``uint8`` two per byte for ``bits <= 4``, else ``int8`` (a view)."""
        raw = self._weight_bytes_view()
        return raw if self.spec["bits"] <= 4 else raw.view(torch.int8)

    @property
    def scale(self) -> Tensor:
        return self.params[: math.prod(self.spec["scale_shape"])].reshape(self.spec["scale_shape"])

    @property
    def bias(self) -> Tensor | None:
        n, b = math.prod(self.spec["scale_shape"]), int(self.spec.get("bias") or 0)
        return self.params[n : n + b] if b else None

    def _input_qparams(self) -> tuple[Tensor, Tensor] | None:
        if not self.spec.get("activation_bits"):
            return None
        return self.params[-2], self.params[-1]

    @staticmethod
    def spec_of(layer: nn.Module, bits: int, granularity: Any, activation_bits: int | None, bias: int | None = None) -> dict[str, Any]:
        """The spec of ``layer`` (a float or fake-quant Linear/Conv/Embedding) stored with these settings;
        ``bias``: number of bias values (default: the layer's own)."""
        kind = layer_kind(layer)
        shape = list(layer.weight.shape)
        if bias is None:
            bias = layer.bias.numel() if getattr(layer, "bias", None) is not None else 0
        spec: dict[str, Any] = {
            "kind": kind,
            "weight_shape": shape,
            "bits": bits,
            "granularity": granularity,
            "scale_shape": list(weight_scale(torch.empty(shape, device="meta"), bits, granularity).shape[:-1]),
            "bias": bias,
            "activation_bits": activation_bits,
        }
        if kind.startswith("conv"):
            spec.update(
                stride=list(layer.stride),
                padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                dilation=list(layer.dilation),
                groups=layer.groups,
                padding_mode=layer.padding_mode,
                reversed_padding=list(layer._reversed_padding_repeated_twice),
            )
        if kind == "embedding":
            spec.update(padding_idx=layer.padding_idx, max_norm=layer.max_norm, norm_type=layer.norm_type)
        return spec

    @classmethod
    def from_layer(cls, layer: nn.Module) -> LowBitLayer:
        """Quantise a fake-quant layer (QATLinear ...) with its current bits and scales."""
        qz = layer.quantizer
        q, scale = quantize_weight(layer.weight.detach().float(), qz.bits, qz.granularity)
        obs = qz.observer
        use_act = obs is not None and bool(obs.initialized)
        spec = cls.spec_of(layer, qz.bits, qz.granularity, qz.activation_bits if use_act else None)
        out = cls(spec)
        out.qweight.copy_(pack_int4(q) if qz.bits <= 4 else q.reshape(-1))
        parts = [scale.reshape(-1)]
        if spec["bias"]:
            parts.append(layer.bias.detach().float().reshape(-1))
        if use_act:
            parts.extend(t.reshape(1).float() for t in qz.activation_qparams())
        out.params.copy_(torch.cat(parts))
        return out.to(layer.weight.device)

    def prepare_export(self) -> None:
        """Hold the unpacked float weight as a (non-persistent) buffer, for ``torch.export``: a traced
        graph would otherwise unpack the weights on every call (inductor does not fold the unpacking).
        :func:`~lightning_compress.deploy.export_for_cpu` calls it on its snapshot of the model."""
        with torch.no_grad():
            self.register_buffer("unpacked_weight", self.dequantized_weight(), persistent=False)

    @torch.compiler.disable
    def _parts(self) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        # (float weight, bias, input qparams), unpacked once and cached; kept outside compiled graphs:
        # unpacking once beats re-unpacking in every compiled call
        unpacked = getattr(self, "unpacked_weight", None)
        if unpacked is not None:
            return unpacked, self.bias, self._input_qparams()
        return self._memo(lambda: (self.dequantized_weight().detach(), self.bias, self._input_qparams()))

    def dequantized_weight(self) -> Tensor:
        shape = tuple(self.spec["weight_shape"])
        numel = math.prod(shape)
        q = unpack_int4(self.qweight, numel) if self.spec["bits"] <= 4 else self.qweight
        return dequantize_weight(q.reshape(shape), self.scale, self.spec["granularity"])

    def forward(self, input: Tensor) -> Tensor:
        s = self.spec
        kind = s["kind"]
        w, bias, qparams = self._parts()
        if kind == "embedding":
            return F.embedding(input, w, s["padding_idx"], s["max_norm"], s["norm_type"])
        x = input
        if qparams is not None:
            x = fake_quantize_activation(x, qparams[0], qparams[1], s["activation_bits"])
        if w.dtype != x.dtype:  # e.g. after .half(): the stored scales stay float32
            w = w.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        if kind == "linear":
            return F.linear(x, w, bias)
        conv = F.conv1d if kind == "conv1d" else F.conv2d
        padding = s["padding"] if isinstance(s["padding"], str) else tuple(s["padding"])
        if s["padding_mode"] != "zeros":
            x = F.pad(x, tuple(s["reversed_padding"]), mode=s["padding_mode"])
            padding = 0
        return conv(x, w, bias, tuple(s["stride"]), padding, tuple(s["dilation"]), s["groups"])

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s['kind']}, weight_shape={tuple(s['weight_shape'])}, bits={s['bits']}, activation_bits={s['activation_bits']}"


class Int8Linear(_PackedLayer):
    """Static int8 Linear: int8 inputs (learned range) x int8 weights (learned scales) via ``torch._int_mm``.

    ``y = s_x s_w (x_q W_q^T) - s_x s_w z_x sum(W_q) + b`` with the zero-point term folded into the
    bias. Exactly the arithmetic of the fake-quant layer, done in integers. One buffer, ``packed``:
    the transposed int8 weight (:attr:`weight_t`), then float32 output scales and biases
    (:attr:`affine`) and the input scale and zero point (:attr:`input_qparams`). The fast CPU path
    once compiled (``torch.compile``); eager it is faster than float at batch 64 only.

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
        qz = layer.quantizer
        q, sw = quantize_weight(layer.weight.detach().float(), 8, qz.granularity)
        sx, zx = qz.activation_qparams()
        zs = zx - 128
        out = cls(layer.in_features, layer.out_features)
        sw = sw.reshape(-1).expand(layer.out_features)
        out.weight_t.copy_(q.t())
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(layer.out_features, device=q.device)
        out.affine[0].copy_(sw * sx)
        out.affine[1].copy_(bias - zs * q.float().sum(1) * sw * sx)
        out.input_qparams.copy_(torch.stack([sx, zs]))
        return out.to(layer.weight.device)

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

    def forward(self, input: Tensor) -> Tensor:
        w, out_scale, out_bias, in_scale, in_zero = self._parts()
        x = input.reshape(-1, self.in_features)
        xq = torch.clamp(torch.round(x / in_scale) + in_zero, -128, 127).to(torch.int8)
        if self.force_fallback:
            reason: str | None = "Int8Linear.force_fallback is set"
        else:
            reason = self.int_mm_unsupported(xq.device, xq.shape[0], self.in_features, self.out_features)
        if reason is None:
            acc = torch._int_mm(xq, w)
        else:
            if not getattr(self, "_fallback_warned", False):
                self._warn_fallback(reason)
            acc = self.int_matmul_fallback(xq, w)
        y = acc * out_scale + out_bias
        return y.to(input.dtype).reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8"


# ------------------------------------------------------------------------------------------ torchao
def _torchao_linear(layer: nn.Module, dynamic_activations: bool) -> nn.Module:
    tq = import_torchao()
    qz = layer.quantizer
    _, scale = quantize_weight(layer.weight.detach().float(), 8, "per_channel")
    kwargs: dict[str, Any] = {}
    if dynamic_activations:
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

        kwargs["act_quant_kwargs"] = QuantizeTensorToInt8Kwargs(granularity=tq.PerRow())
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.weight.device)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    w = tq.Int8Tensor.from_hp(layer.weight.detach().float(), tq.PerRow(), scale=scale, **kwargs)
    new.weight = nn.Parameter(w, requires_grad=False)
    del qz
    return new


def _torchao_conv2d(layer: nn.Module) -> nn.Module:
    tq = import_torchao()
    new = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device=layer.weight.device,
    )
    new.load_state_dict({k: v for k, v in layer.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tq.quantize_(new, tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=tq.PerAxis(0)), filter_fn=lambda m, n: True)
    return new


def _choose_format(layer: nn.Module, backend: str) -> str:
    qz = layer.quantizer
    kind = layer_kind(layer)
    has_act = qz.observer is not None and bool(qz.observer.initialized)
    if kind == "linear" and qz.bits == 8:
        if not has_act and qz.granularity == "per_channel" and backend == "torchao":
            return "torchao_int8_weight"
        if has_act and backend == "torchao" and qz.granularity == "per_channel":
            return "torchao_int8_dynamic"
        if has_act and qz.granularity in ("per_channel", "per_tensor"):
            return "int8_linear"
    if (
        kind == "conv2d"
        and qz.bits == 8
        and backend == "torchao"
        and qz.granularity == "per_channel"
        and layer.in_channels // layer.groups > 1  # torchao 0.18 fails on single-input-channel convs
    ):
        return "torchao_intx_conv2d"
    return "lowbit"


def _build(layer: nn.Module, fmt: str) -> nn.Module:
    if fmt == "torchao_int8_weight":
        return _torchao_linear(layer, dynamic_activations=False)
    if fmt == "torchao_int8_dynamic":
        return _torchao_linear(layer, dynamic_activations=True)
    if fmt == "torchao_intx_conv2d":
        return _torchao_conv2d(layer)
    if fmt == "int8_linear":
        return Int8Linear.from_layer(layer)
    return LowBitLayer.from_layer(layer)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def batchnorm_pairs(model: nn.Module, convs: Collection[str] | None = None) -> list[tuple[str, str]]:
    """``(conv, bn)`` name pairs where a fake-quant Conv1d/2d (or, with ``convs``, any Conv1d/2d of
    those names) feeds only a BatchNorm (found by ``torch.fx``).

    Returns ``[]`` when the model cannot be traced symbolically (data-dependent control flow).
    """
    import torch.fx as fx

    from lightning_compress._tracing import LayerTracer
    from lightning_compress.quantization.layers import QATConv1d, QATConv2d

    try:
        graph = LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models are simply not folded
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or not node.args:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if convs is None:
            eligible = type(conv) in (QATConv1d, QATConv2d)
        else:
            eligible = isinstance(conv, (nn.Conv1d, nn.Conv2d)) and str(src.target) in convs
        if eligible and len(src.users) == 1 and conv.out_channels == bn.num_features:
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _folds_batchnorm(fmt: str, granularity: Any) -> bool:
    """Whether a layer of this format and granularity takes in the BatchNorm that follows it (per-channel
    or grouped scales absorb BatchNorm's per-channel factor exactly; a single per-tensor scale cannot)."""
    return fmt == "lowbit" and granularity != "per_tensor"


def _fold_bn(layer: LowBitLayer, bn: nn.modules.batchnorm._BatchNorm) -> LowBitLayer:
    """Exact for per-channel/group scales: ``bn(s q * x + b) = (f s) q * x + f (b - mean) + beta``.

    The integer weights stay as they are; torch's own ``fuse_conv_bn_weights`` scales the
    per-channel scales (in the place of a float weight) and folds the bias."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    scale, bias = fuse_conv_bn_weights(
        layer.scale.float(),
        layer.bias,
        bn.running_mean.float(),
        bn.running_var.float(),
        bn.eps,
        None if bn.weight is None else bn.weight.detach().float(),
        None if bn.bias is None else bn.bias.detach().float(),
    )
    spec = {**layer.spec, "bias": int(bn.running_mean.numel())}
    out = LowBitLayer(spec)
    out.qweight.copy_(layer.qweight)
    parts = [scale.detach().reshape(-1), bias.detach()]
    qparams = layer._input_qparams()
    if qparams is not None:
        parts.extend(t.reshape(1) for t in qparams)
    out.params.copy_(torch.cat(parts))
    return out


def convert_fake_quant(model: nn.Module, backend: str = "auto", inplace: bool = False, fold_bn: bool = True) -> nn.Module:
    """Replace every fake-quant layer of ``model`` (a copy unless ``inplace``) with its low-bit form.

    With ``fold_bn``, a BatchNorm fed only by a per-channel (or grouped) low-bit conv is folded into
    that conv's scales and bias (exact, with the BatchNorm's running statistics) and replaced by
    ``nn.Identity``. The result carries ``quantization_spec`` (``{layer: {"format": ..., ...}}``,
    plus ``"folded_bn"`` names), used by :func:`save_quantized`/:func:`load_quantized`. It is in
    ``eval()`` mode.

    Raises:
        ValueError: unknown ``backend`` or no fake-quant layer in ``model``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid choices: {list(BACKENDS)}")
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("the model has no fake-quantised layer to convert (prepare it with prepare_fake_quant first)")
    out = model if inplace else copy.deepcopy(model)
    pairs = dict(batchnorm_pairs(out)) if fold_bn else {}
    spec: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, layer in fake_quant_layers(out).items():
            fmt = _choose_format(layer, backend)
            new = _build(layer, fmt)
            entry: dict[str, Any] = {"format": fmt, "bits": layer.quantizer.bits, "kind": layer_kind(layer)}
            bn_name = pairs.get(name)
            if bn_name and _folds_batchnorm(fmt, layer.quantizer.granularity):
                new = _fold_bn(new, out.get_submodule(bn_name))
                _set_submodule(out, bn_name, nn.Identity())
                entry["folded_bn"] = bn_name
            if isinstance(new, (LowBitLayer, Int8Linear)):
                entry["spec"] = new.spec
            _set_submodule(out, name, new)
            spec[name] = entry
    out.quantization_spec = spec
    out.quantization_fold_bn = fold_bn
    return out.eval()


# ------------------------------------------------------------------------------------- persistence
_SAFETENSORS_FORMAT = "lightning-compress/quantized"
_FILE_VERSION = 3
_READABLE_VERSIONS = (2, 3)  # 2: one digest of the whole spec instead of one per layer
_FILE_KEYS = ("format", "bits", "granularity", "activation_bits")


def _is_safetensors(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(".safetensors")


_DIGEST_CHARS = 6  # per layer: a consistency check against the float model, not a signature


def _digests(spec: dict[str, dict[str, Any]]) -> str:
    """One short hash per layer of its full entry (shapes, op arguments, folded BatchNorm), concatenated
    in layer order: small enough for a file, specific enough to name the layer that differs."""
    return "".join(
        hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:_DIGEST_CHARS]
        for entry in spec.values()
    )


def _whole_digest(spec: dict[str, dict[str, Any]]) -> str:
    """The single digest of version-2 files."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _file_spec(model: nn.Module) -> dict[str, Any]:
    """What a file stores of ``model.quantization_spec``: per layer only what the float model does not
    tell (format, bits, granularity, input bits), the most common values once under ``"default"``,
    and a short digest per layer of the whole entry (shapes, op arguments, folded BatchNorm) to check
    the float model against at load."""
    spec: dict[str, dict[str, Any]] = model.quantization_spec
    entries = {}
    for name, entry in spec.items():
        inner = entry.get("spec", {})
        entries[name] = {"format": entry["format"], "bits": entry["bits"]} | {k: inner[k] for k in _FILE_KEYS[2:] if k in inner}
    default: dict[str, Any] = {}
    for key in _FILE_KEYS:
        values = Counter(json.dumps(e[key]) for e in entries.values() if key in e)
        if values:
            default[key] = json.loads(values.most_common(1)[0][0])
    out: dict[str, Any] = {
        "version": _FILE_VERSION,
        "default": default,
        "layers": {n: {k: v for k, v in e.items() if k not in default or default[k] != v} for n, e in entries.items()},
        "digests": _digests(spec),
    }
    if not getattr(model, "quantization_fold_bn", True):
        out["fold_bn"] = False
    return out


def _expand_file_spec(file_spec: dict[str, Any], model: nn.Module, path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The full ``quantization_spec`` of a file, rebuilt from the float ``model``'s layers."""
    first_layout = (
        isinstance(file_spec, dict)
        and "version" not in file_spec
        and bool(file_spec)
        and all(isinstance(e, dict) and "format" in e for e in file_spec.values())
    )
    if not first_layout and (not isinstance(file_spec, dict) or file_spec.get("version") not in _READABLE_VERSIONS):
        found = file_spec.get("version") if isinstance(file_spec, dict) else None
        raise ValueError(
            f"{os.fspath(path)}: quantisation spec version {found!r} is not one this release reads "
            f"({list(_READABLE_VERSIONS)}, or the first layout without a version), so the file is damaged or was "
            "written by another tool; save the model again with save_quantized"
        )
    layers = file_spec if first_layout else {n: {**file_spec["default"], **e} for n, e in file_spec["layers"].items()}
    missing = [n for n in layers if not _has_submodule(model, n)]
    if missing:
        raise ValueError(f"{os.fspath(path)}: the float model has no layer {missing[0]!r}; pass the model class the file was saved from")
    if first_layout:
        return file_spec  # the full spec, stored as it was built
    foldable = {n for n, e in layers.items() if _folds_batchnorm(e["format"], e.get("granularity"))}
    pairs = dict(batchnorm_pairs(model, foldable)) if file_spec.get("fold_bn", True) and foldable else {}
    spec: dict[str, dict[str, Any]] = {}
    for name, e in layers.items():
        layer = model.get_submodule(name)
        entry: dict[str, Any] = {"format": e["format"], "bits": e["bits"], "kind": layer_kind(layer)}
        bias = None
        if name in pairs:
            entry["folded_bn"] = pairs[name]
            bias = model.get_submodule(pairs[name]).num_features
        if e["format"] == "lowbit":
            entry["spec"] = LowBitLayer.spec_of(layer, e["bits"], e["granularity"], e["activation_bits"], bias)
        elif e["format"] == "int8_linear":
            entry["spec"] = {"in_features": layer.in_features, "out_features": layer.out_features}
        spec[name] = entry
    return spec


def _check_digests(
    path: str | os.PathLike[str],
    file_spec: dict[str, Any],
    spec: dict[str, dict[str, Any]],
    model: nn.Module,
    new_layers: dict[str, nn.Module],
    state: dict[str, Tensor],
) -> None:
    """Raise when the float model's layers are not those the file was saved from (files in the first
    layout hold the whole spec and have nothing to check)."""
    if "version" not in file_spec:
        return
    if "digests" in file_spec:
        stored, now = file_spec["digests"], _digests(spec)
        if not isinstance(stored, str) or len(stored) != len(now):
            raise ValueError(f"{os.fspath(path)}: its layer digests do not fit the {len(spec)} layers it lists; the file is damaged")
        for i, name in enumerate(spec):
            part = slice(i * _DIGEST_CHARS, (i + 1) * _DIGEST_CHARS)
            if stored[part] != now[part]:
                _raise_mismatch(path, model, name, spec[name], new_layers[name], state)
    elif file_spec.get("digest") != _whole_digest(spec):
        raise ValueError(
            f"{os.fspath(path)} was saved from a model whose quantised layers differ from this float model's "
            "(shapes, convolution arguments or folded BatchNorms); pass the model class it was saved from"
        )


def _raise_mismatch(
    path: str | os.PathLike[str], model: nn.Module, name: str, entry: dict[str, Any], new: nn.Module, state: dict[str, Tensor]
) -> None:
    """Say how layer ``name`` of the float model differs from the one the file was saved from."""
    layer = model.get_submodule(name)
    folded = entry.get("folded_bn")
    what = f"{type(layer).__name__}" + (f" with {folded!r} folded in" if folded else "")
    if entry["kind"].startswith("conv") and not folded:
        what += " (no BatchNorm folded in)"
    stored = state.get(f"{name}.packed")
    if isinstance(new, _PackedLayer) and stored is not None and stored.shape != new.packed.shape:
        detail = f"holds {stored.numel()} packed bytes, but the float model's {what} needs {new.packed.numel()}"
    else:
        detail = f"was saved from a layer other than the float model's {what} (shape, op arguments or folded BatchNorm)"
    raise ValueError(f"{os.fspath(path)}: layer {name!r} {detail}; pass the model class the file was saved from")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _one_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` as views into one buffer per dtype, so that ``torch.save`` writes one storage record
    per dtype instead of one per tensor (each costs a few hundred bytes, as much as the scales of a
    small layer; ``torch.save`` refuses views of one storage as different dtypes). Tensors that are
    the same storage region stay one view. Returned unchanged when a tensor is a subclass (torchao
    layers) or the tensors sit on several devices."""
    from lightning_compress.report import storage_region

    tensors = list(state.values())
    if not tensors or any(type(t) not in (Tensor, nn.Parameter) for t in tensors) or len({t.device for t in tensors}) > 1:
        return state
    regions = {name: storage_region(t) for name, t in state.items()}
    offsets: dict[tuple[Any, ...], int] = {}
    totals: dict[torch.dtype, int] = {}
    for name, t in state.items():
        if regions[name] not in offsets:
            align = max(1, 16 // t.element_size())  # 16-byte starts: views of a view (packed -> float32) stay legal
            start = -(-totals.get(t.dtype, 0) // align) * align
            offsets[regions[name]] = start
            totals[t.dtype] = start + t.numel()
    buffers = {dtype: torch.empty(n, dtype=dtype, device=tensors[0].device) for dtype, n in totals.items()}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        start = offsets[regions[name]]
        view = buffers[t.dtype][start : start + t.numel()].view(t.shape)
        view.copy_(t.detach())
        out[name] = view
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a converted model, to reload with :func:`load_quantized`.

    A ``.safetensors`` path writes a safetensors file (raw tensors, the quantisation spec as JSON in its
    metadata; the smallest file, and loads without pickle); any other path writes
    ``torch.save({"quantization_spec": ..., "state_dict": ...})``, loadable with ``weights_only=True``,
    its plain tensors views into one storage per dtype (one file record each instead of one per
    tensor). The stored spec holds per layer only what the float model does not tell (format, bits,
    granularity, input bits) and a short digest of the rest (shapes, op arguments, folded
    BatchNorm), which :func:`load_quantized` rebuilds from the float model and checks layer by layer,
    and the CRC-32 of each stored tensor's bytes (8 hex digits per tensor, key ``"crc32"``), which
    :func:`load_quantized` checks, so a damaged file is refused with the name of the damaged tensor.
    Layers converted by torchao hold tensor subclasses, which only ``torch.save`` can store.

    Raises:
        ValueError: ``model`` is not a converted model, or a ``.safetensors`` path for torchao layers
            (nothing is written).
    """
    if getattr(model, "quantization_spec", None) is None:
        raise ValueError("not a converted model (no quantization_spec); convert it with convert_fake_quant first")
    spec = _file_spec(model)
    if _is_safetensors(path):
        from safetensors.torch import save_file

        from lightning_compress.report import safetensors_tensors

        tensors, aliases = safetensors_tensors(model.state_dict())
        spec[_CRC_KEY] = crc32_hex(tensors)
        compact = {"separators": (",", ":")}
        metadata = {"format": _SAFETENSORS_FORMAT, "quantization_spec": json.dumps(spec, **compact)}
        if aliases:
            metadata["aliases"] = json.dumps(aliases, **compact)
        save_file(tensors, os.fspath(path), metadata=metadata)
        return
    state = _one_storage(model.state_dict())
    spec[_CRC_KEY] = crc32_hex(state)
    torch.save({"quantization_spec": spec, "state_dict": state}, path)


_WHAT = "quantised model file"
_CRC_KEY = "crc32"  # optional: files written before it existed load unchecked, and older releases ignore it
_NOT_OURS = (
    "load it into the float model with model.load_state_dict(...) if it is a plain state_dict, or convert the "
    "model (convert_fake_quant) and write it with save_quantized"
)


def _describe_content(blob: Any) -> str:
    """What a torch file that save_quantized did not write holds, in a few words."""
    if not isinstance(blob, Mapping):
        return f"a {type(blob).__name__}"
    keys = list(blob)
    if keys and all(isinstance(v, Tensor) for v in blob.values()):
        return f"a plain state_dict of {len(keys)} tensors (keys like {keys[:4]})"
    if "state_dict" in blob and ("pytorch-lightning_version" in blob or "epoch" in blob):
        return "a Lightning training checkpoint"
    return f"a dict with keys {keys[:6]}"


def _check_file_version(file_spec: Any, path: str | os.PathLike[str]) -> None:
    """Refuse a spec from a newer release, or one whose layer table is missing (damaged or edited)."""
    if not isinstance(file_spec, Mapping) or "version" not in file_spec:
        return  # the first layout (no version): _expand_file_spec checks it
    version = file_spec["version"]
    if isinstance(version, int) and not isinstance(version, bool) and version > max(_READABLE_VERSIONS):
        raise ValueError(
            f"{_WHAT} {os.fspath(path)!r} was written by a newer lightning-compress (file format version {version}; "
            f"this release reads versions {list(_READABLE_VERSIONS)}): upgrade lightning-compress to load it, or save "
            "the model again with this release"
        )
    if version in _READABLE_VERSIONS and not (
        isinstance(file_spec.get("layers"), Mapping) and isinstance(file_spec.get("default"), Mapping)
    ):
        raise ValueError(f"{_WHAT} {os.fspath(path)!r}: its quantisation spec lacks its layer table, so it is damaged or was edited")


def _read_quantized(path: str | os.PathLike[str], map_location: str | torch.device) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The stored spec and the state dict of a :func:`save_quantized` file, its tensors checked against
    their CRC-32 where the file has them. The format is told by the file's first bytes, not its suffix."""
    name = os.fspath(path)
    aliases: dict[str, str] = {}
    if sniff(path, _WHAT) == "safetensors":
        state, meta = load_safetensors_file(path, _WHAT, map_location)
        if meta.get("format") != _SAFETENSORS_FORMAT or "quantization_spec" not in meta:
            raise ValueError(
                f"{_WHAT} {name!r} is a safetensors file of {len(state)} tensors that save_quantized did not write (its "
                f"metadata has no lightning-compress quantisation spec, only keys {sorted(meta)}); {_NOT_OURS}"
            )
        try:
            file_spec = json.loads(meta["quantization_spec"])
            aliases = json.loads(meta.get("aliases", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{_WHAT} {name!r}: its metadata is not valid JSON ({err}), so the file is damaged") from None
    else:
        hint = (
            "Files written by save_quantized hold only tensors and plain values, so this one was written by something "
            f"else or altered; {_NOT_OURS}"
        )
        blob = load_torch_file(path, _WHAT, map_location=map_location, hint=hint)
        if not (isinstance(blob, Mapping) and "quantization_spec" in blob and isinstance(blob.get("state_dict"), Mapping)):
            raise ValueError(f"{_WHAT} {name!r} was not written by save_quantized: it holds {_describe_content(blob)}; {_NOT_OURS}")
        file_spec, state = blob["quantization_spec"], dict(blob["state_dict"])
    _check_file_version(file_spec, path)
    if isinstance(file_spec, Mapping) and "version" in file_spec and _CRC_KEY in file_spec:
        check_crc32_hex(state, file_spec[_CRC_KEY], path, _WHAT)
    for alias, target in aliases.items():
        state[alias] = state[target]
    return file_spec, state


def load_quantized(float_model: nn.Module, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the converted structure on (a copy of) the float model and load a :func:`save_quantized` file.

    ``.safetensors`` files are read with safetensors, others with ``torch.load(weights_only=True)``
    (torchao tensor subclasses are allow-listed by torchao). ``float_model`` must be built like the
    model that was converted (its trained weights do not matter): the layer shapes, convolution
    arguments and folded BatchNorms are read off it and checked against the file's per-layer digests
    (files written before the spec was reduced hold it whole and load as they are).

    Nothing in the file is run: ``.pt`` files are read with ``weights_only=True`` and refused when they
    pickle anything else. Each error names the file and, where it applies, the layer or tensor.

    Raises:
        FileNotFoundError, IsADirectoryError: no such file, or a folder.
        ValueError: a file that :func:`save_quantized` did not write (a plain ``state_dict``, a safetensors
            file without its metadata, a text file), a truncated or damaged file (a tensor whose CRC-32
            differs is named), a file from a newer release, a float model that does not match the file,
            or an unknown layer format.
    """
    tq = import_torchao()  # registers torchao's tensor subclasses as safe globals before torch.load
    file_spec, state = _read_quantized(path, map_location)
    model = copy.deepcopy(float_model)
    spec = _expand_file_spec(file_spec, model, path)
    new_layers: dict[str, nn.Module] = {}
    for name, entry in spec.items():
        fmt = entry["format"]
        old = model.get_submodule(name)
        if fmt == "lowbit":
            new: nn.Module = LowBitLayer(entry["spec"])
        elif fmt == "int8_linear":
            new = Int8Linear(**entry["spec"])
        elif fmt in ("torchao_int8_weight", "torchao_int8_dynamic"):
            new = copy.deepcopy(old)
            cfg = tq.Int8WeightOnlyConfig() if fmt == "torchao_int8_weight" else tq.Int8DynamicActivationInt8WeightConfig()
            tq.quantize_(new, cfg, filter_fn=lambda m, n: True)
        elif fmt == "torchao_intx_conv2d":
            new = copy.deepcopy(old)
            tq.quantize_(new, tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=tq.PerAxis(0)), filter_fn=lambda m, n: True)
        else:
            raise ValueError(f"unknown format {fmt!r} for layer {name!r} in {path}")
        new_layers[name] = new
    _check_digests(path, file_spec, spec, model, new_layers, state)
    for name, new in new_layers.items():
        _set_submodule(model, name, new)
        if spec[name].get("folded_bn"):
            _set_submodule(model, spec[name]["folded_bn"], nn.Identity())
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"{_WHAT} {os.fspath(path)!r} does not fit the float model: {' '.join(str(err).split())}; pass the model "
            "class it was saved from"
        ) from None
    model.quantization_spec = spec
    model.quantization_fold_bn = file_spec.get("fold_bn", True)
    return model.eval()

