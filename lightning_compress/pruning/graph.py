"""Channel dependency graph: which layers' output channels must be removed together.

A :mod:`torch.fx` trace of the model, run once on an example input to learn the tensor shapes, is
walked node by node. Every Conv/Linear output starts a *channel group* (a convolution's channels are
dimension 1, a Linear's the last dimension: the features of each token of an ``(N, T, C)`` input too);
element-wise ops, BatchNorm, pooling and depthwise convolutions pass the channels through; a residual
addition (or a multiplication) of two tensors merges their groups; a concatenation lays groups side by
side; a flatten before a Linear expands every channel into ``H*W`` input features. Everything that
consumes a group's channels (the next conv's or linear's input, a BatchNorm) is recorded, so
:func:`~lightning_compress.pruning.shrink.shrink_model` can cut all of them consistently.

Ops we do not understand are never guessed through: the groups that reach them are marked
*unsupported*, and asking to prune such a group raises an error naming the op and the layers (add them
to ``exclude``). So are layers whose tensors removal cannot cut alone: a weight computed by a
parametrization (``weight_norm``, ``spectral_norm``) and a weight or bias shared with another layer
(tied weights). Groups that reach the model output (the classifier head) or come from the model input
are left alone silently.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from lightning_compress._tracing import LayerTracer
from lightning_compress.pruning.channel_graph import ChannelGraph, ChannelLayout, Segment
from lightning_compress.pruning.traced_ops import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    CAT_FUNCTIONS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    NORM_MODULES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    SHAPE_METHODS,
    describe_node,
    traced_shape,
)

__all__ = ["ChannelGroup", "UnsupportedChannelOpError", "analyze", "channel_groups", "unsupported_message"]


class UnsupportedChannelOpError(ValueError):
    """Raised when channels that were asked to be removed flow through an op we cannot cut."""


@dataclass
class ChannelGroup:
    """Layers whose output channels are coupled and must be pruned together.

    Attributes:
        members: Names (relative to the module analysed) of the Conv/Linear modules whose output
            channels belong to the group: a residual add couples the layers on both branches; a
            depthwise conv that follows a member is a member too (its channels are the same ones).
        size: Number of channels of the group (every member has this many output channels).
        norms: ``{member: norm}`` for members followed directly by a BatchNorm (for ``bn_scale``).
        inputs: ``{consumer: channel of each input position}`` for the Conv/Linear layers that read the
            group's channels (the group's channel index at each input column or input channel, ``-1``
            where another group's channels sit, after a concatenation): masking those columns too makes
            the masked model compute what the model with the channels removed computes, whatever lies
            between (an activation with ``f(0) != 0``, a BatchNorm after a residual add).
    """

    members: list[str]
    size: int
    norms: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class _Analyzer:
    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        try:
            self.gm = fx.GraphModule(model, LayerTracer().trace_with_input(model))
        except Exception as err:  # noqa: BLE001 - re-raised with the context users need
            fix = (
                "torch.compile(net) wraps the network in an OptimizedModule, which torch.fx cannot trace: compile it in "
                "place instead, which keeps its class: lightning_compress.module.compile_in_place(net, {}) (net.compile() "
                "does the same for a class with its own forward, and compiles nothing for torch's containers such as "
                "nn.Sequential)" if type(model).__name__ == "OptimizedModule" else
                "Move the untraceable code into a submodule and keep channel pruning away from the layers around it with "
                "`exclude`, or use structure='unstructured'"
            )
            raise UnsupportedChannelOpError(
                f"channel removal needs a model that torch.fx can trace, and tracing {type(model).__name__} failed: "
                f"{err}. {fix}."
            ) from err
        self._propagate_shapes(example_input)
        self.g = ChannelGraph([], [], {}, set(), [], {})
        self.env: dict[fx.Node, ChannelLayout | None] = {}
        # modules called more than once (shared weights): every call's input and output is blocked, the first's too
        self.calls = Counter(str(n.target) for n in self.gm.graph.nodes if n.op == "call_module")
        self.holders: dict[int, list[str]] = {}  # parameter -> "module.leaf" of every module holding it
        for mod_name, mod in model.named_modules():
            for leaf, p in mod._parameters.items():
                if p is not None:
                    self.holders.setdefault(id(p), []).append(f"{mod_name}.{leaf}" if mod_name else leaf)

    def _propagate_shapes(self, example_input: torch.Tensor) -> None:
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                ShapeProp(self.gm).propagate(example_input)
        finally:
            for m, mode in modes.items():
                m.training = mode

    # ---- helpers
    def _fixed(self, size: int, reason: str) -> int:
        gid = self.g.new_group(size)
        self.g.groups[gid].fixed.append(reason)
        return gid

    def _block(self, descs: Iterable[ChannelLayout | None], reason: str) -> None:
        for d in descs:
            if d is None:
                continue
            for s in d.segs:
                info = self.g.info(s.group)
                if reason not in info.unsupported:
                    info.unsupported.append(reason)

    def _opaque(self, node: fx.Node, reason: str) -> ChannelLayout | None:
        """Output of an op we do not follow: a fresh group nobody may prune."""
        shape = traced_shape(node)
        if shape is None or len(shape) < 2:
            return None
        return ChannelLayout([Segment(self._fixed(shape[1], reason), shape[1])], 1)

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        out: list[fx.Node] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node) and traced_shape(a) is not None:
                out.append(a)

        fx.node.map_arg((node.args, node.kwargs), visit)
        return out

    def _uncuttable(self, name: str, mod: nn.Module) -> str | None:
        """Why removal cannot cut ``mod``'s own tensors, or ``None``: a weight or bias computed from other
        tensors (a parametrization such as ``weight_norm``, or the older hook-based form) or held by another
        module too (tied weights: cutting one layer would untie them)."""
        for leaf in ("weight", "bias"):
            if parametrize.is_parametrized(mod, leaf):
                kinds = sorted({type(p).__name__.lstrip("_") for p in mod.parametrizations[leaf]})  # type: ignore[union-attr, index]
                return (
                    f"module '{name}', whose {leaf} is computed by a parametrization ({', '.join(kinds)}) that removal "
                    f"cannot cut; remove it first (torch.nn.utils.parametrize.remove_parametrizations(layer, '{leaf}'))"
                )
            if leaf not in mod._parameters and isinstance(mod.__dict__.get(leaf), torch.Tensor):
                return (
                    f"module '{name}', whose {leaf} is recomputed by a forward hook (torch.nn.utils.weight_norm or "
                    f"spectral_norm) from {sorted(mod._parameters)}; remove it first (torch.nn.utils.remove_weight_norm)"
                )
            p = mod._parameters.get(leaf)
            own = f"{name}.{leaf}" if name else leaf
            others = [h for h in self.holders.get(id(p), []) if h != own] if p is not None else []
            if others:  # the same words from either layer: said once
                tied = sorted([own, others[0]])
                return f"the tied weights '{tied[0]}' and '{tied[1]}' (one Parameter: removing channels of either would untie them)"
        return None

    def _unsupported(self, node: fx.Node) -> ChannelLayout | None:
        reason = f"unsupported {describe_node(node)}"
        self._block((self.env.get(a) for a in self._tensor_args(node)), reason)
        return self._opaque(node, reason)

    def _same_layout(self, a: ChannelLayout, b: ChannelLayout) -> bool:
        return a.dim == b.dim and [(s.channels, s.inner) for s in a.segs] == [(s.channels, s.inner) for s in b.segs]

    def _merge(self, a: ChannelLayout, b: ChannelLayout) -> None:
        for sa, sb in zip(a.segs, b.segs):
            self.g.union(sa.group, sb.group)

    # ---- main walk
    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.env[node] = self._visit(node)
        return self.g

    def _visit(self, node: fx.Node) -> ChannelLayout | None:  # noqa: C901, PLR0911, PLR0912 - a dispatch table
        shape = traced_shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            return ChannelLayout([Segment(self._fixed(shape[1], "comes from the model input"), shape[1])], 1)
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for a in self._tensor_args(node):
                d = self.env.get(a)
                if d is not None:
                    for s in d.segs:
                        self.g.info(s.group).fixed.append("reaches the model output")
            return None
        if shape is None and not self._tensor_args(node):
            return None  # shapes, sizes, python values
        if shape is None:
            if node.op == "call_method" and node.target in SHAPE_METHODS:
                return None
            if node.op == "call_function" and node.target in (getattr, len):
                return None
            return self._unsupported(node)  # e.g. torch.split -> tuple of tensors
        if node.op == "call_module":
            return self._visit_module(node, shape)
        return self._visit_function(node, shape)

    def _visit_module(self, node: fx.Node, shape: tuple[int, ...]) -> ChannelLayout | None:
        name = str(node.target)
        mod = self.modules[name]
        args = self._tensor_args(node)
        d = self.env.get(args[0]) if args else None
        if self.calls[name] > 1 and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, *NORM_MODULES)):
            reason = f"module '{name}' is called more than once (shared weights)"
            self._block([d], reason)
            self.g.refused[name] = "it is called more than once in the forward (its weights are shared between the calls)"
            return self._opaque(node, reason)
        reason = self._uncuttable(name, mod) if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, *NORM_MODULES)) else None
        if reason is not None:  # neither the channels it reads nor its own can be cut
            self._block([d], reason)
            if isinstance(mod, NORM_MODULES) or len(shape) < 2:
                return self._opaque(node, reason)
            dim = len(shape) - 1 if isinstance(mod, nn.Linear) else 1
            gid = self.g.new_group(shape[dim], name)
            self.g.groups[gid].unsupported.append(reason)
            return ChannelLayout([Segment(gid, shape[dim])], dim)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if d is None or d.dim != 1 or len(args) != 1:
                return self._unsupported(node)
            if mod.groups == 1:
                self.g.consumers.append((name, "conv", d))
                return ChannelLayout([Segment(self.g.new_group(mod.out_channels, name), mod.out_channels)], 1)
            if mod.groups == mod.in_channels == mod.out_channels and len(d.segs) == 1 and d.segs[0].inner == 1:
                gid = d.segs[0].group
                self.g.info(gid).members.append(name)
                self.g.members[name] = gid
                self.g.depthwise.add(name)
                self.g.consumers.append((name, "depthwise", d))
                return d
            depthwise = mod.groups == mod.in_channels == mod.out_channels and len(d.segs) > 1
            reason = (
                f"depthwise convolution '{name}' reading {len(d.segs)} concatenated tensors; it is supported on one "
                "tensor's channels (put it before the concatenation, or exclude the layers)"
                if depthwise else
                f"grouped convolution '{name}' (groups={mod.groups}, in={mod.in_channels}, out={mod.out_channels}); "
                "only depthwise convolutions with one output per input channel are supported"
            )  # fmt: skip
            self._block([d], reason)
            gid = self.g.new_group(mod.out_channels, name)
            self.g.groups[gid].unsupported.append(reason)
            return ChannelLayout([Segment(gid, mod.out_channels)], 1)
        if isinstance(mod, nn.Linear):
            if d is None or len(args) != 1:
                return self._unsupported(node)
            last = len(shape) - 1
            if d.dim == last:
                self.g.consumers.append((name, "linear", d))
            else:  # it mixes another dimension than the one holding these channels (token features from an embedding)
                self._block([d], f"module '{name}', a Linear over the last dimension while these channels are dimension {d.dim}")
            gid = self.g.new_group(mod.out_features, name)
            self.g.groups[gid].tokens = len(shape) > 2
            return ChannelLayout([Segment(gid, mod.out_features)], last)
        if isinstance(mod, NORM_MODULES):
            if d is None or d.dim != 1:
                return self._unsupported(node)
            self.g.consumers.append((name, "norm", d))
            src = args[0]
            if src.op == "call_module" and str(src.target) in self.g.members and len(d.segs) == 1:
                self.g.norms.setdefault(str(src.target), name)
            return d
        if isinstance(mod, ELEMENTWISE_MODULES):
            return d
        if isinstance(mod, POOL_MODULES):
            return d if d is not None and d.dim == 1 else self._unsupported(node)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            dim = mod.dim if mod.dim is not None else -1
            return d if d is not None and dim % len(shape) != d.dim else self._unsupported(node)
        if isinstance(mod, nn.Flatten):
            return self._reshape(node, args[0], d, shape)
        return self._unsupported(node)

    def _visit_function(self, node: fx.Node, shape: tuple[int, ...]) -> ChannelLayout | None:  # noqa: PLR0911
        target = node.target
        is_method = node.op == "call_method"
        args = self._tensor_args(node)
        first = node.args[0] if node.args else None
        d = self.env.get(first) if isinstance(first, fx.Node) else None
        if (is_method and target in ELEMENTWISE_METHODS) or (not is_method and target in ELEMENTWISE_FUNCTIONS):
            if len(args) == 1 and d is not None:
                return d
            return self._unsupported(node)
        if not is_method and target in POOL_FUNCTIONS:
            return d if d is not None and d.dim == 1 and len(args) == 1 else self._unsupported(node)
        if (is_method and target in BINARY_METHODS) or (not is_method and target in BINARY_FUNCTIONS):
            return self._binary(node, shape)
        if not is_method and target in CAT_FUNCTIONS:
            return self._cat(node, shape)
        if (is_method and target in RESHAPE_METHODS) or (not is_method and target in RESHAPE_FUNCTIONS):
            if len(args) != 1 or not isinstance(first, fx.Node):
                return self._unsupported(node)
            return self._reshape(node, first, d, shape)
        if (is_method and target in REDUCE_METHODS) or (not is_method and target in REDUCE_FUNCTIONS):
            return self._reduce(node, d, shape)
        if not is_method and target is operator.getitem:
            return self._index(node, d, shape)
        if (is_method and target == "unsqueeze") or (not is_method and target is torch.unsqueeze):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if d is None or not isinstance(dim, int):
                return self._unsupported(node)
            return ChannelLayout(d.segs, d.dim + 1 if dim % len(shape) <= d.dim else d.dim)
        if (is_method and target == "squeeze") or (not is_method and target is torch.squeeze):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            in_shape = traced_shape(first)
            if d is None or in_shape is None or dim is None:
                return self._unsupported(node)  # a bare squeeze() would drop a channel dim pruned to 1
            dims = {x % len(in_shape) for x in ((dim,) if isinstance(dim, int) else dim) if in_shape[x] == 1}
            if d.dim in dims:
                return self._unsupported(node)
            return ChannelLayout(d.segs, d.dim - sum(1 for x in dims if x < d.dim))
        if (not is_method and target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)) or (
            is_method and target in ("softmax", "log_softmax")
        ):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else -1)
            if d is not None and isinstance(dim, int) and dim % len(shape) != d.dim:
                return d
            return self._unsupported(node)
        return self._unsupported(node)

    def _binary(self, node: fx.Node, shape: tuple[int, ...]) -> ChannelLayout | None:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and traced_shape(a) is not None]
        descs = [d for d in (self.env.get(a) for a in operands) if d is not None]
        if not descs:
            return self._opaque(node, f"{describe_node(node)} has no channel input")
        ch = descs[0].dim
        for a in operands:
            a_shape = traced_shape(a)
            assert a_shape is not None
            if self.env.get(a) is not None:
                continue
            pos = ch - (len(shape) - len(a_shape))  # shapes align from the right when broadcasting
            if 0 <= pos < len(a_shape) and a_shape[pos] != 1:
                reason = f"{describe_node(node)} combines the channels with a constant tensor"
                self._block(descs, reason)
                return self._opaque(node, reason)
        if len(descs) == 2:
            if not self._same_layout(descs[0], descs[1]):
                reason = f"{describe_node(node)}, which combines them with a tensor whose channels are laid out differently"
                self._block(descs, reason)
                return self._opaque(node, reason)
            self._merge(descs[0], descs[1])
        return descs[0]

    def _cat(self, node: fx.Node, shape: tuple[int, ...]) -> ChannelLayout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return self._unsupported(node)
        descs = [self.env.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if any(d is None for d in descs) or len({d.dim for d in descs if d}) != 1:  # type: ignore[union-attr]
            return self._unsupported(node)
        ds = [d for d in descs if d is not None]
        if dim % len(shape) == ds[0].dim:
            return ChannelLayout([s for d in ds for s in d.segs], ds[0].dim)
        if all(self._same_layout(ds[0], d) for d in ds[1:]):
            for d in ds[1:]:
                self._merge(ds[0], d)
            return ds[0]
        return self._unsupported(node)

    def _reshape(self, node: fx.Node, src: fx.Node, d: ChannelLayout | None, shape: tuple[int, ...]) -> ChannelLayout | None:
        in_shape = traced_shape(src)
        if d is None or in_shape is None:
            return self._unsupported(node)
        if tuple(shape) == tuple(in_shape):
            return self._sized(node, d, d.dim, d)
        if d.dim == 1 and len(in_shape) > 2 and len(shape) > 2 and tuple(shape[:2]) == tuple(in_shape[:2]):
            return self._sized(node, d, 1, d)  # (N, C, H, W) -> (N, C, H*W): the channel dim is untouched
        if d.dim == 1 and len(shape) == 2 and shape[0] == in_shape[0] and shape[1] == math.prod(in_shape[1:]):
            spatial = math.prod(in_shape[2:])
            return self._sized(node, d, 1, ChannelLayout([Segment(s.group, s.channels, s.inner * spatial) for s in d.segs], 1))
        return self._unsupported(node)

    def _sized(self, node: fx.Node, d: ChannelLayout, dim: int, out: ChannelLayout) -> ChannelLayout | None:
        """``out``, unless the reshape writes the size of output dimension ``dim`` (which holds the channels) as a
        number: ``x.view(-1, 192)`` keeps 192 after removal, and the smaller model fails at its first step."""
        sizes: Any = None
        if node.op == "call_method" and node.target in ("view", "reshape"):
            sizes = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))) else node.args[1]
        elif node.op == "call_function" and node.target is torch.reshape:
            sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if not isinstance(sizes, (tuple, list)) or dim >= len(sizes):
            return out
        written = sizes[dim]
        if not isinstance(written, int) or isinstance(written, bool) or written == -1:
            return out
        reason = (
            f"{describe_node(node)}, which writes the size {written} of dimension {dim} (the channels) as a number, "
            "so it would not follow their removal; compute it (x.flatten(1), x.view(x.size(0), -1))"
        )
        self._block([d], reason)
        return self._opaque(node, reason)

    def _index(self, node: fx.Node, d: ChannelLayout | None, shape: tuple[int, ...]) -> ChannelLayout | None:
        """``x[:, :, None, None]``-style indexing: full slices and new axes only."""
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        if d is None or not all(e is None or e == full for e in index):
            return self._unsupported(node)
        in_pos = out_pos = 0
        new_dim: int | None = None
        for e in index:
            if e is None:
                out_pos += 1
                continue
            if in_pos == d.dim:
                new_dim = out_pos
            in_pos += 1
            out_pos += 1
        if new_dim is None:
            new_dim = out_pos + d.dim - in_pos
        return ChannelLayout(d.segs, new_dim)

    def _reduce(self, node: fx.Node, d: ChannelLayout | None, shape: tuple[int, ...]) -> ChannelLayout | None:
        src = node.args[0] if node.args else None
        in_shape = traced_shape(src)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if d is None or in_shape is None or dims is None:
            return self._unsupported(node)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(x, int) for x in dims):
            return self._unsupported(node)
        dims = [x % len(in_shape) for x in dims]
        if d.dim in dims:
            return self._unsupported(node)
        new_dim = d.dim if keepdim else d.dim - sum(1 for x in dims if x < d.dim)
        return ChannelLayout(d.segs, new_dim)


def analyze(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace ``model`` and build its channel dependency graph (read by :func:`channel_groups` and by shrinking)."""
    return _Analyzer(model, example_input).run()


#: What to do instead when the refused channels are the features of each position of a sequence.
_TOKENS_HINT = (
    " Some of these channels are the features of each position of a sequence: in a transformer block, remove "
    "feed-forward neurons or attention heads instead (structure='neurons', 'heads' or 'heads+neurons')."
)


def unsupported_message(members: list[str], reasons: list[str], tokens: bool = False) -> str:
    """Why the channels of ``members`` cannot be removed (``reasons``: the ops they reach), and what to do instead."""
    return (
        f"cannot remove output channels of {members}: their channels flow into "
        f"{'; '.join(dict.fromkeys(reasons))}. Add these layers to `exclude` to leave their channels in place."
        + (_TOKENS_HINT if tokens else "")
    )


def _consumer_inputs(graph: ChannelGraph, root: int) -> dict[str, torch.Tensor]:
    """``{Conv/Linear consumer: channel of group ``root`` at each input position, -1 elsewhere}``."""
    out: dict[str, torch.Tensor] = {}
    for name, kind, desc in graph.consumers:
        if kind not in ("conv", "linear") or all(graph.find(seg.group) != root for seg in desc.segs):
            continue
        parts = [
            torch.arange(seg.channels).repeat_interleave(seg.inner)
            if graph.find(seg.group) == root
            else torch.full((seg.channels * seg.inner,), -1)
            for seg in desc.segs
        ]
        out[name] = torch.cat(parts)
    return out


def channel_groups(
    model: nn.Module, example_input: torch.Tensor, prunable: Collection[str] | None = None
) -> list[ChannelGroup]:
    """The groups of coupled output channels of ``model`` that can be removed.

    Output heads (layers whose channels reach the model output) and layers coupled with the model input
    are left out. With ``prunable``, a group is returned only if all its members are in it.

    Args:
        model: The network (not modified; it runs once in eval mode under ``no_grad`` to learn shapes).
        example_input: An input batch for that run.
        prunable: Names of the modules that may be pruned (``None``: every Conv/Linear).

    Returns:
        One :class:`ChannelGroup` per independent set of prunable channels, in graph order.

    Raises:
        UnsupportedChannelOpError: When a prunable group's channels reach an op that cannot be cut
            (the message names it; put the layers in ``exclude``), or the model cannot be traced.

    Example:
        >>> from lightning_compress.models import ResCNN
        >>> groups = channel_groups(ResCNN(width=8), torch.zeros(1, 1, 8, 8))
        >>> [(g.members, g.size) for g in groups]
        [(['stem.0', 'block.conv2'], 8), (['block.conv1'], 8), (['down.0'], 16)]
    """
    graph = analyze(model, example_input)
    allowed = set(prunable) if prunable is not None else None
    order = {name: i for i, name in enumerate(dict(model.named_modules()))}
    out: list[ChannelGroup] = []
    refused = []  # every group that cannot be removed, in one error: one exclude round, not one per group
    for root in graph.roots():
        info = graph.groups[root]
        if not info.members or info.fixed:
            continue
        if allowed is not None and not set(info.members) <= allowed:
            continue
        if info.unsupported:
            refused.append(info)
            continue
        members = sorted(info.members, key=lambda m: order.get(m, 0))
        norms = {m: graph.norms[m] for m in members if m in graph.norms}
        out.append(ChannelGroup(members, info.size, norms, _consumer_inputs(graph, root)))
    if refused:
        raise UnsupportedChannelOpError(
            " ".join(unsupported_message(info.members, info.unsupported) for info in refused)
            + (_TOKENS_HINT if any(info.tokens for info in refused) else "")
        )
    out.sort(key=lambda grp: min(order.get(m, 0) for m in grp.members))
    return out
