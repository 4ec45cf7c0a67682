"""Channel groups of a model for ``structure="channel"``: coupled layers, their biases and BatchNorms."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_compress.batches import ForwardCall
from lightning_compress.pruning.graph import channel_groups
from lightning_compress.pruning.masks import ChannelGroupSpec, find_followers

__all__ = ["channel_group_specs", "channel_trace_input"]


def channel_trace_input(call: ForwardCall, pl_module: nn.Module) -> Tensor:
    """The tensor to trace the channel graph with (at most 2 samples), from how the module's
    ``forward`` is called (:func:`lightning_compress.batches.example_call`)."""
    if call.target and type(pl_module).forward is LightningModule.forward:
        raise ValueError(
            f"structure='channel' traces the module's own forward, but this module defines none: its training_step "
            f"calls self.{call.target}(...). Add forward(self, x): return self.{call.target}(x) to the module, or use "
            "structure='unstructured' or 'N:M'"
        )
    if len(call.args) != 1 or call.kwargs or not isinstance(call.args[0], Tensor):
        raise ValueError(
            "structure='channel' traces the model's forward with one input tensor, but this module's forward takes "
            f"{len(call.args)} positional and {sorted(call.kwargs)} keyword arguments; use structure='unstructured' "
            "or 'N:M', or give the module a forward(x) over one tensor"
        )
    return call.args[0][:2]


def channel_group_specs(
    model: nn.Module, example: Tensor, names: Sequence[str]
) -> tuple[list[ChannelGroupSpec], dict[str, str]]:
    """The channel groups among the weights ``names`` and ``{member: its BatchNorm}``.

    The torch.fx channel graph couples layers whose outputs meet (residual adds, concatenations);
    a forward pass with hooks completes the BatchNorms it reports. Output heads are never in a group.

    Raises:
        ValueError: a name is not the weight of a Linear/Conv layer, is in a ``MultiheadAttention``, is a
            transposed convolution, or no group is left.
    """
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
