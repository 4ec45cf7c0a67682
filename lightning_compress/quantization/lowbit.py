"""The converted layers: real low-bit storage and kernels, one buffer per layer.

:class:`LowBitLayer` stores 2..4-bit weights packed two per byte (``uint8``), 5..8-bit ones as
``int8``, with float32 scales, in one buffer per layer; it dequantises on the fly and applies the
same static input quantisation as the fake-quant layer, so its predictions match the fake-quant
model. :class:`Int8Linear` is the static int8 x int8 Linear over ``torch._int_mm`` (with an exact
per-layer fallback where that kernel has no support). torchao's own int4 formats need CUDA or extra
packages on CPU (and ``IntxWeightOnlyConfig(int4)`` stores one value per byte), hence the packed
module. :func:`~lightning_compress.quantization.convert.convert_fake_quant` builds them.

Both are drop-in replacements for code that reads a layer's tensors and configuration: ``.weight`` is
the dequantised weight (computed once and cached, never in ``state_dict``), ``.bias`` the bias, and
the float layer's configuration attributes read the same (read-only): ``in_features``/``out_features``
of a Linear; ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
``groups``, ``padding_mode`` of a convolution (Whisper's encoder reads ``conv1.stride`` in its
forward); ``num_embeddings``, ``embedding_dim``, ``padding_idx``, ``max_norm``, ``norm_type`` of an
embedding. A converted ``nn.MultiheadAttention`` stays one
(:func:`convert_attention`): its projection weights are stored in :class:`LowBitLayer` children and
exposed as the dequantised ``in_proj_weight`` (or ``q/k/v_proj_weight``) its forward reads.

Example:
    >>> import torch
    >>> q = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    >>> packed = pack_int4(q)
    >>> packed.dtype, packed.numel(), unpack_int4(packed, 5).tolist()
    (torch.uint8, 3, [-8, 7, 0, -1, 3])
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.quantization.fake_quant import (
    dequantize_weight,
    fake_quantize_activation,
    input_levels,
    quantize_weight,
    weight_scale,
)
from lightning_compress.quantization.layers import attention_weight_names, layer_kind, strip_layer

__all__ = [
    "BACKENDS",
    "Int8Linear",
    "LowBitLayer",
    "attention_shell",
    "attention_spec",
    "convert_attention",
    "import_torchao",
    "pack_int4",
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

    def _memo(self, build: Any, slot: str = "parts") -> Any:
        """``build()``, cached under ``slot`` while ``packed`` stays the same tensor at the same version,
        per mode: a replaced buffer (functional_call, assignment) has another address, an in-place change
        bumps the version, and tensors made under inference_mode cannot serve autograd later. While
        being compiled or exported the views are built in the graph (traced tensors have no address)."""
        if torch.compiler.is_compiling():
            return build()
        packed = self._buffers["packed"]  # not ``self.packed``: nn.Module's attribute lookup costs ~0.7 us a call
        key = (packed.data_ptr(), packed._version, torch.is_inference_mode_enabled())
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        hit = cache.get(slot)
        if hit is None or hit[0] != key:
            hit = cache[slot] = (key, build())
        return hit[1]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_cache": None}


#: the convolution of each convolution kind of a layer spec
CONV_OPS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}
_CONV_KINDS = tuple(CONV_OPS)
#: the float layers' configuration attributes a LowBitLayer exposes, and the kinds that have each
_FLOAT_ATTRIBUTE_KINDS: dict[str, tuple[str, ...]] = {}


def _float_attribute(name: str, kinds: tuple[str, ...], read: Callable[[dict[str, Any]], Any]) -> property:
    """The float layer's attribute ``name``, read off a :class:`LowBitLayer`'s spec (read-only), on layers
    of ``kinds``; the others have none, as their float layers have none."""
    _FLOAT_ATTRIBUTE_KINDS[name] = kinds

    def get(self: LowBitLayer) -> Any:
        if self.spec["kind"] not in kinds:
            raise AttributeError(name)  # nn.Module.__getattr__ then names the class and the attribute
        return read(self.spec)

    return property(get, doc=f"``{name}`` of the float {'/'.join(kinds)} layer (read-only).")


def _as_tuple(value: Any) -> Any:
    return value if isinstance(value, str) else tuple(int(v) for v in value)


class LowBitLayer(_PackedLayer):
    """A Linear/Conv1d/Conv2d/Conv3d/Embedding whose weight is stored as packed low-bit integers.

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

    #: the float dtype the layer computes in (a bf16 model's; set at conversion, moved by .to()/.bfloat16(): see
    #: ``_apply``): the dequantised weight, hence lookups and the weight and bias read from outside
    #: (nn.MultiheadAttention reads out_proj's), come in it. A class default: layers pickled before it existed.
    compute_dtype: torch.dtype = torch.float32

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
        """The bias, in the layer's float dtype (a view of ``packed`` for float32 layers)."""
        n, b = math.prod(self.spec["scale_shape"]), int(self.spec.get("bias") or 0)
        return self.params[n : n + b].to(self.compute_dtype) if b else None

    @property
    def weight(self) -> Tensor:
        """The dequantised weight in the layer's float dtype (float32 unless the model was bf16 or fp16;
        detached; unpacked once and cached, not in ``state_dict``)."""
        return self._parts()[0]

    # the float layer's configuration, read off the spec (nothing more is stored)
    in_features = _float_attribute("in_features", ("linear",), lambda s: int(s["weight_shape"][1]))
    out_features = _float_attribute("out_features", ("linear",), lambda s: int(s["weight_shape"][0]))
    in_channels = _float_attribute("in_channels", _CONV_KINDS, lambda s: int(s["weight_shape"][1]) * int(s["groups"]))
    out_channels = _float_attribute("out_channels", _CONV_KINDS, lambda s: int(s["weight_shape"][0]))
    kernel_size = _float_attribute("kernel_size", _CONV_KINDS, lambda s: _as_tuple(s["weight_shape"][2:]))
    stride = _float_attribute("stride", _CONV_KINDS, lambda s: _as_tuple(s["stride"]))
    padding = _float_attribute("padding", _CONV_KINDS, lambda s: _as_tuple(s["padding"]))
    dilation = _float_attribute("dilation", _CONV_KINDS, lambda s: _as_tuple(s["dilation"]))
    groups = _float_attribute("groups", _CONV_KINDS, lambda s: int(s["groups"]))
    padding_mode = _float_attribute("padding_mode", _CONV_KINDS, lambda s: s["padding_mode"])
    num_embeddings = _float_attribute("num_embeddings", ("embedding",), lambda s: int(s["weight_shape"][0]))
    embedding_dim = _float_attribute("embedding_dim", ("embedding",), lambda s: int(s["weight_shape"][1]))
    padding_idx = _float_attribute("padding_idx", ("embedding",), lambda s: s["padding_idx"])
    max_norm = _float_attribute("max_norm", ("embedding",), lambda s: s["max_norm"])
    norm_type = _float_attribute("norm_type", ("embedding",), lambda s: s["norm_type"])

    def float_attributes(self) -> dict[str, Any]:
        """``{name: value}`` of the float layer's configuration attributes this layer exposes (those of its
        kind: ``stride``, ``padding`` ... of a convolution), for a layer that stands in for it in turn."""
        return {name: getattr(self, name) for name, kinds in _FLOAT_ATTRIBUTE_KINDS.items() if self.spec["kind"] in kinds}

    def _input_qparams(self) -> tuple[Tensor, Tensor] | None:
        if not self.spec.get("activation_bits"):
            return None
        return self.params[-2], self.params[-1]

    @staticmethod
    def spec_of(layer: nn.Module, bits: int, granularity: Any, activation_bits: int | None, bias: int | None = None) -> dict[str, Any]:
        """The spec of ``layer`` (a float or fake-quant Linear/Conv/Embedding) stored with these settings;
        ``bias``: number of bias values (default: the layer's own)."""
        kind = layer_kind(layer)
        if bias is None:
            bias = layer.bias.numel() if getattr(layer, "bias", None) is not None else 0
        spec = LowBitLayer.weight_spec(kind, list(layer.weight.shape), bits, granularity, bias, activation_bits)
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

    @staticmethod
    def weight_spec(kind: str, shape: list[int], bits: int, granularity: Any, bias: int, activation_bits: int | None) -> dict[str, Any]:
        """The spec of a layer of ``kind`` with a weight of ``shape`` (op arguments not included)."""
        return {
            "kind": kind,
            "weight_shape": list(shape),
            "bits": bits,
            "granularity": granularity,
            "scale_shape": list(weight_scale(torch.empty(shape, device="meta"), bits, granularity).shape[:-1]),
            "bias": bias,
            "activation_bits": activation_bits,
        }

    def store(self, q: Tensor, scale: Tensor, *extra: Tensor) -> LowBitLayer:
        """Write integer weights ``q`` and the float parameters (scales, then ``extra``) into ``packed``."""
        self.qweight.copy_(pack_int4(q) if self.spec["bits"] <= 4 else q.reshape(-1))
        self.params.copy_(torch.cat([scale.reshape(-1).float(), *(t.reshape(-1).float() for t in extra)]))
        return self

    @classmethod
    def from_layer(cls, layer: nn.Module) -> LowBitLayer:
        """Quantise a fake-quant layer (QATLinear ...) with its current bits, scales and rounding: the
        integers and scales its evaluation used, computed in the weight's dtype as the fake-quant layer
        computes them (a bfloat16 weight's scales are bfloat16 values, stored exactly in float32), and the
        input scale as inputs of that dtype use it."""
        qz = layer.quantizer
        w = layer.weight.detach()
        q, scale = quantize_weight(w, qz.bits, qz.granularity, qz.inference_rounding)
        obs = qz.observer
        use_act = obs is not None and obs.is_initialized()
        spec = cls.spec_of(layer, qz.bits, qz.granularity, qz.activation_bits if use_act else None)
        extra = [layer.bias.detach()] if spec["bias"] else []
        if use_act:
            extra.extend(qz.activation_qparams(w.dtype))
        converted = cls(spec).store(q, scale, *extra).to(layer.weight.device)
        converted.compute_dtype = layer.weight.dtype
        return converted

    def prepare_export(self) -> None:
        """Hold the unpacked float weight as a (non-persistent) buffer, for ``torch.export``: a traced
        graph would otherwise unpack the weights on every call (inductor does not fold the unpacking).
        :func:`~lightning_compress.deploy.export_for_cpu` calls it on its snapshot of the model."""
        with torch.no_grad():
            self.register_buffer("unpacked_weight", self.dequantized_weight(), persistent=False)

    def _parts(self) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        # (float weight, bias, input qparams), unpacked once and cached; kept outside compiled graphs
        # (unpacking once beats re-unpacking in every compiled call). Eager calls skip the
        # ``torch.compiler.disable`` wrapper, which alone costs about 2 us a call.
        if torch.compiler.is_compiling():
            return self._parts_outside_graph()
        return self._unpacked_parts()

    def _unpacked_parts(self) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        unpacked = self._buffers.get("unpacked_weight")
        if unpacked is not None:
            return unpacked, self.bias, self._input_qparams()
        return self._memo(self._unpack)

    def _unpack(self) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        return self.dequantized_weight().detach(), self.bias, self._input_qparams()

    @torch.compiler.disable
    def _parts_outside_graph(self) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        return self._unpacked_parts()

    def dequantized_weight(self) -> Tensor:
        """The weight the integers and scales stand for, computed in float32, in :attr:`compute_dtype`."""
        shape = tuple(self.spec["weight_shape"])
        numel = math.prod(shape)
        q = unpack_int4(self.qweight, numel) if self.spec["bits"] <= 4 else self.qweight
        return dequantize_weight(q.reshape(shape), self.scale, self.spec["granularity"]).to(self.compute_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # as .to(dtype), .bfloat16() move floats
        return super()._apply(fn, recurse)

    def forward(self, input: Tensor) -> Tensor:
        s = self.spec
        kind = s["kind"]
        w, bias, qparams = self._parts()
        if kind == "linear" and qparams is None and w.dtype == input.dtype:  # weight-only Linear: what nn.Linear does
            return F.linear(input, w, bias)
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
        conv = CONV_OPS[kind]
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
        def build() -> Tensor:
            s_w = self.affine[0] / self.input_qparams[0]
            return (self.weight_t.t().float() * s_w[:, None]).detach()

        return self._memo(build, "weight")

    @property
    def bias(self) -> Tensor:
        """The float bias (the zero-point term folded into the output bias taken out again; zeros when
        the layer had none). Cached like :attr:`weight`."""
        def build() -> Tensor:
            scale, folded = self.affine
            return (folded + self.input_qparams[1] * self.weight_t.float().sum(0) * scale).detach()

        return self._memo(build, "bias")

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


# ------------------------------------------------------------------------------------ attention
#: the child holding each projection weight of a converted attention module
_ATTENTION_CHILDREN = {"in_proj_weight": "in_proj", "q_proj_weight": "q_proj", "k_proj_weight": "k_proj", "v_proj_weight": "v_proj"}


def attention_spec(module: nn.MultiheadAttention, bits: int, granularity: Any) -> dict[str, Any]:
    """The spec of a converted attention module: one weight-only Linear :class:`LowBitLayer` spec per
    projection weight (``in_proj_weight``, or ``q/k/v_proj_weight``)."""
    weights = {
        n: LowBitLayer.weight_spec("linear", list(getattr(module, n).shape), bits, granularity, 0, None)
        for n in attention_weight_names(module)
    }
    return {"bits": bits, "granularity": granularity, "activation_bits": None, "weights": weights}


def _refresh_attention(module: nn.Module, incompatible_keys: Any = None) -> None:
    """Recompute the dequantised projection weights of a converted attention module from its children
    (after ``load_state_dict``; the post-hook runs after the children have loaded)."""
    with torch.no_grad():
        for pname, child in _ATTENTION_CHILDREN.items():
            layer = module._modules.get(child)
            old = module._buffers.get(pname)
            if isinstance(layer, LowBitLayer) and old is not None:
                module._buffers[pname] = layer.dequantized_weight().to(device=old.device, dtype=old.dtype)


def attention_shell(module: nn.MultiheadAttention, spec: dict[str, Any]) -> nn.MultiheadAttention:
    """Turn a float (or fake-quant) attention module into a converted one with empty storage, in place.

    Each projection weight ``Parameter`` is removed; a :class:`LowBitLayer` child (``in_proj``, or
    ``q_proj``/``k_proj``/``v_proj``) holds it packed (in ``state_dict``), and the dequantised weight
    is a non-persistent buffer of the original name, recomputed whenever ``load_state_dict`` runs:
    ``F.multi_head_attention_forward``, the attention fast path and other readers find it where they
    look. The class stays ``nn.MultiheadAttention``; biases, ``out_proj`` (converted on its own) and
    ``bias_k``/``bias_v`` stay as they are."""
    for pname, wspec in spec["weights"].items():
        old = getattr(module, pname)
        delattr(module, pname)
        child = LowBitLayer(wspec).to(old.device)
        child.compute_dtype = old.dtype
        module.add_module(_ATTENTION_CHILDREN[pname], child)
        module.register_buffer(pname, torch.zeros(old.shape, dtype=old.dtype, device=old.device), persistent=False)
    if _refresh_attention not in module._load_state_dict_post_hooks.values():
        module.register_load_state_dict_post_hook(_refresh_attention)
    return module


_PACKED_READERS: dict[tuple[Any, ...], type] = {}


def read_packed_projections(module: nn.Module, weight_of: Callable[[nn.Module], Tensor] = LowBitLayer.dequantized_weight) -> bool:
    """Make a converted attention module (of a private copy) read each projection weight from its
    packed child at every access, as ``weight_of(child)`` (default: the dequantised weight), instead of
    its float copy: what ``torch.export`` captures then holds the packed values only, as for every
    other low-bit layer. Switches the instance's class to a subclass with one property per packed
    projection; returns whether ``module`` is such a module."""
    names = tuple(p for p, c in _ATTENTION_CHILDREN.items() if isinstance(module._modules.get(c), LowBitLayer) and p in module._buffers)
    if not isinstance(module, nn.MultiheadAttention) or not names:
        return False
    base = type(module)
    reader = _PACKED_READERS.get((base, names, weight_of))
    if reader is None:
        def weight(child: str) -> property:
            return property(lambda self: weight_of(self._modules[child]))

        body = {p: weight(_ATTENTION_CHILDREN[p]) for p in names}
        reader = _PACKED_READERS[(base, names, weight_of)] = type(base.__name__, (base,), body)
    for name in names:
        del module._buffers[name]
    module.__class__ = reader
    return True


def convert_attention(layer: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """Convert a fake-quant attention module in place (:func:`attention_shell`, filled with its
    quantised projection weights at its current bits and granularity, computed in their dtype as its
    evaluation computes them); its class is the original."""
    qz = layer.quantizer
    spec = attention_spec(layer, qz.bits, qz.granularity)
    weights = {n: getattr(layer, n).detach() for n in spec["weights"]}
    strip_layer(layer)
    attention_shell(layer, spec)
    for pname, w in weights.items():
        getattr(layer, _ATTENTION_CHILDREN[pname]).store(*quantize_weight(w, qz.bits, qz.granularity, qz.inference_rounding))
    _refresh_attention(layer)
    return layer
