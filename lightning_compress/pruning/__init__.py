"""Pruning: importance criteria, masks and channel groups (pure torch) and the :class:`PruningCallback` glue."""

from lightning_compress.pruning.callback import PruningCallback
from lightning_compress.pruning.criteria import (
    CRITERIA,
    BNScale,
    CallableCriterion,
    Criterion,
    Entropy,
    Magnitude,
    PruningContext,
    Random,
    Taylor,
    Wanda,
    make_criterion,
)
from lightning_compress.pruning.graph import ChannelGroup, UnsupportedChannelOpError, channel_groups
from lightning_compress.pruning.reload import allow_shrunk_checkpoints, load_pruned, resize_to_state_dict
from lightning_compress.pruning.shrink import count_macs, remap_optimizer, shrink_in_training, shrink_model, zero_channels

__all__ = [
    "BNScale",
    "ChannelGroup",
    "UnsupportedChannelOpError",
    "CRITERIA",
    "CallableCriterion",
    "Criterion",
    "Entropy",
    "Magnitude",
    "PruningCallback",
    "PruningContext",
    "Random",
    "Taylor",
    "Wanda",
    "allow_shrunk_checkpoints",
    "channel_groups",
    "count_macs",
    "load_pruned",
    "make_criterion",
    "remap_optimizer",
    "resize_to_state_dict",
    "shrink_in_training",
    "shrink_model",
    "zero_channels",
]
