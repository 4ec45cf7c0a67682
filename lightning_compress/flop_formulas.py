"""FLOP formulas for the operators :class:`torch.utils.flop_counter.FlopCounterMode` has none for, and a watch
for operators no formula covers; used by :func:`lightning_compress.measure.count_macs`.

- the fused CPU attention kernels (what ``F.scaled_dot_product_attention`` runs on the CPU);
- oneDNN's recurrent layer (``nn.LSTM`` on the CPU) and the int8 matmul of converted layers (``torch._int_mm``);
- grouped expert matmuls of mixtures of experts: ``torch._grouped_mm`` and Hugging Face's CPU fallback
  ``transformers::grouped_mm_fallback`` (one matmul per expert over the tokens routed to it, hidden from
  a counter inside one custom operator): without a formula a Mixtral's expert work, most of its MACs,
  counted as nothing.

Torch only; nothing of this package.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpaqueOps", "extra_formulas"]


#: Fused attention kernels that :class:`FlopCounterMode` has no formula for (the CPU one is what
#: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` run on the CPU): without one their
#: two matmuls, ``q @ k.T`` and ``attention @ v``, are not counted at all.
_UNCOUNTED_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)


def _attention_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of ``softmax(q @ k.T) @ v`` on shapes ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``:
    ``2·N·L·S·E + 2·N·L·S·Ev`` with ``N`` the product of the query's leading (batch, head) sizes.

    Key/value with fewer heads (grouped-query attention) are broadcast to the query's heads, as the
    kernels do. A causal mask does not reduce the count (as for the CUDA kernels' formula)."""
    *lead, seq_q, dim_q = query_shape
    return 2 * math.prod(lead) * seq_q * key_shape[-2] * (dim_q + value_shape[-1])


def _rnn_layer_flops(input_shape: Any, w_ih_shape: Any, w_hh_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of one direction of one recurrent layer (oneDNN's ``mkldnn_rnn_layer``, what ``nn.LSTM`` runs
    on the CPU): per step and sample, the gates' input and hidden products, ``2·G·(I + H)`` with ``G``
    the gate rows (4·H for an LSTM)."""
    steps_and_samples = math.prod(input_shape[:-1])
    return 2 * steps_and_samples * w_ih_shape[0] * (w_ih_shape[1] + w_hh_shape[1])


def _int_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``torch._int_mm`` (an int8 converted Linear): ``2·M·K·N``, as for a float matmul."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of a grouped matmul, ``2·K`` per output element with ``K`` the first operand's last dimension:
    ``(S, K) × (E, K, N)`` (tokens sorted by expert, ``offs`` splitting them) and ``(E, M, K) × (E, K, N)`` give
    ``S·N`` and ``E·M·N`` outputs; ``(M, K) × (K, N)`` split along ``K`` into ``E`` groups gives ``(E, M, N)``
    outputs that share the ``K`` products, so ``M·N·K`` in all."""
    out = math.prod(out_shape)
    if len(a_shape) == 2 and len(b_shape) == 2:
        out //= max(1, out_shape[0])
    return 2 * out * a_shape[-1]


_GROUPED_MM_OPS = (("aten", "_grouped_mm"), ("transformers", "grouped_mm_fallback"))


def extra_formulas() -> dict[Any, Any]:
    """``{operator: formula}`` for what :class:`FlopCounterMode` does not count (its ``custom_mapping``); a
    library's operator is covered when that library registered it (``transformers`` imported)."""
    from torch.utils.flop_counter import flop_registry

    wanted = [("aten", name, _attention_flops) for name in _UNCOUNTED_ATTENTION_OPS]
    wanted += [("aten", "mkldnn_rnn_layer", _rnn_layer_flops), ("aten", "_int_mm", _int_mm_flops)]
    wanted += [(namespace, name, _grouped_mm_flops) for namespace, name in _GROUPED_MM_OPS]
    formulas = {}
    for namespace, name, formula in wanted:
        try:
            op = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):  # not in this torch, or its library is not loaded
            continue
        if op not in flop_registry:
            formulas[op] = formula
    return formulas


class OpaqueOps(TorchDispatchMode):
    """Entered inside a :class:`FlopCounterMode`: counts the calls of operators outside ``aten``/``prims`` that no
    formula covers (``seen``, by name), whose work the counter cannot see."""

    def __init__(self, formulas: dict[Any, Any]) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.covered = {*flop_registry, *formulas}
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = getattr(func, "_overloadpacket", None)
        if getattr(func, "namespace", "aten") not in ("aten", "prims", "prim") and packet not in self.covered:
            self.seen[str(packet)] += 1
        return func(*args, **(kwargs or {}))
