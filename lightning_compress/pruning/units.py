"""Whole attention heads and feed-forward neurons of a transformer, as channel groups that can be removed.

``PruningCallback(structure="heads" | "neurons" | "heads+neurons")`` masks and then physically removes
these units, so the pruned model is really smaller and faster. The units are found by module structure,
not by tracing (decoders with masks, caches and keyword forwards rarely trace):

- **an attention module** has ``nn.Linear`` children ``q``/``k``/``v`` and ``o`` (or ``q_proj``/``k_proj``/
  ``v_proj`` and ``o_proj``/``out_proj``) of one width, and an integer head count attribute (``n_heads``,
  ``num_heads``, ``n_head`` or ``num_attention_heads``). Head ``h`` is rows ``h*d .. (h+1)*d - 1`` of the
  q/k/v weights and biases and the same columns of the output projection (``d``: the head width).
  ``nn.MultiheadAttention`` packs its projections and ties the head count to the model width; its
  heads cannot be removed (the error says how to proceed).
- **a feed-forward pair** is two ``nn.Linear`` children of one module named ``fc1``/``fc2``,
  ``c_fc``/``c_proj``, ``up_proj``/``down_proj`` (with an optional ``gate_proj`` like ``up_proj``),
  ``linear1``/``linear2`` or ``w1``/``w2``, where the first one's outputs are the second one's inputs.
  Neuron ``j`` is row ``j`` of the first (and of the gate) and column ``j`` of the second.

Zeroing a head's q/k/v rows and its output columns removes its contribution exactly (the head's value
vectors are zero), as zeroing a neuron's input row and bias and its output column does (GELU, ReLU,
SiLU map 0 to 0): the masked model computes what the shrunk model computes.

Example:
    >>> from lightning_compress.lm import GPTDecoder
    >>> model = GPTDecoder(d_model=32, n_layers=1, n_heads=4, max_len=16, attention="sdpa")
    >>> [(g.members, g.size, g.width) for g in find_units(model, ("heads", "neurons"))]
    [(['blocks.0.fc1'], 128, 1), (['blocks.0.attn.q', 'blocks.0.attn.k', 'blocks.0.attn.v'], 4, 8)]
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.pruning.masks import ChannelGroupSpec
from lightning_compress.pruning.shrink import _cut, adopt_replaced_parameters

__all__ = ["UNIT_KINDS", "find_units", "remove_units", "remove_units_in_training"]

UNIT_KINDS = ("heads", "neurons")
_HEAD_COUNT = ("n_heads", "num_heads", "n_head", "num_attention_heads")
_ATTENTION = (("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"))
_FEED_FORWARD = (("fc1", "fc2"), ("c_fc", "c_proj"), ("up_proj", "down_proj"), ("linear1", "linear2"), ("w1", "w2"))


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _head_unit(name: str, module: nn.Module) -> ChannelGroupSpec | None:
    count_attr = next((a for a in _HEAD_COUNT if isinstance(getattr(module, a, None), int)), None)
    for q, k, v, o in _ATTENTION:
        projections = [_linear(module, p) for p in (q, k, v)]
        out = _linear(module, o)
        if count_attr is None or out is None or any(p is None for p in projections):
            continue
        width = projections[0].out_features  # type: ignore[union-attr]
        heads = int(getattr(module, count_attr))
        if any(p.out_features != width for p in projections) or out.in_features != width:  # type: ignore[union-attr]
            return None  # keys or values of another width (grouped-query attention): not a unit we can remove
        if heads < 1 or width % heads:
            raise ValueError(
                f"structure 'heads': attention module {name or type(module).__name__!r} has {count_attr}={heads}, which does not divide the width "
                f"of its projections ({width}); every head must have width / heads rows"
            )
        followers = {f"{_join(name, p)}.bias": 0 for p, m in zip((q, k, v), projections) if m.bias is not None}  # type: ignore[union-attr]
        followers[f"{_join(name, o)}.weight"] = 1
        return ChannelGroupSpec([_join(name, p) for p in (q, k, v)], heads, followers, width // heads, (name, count_attr))
    return None


def _neuron_unit(name: str, module: nn.Module) -> ChannelGroupSpec | None:
    for first, second in _FEED_FORWARD:
        up, down = _linear(module, first), _linear(module, second)
        if up is None or down is None or up.out_features != down.in_features:
            continue
        members = [_join(name, first)]
        gate = _linear(module, "gate_proj") if first == "up_proj" else None
        if gate is not None and gate.weight.shape == up.weight.shape:
            members.insert(0, _join(name, "gate_proj"))
        followers = {f"{m}.bias": 0 for m in members if getattr(module.get_submodule(m.rpartition(".")[2]), "bias", None) is not None}
        followers[f"{_join(name, second)}.weight"] = 1
        return ChannelGroupSpec(members, up.out_features, followers)
    return None


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
    groups = []
    for name, module in model.named_modules():
        if "heads" in kinds and isinstance(module, nn.MultiheadAttention) and (names is None or any(n.startswith(_join(name, "")) for n in names)):
            raise ValueError(
                f"structure 'heads' cannot remove heads of nn.MultiheadAttention ({name!r}): it packs q/k/v in one "
                "in_proj_weight and ties the head count to the model width. Use separate q/k/v/o Linear projections "
                "(GPTDecoder(attention='sdpa')), exclude the attention (exclude=[...]), or use structure='neurons'"
            )
        for kind, make in (("heads", _head_unit), ("neurons", _neuron_unit)):
            group = make(name, module) if kind in kinds else None
            if group is None:
                continue
            changed = [f"{m}.weight" for m in group.members] + [n for n in group.followers if n.endswith(".weight")]
            if names is None or all(n in names for n in changed):
                groups.append(group)
    if not groups:
        raise ValueError(
            f"structure {'+'.join(kinds)!r} found no {' or '.join(kinds)} among the selected weights: heads need q/k/v/o "
            "(or *_proj) Linear children and a head count attribute, neurons a pair such as fc1/fc2 or up_proj/down_proj"
        )
    return groups


def _kept_rows(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the kept channels, each spanning ``width`` rows."""
    channels = torch.nonzero(keep.detach().cpu().bool()).flatten()
    return (channels[:, None] * width + torch.arange(width)).flatten()


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
        rows = _kept_rows(k, g.width)
        for m in g.members:
            layer = modules[m]
            _cut(layer, "weight", [(0, rows.to(layer.weight.device))], origin)
            _cut(layer, "bias", [(0, rows.to(layer.weight.device))], origin)
            layer.out_features = len(rows)
        for pname, dim in g.followers.items():
            if dim == 1:
                layer = modules[pname.rpartition(".")[0]]
                _cut(layer, "weight", [(1, rows.to(layer.weight.device))], origin)
                layer.in_features = len(rows)
        kept = int(k.bool().sum())
        if g.count_attribute is not None:
            owner, attr = modules[g.count_attribute[0]], g.count_attribute[1]
            if not isinstance(getattr(type(owner), attr, None), property):  # a property derives it from the shapes
                setattr(owner, attr, kept)
        changes[g.members[0].rpartition(".")[0] or g.members[0]] = (g.size, kept)
    return changes, origin


def remove_units_in_training(trainer: Any, pl_module: nn.Module, groups: Sequence[ChannelGroupSpec], keep: Sequence[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """:func:`remove_units` inside a running ``Trainer``: every optimizer is remapped (the moments of the
    surviving entries carried over) and a ``DistributedDataParallel`` wrapper is rebuilt; under DDP
    rank 0's keep-vectors are used on every rank."""
    strategy = trainer.strategy
    if getattr(trainer, "world_size", 1) > 1:
        keep = strategy.broadcast([k.detach().cpu() for k in keep], src=0)
    changes, param_map = remove_units(pl_module, groups, keep)
    adopt_replaced_parameters(trainer, pl_module, param_map)
    return changes

