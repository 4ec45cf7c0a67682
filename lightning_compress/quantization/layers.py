"""Quantisation-aware layers by in-place class swap, and the functions that prepare and strip a model.

Design: a supported layer (exactly ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Embedding``)
gets its ``__class__`` switched to a subclass (:class:`QATLinear` ...) whose ``forward`` has the same
signature and fake-quantises the weight (and the input, through an EMA observer) before calling the
same functional op. A child module ``quantizer`` holds the settings and the observer. Nothing is
monkey-patched on the instance, the ``weight``/``bias`` ``Parameter`` objects are the very same
(optimizers, pruning masks and other callbacks keep their references), ``isinstance(m, nn.Linear)``
still holds, the observer buffers are non-persistent so ``state_dict`` keys do not change (the
checkpoint loads strictly into the float model), and :func:`strip_fake_quant` restores the original
classes. ``torch.nn.utils.parametrize`` was rejected: it renames the keys to
``parametrizations.weight.original`` and makes ``weight`` a computed tensor that in-place pruning
masks cannot write to.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> keys = list(net.state_dict())
    >>> layers = prepare_fake_quant(net, QuantSettings(bits=4))
    >>> sorted(layers), type(net[0]).__name__, isinstance(net[0], nn.Linear)
    (['0', '2'], 'QATLinear', True)
    >>> list(net.state_dict()) == keys
    True
    >>> net(torch.randn(5, 4)).shape
    torch.Size([5, 2])
    >>> strip_fake_quant(net); type(net[0]).__name__
    'Linear'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.selection import select_weights
from lightning_compress.quantization.fake_quant import (
    Granularity,
    MinMaxObserver,
    activation_qparams,
    fake_quantize_activation,
    fake_quantize_weight,
)

__all__ = [
    "SUPPORTED_TYPES",
    "QATConv1d",
    "QATConv2d",
    "QATEmbedding",
    "QATLinear",
    "QuantSettings",
    "Quantizer",
    "fake_quant_layers",
    "prepare_fake_quant",
    "select_layers",
    "strip_fake_quant",
]


@dataclass
class QuantSettings:
    """Per-layer quantisation settings (``activation_bits`` is ignored for embeddings)."""

    bits: int = 8
    activation_bits: int | None = 8
    granularity: Granularity = "per_channel"
    rounding: str = "nearest"
    observer_momentum: float | None = 0.1


class Quantizer(nn.Module):
    """Settings, switches and the input observer of one fake-quantised layer (child ``quantizer``).

    ``enabled`` turns fake quantisation on; ``observing`` lets the input observer update (the callback
    sets it only around training steps and during PTQ calibration, never in validation/test/predict). Stochastic rounding is used in training only; evaluation
    rounds to nearest, as the converted model does.
    """

    def __init__(self, settings: QuantSettings, weight_only: bool = False) -> None:
        super().__init__()
        self.bits = int(settings.bits)
        self.activation_bits = None if weight_only else settings.activation_bits
        self.granularity = settings.granularity
        self.rounding = settings.rounding
        self.enabled = True
        self.observing = False
        self.observer = MinMaxObserver(settings.observer_momentum) if self.activation_bits else None

    def weight(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        rounding = self.rounding if self.training or self.rounding != "stochastic" else "nearest"
        return fake_quantize_weight(w, self.bits, self.granularity, rounding)

    def input(self, x: Tensor) -> Tensor:
        obs = self.observer
        if obs is None or not self.enabled:
            return x
        if self.observing:
            obs.update(x)
        if not bool(obs.initialized):
            return x
        scale, zero_point = self.activation_qparams()
        return fake_quantize_activation(x, scale.to(x.dtype), zero_point.to(x.dtype), self.activation_bits or 8)

    def activation_qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the input from the observed range."""
        assert self.observer is not None
        return activation_qparams(self.observer.min_val, self.observer.max_val, self.activation_bits or 8)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, activation_bits={self.activation_bits}, granularity={self.granularity!r}, "
            f"rounding={self.rounding!r}, enabled={self.enabled}"
        )


class QATLinear(nn.Linear):
    """``nn.Linear`` computing ``F.linear(fq(input), fq(weight), bias)``."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATConv1d(nn.Conv1d):
    """``nn.Conv1d`` on fake-quantised input and weight."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATConv2d(nn.Conv2d):
    """``nn.Conv2d`` on fake-quantised input and weight."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` looking up a fake-quantised table (weight-only: the input is indices)."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(
            input,
            self.quantizer.weight(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


SUPPORTED_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Embedding: QATEmbedding,
}
_QAT_TYPES = {v: k for k, v in SUPPORTED_TYPES.items()}


def under_any(name: str, prefixes: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one (``"teacher"`` covers ``"teacher.fc"``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _quantisable_weight(module: nn.Module, leaf: str) -> bool:
    return leaf == "weight" and isinstance(module, tuple(SUPPORTED_TYPES))


def select_layers(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to quantise, or a ``ValueError`` naming what cannot be.

    The weights are chosen by :func:`lightning_compress.selection.select_weights` (the rule pruning
    uses too): by default every ``nn.Linear``, ``nn.Conv1d/2d`` and ``nn.Embedding`` outside a
    ``teacher``; ``include``/``exclude`` are regexes on module names, and each must match something.
    ``quantize_teacher=True`` adds the teacher's layers to the default. Subclasses of the supported
    types with their own ``forward`` cannot be swapped safely and raise, with a hint to exclude them.

    Raises:
        ValueError: a pattern matches nothing, a chosen layer cannot be quantised, or nothing is left.
    """
    kind = _quantisable_weight
    if quantize_teacher:
        if include is None:
            include = [".*", "teacher"]
    names = select_weights(root, include, exclude, kind, "quantise")
    modules = dict(root.named_modules())
    chosen: list[tuple[str, nn.Module]] = []
    for pname in names:
        name, _, leaf = pname.rpartition(".")
        module = modules[name]
        if leaf == "weight" and (type(module) in SUPPORTED_TYPES or type(module) in _QAT_TYPES):
            chosen.append((name, module))
            continue
        raise ValueError(
            f"cannot quantise {pname!r} ({type(module).__name__}): supported are the weights of "
            f"{[t.__name__ for t in SUPPORTED_TYPES]} (exact classes, not subclasses with their own forward); "
            f"add a pattern matching it to exclude, e.g. exclude=[{re.escape(name)!r}]"
        )
    return chosen


def prepare_fake_quant(
    root: nn.Module,
    settings: QuantSettings,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> dict[str, nn.Module]:
    """Swap the selected layers to their QAT classes in place; return ``{name: layer}``.

    All checks run before the first layer changes. Already prepared layers are kept as they are.
    """
    chosen = select_layers(root, include, exclude, quantize_teacher)
    if isinstance(settings.granularity, int):
        for name, module in chosen:
            per_row = module.weight[0].numel()
            if per_row % settings.granularity:
                raise ValueError(
                    f"group size {settings.granularity} does not divide the {per_row} weights per output "
                    f"channel of layer {name!r}; choose a divisor, 'per_channel', or exclude the layer"
                )
    out: dict[str, nn.Module] = {}
    for name, module in chosen:
        if type(module) in SUPPORTED_TYPES:
            module.__class__ = SUPPORTED_TYPES[type(module)]
            module.add_module("quantizer", Quantizer(settings, weight_only=isinstance(module, nn.Embedding)))
            module.quantizer.to(module.weight.device)
        out[name] = module
    return out


def fake_quant_layers(root: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the fake-quantised layers inside ``root``."""
    return {n: m for n, m in root.named_modules() if type(m) in _QAT_TYPES}


def strip_fake_quant(root: nn.Module) -> None:
    """Undo :func:`prepare_fake_quant` in place: original classes, no ``quantizer`` children."""
    for _, module in fake_quant_layers(root).items():
        del module.quantizer
        module.__class__ = _QAT_TYPES[type(module)]


def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"embedding"`` for a (QAT) layer."""
    for base, name in ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Embedding, "embedding")):
        if isinstance(module, base):
            return name
    raise TypeError(f"not a quantisable layer: {type(module).__name__}")
