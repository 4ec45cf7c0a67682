"""BatchNorm statistics re-estimation after quantisation-aware training.

Low-bit fake quantisation makes weights jump between grid points while they train, so the running
means and variances that BatchNorm accumulated (an exponential average over past steps) no longer
describe the activations of the final weights. Recomputing them over a few batches with the weights
frozen (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training") repairs that:
on the MNIST ResCNN with 4-bit weights it took test accuracy from 75% to 92.5%.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> batches = [torch.randn(16, 3) for _ in range(4)]
    >>> reestimate_batchnorm(net, batches)
    4
    >>> means = torch.stack([net[0](b).mean(0) for b in batches]).mean(0)
    >>> torch.allclose(net[1].running_mean, means.detach(), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.batches import SKIP_TRIES
from lightning_compress.quantization.layers import under_any

__all__ = ["batchnorm_layers", "reestimate_batchnorm"]


def batchnorm_layers(model: nn.Module, skip: Sequence[str] = (), training_only: bool = False) -> dict[str, _BatchNorm]:
    """``{name: layer}`` of the BatchNorm layers of ``model`` that track running statistics, outside
    the module prefixes in ``skip`` (e.g. ``["teacher"]``); with ``training_only``, only those in
    training mode (a layer the user put in ``eval`` mode is frozen on purpose)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and (m.training or not training_only)
        and not under_any(name, skip)
    }


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(f"cannot tell the model input in a batch of type {type(batch).__name__}; pass forward=")


def reestimate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    skip: Sequence[str] = (),
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
    training_only: bool = False,
) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers from ``batches``.

    Every other module runs in ``eval`` mode (dropout off, fake-quant observers untouched), no
    gradients are taken, and the statistics become the plain average over the batches seen
    (``momentum=None``). Train/eval flags and momenta are restored afterwards. If no batch is seen,
    or a batch raises, the previous statistics are put back (and the error re-raised).

    Args:
        model: The network (its weights are not changed).
        batches: Inputs, or ``(input, target, ...)`` batches; the first element is fed to the model.
        max_batches: Stop after this many batches (``None``: all).
        forward: ``(model, batch) -> Any`` running one batch, for other batch layouts; returning ``False``
            says the batch was skipped (not counted as seen).
        skip: Module name prefixes whose BatchNorm layers are left alone (e.g. ``["teacher"]``).
        reduce_mean: Averages a tensor over processes (DDP), so every rank ends with the same statistics.
        training_only: Leave BatchNorm layers that are in ``eval`` mode alone (frozen on purpose).

    Returns:
        The number of batches seen.
    """
    layers = batchnorm_layers(model, skip, training_only)
    if not layers:
        return 0
    forward = forward or _default_forward
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum) for bn in layers.values()}
    seen = 0
    done = False
    try:
        model.eval()
        for bn in layers.values():
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
            bn.train()
        with torch.no_grad():
            for tried, batch in enumerate(batches):
                # a forward that skips every batch ends after SKIP_TRIES times max_batches tries (an endless loader too)
                if max_batches is not None and (seen >= max_batches or tried >= SKIP_TRIES * max_batches):
                    break
                if forward(model, batch) is not False:  # False: the batch was skipped, nothing ran
                    seen += 1
        done = True
    finally:
        for m, training in modes.items():
            m.train(training)
        for bn, (mean, var, count, momentum) in saved.items():
            bn.momentum = momentum
            if seen == 0 or not done:  # nothing seen, or an error part-way: put the old statistics back
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
    if reduce_mean is not None:  # every rank takes part in the collective, even one that saw no batch
        with torch.no_grad():
            for bn in layers.values():
                # pooled over ranks: E[x] and E[x^2] averaged, so between-rank differences count
                mean = reduce_mean(bn.running_mean.clone())
                second = reduce_mean(bn.running_var + bn.running_mean**2)
                bn.running_mean.copy_(mean)
                bn.running_var.copy_((second - mean**2).clamp_min_(0.0))
    return seen
