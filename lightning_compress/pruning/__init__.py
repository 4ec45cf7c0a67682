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
    make_criterion,
)

__all__ = [
    "BNScale",
    "CRITERIA",
    "CallableCriterion",
    "Criterion",
    "Entropy",
    "Magnitude",
    "PruningCallback",
    "PruningContext",
    "Random",
    "Taylor",
    "make_criterion",
]
