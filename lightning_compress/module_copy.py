"""Deep copies of the models users bring, and the weights a forward hook recomputes.

The older hook-based ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.spectral_norm`` keep the weight as
a plain attribute computed from other parameters (``weight_g``/``weight_v``, ``weight_orig``) by a forward
pre-hook: a non-leaf tensor, which ``copy.deepcopy`` refuses ("Only Tensors created explicitly by the user
(graph leaves) support the deepcopy protocol"), so no copy of such a model could be made (a report's
baseline, a converted or exported model). :func:`copy_model` copies it with that attribute detached (the
copy's hook computes it again at its next forward), leaving the original as it was.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)))
    >>> hook_computed_weights(net[0])
    ['weight']
    >>> torch.equal(copy_model(net)[0].weight, net[0].weight)
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["copy_model", "hook_computed_weights", "hook_source"]


def hook_computed_weights(module: nn.Module) -> list[str]:
    """The names of ``module``'s own tensors that a hook-based ``weight_norm``/``spectral_norm`` recomputes at every
    forward (not parameters of the module: what carries their values is ``<name>_v``/``<name>_g`` or
    ``<name>_orig``)."""
    return [hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, (WeightNorm, SpectralNorm))]


def hook_source(module: nn.Module, name: str) -> str:
    """The parameter of ``module`` whose zeros are the zeros of the weight ``name`` a hook recomputes: ``weight_norm``'s
    direction ``<name>_v``, or ``spectral_norm``'s ``<name>_orig`` (its ``<name>_v`` is a power-iteration buffer)."""
    spectral = any(isinstance(h, SpectralNorm) and h.name == name for h in module._forward_pre_hooks.values())
    return f"{name}_orig" if spectral else f"{name}_v"


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, also of a model holding hook-recomputed weights (see the module's note)."""
    computed = [(m, name) for m in model.modules() for name in hook_computed_weights(m) if isinstance(getattr(m, name, None), torch.Tensor)]
    held = [getattr(m, name) for m, name in computed]
    try:
        for (m, name), tensor in zip(computed, held):
            setattr(m, name, tensor.detach())
        return copy.deepcopy(model, memo)
    finally:
        for (m, name), tensor in zip(computed, held):
            setattr(m, name, tensor)
