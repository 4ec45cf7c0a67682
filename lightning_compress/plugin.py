"""The small contract between compression plugins and the :class:`~lightning_compress.CompressionReport`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

__all__ = ["CompressionCallback"]


class CompressionCallback(Callback):
    """Base class of the callbacks that compress a model.

    The report reads three things from every callback of this type, and from a LightningModule that
    defines the same methods (``DistillationModule`` does):

    - :meth:`compression_state`: scalars recorded once per epoch and plotted (``{"sparsity": 0.42}``,
      ``{"weight_bits": 8}``).
    - :meth:`compression_summary`: a JSON-ready section of the report (per-layer sparsity, bits...).
    - :meth:`compressed_artifact`: the model to measure as "compressed" instead of the trained module
      (the converted int8 model, say), or ``None``.
    - :meth:`is_active`: whether the plugin has changed the model yet; the report takes the baseline
      metrics from the last validation before any plugin became active.

    A LightningModule may also define ``compression_baseline()`` (the model to compare against, e.g.
    a distillation teacher, copied when fit starts) and ``compression_baseline_metrics()`` (that
    model's metrics, used instead of the pre-compression epochs).

    Subclasses that change the model in ``setup`` call ``super().setup(trainer, pl_module, stage)``
    first: it lets every :class:`~lightning_compress.CompressionReport` of the run copy the model
    before it is changed, whatever the order of the callbacks.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            take_baselines(trainer, pl_module)

    def compression_state(self) -> dict[str, float]:
        return {}

    def compression_summary(self) -> dict[str, Any]:
        return {}

    def compressed_artifact(self) -> nn.Module | None:
        return None

    def is_active(self) -> bool:
        return False


def speaks_contract(pl_module: LightningModule) -> bool:
    """Whether a LightningModule is a compression plugin itself (it defines ``compressed_artifact()``,
    as :class:`~lightning_compress.DistillationModule` does)."""
    return callable(getattr(pl_module, "compressed_artifact", None))


def module_artifact(pl_module: LightningModule) -> nn.Module | None:
    """The module's own compressed artifact (a distilled student), or ``None`` when it has none."""
    return pl_module.compressed_artifact() if speaks_contract(pl_module) else None


def run_dir(trainer: Trainer) -> Path:
    """The run's log directory (``trainer.log_dir``, else ``default_root_dir``). ``trainer.log_dir``
    broadcasts under DDP: call this on every rank, never inside a rank-0-only branch."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def example_input(trainer: Trainer, pl_module: LightningModule) -> torch.Tensor | None:
    """The module's ``example_input_array`` when it is a tensor, else the first tensor of one batch of
    the trainer's training dataloader; ``None`` when neither exists (dict batches, no loader)."""
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return example
    loader = getattr(trainer, "train_dataloader", None)
    try:
        batch = next(iter(loader)) if loader is not None else None
    except (TypeError, StopIteration):
        batch = None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, torch.Tensor):
        return batch
    return None


def take_baselines(trainer: Trainer, pl_module: LightningModule) -> None:
    """Ask every CompressionReport of ``trainer`` to copy the model now (before it is changed)."""
    from lightning_compress.report import CompressionReport

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, CompressionReport):
            callback.take_baseline(pl_module)
