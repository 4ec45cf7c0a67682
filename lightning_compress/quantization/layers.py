"""Quantisation-aware layers by in-place class swap, and the functions that find and strip them in a model.

Choosing the layers and swapping them in (:func:`~lightning_compress.quantization.layer_selection.prepare_fake_quant`)
is in :mod:`~lightning_compress.quantization.layer_selection`.

Design: a supported layer (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` or
``nn.MultiheadAttention``, or a subclass of one that does not override ``forward``, such as attention's
``NonDynamicallyQuantizableLinear``) gets its ``__class__`` switched to a subclass (:class:`QATLinear`
...; for a subclass, one made from it and the QAT class, so ``isinstance`` keeps holding for it) whose
``forward`` has the same signature and fake-quantises the weight (and the input, through an EMA
observer) before calling the same functional op. A child module ``quantizer`` holds the settings and
the observer. Nothing is monkey-patched on the instance, the ``weight``/``bias`` ``Parameter`` objects are the very same
(optimizers, pruning masks and other callbacks keep their references), ``isinstance(m, nn.Linear)``
still holds, the observer buffers are non-persistent so ``state_dict`` keys do not change (the
checkpoint loads strictly into the float model), and :func:`strip_fake_quant` restores the original
classes. ``torch.nn.utils.parametrize`` was rejected: it renames the keys to
``parametrizations.weight.original`` and makes ``weight`` a computed tensor that in-place pruning
masks cannot write to.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.quantization.layer_selection import prepare_fake_quant
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

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.selection import is_conv1d
from lightning_compress.quantization.fake_quant import (
    Granularity,
    MinMaxObserver,
    activation_qparams,
    fake_quantize_activation,
    fake_quantize_weight,
)

__all__ = [
    "SUPPORTED_TYPES",
    "is_supported_type",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATEmbedding",
    "QATLinear",
    "QATMultiheadAttention",
    "QATTransposedLinear",
    "QuantSettings",
    "Quantizer",
    "attention_weight_names",
    "disable_fast_paths",
    "fake_quant_layers",
    "quantised_weights",
    "restore_fast_paths",
    "strip_fake_quant",
    "strip_layer",
    "weight_readers",
]


@dataclass
class QuantSettings:
    """Per-layer quantisation settings (``activation_bits`` is ignored for the weight-only layers:
    embeddings, attention modules and their ``out_proj``, and layers with tied weights)."""

    bits: int = 8
    activation_bits: int | None = 8
    granularity: Granularity = "per_channel"
    rounding: str = "nearest"
    observer_momentum: float | None = 0.1


class Quantizer(nn.Module):
    """Settings, switches and the input observer of one fake-quantised layer (child ``quantizer``).

    ``enabled`` turns fake quantisation on; ``observing`` lets the input observer update (the callback
    sets it only around training steps and during PTQ calibration, never in validation/test/predict).
    Evaluation and the converted model round with :attr:`inference_rounding`: the training rounding,
    except that stochastic rounding (training only) becomes rounding to nearest.
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

    @property
    def inference_rounding(self) -> str:
        """The rounding of evaluation and of conversion: ``"nearest"`` for ``"stochastic"`` (a training
        rounding), else :attr:`rounding` itself, so the converted weights are the evaluated ones."""
        return "nearest" if self.rounding == "stochastic" else self.rounding

    def weight(self, w: Tensor, matmul: bool = True) -> Tensor:
        """The fake-quantised ``w``. ``matmul``: it feeds a matmul or convolution, which autocast runs in
        its lower dtype, so under autocast the rounded weight is returned in that dtype directly."""
        if not self.enabled:
            return w
        rounding = self.rounding if self.training else self.inference_rounding
        dtype = None
        if matmul and torch.is_autocast_enabled(w.device.type) and w.dtype == torch.float32:
            dtype = torch.get_autocast_dtype(w.device.type)
        return fake_quantize_weight(w, self.bits, self.granularity, rounding, dtype=dtype)

    def input(self, x: Tensor) -> Tensor:
        obs = self.observer
        if obs is None or not self.enabled:
            return x
        if self.observing:
            obs.update(x)
        if not obs.is_initialized():
            return x
        scale, zero_point = self.activation_qparams(x.dtype)
        return fake_quantize_activation(x, scale, zero_point, self.activation_bits or 8)

    def activation_qparams(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the input from the observed range, as inputs of ``dtype`` (default:
        the observer's, float32) are quantised with them: in that dtype, the scale rounded to it (see
        :func:`~lightning_compress.quantization.fake_quant.activation_qparams`)."""
        assert self.observer is not None
        return activation_qparams(self.observer.min_val, self.observer.max_val, self.activation_bits or 8, dtype)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, activation_bits={self.activation_bits}, granularity={self.granularity!r}, "
            f"rounding={self.rounding!r}, enabled={self.enabled}"
        )


class _CountsQuantisedWeights:
    """What :func:`~lightning_compress.measure.count_parameters` counts of a fake-quantised layer: its
    weights as evaluation computes with them, so the zeros that rounding makes count as zeros."""

    quantizer: Quantizer

    def counted_parameters(self) -> dict[str, Tensor]:
        qz = self.quantizer
        if not qz.enabled:
            return {}
        names = attention_weight_names(self) if isinstance(self, nn.MultiheadAttention) else ["weight"]
        transposed = isinstance(self, QATTransposedLinear)  # (in, out): quantised per column
        with torch.no_grad():
            return {
                n: fake_quantize_weight(w.t() if transposed else w, qz.bits, qz.granularity, qz.inference_rounding)
                for n in names
                for w in [getattr(self, n).detach()]
            }


class QATLinear(_CountsQuantisedWeights, nn.Linear):
    """``nn.Linear`` computing ``F.linear(fq(input), fq(weight), bias)``."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATConv1d(_CountsQuantisedWeights, nn.Conv1d):
    """``nn.Conv1d`` on fake-quantised input and weight."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATConv2d(_CountsQuantisedWeights, nn.Conv2d):
    """``nn.Conv2d`` on fake-quantised input and weight."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATConv3d(_CountsQuantisedWeights, nn.Conv3d):
    """``nn.Conv3d`` on fake-quantised input and weight."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATTransposedLinear(_CountsQuantisedWeights, nn.Module):
    """A GPT-2 style ``Conv1D`` (weight ``(in, out)``, :func:`~lightning_compress.selection.is_conv1d`)
    computing ``F.linear(fq(input), fq(weight.T), bias)``: its own ``x @ weight + bias`` on fake-quantised
    operands, each output channel (a column of ``weight``) with its own scale. Mixed into a class made
    from the user's ``Conv1D`` class (``transformers`` is not imported); converted like a Linear."""

    quantizer: Quantizer
    weight: Tensor
    bias: Tensor | None

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.quantizer.input(input), self.quantizer.weight(self.weight.t()), self.bias)


class QATEmbedding(_CountsQuantisedWeights, nn.Embedding):
    """``nn.Embedding`` looking up a fake-quantised table (weight-only: the input is indices).

    With ``max_norm``, the rows ``input`` refers to are renormalised in the stored weight first, in place and
    without grad, as ``nn.Embedding`` does; the fake-quantised table of that weight is then looked up as it
    is (renormalising the fake-quantised copy instead changed a temporary, never the weight, and failed the
    backward: the straight-through output is a view)."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        if self.max_norm is not None:
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, input.contiguous(), self.max_norm, self.norm_type)
        return F.embedding(
            input,
            self.quantizer.weight(self.weight, matmul=False),
            self.padding_idx,
            None,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


def attention_weight_names(module: nn.MultiheadAttention) -> list[str]:
    """The projection weights of an attention module that quantisation takes: the packed
    ``in_proj_weight``, or ``q/k/v_proj_weight`` when keys or values have their own width."""
    if module._qkv_same_embed_dim:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


class QATMultiheadAttention(_CountsQuantisedWeights, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` on fake-quantised projection weights (weight-only).

    The same signature, masks, ``batch_first``, ``need_weights`` and outputs as
    ``nn.MultiheadAttention.forward``; the computation is its general path,
    ``F.multi_head_attention_forward``, given the fake-quantised ``in_proj_weight`` (or ``q/k/v``
    weights) and, when ``out_proj`` is fake-quantised too, its fake-quantised weight. The fused
    inference path (``torch._native_multi_head_attention``) is not taken, so validation during QAT
    sees the quantised weights. The inputs are not quantised: the converted module keeps computing
    in float on the dequantised weights (no integer kernel to match), and ``out_proj``'s input is
    computed inside the functional op (the module's ``forward`` is never called), so it is weight-only
    as well.
    """

    quantizer: Quantizer

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False
        )
        if self.batch_first and is_batched:  # as nn.MultiheadAttention does, keeping q is k is v where it holds
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        w = {n: self.quantizer.weight(getattr(self, n)) for n in attention_weight_names(self)}
        out = self.out_proj
        out_weight = out.quantizer.weight(out.weight) if type(out) in _QAT_TYPES else out.weight
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            w.get("in_proj_weight"),
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_weight,
            out.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=w.get("q_proj_weight"),
            k_proj_weight=w.get("k_proj_weight"),
            v_proj_weight=w.get("v_proj_weight"),
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights


SUPPORTED_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Conv3d: QATConv3d,
    nn.Embedding: QATEmbedding,
    nn.MultiheadAttention: QATMultiheadAttention,
}
#: fake-quant class -> the class it replaced (the subclasses made by :func:`_qat_class` join it)
_QAT_TYPES: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in SUPPORTED_TYPES.items()}
_SUBCLASS_QAT: dict[type[nn.Module], type[nn.Module]] = {}


# Linear subclasses whose ``forward`` overrides nn.Linear's with the same product, written out:
# Falcon's ``FalconLinear`` (``input @ weight.T`` plus bias, every projection of the model).
_LINEAR_PRODUCT_FORWARDS = frozenset({"FalconLinear"})


def _qat_class(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The fake-quant class for layers of class ``cls``, or ``None`` when there is none.

    A subclass of a supported type that does not override ``forward`` (attention's
    ``NonDynamicallyQuantizableLinear``) gets a class made from the QAT class and itself, once per
    class: ``isinstance`` keeps holding for the subclass, and its other methods stay its own. A
    subclass with its own ``forward`` has none: the QAT ``forward`` would replace what it computes.
    A GPT-2 style ``Conv1D`` gets one made with :class:`QATTransposedLinear`, which computes its product,
    and a Linear subclass whose forward only writes out the Linear product (``FalconLinear``) one made
    with :class:`QATLinear`.
    """
    if cls in SUPPORTED_TYPES:
        return SUPPORTED_TYPES[cls]
    if cls in _QAT_TYPES:
        return cls
    if cls in _SUBCLASS_QAT:
        return _SUBCLASS_QAT[cls]
    qat = next((q for base, q in SUPPORTED_TYPES.items() if issubclass(cls, base) and cls.forward is base.forward), None)
    if qat is None and cls.__name__ == "Conv1D" and not issubclass(cls, nn.modules.conv._ConvNd):
        qat = QATTransposedLinear  # GPT-2's (in, out) layer: its forward is replaced by the same product
    if qat is None and cls.__name__ in _LINEAR_PRODUCT_FORWARDS and issubclass(cls, nn.Linear):
        qat = QATLinear  # its own forward computes what nn.Linear's does
    if qat is None:
        return None
    name = f"QAT{cls.__name__}"
    module = sys.modules[__name__]
    while hasattr(module, name):  # a name of its own in this module, so pickle finds the class
        name += "_"
    body = {"__module__": __name__, "__qualname__": name, "__doc__": f"{qat.__name__} for {cls.__qualname__}."}
    made = type(name, (qat, cls), body)
    setattr(module, name, made)
    _SUBCLASS_QAT[cls] = made
    _QAT_TYPES[made] = cls
    return made


def under_any(name: str, prefixes: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one (``"teacher"`` covers ``"teacher.fc"``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_supported_type(module: nn.Module) -> bool:
    """Whether quantisation takes modules of ``module``'s type: :data:`SUPPORTED_TYPES` and GPT-2's ``Conv1D``."""
    return isinstance(module, tuple(SUPPORTED_TYPES)) or is_conv1d(module)


def _weight_leaves(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that quantisation takes ([] when it takes none)."""
    if isinstance(module, nn.MultiheadAttention):
        return attention_weight_names(module)
    return ["weight"] if is_supported_type(module) else []


def quantised_weights(module: nn.Module) -> dict[str, Tensor]:
    """``{parameter name: tensor}`` of the weights a (fake-quant) layer quantises."""
    return {n: getattr(module, n) for n in _weight_leaves(module)}


def weight_readers(root: nn.Module, chosen: Sequence[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """``{weight name: [names of the modules whose forward may read it]}`` for the weights of ``chosen``
    layers: the layer itself, and for an attention module's ``out_proj`` the attention module, which
    computes it (fake-quantised there too). A tied weight appears under each layer's name."""
    modules = dict(root.named_modules())
    readers: dict[str, list[str]] = {}
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        computed_by_parent = child == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention)
        own = [name, parent] if computed_by_parent else [name]
        for leaf in _weight_leaves(module):
            readers[f"{name}.{leaf}" if name else leaf] = own
    return readers


def fake_quant_layers(root: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the fake-quantised layers inside ``root``."""
    return {n: m for n, m in root.named_modules() if type(m) in _QAT_TYPES}


def strip_fake_quant(root: nn.Module, layers: Iterable[nn.Module] | None = None) -> None:
    """Undo :func:`prepare_fake_quant` in place: original classes, no ``quantizer`` children, the
    transformer fast paths as they were. ``layers``: only these fake-quantised layers of ``root`` (one
    callback's, beside another's); the fast paths come back once none is left."""
    for module in list(fake_quant_layers(root).values() if layers is None else layers):
        strip_layer(module)
    if not fake_quant_layers(root):
        restore_fast_paths(root)


def strip_layer(module: nn.Module) -> None:
    """One fake-quant layer back to its original class, without its ``quantizer``."""
    del module.quantizer
    module.__class__ = _QAT_TYPES[type(module)]


_FAST_PATH_SAVED = "_quantization_fast_path_saved"


def _switch(module: nn.Module, attr: str, value: Any) -> None:
    saved = module.__dict__.setdefault(_FAST_PATH_SAVED, {})
    saved.setdefault(attr, getattr(module, attr, None))
    setattr(module, attr, value)


def disable_fast_paths(root: nn.Module, layers: Iterable[nn.Module]) -> None:
    """Make ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` modules that hold one of ``layers``
    take their general path, per module.

    Their inference fast path (``eval()`` under ``no_grad``) reads ``linear1.weight``,
    ``self_attn.in_proj_weight`` ... itself and runs one fused float kernel: it would skip fake
    quantisation in QAT validation and, on a converted model, the int8 kernels and input quantisation
    of the converted layers. The switch is the layer's own ``activation_relu_or_gelu`` (read only by
    that fast path; the activation itself is ``activation``) set to ``0``, and the encoder's
    ``use_nested_tensor`` set to ``False``; nothing process-wide (``torch.backends.mha``) changes.
    :func:`restore_fast_paths` puts the values back. Attention modules themselves keep their fast
    path: their converted form computes in float on the dequantised weights anyway.
    """
    ids = {id(m) for m in layers}
    for module in root.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) and any(id(m) in ids for m in module.modules()):
            if isinstance(module, nn.TransformerEncoderLayer):
                _switch(module, "activation_relu_or_gelu", 0)
            else:
                _switch(module, "use_nested_tensor", False)


def restore_fast_paths(root: nn.Module) -> None:
    """Undo :func:`disable_fast_paths` inside ``root``."""
    for module in root.modules():
        for attr, value in module.__dict__.pop(_FAST_PATH_SAVED, {}).items():
            setattr(module, attr, value)


def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``, ``"embedding"`` or ``"attention"`` for a (QAT) layer."""
    kinds = (
        (nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"), (nn.Embedding, "embedding"),
        (nn.MultiheadAttention, "attention"),
    )
    for base, name in kinds:
        if isinstance(module, base):
            return name
    if is_conv1d(module):  # converted as the Linear it computes
        return "linear"
    raise TypeError(f"not a quantisable layer: {type(module).__name__}")
