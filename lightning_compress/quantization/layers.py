"""Quantisation-aware layers by in-place class swap, and the functions that prepare and strip a model.

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
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.selection import is_conv1d, preview, select_weights, weights_by_module
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
    "float_weight_holders",
    "prepare_fake_quant",
    "quantised_fraction",
    "quantised_weights",
    "restore_fast_paths",
    "select_layers",
    "skipped_layers",
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


class QATConv3d(nn.Conv3d):
    """``nn.Conv3d`` on fake-quantised input and weight."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantizer.input(input), self.quantizer.weight(self.weight), self.bias)


class QATTransposedLinear(nn.Module):
    """A GPT-2 style ``Conv1D`` (weight ``(in, out)``, :func:`~lightning_compress.selection.is_conv1d`)
    computing ``F.linear(fq(input), fq(weight.T), bias)``: its own ``x @ weight + bias`` on fake-quantised
    operands, each output channel (a column of ``weight``) with its own scale. Mixed into a class made
    from the user's ``Conv1D`` class (``transformers`` is not imported); converted like a Linear."""

    quantizer: Quantizer
    weight: Tensor
    bias: Tensor | None

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.quantizer.input(input), self.quantizer.weight(self.weight.t()), self.bias)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` looking up a fake-quantised table (weight-only: the input is indices)."""

    quantizer: Quantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(
            input,
            self.quantizer.weight(self.weight, matmul=False),
            self.padding_idx,
            self.max_norm,
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


class QATMultiheadAttention(nn.MultiheadAttention):
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


def _weight_leaves(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that quantisation takes ([] when it takes none)."""
    if isinstance(module, nn.MultiheadAttention):
        return attention_weight_names(module)
    return ["weight"] if isinstance(module, tuple(SUPPORTED_TYPES)) or is_conv1d(module) else []


def _quantisable_weight(module: nn.Module, leaf: str) -> bool:
    return leaf in _weight_leaves(module)


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


def _supported() -> str:
    """What quantisation takes, for messages."""
    return (
        f"the weights of {[t.__name__ for t in SUPPORTED_TYPES]}, of GPT-2 style Conv1D and of their subclasses "
        "that do not override forward"
    )


def _cannot(pname: str, module: nn.Module, name: str, why: str) -> ValueError:
    return ValueError(
        f"cannot quantise {pname!r} ({type(module).__name__}): {why}; add a pattern matching it to exclude, "
        f"e.g. exclude=[{re.escape(name)!r}]"
    )


def _weight_holders(root: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [names of the layers holding it as a quantisable weight]}``."""
    holders: dict[int, list[str]] = {}
    for name, module in root.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if leaf in _weight_leaves(module):
                holders.setdefault(id(p), []).append(name)
    return holders


def _check_ties(root: nn.Module, chosen: dict[str, nn.Module]) -> dict[int, list[str]]:
    """Tied weights (one ``Parameter`` held by several layers, as an LM head and its embedding):
    ``{id(parameter): [layer names]}`` for those among ``chosen``, after checking that every layer
    holding one is chosen and that they can share one stored table (Linear without bias, Embedding)."""
    holders = _weight_holders(root)
    ties: dict[int, list[str]] = {}
    for name, module in chosen.items():
        if isinstance(module, nn.MultiheadAttention) or len(holders[id(module.weight)]) < 2:
            continue
        group = holders[id(module.weight)]
        left_out = [n for n in group if n not in chosen]
        if left_out:
            raise ValueError(
                f"the weight of {name!r} is the same Parameter as that of {left_out}: quantise all of "
                f"{group} (the weight is then stored once) or exclude all of them, e.g. exclude={[re.escape(n) for n in group]!r}"
            )
        bad = [n for n in group if not isinstance(chosen[n], (nn.Linear, nn.Embedding)) or getattr(chosen[n], "bias", None) is not None]
        if bad:
            raise ValueError(
                f"the layers {group} share one weight Parameter, which is quantised once and stored once only for "
                f"Linear layers without bias and Embeddings; {bad[0]!r} is not one: exclude all of them, e.g. "
                f"exclude={[re.escape(n) for n in group]!r}"
            )
        ties[id(module.weight)] = group
    return ties


def select_layers(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to quantise, or a ``ValueError`` naming what cannot be.

    The weights are chosen by :func:`lightning_compress.selection.select_weights` (the rule pruning
    uses too): by default every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` weight and every
    ``nn.MultiheadAttention`` projection weight (``in_proj_weight``, or ``q/k/v_proj_weight``) outside a
    ``teacher``; ``include``/``exclude`` are regexes on module names, and each must match something.
    ``quantize_teacher=True`` adds the teacher's layers to the default. Subclasses of the supported
    types with their own ``forward`` (OPT's positional embedding, Gemma 3's scaled embedding) cannot be
    swapped safely: the default selection leaves them in float (:func:`prepare_fake_quant` warns,
    :func:`skipped_layers` says which and why), and a layer named by ``include`` raises, with a hint
    to exclude it. An attention module's ``out_proj`` is computed by the attention module, so it is
    quantised only with it; one weight ``Parameter`` shared by several layers (tied weights) is
    quantised in all of them or in none.

    Raises:
        ValueError: a pattern matches nothing, a chosen layer cannot be quantised, or nothing is left.
    """
    return _selection(root, include, exclude, quantize_teacher)[0]


def skipped_layers(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> dict[str, str]:
    """``{layer name: why}`` of the layers the default selection finds but leaves in float, because they
    cannot be fake-quantised faithfully (empty when ``include`` is given: those raise instead).

    Example:
        >>> class Scaled(nn.Embedding):  # an embedding that computes more than a lookup
        ...     def forward(self, ids):
        ...         return super().forward(ids) * 2.0
        >>> net = nn.Sequential(Scaled(10, 4), nn.Linear(4, 2))
        >>> [name for name, _ in select_layers(net)], skipped_layers(net)
        (['1'], {'0': 'Scaled: a subclass of Embedding with its own forward, which fake quantisation would replace'})
    """
    return _selection(root, include, exclude, quantize_teacher)[1]


def _own_forward(module: nn.Module) -> str:
    base = next((b for b in SUPPORTED_TYPES if isinstance(module, b)), type(module))
    return f"{type(module).__name__}: a subclass of {base.__name__} with its own forward, which fake quantisation would replace"


def _selection(
    root: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None, quantize_teacher: bool
) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """:func:`select_layers` and :func:`skipped_layers` in one pass: the chosen layers, and ``{name: why}``
    of those the default selection leaves in float (with ``include`` given, those raise)."""
    by_default = include is None
    if quantize_teacher and include is None:
        include = [".*", "teacher"]
    names = select_weights(root, include, exclude, _quantisable_weight, "quantise", only_kind=_supported())
    modules = dict(root.named_modules())
    picked: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for pname in names:
        name, _, leaf = pname.rpartition(".")
        module = modules[name]
        unsupported = leaf not in _weight_leaves(module) or _qat_class(type(module)) is None
        if unsupported and by_default:  # the default takes supported kinds only: a subclass with its own forward
            skipped[name] = _own_forward(module)
            continue
        if leaf not in _weight_leaves(module):  # named in full by include: a parameter of a type we do not take
            raise ValueError(
                f"cannot quantise {pname!r} ({type(module).__name__}): quantisation takes {_supported()}; "
                "drop the include pattern that names it"
            )
        if unsupported:
            raise _cannot(
                pname, module, name,
                f"supported are the weights of {[t.__name__ for t in SUPPORTED_TYPES]} and of their subclasses that do "
                "not override forward (a subclass with its own forward would lose it)",
            )
        picked.setdefault(name, []).append(leaf)
    if skipped:
        holders = _weight_holders(root)
        for name in list(picked):
            why = _goes_with_skipped(name, modules, holders, skipped)
            if why is not None:
                skipped[name] = why
                del picked[name]
        if not picked:
            raise ValueError(
                f"no layer of {type(root).__name__} can be fake-quantised: {_describe_skipped(skipped)}; it has no "
                f"other weight to quantise (quantisation takes {_supported()})"
            )
    for name, leaves in picked.items():
        module = modules[name]
        parent_name, _, child = name.rpartition(".")
        if len(leaves) < len(_weight_leaves(module)):
            rest = [leaf for leaf in _weight_leaves(module) if leaf not in leaves]
            raise _cannot(f"{name}.{rest[0]}", module, name, f"its projection weights {_weight_leaves(module)} are quantised together")
        if child == "out_proj" and isinstance(modules.get(parent_name), nn.MultiheadAttention) and parent_name not in picked:
            raise _cannot(
                f"{name}.weight", module, name,
                f"the attention module {parent_name!r} computes it with its own functional op, so it is "
                "quantised only together with that module's projection weights",
            )
    chosen = {name: modules[name] for name in picked}
    _check_ties(root, chosen)
    return list(chosen.items()), skipped


def _goes_with_skipped(name: str, modules: dict[str, nn.Module], holders: dict[int, list[str]], skipped: dict[str, str]) -> str | None:
    """Why layer ``name`` stays in float with a ``skipped`` one (its weight is tied to it, or it is the
    ``out_proj`` of a skipped attention module), or ``None``."""
    module = modules[name]
    parent, _, child = name.rpartition(".")
    if not isinstance(module, nn.MultiheadAttention):
        tied_to = [n for n in holders[id(module.weight)] if n in skipped]
        if tied_to:
            return f"its weight is the same Parameter as that of {tied_to[0]!r}, which stays in float"
    if child == "out_proj" and parent in skipped and isinstance(modules[parent], nn.MultiheadAttention):
        return f"the attention module {parent!r} that computes it stays in float"
    return None


def _describe_skipped(skipped: dict[str, str]) -> str:
    """The skipped layers grouped by reason: ``why: [names]`` for each reason."""
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{why}: {preview(names)}" for why, names in by_reason.items())


def prepare_fake_quant(
    root: nn.Module,
    settings: QuantSettings,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> dict[str, nn.Module]:
    """Swap the selected layers to their QAT classes in place; return ``{name: layer}``.

    All checks run before the first layer changes. Already prepared layers are kept as they are. Layers
    the default selection leaves in float (:func:`skipped_layers`) and modules whose weights quantisation
    does not take (:func:`float_weight_holders`: an ``nn.LSTM``, a ``weight_norm`` layer ..., with their
    share of the model's weights) are named in one warning.
    Weight-only (no input quantisation): embeddings, attention modules and their ``out_proj``, and
    layers whose weight is tied to another's (stored once after conversion, shared by all of them).
    Transformer encoder layers holding a chosen layer take their general path from then on (see
    :func:`disable_fast_paths`).
    """
    chosen, skipped = _selection(root, include, exclude, quantize_teacher)
    if isinstance(settings.granularity, int):
        for name, module in chosen:
            for pname, w in quantised_weights(module).items():
                per_row = w.shape[0] if is_conv1d(module) else w[0].numel()  # Conv1D: (in, out)
                if per_row % settings.granularity:
                    raise ValueError(
                        f"group size {settings.granularity} does not divide the {per_row} weights per output "
                        f"channel of {pname!r} in layer {name!r}; choose a divisor, 'per_channel', or exclude the layer"
                    )
    tied = {n for group in _check_ties(root, dict(chosen)).values() for n in group}
    modules = dict(root.named_modules())
    out: dict[str, nn.Module] = {}
    for name, module in chosen:
        if type(module) not in _QAT_TYPES:
            in_attention = isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention)
            weight_only = isinstance(module, (nn.Embedding, nn.MultiheadAttention)) or in_attention or name in tied
            module.__class__ = _qat_class(type(module))
            module.add_module("quantizer", Quantizer(settings, weight_only=weight_only))
            module.quantizer.to(next(iter(quantised_weights(module).values())).device)
        out[name] = module
    disable_fast_paths(root, out.values())
    notes = []
    if skipped:
        notes.append(
            f"{len(skipped)} layers of the default selection stay in float, as they cannot be fake-quantised faithfully. "
            f"{_describe_skipped(skipped)}. To quantise the others without this note, exclude them "
            f"(e.g. exclude={[re.escape(n) for n in list(skipped)[:2]]!r}); naming one in include is an error."
        )
    other_types = float_weight_holders(root, out, quantize_teacher)
    if other_types:
        notes.append(_float_types_note(root, other_types, quantize_teacher))
    if notes:
        warnings.warn(" ".join(notes), UserWarning, stacklevel=2)
    return out


def float_weight_holders(
    root: nn.Module, layers: Iterable[str], quantize_teacher: bool = False
) -> dict[str, tuple[str, int]]:
    """``{module name: (type name, number of weights)}`` of the modules outside ``layers`` (the quantised
    layers' names) that hold weights of their own (parameters of 2+ dimensions, see
    :func:`~lightning_compress.selection.weights_by_module`) of a kind quantisation does not take: a
    module of another type (``nn.LSTM``, ``nn.ConvTranspose2d``, a custom layer's ``nn.Parameter``), or
    a parametrised weight (``weight_norm``). They stay in float. Layers of supported types left out by
    ``include``/``exclude`` or :func:`skipped_layers` are not listed.

    Example:
        >>> net = nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 2))
        >>> float_weight_holders(net, ["1"])
        {'0': ('LSTM', 384)}
    """
    modules = dict(root.named_modules())
    chosen = set(layers)
    taken = {id(w) for n in chosen for w in quantised_weights(modules[n]).values()}
    out: dict[str, tuple[str, int]] = {}
    for name, weights in weights_by_module(root, teacher=quantize_teacher).items():
        module = modules[name]
        supported = (isinstance(module, tuple(SUPPORTED_TYPES)) or is_conv1d(module)) and not parametrize.is_parametrized(module)
        count = sum(w.numel() for w in weights.values() if id(w) not in taken)
        if name not in chosen and not supported and count:
            out[name] = (type(module).__name__, count)
    return out


def quantised_fraction(root: nn.Module, layers: Iterable[nn.Module], quantize_teacher: bool = False) -> float:
    """The share of ``root``'s weights (parameters of 2+ dimensions, each counted once, outside a teacher
    unless ``quantize_teacher``) that the fake-quant ``layers`` quantise: weights left in float, of
    supported layers or of other types (:func:`float_weight_holders`), count against it.

    Example:
        >>> net = nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 2))  # 384 LSTM weights, 16 Linear ones
        >>> quantised_fraction(net, [net[1]])
        0.04
    """
    taken = {id(w) for layer in layers for w in quantised_weights(layer).values()}
    weights = [w for ws in weights_by_module(root, teacher=quantize_teacher).values() for w in ws.values()]
    total = sum(w.numel() for w in weights)
    return sum(w.numel() for w in weights if id(w) in taken) / total if total else 0.0


def _float_types_note(root: nn.Module, holders: dict[str, tuple[str, int]], quantize_teacher: bool) -> str:
    total = sum(w.numel() for ws in weights_by_module(root, teacher=quantize_teacher).values() for w in ws.values())
    share = sum(n for _, n in holders.values()) / max(1, total)
    listed = ", ".join(f"{name!r} ({kind}, {n} weights)" for name, (kind, n) in list(holders.items())[:8])
    more = f", ... ({len(holders)} in all)" if len(holders) > 8 else ""
    parametrised = [n for n in holders if parametrize.is_parametrized(root.get_submodule(n))]
    hint = (
        f" A parametrised weight (weight_norm, spectral_norm: {parametrised[:2]!r}) is quantised once its parametrisation "
        "is removed (torch.nn.utils.parametrize.remove_parametrizations)."
        if parametrised else ""
    )
    return (
        f"{len(holders)} modules holding {share:.1%} of the model's weights stay in float, as quantisation does not take "
        f"their kind of weight: {listed}{more}. Quantisation takes {_supported()}.{hint}"
    )


def fake_quant_layers(root: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the fake-quantised layers inside ``root``."""
    return {n: m for n, m in root.named_modules() if type(m) in _QAT_TYPES}


def strip_fake_quant(root: nn.Module) -> None:
    """Undo :func:`prepare_fake_quant` in place: original classes, no ``quantizer`` children, the
    transformer fast paths as they were."""
    for _, module in fake_quant_layers(root).items():
        strip_layer(module)
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
