"""Channel groups of a model for ``structure="channel"``: coupled layers, their biases and BatchNorms."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.batches import ForwardCall, eval_mode
from lightning_compress.pruning.graph import channel_groups
from lightning_compress.pruning.channel_masks import ChannelGroupSpec

__all__ = ["channel_group_specs", "channel_trace_input"]


def channel_trace_input(call: ForwardCall, pl_module: nn.Module) -> tuple[str, Tensor]:
    """``(network, input)``: the network to trace the channel graph of and its input tensor (at most 2
    samples), from :func:`lightning_compress.batches.example_call`. The network is ``call.target`` (the
    child the training step calls), else the child the module's ``forward`` hands its input to
    unchanged (a wrapper such as a distillation module's ``self.student(x)``), else ``""``: the module's
    own ``forward``."""
    if not call.args and len(call.kwargs) == 1:
        call = _as_positional(call, pl_module)
    if len(call.args) != 1 or call.kwargs or not isinstance(call.args[0], Tensor):
        raise ValueError(
            "structure='channel' traces the model's forward with one input tensor, but this module's forward takes "
            f"{len(call.args)} positional and {sorted(call.kwargs)} keyword arguments; for a transformer's attention "
            "heads and feed-forward neurons use structure='heads', 'neurons' or 'heads+neurons' (no trace), else "
            "structure='unstructured' or 'N:M', or give the module a forward(x) over one tensor"
        )
    x = call.args[0][:2]
    return call.target or _handed_to(pl_module, x), x


def _as_positional(call: ForwardCall, pl_module: nn.Module) -> ForwardCall:
    """A call by one keyword tensor (``self.student(x=...)``, a dict batch's key naming the input) as the same call by
    position, when the network computes the same thing either way; else ``call`` as it is."""
    (key, value), = call.kwargs.items()
    if not isinstance(value, Tensor):
        return call
    network = pl_module.get_submodule(call.target) if call.target else pl_module
    x = value[:2]
    try:
        with eval_mode(network), torch.no_grad():
            by_name, by_position = network(**{key: x}), network(x)
    except Exception:  # noqa: BLE001 - a forward that takes it by name only: the error below says what to do
        return call
    leaves = [torch.utils._pytree.tree_leaves(o) for o in (by_name, by_position)]
    same = len(leaves[0]) == len(leaves[1]) and all(
        (a is b) or (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b))
        for a, b in zip(*leaves)
    )
    return ForwardCall((value,), {}, call.target) if same else call


def _handed_to(module: nn.Module, x: Tensor) -> str:
    """The direct child whose output ``module(x)`` returns, when ``module`` called it with ``x`` itself as
    its only input (a wrapper's ``forward``: ``return self.student(x)``), else ``""``."""
    calls: list[tuple[str, bool]] = []
    outputs: dict[str, list[Tensor]] = {}  # the tensors themselves: an id alone may be reused once freed

    def before(name: str) -> Any:
        def hook(child: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((name, len(args) == 1 and args[0] is x and not kwargs))

        return hook

    def after(name: str) -> Any:
        def hook(child: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs.setdefault(name, []).extend(t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, Tensor))

        return hook

    handles = [h for name, child in module.named_children()
               for h in (child.register_forward_pre_hook(before(name), with_kwargs=True), child.register_forward_hook(after(name)))]
    try:
        with eval_mode(module), torch.no_grad():
            result = module(x)
    except Exception:  # noqa: BLE001 - a forward that cannot run here: trace the module itself, which says why
        return ""
    finally:
        for handle in handles:
            handle.remove()
    if not calls or not calls[0][1]:
        return ""
    name = calls[0][0]
    returned = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, Tensor)]
    return name if returned and all(any(r is t for t in outputs.get(name, ())) for r in returned) else ""


def channel_group_specs(
    model: nn.Module, example: Tensor, names: Sequence[str], network: str = ""
) -> tuple[list[ChannelGroupSpec], dict[str, str]]:
    """The channel groups among the weights ``names`` and ``{member: its BatchNorm}``; with ``network``,
    the graph is that child's (``example`` is its input), and weights outside it are in no group.

    The torch.fx channel graph couples layers whose outputs meet (residual adds, concatenations);
    a forward pass with hooks completes the BatchNorms it reports. Output heads are never in a group.

    Raises:
        ValueError: a name is not the weight of a Linear/Conv layer, is in a ``MultiheadAttention``, is a
            transposed convolution, or no group is left.
    """
    if not network:
        return _specs(model, example, names)
    prefix = f"{network}."
    inside = [n[len(prefix):] for n in names if n.startswith(prefix)]
    outside = [n for n in names if not n.startswith(prefix)]
    if outside:
        rank_zero_warn(
            f"structure='channel' traces {network!r}, the network the training step calls; the selected weights "
            f"outside it stay whole: {outside[:5]}{' ...' if len(outside) > 5 else ''}"
        )
    try:
        groups, batchnorms = _specs(model.get_submodule(network), example, inside)
    except ValueError as err:  # its names are relative to the network: say which
        raise type(err)(f"{err} (layer names inside {network!r}, the network the training step calls)") from err
    for g in groups:
        g.members = [prefix + m for m in g.members]
        g.followers = {prefix + k: v for k, v in g.followers.items()}
        g.columns = {prefix + k: v for k, v in g.columns.items()}
        g.layouts = {prefix + k: v for k, v in g.layouts.items()}
    return groups, {prefix + m: prefix + b for m, b in batchnorms.items()}


def _specs(model: nn.Module, example: Tensor, names: Sequence[str]) -> tuple[list[ChannelGroupSpec], dict[str, str]]:
    modules = dict(model.named_modules())
    attention = [m for m, mod in modules.items() if isinstance(mod, nn.MultiheadAttention)]
    selected = []
    for n in names:
        mod_name, _, leaf = n.rpartition(".")
        mod = modules[mod_name]
        inside = next((a for a in attention if mod_name == a or mod_name.startswith(f"{a}.")), None)
        if inside is not None:
            raise ValueError(
                f"structure='channel' cannot prune nn.MultiheadAttention yet ({n} in {inside!r}): the channel graph does "
                "not treat attention heads as groups. Exclude the attention layers (e.g. exclude=['self_attn']) or use "
                "structure='unstructured' or '2:4'"
            )
        if leaf != "weight" or not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ValueError(f"structure='channel' prunes output channels of Linear/Conv layers; {n} is not one")
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            raise ValueError(f"structure='channel' does not support transposed convolutions ({mod_name}); exclude it")
        selected.append(mod_name)
    followers, _ = find_followers(model, example, selected)
    batchnorms: dict[str, str] = {}
    raw = channel_groups(model, example, prunable=selected)
    for g in raw:
        batchnorms.update(getattr(g, "norms", {}) or {})
    for m, bn in followers.items():
        batchnorms.setdefault(m, bn)
    groups = []
    for g in raw:
        fol: dict[str, int] = {}
        for m in g.members:
            if getattr(modules[m], "bias", None) is not None:
                fol[f"{m}.bias"] = 0
            bn = batchnorms.get(m)
            if bn is not None:
                for leaf in ("weight", "bias"):
                    if getattr(modules[bn], leaf, None) is not None:
                        fol[f"{bn}.{leaf}"] = 0
        columns = {f"{c}.weight": index for c, index in g.inputs.items()}
        groups.append(ChannelGroupSpec(list(g.members), int(g.size), fol, columns=columns))
    if not groups:
        raise ValueError(
            f"structure='channel' found no prunable channel group among {list(names)} (output heads are never "
            "channel-pruned); include more layers"
        )
    return groups, {m: b for m, b in batchnorms.items() if any(m in g.members for g in groups)}


def find_followers(model: nn.Module, example_input: Any, members: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """Trace one forward pass with hooks: which BatchNorm consumes each member's output, and which module is an output head.

    Returns:
        ``({member: batchnorm module name}, {names of modules whose output is the model's output})``.
    """
    members = set(members)
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    followers: dict[str, str] = {}
    heads: set[str] = set()
    last: dict[int, str] = {}
    handles = []

    def out_hook(name: str):
        def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                produced[id(output)] = name
                last[id(output)] = name

        return hook

    def bn_hook(name: str):
        def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and id(inputs[0]) in produced:
                followers.setdefault(produced[id(inputs[0])], name)

        return hook

    keepalive: list[Any] = []
    try:
        for name, mod in modules.items():
            if name in members:
                handles.append(mod.register_forward_hook(out_hook(name)))
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                handles.append(mod.register_forward_hook(bn_hook(name)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():  # forward itself, as the channel trace reads it: the input is the one the step's
                out = model.forward(example_input)  # call gave it, after the network's own pre-hooks (run once)
        finally:
            model.train(was_training)
        keepalive.append(out)
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if isinstance(o, Tensor) and id(o) in last:
                heads.add(last[id(o)])
    finally:
        for h in handles:
            h.remove()
    return followers, heads
