"""Training batches run outside the training step by quantisation: PTQ calibration and BatchNorm
re-estimation during a fit. Each batch goes through :func:`lightning_compress.batches.run_batch`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_compress.batches import BatchForward, eval_mode, random_state_kept, run_batch, run_batches, to_module_device, train_loader
from lightning_compress.quantization.batchnorm import reestimate_batchnorm

__all__ = ["calibrate_ranges", "reestimate_in_fit", "training_batches"]


def training_batches(trainer: Trainer, loader: Any = None) -> Iterator[Any]:
    """The fit's training batches (of ``loader``, default :func:`~lightning_compress.batches.train_loader`'s) as the
    step receives them, each prepared as the loop prepares it (:func:`~lightning_compress.batches.to_module_device`)."""
    loader = train_loader(trainer, trainer.lightning_module) if loader is None else loader
    if loader is None:
        raise ValueError("QuantizeCallback needs a training dataloader to run batches on")
    return (to_module_device(trainer.lightning_module, b) for b in loader)


def batches_allowed(trainer: Trainer, max_batches: int) -> int:
    """``max_batches``, at most the training batches an epoch of this fit runs (``limit_train_batches``)."""
    n = trainer.num_training_batches
    return min(max_batches, n) if isinstance(n, int) and n >= 0 else max_batches


def calibrate_ranges(
    trainer: Trainer, pl_module: LightningModule, layers: Mapping[str, nn.Module], max_batches: int, batch_forward: BatchForward | None
) -> int:
    """Observe the input ranges of ``layers`` on up to ``max_batches`` training batches, the module in
    eval mode without gradients (a progress bar on rank 0); returns the number of batches seen."""
    from tqdm.auto import tqdm

    loader = train_loader(trainer, pl_module)
    if loader is None:
        raise ValueError("QuantizeCallback needs a training dataloader to run batches on")
    max_batches = batches_allowed(trainer, max_batches)
    try:
        total = min(max_batches, len(loader))  # type: ignore[arg-type]
    except TypeError:
        total = max_batches
    for layer in layers.values():
        layer.quantizer.enabled = layer.quantizer.observing = True
    show = trainer.progress_bar_callback is not None and trainer.is_global_zero
    try:
        with eval_mode(pl_module), random_state_kept(loader):
            batches = tqdm(loader, total=total, desc="PTQ calibration", disable=not show, leave=False)
            return run_batches(pl_module, batches, total, batch_forward)  # a batch the step skips is not seen
    finally:
        for layer in layers.values():
            layer.quantizer.observing = False


def _indexed_run(batch_forward: BatchForward | None) -> Any:
    """A ``(module, batch) -> bool`` forward for :func:`reestimate_batchnorm` that hands ``training_step``
    the batch's index in this pass (so a step skipping some indices skips the same ones here)."""
    calls = itertools.count()
    return lambda module, batch: run_batch(module, batch, batch_forward, next(calls))


def reestimate_in_fit(
    trainer: Trainer,
    pl_module: LightningModule,
    layers: Mapping[str, nn.Module],
    max_batches: int,
    batch_forward: BatchForward | None,
    protected: Sequence[str],
) -> int:
    """Recompute the BatchNorm running statistics over ``max_batches`` training batches with the current
    fake-quantised weights (observers paused; averaged over processes under DDP; BatchNorms under
    ``protected`` names or in eval mode left alone); returns the number of batches seen."""
    for layer in layers.values():
        layer.quantizer.observing = False
    reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None
    loader = train_loader(trainer, pl_module)
    with random_state_kept(loader):
        return reestimate_batchnorm(
            pl_module,
            training_batches(trainer, loader),
            max_batches=batches_allowed(trainer, max_batches),
            forward=_indexed_run(batch_forward),
            skip=protected,
            reduce_mean=reduce,
            training_only=True,  # a BatchNorm the user put in eval mode stays as it is
        )
