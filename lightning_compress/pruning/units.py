"""Whole attention heads and feed-forward neurons of a transformer, as channel groups that can be removed.

``PruningCallback(structure="heads" | "neurons" | "heads+neurons")`` masks and then physically removes
these units, so the pruned model is really smaller and faster. The units are found by module structure,
not by tracing (decoders with masks, caches and keyword forwards rarely trace):

- **an attention module** has ``nn.Linear`` children ``q``/``k``/``v`` and ``o`` (or ``q_proj``/``k_proj``/
  ``v_proj`` and ``o_proj``/``out_proj``, DistilBERT's ``q_lin``... ``out_lin``, or BERT's ``self.query``/
  ``self.key``/``self.value`` with ``output.dense`` beside them) and a head count: an integer attribute (``n_heads``,
  ``num_heads``, ``n_head`` or ``num_attention_heads``), else its ``head_dim`` (Hugging Face's attention
  modules), else ``config.num_attention_heads``. Head ``h`` is rows ``h*d .. (h+1)*d - 1`` of the q/k/v
  weights and biases and the same columns of the output projection (``d``: the head width). With
  grouped-query attention (keys and values narrower than the queries: ``G`` query heads share each
  key/value head) the unit is one key/value head with its ``G`` query heads, so what remains is still
  grouped the same way; a ``num_key_value_heads``-style attribute (and BERT's ``all_head_size``) is
  updated with the head count. T5's attention keeps its heads: its relative position bias has one
  column per head and is shared by every layer. So does an attention module where anything else
  depends on the heads (a parameter of its own such as attention sinks, a query/key norm wider than
  one head, a bias table with one entry per head, a position bias shared by all layers) and
  multi-query attention (one key/value head); the warning or error names the module and why.
  GPT-2's attention computes q, k and v side by side in one ``Conv1D`` ``c_attn`` (weight ``(in, 3E)``):
  head ``h`` is a block of columns in each third, and ``c_proj``'s rows; ``num_heads`` and
  ``split_size`` follow. GPT-NeoX's ``query_key_value`` holds each head's q, k and v side by side
  (rows ``(heads, 3, head_size)``), ``dense`` after it. ``nn.MultiheadAttention`` packs its projections and ties the head count to
  the model width; its heads cannot be removed (the error says how to proceed).
- **a feed-forward pair** is two ``nn.Linear`` (or GPT-2 ``Conv1D``) below one module named ``fc1``/``fc2``,
  ``c_fc``/``c_proj``, ``fc_in``/``fc_out``, ``dense_h_to_4h``/``dense_4h_to_h``, ``up_proj``/``down_proj`` (with an optional ``gate_proj`` like ``up_proj``),
  ``linear1``/``linear2``, ``w1``/``w2`` (with an optional ``w3`` like ``w1``), ``lin1``/``lin2``, ``wi``/``wo`` or BERT's
  ``intermediate.dense``/``output.dense``, where the first one's outputs are the second one's inputs.
  Neuron ``j`` is row ``j`` of the first (and of the gate) and column ``j`` of the second.

Zeroing a head's q/k/v rows and its output columns removes its contribution exactly (the head's value
vectors are zero), as zeroing a neuron's input row and bias and its output column does (GELU, ReLU,
SiLU map 0 to 0): the masked model computes what the shrunk model computes. That holds only when
nothing between the projections mixes the units, so each module found is checked once per class, on a
copy with random weights and an input of shape ``(2, 3, width)``: half its units zeroed must compute
what half its units removed computes. A module that fails keeps its units, with a warning saying why: a
norm over the neurons or over all heads' outputs (NormFormer's and Kosmos-2's ``ffn_layernorm``,
Kosmos-2's ``inner_attn_ln``), or a forward that reshapes with a fixed width (nanoGPT's
``y.view(B, T, C)``). A module whose forward cannot run on that input alone (it needs position
embeddings or a mask) keeps its units when it holds a norm of the units' width.

Example:
    >>> from lightning_compress.lm import GPTDecoder
    >>> model = GPTDecoder(d_model=32, n_layers=1, n_heads=4, max_len=16, attention="sdpa")
    >>> [(g.members, g.size) for g in find_units(model, ("heads", "neurons"))]
    [(['blocks.0.fc1'], 128), (['blocks.0.attn.q', 'blocks.0.attn.k', 'blocks.0.attn.v'], 4)]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.measure import first_tensor
from lightning_compress.module_copy import copy_model
from lightning_compress.pruning.channel_masks import ChannelGroupSpec, expand_channel_mask, spread_channels
from lightning_compress.pruning.shrink import _cut, adopt_replaced_parameters, check_optimizer_reads_groups, replaced_parameters
from lightning_compress.pruning.weights import adapter_weights
from lightning_compress.selection import is_conv1d

__all__ = ["UNIT_KINDS", "find_units", "remove_units", "remove_units_in_training", "set_unit_counts", "unit_counts"]

UNIT_KINDS = ("heads", "neurons")
_HEAD_COUNT = ("n_heads", "num_heads", "n_head", "num_attention_heads")
_KV_HEAD_COUNT = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head")
_ATTENTION = (
    ("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_proj", "k_proj", "v_proj", "dense"),  # Phi
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT, RoBERTa: the output projection in a sibling
)
_FEED_FORWARD = (
    ("fc1", "fc2"), ("c_fc", "c_proj"), ("up_proj", "down_proj"), ("linear1", "linear2"), ("w1", "w2"),
    ("lin1", "lin2"), ("wi", "wo"), ("wi_0", "wo"), ("intermediate.dense", "output.dense"),  # DistilBERT, T5 (gated: T5 v1.1), BERT
    ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-J, GPT-NeoX
)

#: Fused layers of the layouts not matched above (Phi-3, Falcon, BLOOM, MPT, Baichuan), named when nothing is found.
_FUSED = {
    "heads": {f: "its queries, keys and values are" for f in ("qkv_proj", "query_key_value", "Wqkv", "W_pack")},
    "neurons": {"gate_up_proj": "its gate and up projections are"},
}


def _child(module: nn.Module, path: str) -> Any:
    child: Any = module
    for part in path.split("."):
        child = child._modules.get(part) if isinstance(child, nn.Module) else None
    return child


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    """The ``nn.Linear`` at ``path`` below ``module`` (a child, or a dotted path such as ``self.query``)."""
    child = _child(module, path)
    return child if isinstance(child, nn.Linear) else None


def _matmul(module: nn.Module, path: str) -> tuple[nn.Module, int, int] | None:
    """``(layer, inputs, outputs)`` of the ``nn.Linear`` or GPT-2 ``Conv1D`` (weight ``(in, out)``) at ``path``."""
    child = _child(module, path)
    if isinstance(child, nn.Linear):
        return child, child.in_features, child.out_features
    if isinstance(child, nn.Module) and is_conv1d(child):
        return child, child.weight.shape[0], child.weight.shape[1]
    return None


def _gpt2_head_unit(name: str, module: nn.Module) -> ChannelGroupSpec | None:
    """GPT-2's attention: one ``Conv1D`` ``c_attn`` computing q, k and v side by side (3 blocks of columns),
    ``c_proj`` after it, ``num_heads`` and ``split_size`` attributes (``split_size``: the width of each)."""
    fused, out = _matmul(module, "c_attn"), _matmul(module, "c_proj")
    heads, split = getattr(module, "num_heads", None), getattr(module, "split_size", None)
    if fused is None or out is None or not (is_conv1d(fused[0]) and is_conv1d(out[0])) or _child(module, "q_attn") is not None:
        return None  # not GPT-2's layout, or its cross-attention (q in a layer of its own)
    if not (isinstance(heads, int) and isinstance(split, int) and heads > 0 and fused[2] == 3 * split == 3 * out[1] and split % heads == 0):
        return None
    c_attn, c_proj = _join(name, "c_attn"), _join(name, "c_proj")
    followers = {f"{c_proj}.weight": 0}
    layouts = {f"{c_attn}.weight": (1, 3), f"{c_proj}.weight": (0, 1)}
    if fused[0].bias is not None:
        followers[f"{c_attn}.bias"] = 0
        layouts[f"{c_attn}.bias"] = (0, 3)
    counts = [(name, "num_heads", 1), (name, "split_size", split // heads)]
    if isinstance(getattr(module, "embed_dim", None), int):  # older transformers reshape with it
        counts.append((name, "embed_dim", split // heads))
    return ChannelGroupSpec([c_attn], heads, followers, tuple(counts), layouts)


def _neox_head_unit(name: str, module: nn.Module) -> ChannelGroupSpec | None:
    """GPT-NeoX's attention (Pythia): one ``query_key_value`` Linear whose rows hold each head's q, k and v
    side by side (``(heads, 3, head_size)``), ``dense`` after it and a ``head_size`` attribute. BLOOM and
    Falcon lay out the same name differently and keep no ``head_size``: they are not matched."""
    fused, out, size = _linear(module, "query_key_value"), _linear(module, "dense"), getattr(module, "head_size", None)
    if fused is None or out is None or not isinstance(size, int) or size < 1:
        return None
    if fused.out_features != 3 * out.in_features or out.in_features % size:
        return None
    heads = out.in_features // size
    qkv, dense = _join(name, "query_key_value"), _join(name, "dense")
    followers = {f"{dense}.weight": 1}
    if fused.bias is not None:
        followers[f"{qkv}.bias"] = 0
    _, attr = _head_count(module, out.in_features) or (heads, None)  # older versions keep a count attribute
    return ChannelGroupSpec([qkv], heads, followers, ((name, attr, 1),) if attr else ())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _head_count(module: nn.Module, q_rows: int) -> tuple[int, str | None] | None:
    """``(query heads, the attribute holding that count or None)``, or ``None`` when the module says nothing."""
    attr = next((a for a in _HEAD_COUNT if isinstance(getattr(module, a, None), int)), None)
    if attr is not None:
        return int(getattr(module, attr)), attr
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0 and q_rows % head_dim == 0:
        return q_rows // head_dim, None
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return (heads, None) if isinstance(heads, int) else None


_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def _per_head_extra(module: nn.Module, owner: nn.Module, projections: Sequence[nn.Module], heads: int, head_dim: int) -> str | None:
    """What in an attention module, besides q/k/v/o, depends on its heads, so that removal would not cut
    it: a parameter of the module itself (attention sinks), a query/key norm wider than one head (over
    all heads' width, or one weight per head), or a parameter with one entry per head in a child that
    is not a projection (a relative position bias table). A norm over one head's width, shared by the
    heads, and other Linear layers in the module (a feed-forward beside the attention) are fine."""
    for holder in dict.fromkeys((module, owner)):
        for pname, p in holder.named_parameters(recurse=False):
            return f"its parameter {pname!r} {tuple(p.shape)} is not in q/k/v/o"
    norms = [n for n, _ in owner.named_modules() if n.rpartition(".")[2] in _QK_NORMS]
    for name in norms:  # one norm over a head's width: a weight (and a bias) of head_dim entries
        shapes = [tuple(p.shape) for p in owner.get_submodule(name).parameters()]
        if len(shapes) > 2 or any(math.prod(shape) != head_dim for shape in shapes):
            return f"its {name} holds {shapes[:3]}{'...' if len(shapes) > 3 else ''}, not one norm over a head's {head_dim}: it spans the heads or has one per head"
    for child_name, child in owner.named_modules():
        if not child_name or any(child is p for p in projections) or isinstance(child, nn.Linear) or is_conv1d(child):
            continue
        if any(child_name == n or child_name.startswith(f"{n}.") for n in norms):
            continue
        for pname, p in child.named_parameters(recurse=False):
            if heads in p.shape:
                return f"its parameter {_join(child_name, pname)!r} {tuple(p.shape)} has one entry per head"
    return None


def _head_unit(name: str, module: nn.Module, skipped: list[str], counting: bool = False) -> ChannelGroupSpec | None:
    """The heads of attention module ``module`` as a group of removable units (a key/value head with its query
    heads), or ``None``; ``counting``: also a module whose heads cannot be removed (one key/value head left)."""
    fused = _gpt2_head_unit(name, module) or _neox_head_unit(name, module)
    if fused is not None:
        return fused
    for q, k, v, o in _ATTENTION:
        projections = [_linear(module, p) for p in (q, k, v)]
        out = _linear(module, o)
        if out is None or any(p is None for p in projections):
            continue
        q_rows, kv_rows = projections[0].out_features, projections[1].out_features  # type: ignore[union-attr]
        inner = q.rpartition(".")[0]  # where the head count lives: the module holding the projections
        owner, owner_name = (module.get_submodule(inner), _join(name, inner)) if inner else (module, name)
        if getattr(owner, "has_relative_attention_bias", None) is not None:
            return None  # T5: a position bias with one column per head, computed once and shared by every layer
        count = _head_count(owner, q_rows)
        if count is None or projections[2].out_features != kv_rows or out.in_features != q_rows:  # type: ignore[union-attr]
            return None
        heads, count_attr = count
        if heads < 1 or q_rows % heads:
            raise ValueError(
                f"structure 'heads': attention module {name or type(module).__name__!r} has {count_attr or 'a head count'}={heads}, "
                f"which does not divide the width of its query projection ({q_rows}); every head must have width / heads rows"
            )
        head_dim = q_rows // heads
        if kv_rows % head_dim or heads % (kv_rows // head_dim or 1) or not kv_rows:
            return None  # keys and values not a whole number of heads per query group
        groups = kv_rows // head_dim  # key/value heads: the removable units
        extra = _per_head_extra(module, owner, [*projections, out], heads, head_dim)  # type: ignore[list-item]
        if (extra is not None or groups == 1) and not counting:
            why = extra or "it has one key/value head (multi-query attention), and a unit is a key/value head with its query heads"
            skipped.append(f"{name or type(module).__name__!r} keeps its heads: {why}")
            return None
        counts = [(owner_name, count_attr, heads // groups)] if count_attr else []
        kv_attr = next((a for a in _KV_HEAD_COUNT if isinstance(getattr(owner, a, None), int)), None)
        if kv_attr is not None:
            counts.append((owner_name, kv_attr, 1))
        if isinstance(getattr(owner, "all_head_size", None), int):  # BERT keeps the width too
            counts.append((owner_name, "all_head_size", q_rows // groups))
        if q == "q_lin" and isinstance(getattr(owner, "dim", None), int):  # DistilBERT: older versions divide it by n_heads
            counts.append((owner_name, "dim", q_rows // groups))
        followers = {f"{_join(name, p)}.bias": 0 for p, m in zip((q, k, v), projections) if m.bias is not None}  # type: ignore[union-attr]
        followers[f"{_join(name, o)}.weight"] = 1
        return ChannelGroupSpec([_join(name, p) for p in (q, k, v)], groups, followers, tuple(counts))
    return None


def _neuron_unit(name: str, module: nn.Module, skipped: list[str]) -> ChannelGroupSpec | None:
    for first, second in _FEED_FORWARD:
        up, down = _matmul(module, first), _matmul(module, second)
        if up is None or down is None or up[2] != down[1]:
            continue
        if getattr(module, "activation_sparsity", 0.0):  # Gemma 3n: a threshold taken over all the neurons
            skipped.append(f"{name!r} keeps its neurons: it keeps the activations above a quantile of all of them")
            return None
        firsts = [first]
        gate_name = {"up_proj": "gate_proj", "w1": "w3", "wi_0": "wi_1"}.get(first)  # gated: Hugging Face's, Meta's, T5's names
        gate = _matmul(module, gate_name) if gate_name else None
        if gate is not None and gate[0].weight.shape == up[0].weight.shape:
            firsts = [gate_name, first] if first == "up_proj" else [first, gate_name]
        members = [_join(name, f) for f in firsts]
        followers: dict[str, int] = {}
        layouts: dict[str, tuple[int, int]] = {}
        for f in firsts:
            layer = _child(module, f)
            if layer.bias is not None:
                followers[f"{_join(name, f)}.bias"] = 0
            if is_conv1d(layer):  # outputs along dim 1
                layouts[f"{_join(name, f)}.weight"] = (1, 1)
        followers[f"{_join(name, second)}.weight"] = 0 if is_conv1d(down[0]) else 1  # the second one's inputs
        return ChannelGroupSpec(members, up[2], followers, (), layouts)
    return None


_UnitMaker = Callable[[str, nn.Module, list[str]], "ChannelGroupSpec | None"]


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's norms and any class named ``*Norm*`` (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or "Norm" in type(module).__name__


def _norm_width(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int) or (isinstance(shape, Sequence) and shape):
        return int(shape if isinstance(shape, int) else shape[-1])
    width = getattr(module, "num_features", getattr(module, "num_channels", None))
    if isinstance(width, int):
        return width
    weight = getattr(module, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) and weight.dim() else None


def _unit_width(module: nn.Module, spec: ChannelGroupSpec) -> int | None:
    """The width the units span where they are read: the input width of the layer after them."""
    reader = next((n for n in spec.followers if n.endswith(".weight") and n.rpartition(".")[0] not in spec.members), None)
    weight = getattr(_child(module, reader.rpartition(".")[0]), "weight", None) if reader else None
    return int(weight.shape[spec.layout(reader)[0]]) if isinstance(weight, torch.Tensor) and reader else None


def _norms_of_width(module: nn.Module, spec: ChannelGroupSpec, width: int | None) -> list[str]:
    """Norms below ``module`` (outside its projections and per-head query/key norms) as wide as its units."""
    out = []
    for name, child in module.named_modules():
        parts = name.split(".")
        if not name or not _is_norm(child) or any(p in _QK_NORMS for p in parts):
            continue
        if any(name == m or name.startswith(f"{m}.") for m in spec.members) or _norm_width(child) not in (width, None):
            continue
        out.append(f"{name} ({type(child).__name__})")
    return out


def _random_copy(module: nn.Module) -> nn.Module:
    """A float32 copy of ``module`` on the CPU, in eval mode, without hooks and with fake quantisation off, with
    seeded random parameters (its buffers copied): what its forward computes, not what it has learned."""
    g = torch.Generator().manual_seed(0)
    memo: dict[int, Any] = {}
    for p in module.parameters():
        fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        memo[id(p)] = nn.Parameter(torch.randn(tuple(p.shape), generator=g) / math.sqrt(fan_in), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.detach().to("cpu", torch.float32 if b.is_floating_point() else b.dtype).clone()
    trial = copy_model(module, memo)
    for m in trial.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        quantizer = getattr(m, "quantizer", None)  # a fake-quantised layer computes in float: what the units mix is
        if isinstance(getattr(quantizer, "enabled", None), bool):  # the forward's, not the rounding's (group scales)
            quantizer.enabled = False
    return trial.eval()


def _said(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _zero_units(module: nn.Module, spec: ChannelGroupSpec, keep: torch.Tensor) -> None:
    """What masking does (:meth:`~lightning_compress.pruning.state.PruningState.set_channel_keep`): zero the
    dropped units' rows of the members and their entries in every follower."""
    params = dict(module.named_parameters())
    for name in [f"{m}.weight" for m in spec.members] + list(spec.followers):
        p = params.get(name)
        if p is not None:
            dim, blocks = spec.layout(name)
            p.masked_fill_(~expand_channel_mask(spread_channels(keep, p.shape[dim], blocks), p.shape, dim), 0.0)


def _removal_check(module: nn.Module, make: _UnitMaker, kind: str) -> str | None:
    """Why removing ``module``'s units would not compute what masking them computes, or ``None``: half of them
    zeroed and then removed on a random copy (:func:`_random_copy`) must give the same output."""
    spec = make("", module, [])  # names relative to the module: the same in its copy
    if spec is None or spec.size < 2:
        return None
    width = _unit_width(module, spec)
    keep = torch.arange(spec.size) % 2 == 0
    try:
        trial = _random_copy(module)
        first = _child(trial, spec.members[0])
        x = torch.randn(2, 3, first.weight.shape[0] if is_conv1d(first) else first.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _zero_units(trial, spec, keep)
            masked = first_tensor((trial(x),), {})
    except Exception as err:  # noqa: BLE001 - a forward that needs more than one tensor: judged by its norms
        norms = _norms_of_width(module, spec, width)
        if not norms:
            return None
        return (
            f"its {norms[0]} has the width of its {kind} and may normalise over them, and its forward could not be run "
            f"alone to check ({_said(err)})"
        )
    if masked is None:
        return None
    try:
        remove_units(trial, [spec], [keep])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            removed = first_tensor((trial(x),), {})
    except Exception as err:  # noqa: BLE001 - reported as the reason the module keeps its units
        norms = _norms_of_width(module, spec, width)
        why = f"its {norms[0]} normalises over them" if norms else "it may reshape with a fixed width"
        return f"its forward fails once {kind} are removed ({_said(err)}): {why}"
    scale = float(masked.nan_to_num().abs().max()) if masked.numel() else 0.0
    if removed is not None and removed.shape == masked.shape and torch.allclose(removed, masked, rtol=1e-4, atol=1e-4 * scale, equal_nan=True):
        return None
    norms = _norms_of_width(module, spec, width)
    where = f"its {norms[0]} normalises over them" if norms else f"something in its forward mixes its {kind}"
    return f"with half its {kind} zeroed it computes something else than with them removed ({where})"


def find_units(model: nn.Module, kinds: Collection[str], names: Collection[str] | None = None) -> list[ChannelGroupSpec]:
    """The attention heads and/or feed-forward neurons of ``model``, one channel group per module.

    Args:
        kinds: ``"heads"`` and/or ``"neurons"``.
        names: The selected weights (``include``/``exclude``): a unit is kept only if every weight it
            changes is among them. ``None``: every unit.

    Raises:
        ValueError: an unknown kind; ``nn.MultiheadAttention`` with ``"heads"``; no unit found.
    """
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if bad or not kinds:
        raise ValueError(f"unit kinds {sorted(kinds)}: valid kinds are {list(UNIT_KINDS)}")
    groups: list[ChannelGroupSpec] = []
    found: set[str] = set()
    skipped: list[str] = []
    unselected: list[str] = []  # units whose weights are not all selected: said when nothing else is found
    checked: dict[Any, str | None] = {}  # one removal check per module class and shapes
    shared_bias = [n for n, m in model.named_modules() if n.endswith("relative_attention_bias") and isinstance(m, nn.Embedding)]
    if "heads" in kinds and shared_bias:  # MPNet: one position bias column per head, shared by every layer
        skipped.append(f"every attention module keeps its heads: {shared_bias[0]!r} holds one bias per head for all layers")
    for name, module in model.named_modules():
        if "heads" in kinds and isinstance(module, nn.MultiheadAttention) and (names is None or any(n.startswith(_join(name, "")) for n in names)):
            raise ValueError(
                f"structure {'+'.join(sorted(kinds))!r} cannot remove heads of nn.MultiheadAttention ({name!r}): it packs "
                "q/k/v in one in_proj_weight and ties the head count to the model width. Use separate q/k/v/o Linear "
                "projections (GPTDecoder(attention='sdpa')), exclude the attention (exclude=[...]), or use structure='neurons'"
            )
        for kind, make in (("heads", _head_unit), ("neurons", _neuron_unit)):
            group = make(name, module, skipped) if kind in kinds and not (kind == "heads" and shared_bias) else None
            if group is None:
                if kind in kinds and (fused := next((f for f in _FUSED[kind] if isinstance(_child(module, f), nn.Module)), None)):
                    skipped.append(f"{name!r} keeps its {kind}: {_FUSED[kind][fused]} one fused layer, {fused!r}, which is "
                                   "not split (prune it with structure='unstructured' or 'N:M')")
                continue
            changed = [f"{m}.weight" for m in group.members] + [n for n in group.followers if n.endswith(".weight")]
            left_out = [] if names is None else [n for n in changed if n not in names]
            if left_out:
                unselected.append(f"{name!r} keeps its {kind}: include/exclude leave out {left_out[0]!r}")
            else:
                key = (type(module), kind, tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))
                if key not in checked:
                    checked[key] = _removal_check(module, make, kind)
                if checked[key] is not None:
                    skipped.append(f"{name!r} keeps its {kind}: {checked[key]}")
                    continue
                groups.append(group)
                found.add(kind)
    needs = (
        "heads need q/k/v/o (or *_proj) Linear children and a head count (an attribute such as num_heads, head_dim or "
        "config.num_attention_heads), neurons a pair such as fc1/fc2 or up_proj/down_proj"
    )
    if adapter_weights(name for name, _ in model.named_parameters()):
        needs += "; LoRA wrappers (peft) stand where those Linear children are: merge the adapters first (merge_and_unload)"
    reasons = skipped or unselected
    said = f"{'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}"
    kept = f" ({said})" if reasons else ""
    if not groups:
        raise ValueError(f"structure {'+'.join(kinds)!r} found no {' or '.join(kinds)} it can remove among the selected weights{kept or ': ' + needs}")
    missing = [kind for kind in kinds if kind not in found]
    if missing:
        rank_zero_warn(
            f"structure {'+'.join(kinds)!r} found no {missing[0]} it can remove among the selected weights{kept}, so only "
            f"{[k for k in kinds if k not in missing][0]} are pruned: {needs}"
        )
    elif skipped:
        rank_zero_warn(f"structure {'+'.join(kinds)!r}: {len(skipped)} module(s) left whole: {said}")
    return groups


def unit_counts(model: nn.Module) -> dict[str, list[int]]:
    """How many units each module holds now, read from its shapes (no removal check): ``{"heads": [key/value heads
    of each attention module], "neurons": [neurons of each feed-forward pair]}``."""
    counts: dict[str, list[int]] = {kind: [] for kind in UNIT_KINDS}
    for name, module in model.named_modules():
        for kind in UNIT_KINDS:
            try:
                group = _head_unit(name, module, [], counting=True) if kind == "heads" else _neuron_unit(name, module, [])
            except ValueError:  # a head count that does not divide the width: not a unit this library removes
                group = None
            if group is not None:
                counts[kind].append(group.size)
    return counts


def _kept(keep: torch.Tensor, length: int, blocks: int = 1) -> torch.Tensor:
    """Indices of the kept ones of ``length`` entries spread over the channels of ``keep``
    (:func:`~lightning_compress.pruning.masks.spread_channels`)."""
    return torch.nonzero(spread_channels(keep.detach().cpu().bool(), length, blocks)).flatten()


def _set_width(layer: nn.Module, side: str) -> None:
    """``out_features``/``in_features`` of a Linear, ``nf`` of a GPT-2 ``Conv1D``, from its weight."""
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = layer.weight.shape
    elif is_conv1d(layer):
        layer.nx, layer.nf = layer.weight.shape


def set_unit_counts(modules: dict[str, nn.Module], group: ChannelGroupSpec, kept: int) -> None:
    """Set the counts that follow a group's kept units (an attention module's head counts)."""
    for owner_name, attr, per_unit in group.count_attributes:
        owner = modules[owner_name]
        if not isinstance(getattr(type(owner), attr, None), property):  # a property derives it from the shapes
            setattr(owner, attr, kept * per_unit)


def remove_units(model: nn.Module, groups: Sequence[ChannelGroupSpec], keep: Sequence[torch.Tensor]) -> tuple[dict[str, tuple[int, int]], dict[Any, Any]]:
    """Physically remove the pruned heads and neurons: slice the weights, biases and output columns,
    update ``in_features``/``out_features`` and the head count. Every check happens before any change.

    Returns:
        ``({unit module: (channels before, channels after)}, parameter map for :func:`remap_optimizer`)``.
    """
    if len(keep) != len(groups):
        raise ValueError(f"{len(keep)} keep-vectors for {len(groups)} unit groups")
    for g, k in zip(groups, keep):
        if k.numel() != g.size or not bool(k.bool().any()):
            raise ValueError(f"the keep-vector of {g.members} has {k.numel()} entries ({int(k.bool().sum())} kept), expected {g.size} with at least one kept")
    modules = dict(model.named_modules())
    origin: dict[Any, Any] = {}
    changes = {}
    for g, k in zip(groups, keep):
        for m in g.members:
            layer = modules[m]
            for leaf in ("weight", "bias"):
                tensor = getattr(layer, leaf, None)
                if tensor is not None:
                    dim, blocks = g.layout(f"{m}.{leaf}")
                    _cut(layer, leaf, [(dim, _kept(k, tensor.shape[dim], blocks).to(tensor.device))], origin)
            _set_width(layer, "out")
        for pname, dim in g.followers.items():
            module_name, _, leaf = pname.rpartition(".")
            layer = modules[module_name]
            if leaf != "weight" or module_name in g.members:
                continue  # a member's bias: cut with the member
            dim, blocks = g.layout(pname)
            _cut(layer, "weight", [(dim, _kept(k, layer.weight.shape[dim], blocks).to(layer.weight.device))], origin)
            _set_width(layer, "in")
        kept = int(k.bool().sum())
        set_unit_counts(modules, g, kept)
        changes[g.members[0].rpartition(".")[0] or g.members[0]] = (g.size, kept)
    return changes, replaced_parameters(origin)


def remove_units_in_training(trainer: Any, pl_module: nn.Module, groups: Sequence[ChannelGroupSpec], keep: Sequence[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """:func:`remove_units` inside a running ``Trainer``: every optimizer is remapped (the moments of the
    surviving entries carried over) and a ``DistributedDataParallel`` wrapper is rebuilt; under DDP
    rank 0's keep-vectors are used on every rank."""
    strategy = trainer.strategy
    if getattr(trainer, "world_size", 1) > 1:
        keep = strategy.broadcast([k.detach().cpu() for k in keep], src=0)
    check_optimizer_reads_groups(trainer.optimizers, list(pl_module.parameters()))  # before any change
    changes, param_map = remove_units(pl_module, groups, keep)
    adopt_replaced_parameters(trainer, pl_module, param_map)
    return changes

