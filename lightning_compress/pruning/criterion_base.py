"""The criterion interface: what a criterion may look at (:class:`PruningContext`) and the methods the
pruning callback calls (:class:`Criterion`). The built-in criteria are in
:mod:`lightning_compress.pruning.criteria` and :mod:`lightning_compress.pruning.wanda`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning.channel_masks import ChannelGroupSpec

__all__ = ["Criterion", "PruningContext"]


@dataclass
class PruningContext:
    """What a criterion may look at.

    Attributes:
        model: The LightningModule (names below are relative to it).
        params: ``{parameter name: parameter}`` of the weights being pruned.
        modules: ``{module name: module}`` of the whole model.
        groups: Channel groups (``channel`` granularity only).
        batchnorms: ``{Conv/Linear module name: name of the BatchNorm that consumes its output}``.
        seed: The callback's seed.
        shards: The processes holding the other rows of sharded weights (FSDP2), else ``None``; the
            scores are then asked for this process's rows (``params`` are still the whole parameters,
            whose :func:`~lightning_compress.pruning.shards.row_range` says which rows those are).
        data_group: The other processes of a data-parallel fit (DDP), which run other batches through the
            same whole weights, else ``None``: a criterion that reads the data sums its statistics over them
            (:func:`~lightning_compress.sharding.data_parallel_group`).
    """

    model: nn.Module
    params: dict[str, Tensor]
    modules: dict[str, nn.Module]
    groups: list[ChannelGroupSpec] = field(default_factory=list)
    batchnorms: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    shards: Any = None
    data_group: Any = None


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _per_channel(group: ChannelGroupSpec, name: str, scores: Tensor) -> Tensor:
    """Element scores of a member weight summed over each channel's entries: a channel's rows (a head's
    rows), along the weight's output dim and in each of its blocks (a fused q/k/v)."""
    dim, blocks = group.layout(name)
    if dim:
        scores = scores.movedim(dim, 0)
    return scores.reshape(blocks, group.size, -1).abs().sum((0, 2))


class Criterion:
    """Base class of importance criteria. Override :meth:`element_scores` or :meth:`channel_scores`.

    Class attribute ``granularities`` lists the granularities it supports among ``"unstructured"``,
    ``"channel"`` and ``"nm"``.
    """

    name: str = "custom"
    granularities: tuple[str, ...] = ("unstructured", "channel", "nm")
    #: Whether scores need training batches seen first (pruning cannot happen before the first step).
    needs_data: bool = False
    #: Whether it reads the layers' inputs in training steps (the callback then makes each batch's padding
    #: mask the current one: :mod:`lightning_compress.token_mask`).
    reads_inputs: bool = False
    #: Whether unstructured masks compare scores within each output row (every row loses the same
    #: share; the callback's ``scope`` is then ``"row"``) instead of across a layer or the model.
    per_row: bool = False

    def setup(self, ctx: PruningContext, granularity: str) -> None:
        """Check that the criterion applies (raise ``ValueError`` otherwise) and attach hooks."""
        if granularity not in self.granularities:
            raise ValueError(
                f"criterion {self.name!r} does not apply to structure {_gran_name(granularity)!r}; it supports "
                f"{[_gran_name(g) for g in self.granularities]}"
            )
        self.ctx = ctx

    def data_processes(self) -> Any:
        """The processes whose data statistics add up to this model's: the shards' (FSDP2) or the replicas' (DDP);
        ``None`` with one process, or before :meth:`setup`."""
        ctx = getattr(self, "ctx", None)
        if ctx is None:
            return None
        return ctx.shards if ctx.shards is not None else ctx.data_group

    def teardown(self) -> None:
        """Remove hooks (called when pruning ends)."""

    def on_before_optimizer_step(self, params: Mapping[str, Tensor]) -> None:
        """Called with gradients available, before every optimizer step."""

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Importance of every element of each weight (same shapes)."""
        raise NotImplementedError(f"criterion {self.name!r} does not score individual weights")

    def channel_scores(self, params: Mapping[str, Tensor], groups: Sequence[ChannelGroupSpec]) -> list[Tensor]:
        """Importance of every output channel of each group. Default: the members' element scores summed
        over each output channel, each member normalised by its mean, averaged over the members."""
        names = {f"{m}.weight" for g in groups for m in g.members}
        elem = self.element_scores({n: params[n] for n in names})
        out = []
        for g in groups:
            per = []
            for m in g.members:
                s = _per_channel(g, f"{m}.weight", elem[f"{m}.weight"].detach().float())
                per.append(s / s.mean().clamp_min(1e-12))
            out.append(torch.stack(per).mean(0))
        return out

    def reset(self) -> None:
        """Forget what was accumulated (called after each mask update)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _gran_name(g: str) -> str:
    return "N:M" if g == "nm" else g
