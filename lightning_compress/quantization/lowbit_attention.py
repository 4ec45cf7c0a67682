"""A converted ``nn.MultiheadAttention``: it stays one, its projection weights stored in
:class:`~lightning_compress.quantization.lowbit.LowBitLayer` children and exposed as the dequantised
``in_proj_weight`` (or ``q/k/v_proj_weight``) its forward reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization.fake_quant import quantize_weight
from lightning_compress.quantization.layers import attention_weight_names, strip_layer
from lightning_compress.quantization.lowbit import LowBitLayer

__all__ = ["attention_shell", "attention_spec", "convert_attention", "read_packed_projections"]

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
