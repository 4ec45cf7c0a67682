"""The :mod:`torch.fx` tracer shared by channel pruning and quantisation (BatchNorm folding).

A neutral module, so that neither ``pruning/`` nor ``quantization/`` imports the other for it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import fx, nn

__all__ = ["LEAF_TYPES", "LayerTracer"]

#: Layers traced as single nodes, subclasses included.
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Embedding,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


class LayerTracer(fx.Tracer):
    """Keeps subclasses of the standard layers (e.g. fake-quantising ``QATLinear``) as single nodes,
    so the data-dependent branches of their observers are never traced.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> [n.op for n in LayerTracer().trace(net).nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)

    def trace_with_input(self, model: nn.Module) -> fx.Graph:
        """The graph of ``model`` called with its first input only, as the example call runs it: the other
        parameters of its ``forward`` whose defaults are ``None`` or a bool are traced at them (``labels=None``: a
        symbolic ``labels`` would take the ``labels is not None`` branch, which the call never runs; ``training=False``
        could not be branched on at all). Other defaults stay symbolic: fx cannot specialise a tuple default."""
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return self.trace(model)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        defaults: dict[str, Any] = {
            p.name: p.default for p in params[1:] if p.kind in kinds and (p.default is None or isinstance(p.default, bool))
        }
        return self.trace(model, concrete_args=defaults or None)
