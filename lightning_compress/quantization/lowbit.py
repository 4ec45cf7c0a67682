"""The converted layers: real low-bit storage and kernels, one buffer per layer.

:class:`LowBitLayer` stores 2..4-bit weights packed two per byte (``uint8``), 5..8-bit ones as
``int8``, with float32 scales, in one buffer per layer; it dequantises on the fly and applies the
same static input quantisation as the fake-quant layer, so its predictions match the fake-quant
model. :class:`~lightning_compress.quantization.int8_linear.Int8Linear` is the static int8 x int8
Linear over ``torch._int_mm`` (with an exact per-layer fallback where that kernel has no support). torchao's own int4 formats need CUDA or extra
packages on CPU (and ``IntxWeightOnlyConfig(int4)`` stores one value per byte), hence the packed
module. :func:`~lightning_compress.quantization.convert.convert_fake_quant` builds them.

Both are drop-in replacements for code that reads a layer's tensors and configuration: ``.weight`` is
the dequantised weight (computed once and cached, never in ``state_dict``), ``.bias`` the bias, and
the float layer's configuration attributes read the same (read-only): ``in_features``/``out_features``
of a Linear; ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
``groups``, ``padding_mode`` of a convolution (Whisper's encoder reads ``conv1.stride`` in its
forward); ``num_embeddings``, ``embedding_dim``, ``padding_idx``, ``max_norm``, ``norm_type`` of an
embedding. A converted ``nn.MultiheadAttention`` stays one
(:func:`~lightning_compress.quantization.lowbit_attention.convert_attention`): its projection weights are stored in :class:`LowBitLayer` children and
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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.quantization.fake_quant import (
    dequantize_weight,
    fake_quantize_activation,
    quantize_weight,
    weight_scale,
)
from lightning_compress.quantization.layers import layer_kind

__all__ = [
    "BACKENDS",
    "LowBitLayer",
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


def _check_unchanged_hook(module: nn.Module, *args: Any) -> None:
    module.check_unchanged()


def _same(cached: Any, fresh: Any) -> bool:
    """Whether a cached value (a tensor, or a tuple of tensors and ``None``) equals its fresh build, NaN equal to NaN."""
    if isinstance(cached, tuple):
        return len(cached) == len(fresh) and all(_same(a, b) for a, b in zip(cached, fresh))
    if isinstance(cached, Tensor):
        if not isinstance(fresh, Tensor) or cached.shape != fresh.shape:
            return False
        if torch.equal(cached, fresh):
            return True
        return cached.is_floating_point() and bool(((cached == fresh) | (cached.isnan() & fresh.isnan())).all())
    return cached is fresh or cached == fresh


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
        self._register_state_dict_hook(_check_unchanged_hook)

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
            hit = cache[slot] = (key, build(), build)
        return hit[1]

    def counted_parameters(self) -> dict[str, Tensor]:
        """The float layer's parameters as this layer computes with them (dequantised, built for the count and not
        kept), for :func:`~lightning_compress.measure.count_parameters`: the converted model counts as the model it
        stands for."""
        weight, bias = self.float_parameters()
        return {"weight": weight, **({"bias": bias} if bias is not None else {})}

    def float_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The dequantised weight and the bias, built now (not cached)."""
        raise NotImplementedError

    def _renormalises_at_lookup(self) -> bool:
        """An embedding with ``max_norm`` whose rows were not renormalised when it was converted (``rows_renormalised``
        missing from its spec: a file written before conversion did it) renormalises them at lookup, as then."""
        s = getattr(self, "spec", {})
        return s.get("kind") == "embedding" and s.get("max_norm") is not None and not s.get("rows_renormalised")

    def check_unchanged(self) -> None:
        """Raise where a tensor read from the layer (its dequantised ``weight``) was changed in place since:
        the layer copies, moves and saves ``packed``, where the change is not, so it would be lost without a
        word. peft's ``merge_and_unload`` adds an adapter to ``weight.data``, which leaves the tensor's
        version and address as they were, so the cached values are compared with ``packed``'s again."""
        if self._renormalises_at_lookup():
            return  # it renormalises its cached rows in place at every lookup, as nn.Embedding does
        packed = self._buffers["packed"]
        current = (packed.data_ptr(), packed._version)
        for key, value, build in (self._cache or {}).values():
            # an entry of an earlier packed (written through a view, replaced, copied into) is stale, not changed
            if key[:2] == current and not _same(value, build()):
                raise RuntimeError(
                    f"{type(self).__name__}: its weight was changed in place after conversion (an adapter merged into it, "
                    "such as peft's merge_and_unload?); the layer computes and saves its packed integers, where the change "
                    "is not. Merge into the fake-quantised model and convert that "
                    "(lightning_compress.quantization.convert_fake_quant), or quantise the merged model again"
                )

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.check_unchanged()
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        self.check_unchanged()  # a copy or a pickle is made from ``packed``
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
        if spec.get("max_norm") is not None:  # convert_fake_quant renormalised every row first
            spec["rows_renormalised"] = True
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

    def float_parameters(self) -> tuple[Tensor, Tensor | None]:
        return self.dequantized_weight(), self.bias

    def dequantized_weight(self) -> Tensor:
        """The weight the integers and scales stand for, computed in float32, in :attr:`compute_dtype`."""
        shape = tuple(self.spec["weight_shape"])
        numel = math.prod(shape)
        q = unpack_int4(self.qweight, numel) if self.spec["bits"] <= 4 else self.qweight
        return dequantize_weight(q.reshape(shape), self.scale, self.spec["granularity"]).to(self.compute_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # as .to(dtype), .bfloat16() move floats
        moved = super()._apply(fn, recurse)  # checks the cached weight against packed at the dtype it was built in
        self.compute_dtype = dtype
        return moved

    def forward(self, input: Tensor) -> Tensor:
        s = self.spec
        kind = s["kind"]
        w, bias, qparams = self._parts()
        if kind == "linear" and qparams is None and w.dtype == input.dtype:  # weight-only Linear: what nn.Linear does
            return F.linear(input, w, bias)
        if kind == "embedding":
            if self._renormalises_at_lookup():  # a file converted before the rows were renormalised at conversion
                return F.embedding(input, w, s["padding_idx"], s["max_norm"], s["norm_type"])
            # max_norm: the rows were renormalised at conversion, as the fake-quantised layer looked them up
            return F.embedding(input, w, s["padding_idx"])
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
