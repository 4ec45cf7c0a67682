"""Which parameters are matrix-multiplication weights, how they are laid out, and what the default leaves out.

Pruning takes every matmul weight by default:

- the ``weight`` of ``nn.Linear`` and its subclasses (``MultiheadAttention.out_proj`` is a
  ``NonDynamicallyQuantizableLinear``) and of ``Conv1d/2d/3d`` and transposed convolutions (a transposed
  convolution stores ``(in, out / groups, *kernel)``: input dimension first, like ``Conv1D`` below);
- ``nn.MultiheadAttention``'s packed ``in_proj_weight`` ``(3E, E)`` (rows are the q, k, v outputs),
  or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the key/value sizes differ;
- the ``weight`` of a GPT-2 style ``Conv1D`` (Hugging Face ``transformers.pytorch_utils.Conv1D``,
  recognised by its class name, its ``nf`` attribute and a 2-D weight) stored ``(in, out)``:
  "input dimension first", so N:M groups and per-row comparisons run along dim 0 for it.

Embeddings are lookups, not matmuls: pruned only when a pattern names their full parameter name.
A parameter of two or more dimensions that belongs to a module type not listed here (an RNN, a
custom layer holding its own ``nn.Parameter``) is not pruned by default;
:func:`unknown_matmul_weights` lists them so that the callback can say so.

Example:
    >>> from torch import Tensor, nn
    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> [n for n, _ in layer.named_parameters() if matmul_kind(layer.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])]
    ['self_attn.in_proj_weight', 'self_attn.out_proj.weight', 'linear1.weight', 'linear2.weight']
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

from torch import Tensor, nn

from lightning_compress.module_copy import hook_computed_weights, hook_source
from lightning_compress.selection import is_conv1d, is_protected, preview, training_only_modules

__all__ = [
    "MHA_PROJECTIONS",
    "input_dim",
    "input_major",
    "is_conv1d",
    "matmul_kind",
    "prunable_weight",
    "unknown_matmul_weights",
    "unknown_weights_note",
]

#: ``nn.MultiheadAttention`` projection weights and the inputs they multiply (``"qkv"``: the packed
#: ``(3E, E)`` weight, rows ``[0, E)`` on the query, ``[E, 2E)`` on the key, ``[2E, 3E)`` on the value).
MHA_PROJECTIONS = {"in_proj_weight": "qkv", "q_proj_weight": "q", "k_proj_weight": "k", "v_proj_weight": "v"}

#: Module types whose parameters are never listed as unknown matmul weights (lookups: named to be pruned).
_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


def matmul_kind(module: nn.Module, leaf: str) -> str | None:
    """``"linear"``, ``"conv"``, ``"attention"`` or ``"conv1d"`` when ``module``'s parameter ``leaf`` is a
    matmul weight pruning takes by default, else ``None``.

    >>> matmul_kind(nn.Linear(2, 2), "weight"), matmul_kind(nn.Linear(2, 2), "bias"), matmul_kind(nn.Embedding(3, 2), "weight")
    ('linear', None, None)
    >>> matmul_kind(nn.MultiheadAttention(4, 2), "in_proj_weight")
    'attention'
    """
    if leaf == "weight" and isinstance(module, nn.Linear):
        return "linear"
    if leaf == "weight" and isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.MultiheadAttention) and leaf in MHA_PROJECTIONS:
        return "attention"
    if leaf == "weight" and is_conv1d(module):
        return "conv1d"
    return None


def prunable_weight(module: nn.Module, leaf: str) -> bool:
    """Pruning's selection kind (:func:`lightning_compress.selection.select_weights`): every matmul weight."""
    return matmul_kind(module, leaf) is not None


def _module_name(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def input_major(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """``{name: dim}`` of the parameters among ``names`` whose inputs are not all their dimensions after the first:
    0 for ``Conv1D`` weights ``(in, out)`` and transposed convolution weights ``(in, out / groups, *kernel)``; for the
    3-D expert weights of a Hugging Face mixture of experts, 1 when stored ``(experts, in, out)`` (its experts
    module says ``is_transposed``, as GPT-OSS's does) and 2 when stored ``(experts, out, in)`` (Mixtral, Qwen). A
    matrix multiplication reduces over that dimension, so N:M blocks run along it and an output row is everything
    else: one output unit of one expert, not a whole expert.

    >>> input_major(nn.Sequential(nn.ConvTranspose2d(8, 4, 2), nn.Conv2d(4, 4, 1)), ["0.weight", "1.weight"])
    {'0.weight': 0}
    """
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        module, leaf = modules.get(_module_name(n), nn.Module()), n.rpartition(".")[2]
        if leaf == "weight" and (is_conv1d(module) or isinstance(module, nn.modules.conv._ConvTransposeNd)):
            out[n] = 0
        elif isinstance(getattr(module, "is_transposed", None), bool) and getattr(getattr(module, leaf, None), "dim", lambda: 0)() == 3:
            out[n] = 1 if module.is_transposed else 2
    return out


def input_dim(input_major: Collection[str] | Mapping[str, int], name: str, t: Tensor) -> int | None:
    """The dimension of ``t`` (the weight ``name``) that holds its inputs when it is not the trailing ones:
    ``input_major[name]`` of a mapping (``{"experts.gate_up_proj": 1}`` for ``(experts, in, out)``), 0 for a name
    in any other collection (``Conv1D`` ``(in, out)``, transposed convolutions), else ``None``."""
    if t.dim() < 2 or name not in input_major:
        return None
    return int(input_major[name]) if isinstance(input_major, Mapping) else 0


def unknown_matmul_weights(model: nn.Module, chosen: Iterable[str]) -> list[str]:
    """Parameters of two or more dimensions, outside a ``teacher``, of module types pruning does not know
    (not Linear/Conv/MultiheadAttention/Conv1D, not an embedding) and not in ``chosen``."""
    chosen = set(chosen)
    out: list[str] = []
    seen: set[int] = set()
    modules = dict(model.named_modules())
    training_only = training_only_modules(model)
    for mod_name, module in modules.items():
        known = _known(module)
        owner, _, parametrized = mod_name.rpartition(".parametrizations.")
        if parametrized and _known(modules.get(owner)):
            continue  # the tensors behind a known layer's parametrised weight: said by parametrized_weights_note
        for leaf, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not known and p.dim() >= 2 and full not in chosen and not is_protected(mod_name, training_only):
                out.append(full)
    return out


def _known(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, *_LOOKUPS)) or is_conv1d(module)


def parametrized_weights_note(model: nn.Module, chosen: Iterable[str]) -> str | None:
    """A note naming the parametrised weights of known layers (``weight_norm``, ``spectral_norm``, a
    ``register_parametrization``) of which no tensor is pruned: the computed weight is not a parameter."""
    chosen = set(chosen)
    training_only = training_only_modules(model)
    names = [
        f"{name}.{leaf}" if name else leaf
        for name, module in model.named_modules()
        if _known(module) and not is_protected(name, training_only)
        for leaf in getattr(getattr(module, "parametrizations", None), "keys", lambda: ())()
        if not any(c.startswith(f"{name}.parametrizations.{leaf}.".lstrip(".")) for c in chosen)
    ]
    hooked = {  # the older hook-based form: an attribute the hook recomputes; the parameter carrying its zeros
        f"{name}.{leaf}" if name else leaf: f"{name}.{hook_source(module, leaf)}" if name else hook_source(module, leaf)
        for name, module in model.named_modules()
        if _known(module) and not is_protected(name, training_only)
        for leaf in hook_computed_weights(module)
        if not any(c.startswith(f"{name}.{leaf}_".lstrip(".")) for c in chosen)
    }
    if not names and not hooked:
        return None
    older = (
        f"{preview(list(hooked))}, recomputed at every forward by the older hook-based torch.nn.utils.weight_norm/"
        f"spectral_norm from other tensors; the one whose zeros are the weight's: {preview(list(hooked.values()))}"
        if hooked else ""
    )
    if not names:
        return f"PruningCallback does not prune parametrised weights: {older}. To prune one, include the tensor that carries its zeros"
    return (
        f"PruningCallback does not prune parametrised weights: {preview(names)}{'; and ' + older if older else ''}. Their "
        "value is computed from other tensors (parametrizations.<name>.original*), and a zero there is a zero of the "
        "weight only where the parametrisation keeps zeros (weight_norm's direction, original1, does; its norms, "
        "original0, and an added constant do not). To prune one, include the tensor that carries its zeros"
    )


def unknown_weights_note(model: nn.Module, chosen: Iterable[str]) -> str | None:
    """A one-paragraph note listing :func:`unknown_matmul_weights` (``None`` when there are none)."""
    unknown = unknown_matmul_weights(model, chosen)
    if not unknown:
        return None
    return (
        f"PruningCallback does not prune {len(unknown)} parameter(s) of 2 or more dimensions that belong to module types "
        f"it does not know: {preview(unknown)}. They are not counted in the reported sparsity. To prune one, add its "
        f"full name to include, with '.*' to keep the default layers: include=['.*', r'{re.escape(unknown[0])}']"
    )


#: a LoRA adapter's matrices and the layer it adapts, as peft names them (``query.lora_A.default.weight``,
#: ``query.base_layer.weight``)
_ADAPTER_NAME = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|base_layer)(\.|$)")


def adapter_weights(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that are LoRA adapters or the layers they adapt (peft's naming)."""
    return [n for n in names if _ADAPTER_NAME.search(n)]


def adapter_note(chosen: Iterable[str]) -> str | None:
    """A one-paragraph note when the pruned weights include LoRA adapters or the layers they adapt: merging the
    adapters adds their dense product to the layer, so the pruned zeros do not survive ``merge_and_unload``."""
    adapted = adapter_weights(chosen)
    if not adapted:
        return None
    adapters = [n for n in adapted if re.search(r"(^|\.)lora_[AB]\.", n)]
    lora = (
        f" The adapters themselves are selected too ({preview(adapters)}): peft starts lora_B at zero, so a global "
        "ranking prunes every lora_B whole at the first update and the fine-tune then trains nothing; "
        "exclude=['lora_'] prunes the base weights only."
        if adapters else ""
    )
    return (
        f"PruningCallback prunes LoRA adapters or the layers they adapt: {preview(adapted)}. Merging the adapters "
        "(peft's merge_and_unload) adds their dense product B·A to each adapted layer and fills its zeros (a 50% "
        "sparse query layer kept 7.2%). To keep the sparsity, merge first and prune the merged model, or serve the "
        "adapters unmerged; then save the pruned base weights too (a Lightning checkpoint, or the base model's "
        "save_pretrained): peft's save_pretrained of the unmerged model writes the adapters alone, and loading them "
        f"onto the original base brings its dense weights back.{lora}"
    )


def normalised_directions(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """``{name: dim}`` of the selected weights that ``weight_norm`` divides by their norm (its direction,
    ``parametrizations.weight.original1``, or the hook-based ``weight_v``): the norm is over every slice along ``dim`` (0:
    each output row), or the whole tensor for -1. A slice pruned whole computes 0/0 there, and NaN then reaches every weight through the gradients."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    modules = dict(model.named_modules())
    out: dict[str, int] = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        holder = modules.get(owner)
        if leaf == "original1" and isinstance(holder, nn.ModuleList) and len(holder) and isinstance(holder[0], _WeightNorm):
            out[name] = int(holder[0].dim)
        elif leaf.endswith("_v") and holder is not None:
            for hook in holder._forward_pre_hooks.values():
                if isinstance(hook, WeightNorm) and hook.name == leaf[:-2]:
                    out[name] = -1 if hook.dim is None else int(hook.dim)
    return out
