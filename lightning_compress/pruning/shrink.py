"""Physically remove pruned channels: smaller tensors, fewer MACs, real CPU speed-up.

Pure functions on modules (:func:`shrink_model`, :func:`zero_channels`, :func:`count_macs`) and one
function for a running Trainer (:func:`shrink_in_training`) that also remaps the optimizer state and
re-wraps DDP. Loading a shrunk checkpoint into the original class: :mod:`.reload`.

Which tensors to cut comes from the channel dependency graph of :mod:`.graph`: a kept-channel vector
for one layer cuts that layer's output rows (weight, bias), the BatchNorm after it, the input columns of
every consumer (through residual adds, concatenations, flatten→Linear and depthwise convolutions) and
the other layers of its group. Removal is exact: the shrunk model computes what the model with those
channels zeroed (:func:`zero_channels`, which zeroes the consumers' input columns too) computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.pruning.channel_graph import ChannelGraph, ChannelLayout
from lightning_compress.pruning.graph import UnsupportedChannelOpError, analyze, unsupported_message
from lightning_compress.measure import count_macs, floating_dtype

__all__ = [
    "count_macs",
    "remap_optimizer",
    "shrink_in_training",
    "shrink_model",
    "zero_channels",
]

_ParamMap = dict[nn.Parameter, tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]]


# --------------------------------------------------------------------------------------------------
# deciding what to keep


def _round_up(keep: torch.Tensor, round_to: int | None) -> torch.Tensor:
    if not round_to or round_to <= 1:
        return keep
    n, kept = keep.numel(), int(keep.sum())
    target = min(n, math.ceil(kept / round_to) * round_to)
    keep = keep.clone()
    missing = target - kept
    if missing > 0:
        # restore the removed channels with the lowest index (the keep vector carries no scores)
        removed = (~keep).nonzero().flatten()[:missing]
        keep[removed] = True
    return keep


def _group_keeps(graph: ChannelGraph, keep: Mapping[str, torch.Tensor], round_to: int | None) -> dict[int, torch.Tensor]:
    """Validate ``keep`` and turn it into ``{group root: bool vector}``."""
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    prunable = sorted(
        m
        for m, g in graph.members.items()
        if not graph.info(g).fixed and not graph.info(g).unsupported
    )
    out: dict[int, torch.Tensor] = {}
    source: dict[int, str] = {}
    for name, vec in keep.items():
        if name not in graph.members:
            why = f"its output channels cannot be removed: {graph.refused[name]}" if name in graph.refused else (
                "which is not a Conv/Linear layer whose output channels can be removed")
            raise ValueError(f"keep names {name!r}, {why}; valid names: {prunable}")
        root = graph.find(graph.members[name])
        info = graph.groups[root]
        if info.fixed:
            raise ValueError(
                f"the output channels of {name!r} cannot be removed: the channel group {sorted(info.members)} "
                f"{info.fixed[0] if info.fixed[0].startswith(('reaches', 'comes')) else f'reaches {info.fixed[0]}'}; "
                "exclude it from channel pruning"
            )
        if info.unsupported:
            raise UnsupportedChannelOpError(unsupported_message(sorted(info.members), info.unsupported, info.tokens))
        vec = torch.as_tensor(vec).detach().to("cpu").flatten()
        if vec.dtype != torch.bool:
            if not bool(((vec == 0) | (vec == 1)).all()):
                raise ValueError(f"keep[{name!r}] must be a boolean vector (True = keep the channel)")
            vec = vec.bool()
        if vec.numel() != info.size:
            raise ValueError(f"keep[{name!r}] has {vec.numel()} entries, but the layer has {info.size} output channels")
        if not bool(vec.any()):
            raise ValueError(
                f"keep[{name!r}] would remove every output channel of {sorted(info.members)}; at least one "
                "channel of a layer must stay (lower the target sparsity for this layer)"
            )
        if root in out and not torch.equal(out[root], vec):
            raise ValueError(
                f"keep[{name!r}] and keep[{source[root]!r}] differ, but the two layers are coupled (e.g. by a "
                f"residual add: {sorted(info.members)}) and must keep the same channels"
            )
        out[root], source[root] = vec, name
    return {root: _round_up(vec, round_to) for root, vec in out.items()}


def _positions(graph: ChannelGraph, desc: ChannelLayout, keeps: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Kept positions along a tensor's channel dim (``None``: everything is kept)."""
    parts: list[torch.Tensor] = []
    offset, touched = 0, False
    for seg in desc.segs:
        vec = keeps.get(graph.find(seg.group))
        span = seg.channels * seg.inner
        if vec is None:
            parts.append(torch.arange(offset, offset + span))
        else:
            touched = True
            ch = vec.nonzero().flatten()
            parts.append((offset + ch[:, None] * seg.inner + torch.arange(seg.inner)[None, :]).flatten())
        offset += span
    return torch.cat(parts) if touched else None


# --------------------------------------------------------------------------------------------------
# cutting tensors


#: set on a module whose tensors lost channels or units: the model is smaller than it was, though
#: nothing in it is sparse or low-bit (what :func:`lightning_compress.export` looks for)
REMOVED_MARK = "_lightning_compress_removed"


def _cut(module: nn.Module, pname: str, ops: list[tuple[int, torch.Tensor]], origin: _ParamMap) -> None:
    old = getattr(module, pname, None)
    if old is None:
        return
    setattr(module, REMOVED_MARK, True)
    data = old.detach()
    for dim, idx in ops:
        data = data.index_select(dim, idx.to(data.device))
    data = _laid_out_as(data, old)
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        setattr(module, pname, new)
        orig, prev = origin.pop(old, (old, []))
        origin[new] = (orig, prev + ops)
    else:
        module._buffers[pname] = data


def _laid_out_as(data: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``data`` in ``like``'s memory format: a channels-last weight stays channels-last once cut
    (``index_select`` returns a contiguous tensor)."""
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if like.dim() == dims and not like.is_contiguous() and like.is_contiguous(memory_format=fmt):
            return data.clone(memory_format=fmt)
    return data.clone()


def replaced_parameters(origin: _ParamMap) -> _ParamMap:
    """``{old parameter: (new parameter, cuts)}``, what :func:`remap_optimizer` takes, from the
    ``{new: (old, cuts)}`` that :func:`_cut` records while it replaces parameters."""
    return {orig: (new, ops) for new, (orig, ops) in origin.items()}


def _plan(graph: ChannelGraph, keeps: dict[int, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"out": idx, "in": idx}}`` for every module that changes."""
    plan: dict[str, dict[str, torch.Tensor]] = {}
    for name, gid in graph.members.items():
        vec = keeps.get(graph.find(gid))
        if vec is not None and name not in graph.depthwise:
            plan.setdefault(name, {})["out"] = vec.nonzero().flatten()
    for name, kind, desc in graph.consumers:
        idx = _positions(graph, desc, keeps)
        if idx is None:
            continue
        if kind in ("norm", "depthwise"):
            plan.setdefault(name, {})["out"] = idx
        if kind != "norm":
            plan.setdefault(name, {})["in"] = idx
    return plan


def _apply(model: nn.Module, graph: ChannelGraph, plan: dict[str, dict[str, torch.Tensor]]) -> _ParamMap:
    modules = dict(model.named_modules())
    origin: _ParamMap = {}
    for name, cut in plan.items():
        mod = modules[name]
        out_idx, in_idx = cut.get("out"), cut.get("in")
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            conv = isinstance(mod, nn.modules.conv._ConvNd)
            if conv and name in graph.depthwise:
                assert out_idx is not None
                _cut(mod, "weight", [(0, out_idx)], origin)
                _cut(mod, "bias", [(0, out_idx)], origin)
                mod.in_channels = mod.out_channels = mod.groups = len(out_idx)
                continue
            out_attr, in_attr = ("out_channels", "in_channels") if conv else ("out_features", "in_features")
            if out_idx is not None:
                _cut(mod, "weight", [(0, out_idx)], origin)
                _cut(mod, "bias", [(0, out_idx)], origin)
                setattr(mod, out_attr, len(out_idx))
            if in_idx is not None:
                _cut(mod, "weight", [(1, in_idx)], origin)
                setattr(mod, in_attr, len(in_idx))
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            assert out_idx is not None
            for pname in ("weight", "bias", "running_mean", "running_var"):
                _cut(mod, pname, [(0, out_idx)], origin)
            mod.num_features = len(out_idx)
        else:  # pragma: no cover - the graph only records the kinds above
            raise RuntimeError(f"internal error: cannot cut {type(mod).__name__} {name!r}")
    return origin


def _shrink(
    model: nn.Module, keep: Mapping[str, torch.Tensor], example_input: torch.Tensor, round_to: int | None
) -> tuple[dict[str, tuple[int, int]], _ParamMap]:
    graph = analyze(model, example_input)
    keeps = _group_keeps(graph, keep, round_to)  # every check happens before anything is changed
    changes: dict[str, tuple[int, int]] = {}
    for name, gid in sorted(graph.members.items()):
        vec = keeps.get(graph.find(gid))
        if vec is not None:
            changes[name] = (vec.numel(), int(vec.sum()))
    return changes, replaced_parameters(_apply(model, graph, _plan(graph, keeps)))


def shrink_model(
    model: nn.Module,
    keep: Mapping[str, torch.Tensor],
    example_input: torch.Tensor,
    *,
    round_to: int | None = None,
) -> dict[str, tuple[int, int]]:
    """Remove output channels for real, in place, with everything that depends on them.

    For every layer named in ``keep``, the channels marked ``False`` leave its weight and bias, the
    BatchNorm that follows, the input of every consumer (also through residual additions,
    concatenations, flatten→Linear and depthwise convolutions) and the other layers of its
    :class:`~lightning_compress.pruning.graph.ChannelGroup`. Parameters become new ``nn.Parameter``
    objects (use :func:`shrink_in_training` inside a Trainer: it also fixes the optimizer).

    Args:
        model: The network, modified in place.
        keep: ``{layer name: bool vector over its output channels}`` (``True`` = keep). Naming one member
            of a group is enough; naming several requires the same vector.
        example_input: An input batch to trace the model with (it runs once in eval mode).
        round_to: Round each group's kept count up to a multiple of this (e.g. 8), restoring the removed
            channels with the lowest index; never above the original count.

    Returns:
        ``{layer: (channels before, channels after)}`` for every member of a shrunk group.

    Raises:
        ValueError: An unknown layer, the output head, a vector of the wrong length, a vector removing
            every channel, or coupled layers given different vectors. Nothing is changed then.
        UnsupportedChannelOpError: The channels reach an op that cannot be cut (named in the message).

    Example:
        >>> from lightning_compress.models import ResCNN
        >>> net = ResCNN(width=8).eval()
        >>> keep = {"stem.0": torch.arange(8) < 4, "down.0": torch.arange(16) % 2 == 0}
        >>> shrink_model(net, keep, torch.zeros(1, 1, 8, 8))
        {'block.conv2': (8, 4), 'down.0': (16, 8), 'stem.0': (8, 4)}
        >>> net.block.conv1.in_channels, net.fc.in_features, net(torch.zeros(2, 1, 8, 8)).shape
        (4, 8, torch.Size([2, 10]))
    """
    changes, _ = _shrink(model, keep, example_input, round_to)
    return changes


def zero_channels(model: nn.Module, keep: Mapping[str, torch.Tensor], example_input: torch.Tensor) -> None:
    """Zero the channels :func:`shrink_model` would remove, keeping every shape (the *masked* model).

    Zeroes the dropped rows of each member's weight and bias, the affine weight/bias of the
    BatchNorms that carry those channels and the input columns of the layers that read them, so
    nothing in a dropped channel is ever read: the masked model and the shrunk model compute the same
    function, whatever lies between (an activation with ``f(0) != 0``, a BatchNorm after an add).

    Example:
        >>> from lightning_compress.models import MLP
        >>> net = MLP(4, (3,), 2)
        >>> zero_channels(net, {"net.1": torch.tensor([True, False, True])}, torch.zeros(1, 4))
        >>> bool(net.net[1].weight[1].abs().sum() == 0), bool(net.net[3].weight[:, 1].abs().sum() == 0)
        (True, True)
    """
    graph = analyze(model, example_input)
    keeps = _group_keeps(graph, keep, None)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, gid in graph.members.items():
            vec = keeps.get(graph.find(gid))
            if vec is None:
                continue
            mod = modules[name]
            drop = (~vec).to(mod.weight.device)
            mod.weight[drop] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[drop] = 0
        for name, kind, desc in graph.consumers:
            idx = _positions(graph, desc, keeps)
            mod = modules[name]
            if idx is None or kind == "depthwise" or mod.weight is None:
                continue
            dim = 0 if kind == "norm" else 1  # a BatchNorm's channels; a layer's input columns
            drop = torch.ones(mod.weight.shape[dim], dtype=torch.bool)
            drop[idx] = False
            mod.weight.index_fill_(dim, drop.nonzero().flatten().to(mod.weight.device), 0)
            if kind == "norm" and mod.bias is not None:
                mod.bias[drop.to(mod.bias.device)] = 0


# --------------------------------------------------------------------------------------------------
# inside a Trainer


#: The attributes of a torch optimizer that removal updates or that hold no parameters.
_OPTIMIZER_OWN = frozenset({"param_groups", "state", "defaults"})


def check_optimizer_reads_groups(optimizers: Sequence[Any], params: Iterable[torch.Tensor]) -> None:
    """Refuse optimizers that keep their own reference to any of ``params`` besides ``param_groups`` and
    ``state`` (a flat list made in ``__init__``, as some third-party optimizers do): removal replaces the
    parameters in those two, and such an optimizer went on stepping the old tensors, so the smaller layers
    never trained again, in silence.

    Raises:
        ValueError: naming the optimizer and its attribute.
    """
    ids = {id(p) for p in params}
    for optimizer in optimizers:
        for attr, value in vars(optimizer).items():
            if attr in _OPTIMIZER_OWN or attr.startswith("_optimizer_") or not isinstance(value, (list, tuple, dict)):
                continue
            items = value.values() if isinstance(value, dict) else value
            inner = [x for v in items for x in (v if isinstance(v, (list, tuple)) else (v,))]
            if any(id(x) in ids for x in inner):
                raise ValueError(
                    f"{type(optimizer).__name__} keeps its own reference to the pruned layers' parameters in its attribute "
                    f"{attr!r}; removing channels replaces them in param_groups and state only, so its steps would go on "
                    "updating the old tensors and the smaller layers would not train. Use an optimizer that reads "
                    "param_groups at each step, or shrink=False"
                )


def remap_optimizer(optimizer: torch.optim.Optimizer, param_map: _ParamMap) -> None:
    """Point ``optimizer`` at the shrunk parameters, slicing the state of the surviving entries.

    Every state tensor with the parameter's dimensions is cut with the same indices along each cut dimension
    where it has the parameter's size (momentum buffers, Adam's moments) and kept where it has size 1
    (Adafactor's factored row and column statistics); other state (step counters) is carried over as is.

    Raises:
        ValueError: a state tensor with the parameter's dimensions but another size than the parameter's or 1
            along one of them (a preconditioner), which removal cannot follow (nothing is changed).
    """
    check_optimizer_reads_groups([optimizer], param_map)
    for old, _ in param_map.items():  # every check before any change
        for key, value in optimizer.state.get(old, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() == old.dim() > 0:
                bad = [d for d in range(old.dim()) if value.shape[d] not in (old.shape[d], 1)]
                if bad:
                    raise ValueError(
                        f"{type(optimizer).__name__}'s state {key!r} of a parameter {tuple(old.shape)} has shape "
                        f"{tuple(value.shape)}, which removing entries cannot follow (dimension {bad[0]})"
                    )
    for group in optimizer.param_groups:
        group["params"] = [param_map[p][0] if p in param_map else p for p in group["params"]]
    for old, (new, ops) in param_map.items():
        if old not in optimizer.state:
            continue
        state = optimizer.state.pop(old)
        for key, original in list(state.items()):
            if isinstance(original, torch.Tensor) and original.dim() == old.dim() > 0:
                value = original
                for dim, idx in ops:
                    if value.shape[dim] == old.shape[dim] != 1:
                        value = value.index_select(dim, idx.to(value.device))
                state[key] = _laid_out_as(value, original)
        optimizer.state[new] = state


def shrink_in_training(
    trainer: Any,
    pl_module: Any,
    keep: Mapping[str, torch.Tensor],
    *,
    round_to: int | None = None,
    example_input: torch.Tensor | None = None,
    network: str = "",
) -> dict[str, tuple[int, int]]:
    """:func:`shrink_model` inside a running ``Trainer``: optimizer, schedulers and DDP keep working.

    - ``keep`` names are relative to ``pl_module`` (``"model.stem.0"`` for a ``ClassifierModule``).
    - Under DDP, rank 0's ``keep`` is broadcast first so every rank removes the same channels, and the
      module is wrapped in a fresh ``DistributedDataParallel`` (whose constructor also checks that
      the parameter shapes agree across ranks).
    - Every optimizer is remapped with :func:`remap_optimizer` (momentum and Adam moments of the
      surviving entries carried over); LR schedulers hold the optimizer, not the parameters, and keep
      working.
    - The new shapes are in the module's ``state_dict``; ``ClassifierModule`` resizes itself before
      loading such a checkpoint, other LightningModules call :func:`allow_shrunk_checkpoints` in
      ``__init__`` (or users call :func:`load_pruned`).

    Call it from a callback hook between optimizer steps (e.g. ``on_train_epoch_start``), on every rank.

    Args:
        trainer: The running ``lightning.pytorch.Trainer``.
        pl_module: Its LightningModule.
        keep: As in :func:`shrink_model`.
        round_to: As in :func:`shrink_model`.
        example_input: Input batch to trace with; default ``pl_module.example_input_array``.
        network: The child of ``pl_module`` to trace and shrink (``example_input`` is its input; the step
            calls it directly, as a distillation step calls ``student``); ``""``: the module's own forward.

    Returns:
        ``{layer: (channels before, channels after)}``.
    """
    x = example_input if example_input is not None else getattr(pl_module, "example_input_array", None)
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            "shrink_in_training needs an example input to trace the model: set `example_input_array` on the "
            "LightningModule (ClassifierModule: `example_input_shape=`) or pass `example_input=`"
        )
    dtype = floating_dtype(pl_module) or x.dtype
    x = x.to(pl_module.device, dtype=dtype if x.is_floating_point() else x.dtype)  # precision="bf16-true" casts the module
    strategy = trainer.strategy
    if getattr(trainer, "world_size", 1) > 1:
        keep = strategy.broadcast({k: torch.as_tensor(v).detach().cpu() for k, v in keep.items()}, src=0)
    prefix = f"{network}." if network else ""
    inner = {name[len(prefix):]: k for name, k in keep.items() if name.startswith(prefix)}
    # again here, before any change: an optimizer may make its own list at its first step, after the fit's start
    check_optimizer_reads_groups(trainer.optimizers, list(pl_module.get_submodule(network).parameters()))
    changes, param_map = _shrink(pl_module.get_submodule(network), inner, x, round_to)
    adopt_replaced_parameters(trainer, pl_module, param_map)
    return {prefix + name: change for name, change in changes.items()}


def adopt_replaced_parameters(trainer: Any, pl_module: Any, param_map: _ParamMap) -> None:
    """After layers got new (smaller) parameters mid-fit: point every optimizer at them (:func:`remap_optimizer`)
    and wrap the module in a fresh ``DistributedDataParallel`` when it ran under one."""
    for optimizer in trainer.optimizers:
        remap_optimizer(optimizer, param_map)
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        if not hasattr(strategy, "_setup_model"):
            raise NotImplementedError(f"re-wrapping after channel removal is not supported for {type(strategy).__name__}")
        old = strategy.model
        strategy.model = strategy._setup_model(pl_module)
        del old
