"""One metric object per evaluation dataloader.

With several validation (or test) dataloaders Lightning logs ``val_acc/dataloader_idx_1`` and so on, but a
module holding one ``torchmetrics`` object per stage pools every loader's samples into each of those numbers
(0.435 reported for a loader whose own accuracy was 0.281). :func:`loader_metric` gives each loader its own
copy of the module's metric, made at the loader's first batch and kept in the module (so it moves with it
and, under DDP, synchronises as the original does; metric states are not saved in checkpoints).
"""

from __future__ import annotations

import copy

from torch import nn
from torchmetrics import Metric

__all__ = ["loader_metric"]


def loader_metric(owner: nn.Module, name: str, dataloader_idx: int = 0) -> Metric:
    """``owner.<name>`` for the first dataloader; for dataloader ``dataloader_idx`` > 0 a fresh copy of it.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> module = nn.Module()
        >>> module.val_acc = MulticlassAccuracy(3, average="micro")
        >>> loader_metric(module, "val_acc") is module.val_acc, loader_metric(module, "val_acc", 1) is module.val_acc
        (True, False)
        >>> loader_metric(module, "val_acc", 1) is loader_metric(module, "val_acc", 1)
        True
    """
    metric = getattr(owner, name)
    if not dataloader_idx:
        return metric
    store = owner._modules.get("loader_metrics")
    if store is None:
        store = nn.ModuleDict()
        owner.add_module("loader_metrics", store)
    key = f"{name}_{dataloader_idx}"
    if key not in store:
        copied = copy.deepcopy(metric)
        copied.reset()
        # a metric computes the same in either mode; made in the mode training leaves modules in: after an evaluation
        # Lightning restores the modes it saw before, so a copy made during it stayed in eval mode into training, and
        # Lightning warned of "module(s) in eval mode at the start of training"
        copied.train()
        store[key] = copied
        if getattr(owner, "_metric_attributes", None) is not None:
            owner._metric_attributes = None  # LightningModule.log finds a logged metric by a map it made once
    return store[key]  # type: ignore[return-value]
