"""Conversion of a fake-quantised model to real low-bit storage and kernels.

Per layer, :func:`convert_fake_quant` picks a path that runs on CPU and reuses the learned scales:

============================  ======================  =====================================================
layer                         ``backend="auto"``      ``backend="torchao"``
============================  ======================  =====================================================
Linear, 8-bit, act. 8-bit     :class:`Int8Linear`     torchao ``Int8Tensor`` (learned weight scales, dynamic
                              (static int8 x int8,    per-token activations: the learned activation range
                              ``torch._int_mm``)      is not used)
Linear, 8-bit, weight-only    :class:`LowBitLayer`    torchao ``Int8Tensor`` (learned scales)
Conv2d, 8-bit                 :class:`LowBitLayer`    torchao ``IntxWeightOnlyConfig(int8)`` (its own scales,
                                                      no activation quantisation)
2..7 bits, Conv1d, Conv3d,     :class:`LowBitLayer`    same
Embedding
MultiheadAttention            stays one; projection   same
                              weights in
                              :class:`LowBitLayer`
                              children
                              (:func:`convert_attention`)
attention ``out_proj``, tied  :class:`LowBitLayer`    same
weights                       (weight-only)
============================  ======================  =====================================================

Every path stores the integers the fake-quant layer evaluates with: its weights rounded with its
``rounding`` (``"floor"`` stays floor; ``"stochastic"``, a training rounding, converts to nearest as
evaluation rounds), computed in the weight's own dtype as the fake-quant layer computes them. Weights
held in bfloat16 or float16 (``precision="bf16-true"``, ``"16-true"``) have scales that are values of
that dtype, stored exactly in float32, and the input scale is stored as inputs of that dtype use it
(rounded to it), so the converted layers take the same integer weights and input levels as the
fake-quant model's evaluation. torchao's conv2d path chooses its own scales and rounds to nearest, so
it is taken only for layers that round to nearest; a ``"floor"`` Conv2d becomes a :class:`LowBitLayer`.

An attention module's ``out_proj`` is read as ``.weight``/``.bias`` by the attention module's
functional op, so it is stored weight-only in every backend. Layers sharing one weight ``Parameter``
(an LM head tied to its embedding) share one stored ``packed`` buffer: the file holds the table once.
Transformer encoder layers holding converted layers take their general path
(:func:`~lightning_compress.quantization.layers.disable_fast_paths`).

The layers themselves are in :mod:`~lightning_compress.quantization.lowbit`; files of converted
models (:func:`~lightning_compress.quantization.files.save_quantized`,
:func:`~lightning_compress.quantization.files.load_quantized`) in
:mod:`~lightning_compress.quantization.files`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Collection
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_compress.guard import NONFINITE_ACTIONS, check_finite
from lightning_compress.module_copy import copy_model
from lightning_compress.quantization.fake_quant import quantize_weight
from lightning_compress.quantization.layers import QATLinear, disable_fast_paths, fake_quant_layers, layer_kind, quantised_weights
from lightning_compress.selection import is_conv1d, preview
from lightning_compress.quantization.int8_linear import Int8Linear
from lightning_compress.quantization.lowbit import (  # noqa: F401 - re-exported: their home before the split
    BACKENDS,
    LowBitLayer,
    _DropCudaExtensionNoise,
    import_torchao,
    pack_int4,
    unpack_int4,
)
from lightning_compress.quantization.lowbit_attention import attention_spec, convert_attention

__all__ = [
    "BACKENDS", "Int8Linear", "LowBitLayer", "batchnorm_pairs", "check_quantization_finite", "convert_fake_quant", "import_torchao", "pack_int4",
    "unpack_int4",
]


# ------------------------------------------------------------------------------------------ torchao
def _torchao_linear(layer: nn.Module, dynamic_activations: bool) -> nn.Module:
    """A torchao ``Int8Tensor`` Linear holding the fake-quant layer's own integers: torchao rounds to
    nearest, so it is handed the dequantised weight ``s * q`` with the scales ``s``, which it rounds
    back to exactly ``q`` whatever rounding made them."""
    tq = import_torchao()
    qz = layer.quantizer
    q, scale = quantize_weight(layer.weight.detach(), 8, "per_channel", qz.inference_rounding)
    scale = scale.float()
    kwargs: dict[str, Any] = {}
    if dynamic_activations:
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

        kwargs["act_quant_kwargs"] = QuantizeTensorToInt8Kwargs(granularity=tq.PerRow())
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.weight.device)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    w = tq.Int8Tensor.from_hp(q.float() * scale, tq.PerRow(), scale=scale, **kwargs)
    new.weight = nn.Parameter(w, requires_grad=False)
    return new


def _torchao_conv2d(layer: nn.Module) -> nn.Module:
    tq = import_torchao()
    new = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device=layer.weight.device,
    )
    new.load_state_dict({k: v for k, v in layer.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tq.quantize_(new, tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=tq.PerAxis(0)), filter_fn=lambda m, n: True)
    return new


def _choose_format(layer: nn.Module, backend: str, plain: bool = False) -> str:
    """The stored format of a fake-quant layer; ``plain``: a :class:`LowBitLayer` whatever the backend
    (a layer read through ``.weight`` by its parent, or sharing its stored weight)."""
    qz = layer.quantizer
    kind = layer_kind(layer)
    if kind == "attention":
        return "lowbit_attention"
    if plain:
        return "lowbit"
    has_act = qz.observer is not None and qz.observer.is_initialized()
    if kind == "linear" and qz.bits == 8:
        if not has_act and qz.granularity == "per_channel" and backend == "torchao":
            return "torchao_int8_weight"
        if has_act and backend == "torchao" and qz.granularity == "per_channel":
            return "torchao_int8_dynamic"
        if has_act and qz.granularity in ("per_channel", "per_tensor"):
            return "int8_linear"
    if (
        kind == "conv2d"
        and qz.bits == 8
        and backend == "torchao"
        and qz.granularity == "per_channel"
        and qz.inference_rounding == "nearest"  # torchao chooses its own scales and rounds w / s to nearest
        and layer.in_channels // layer.groups > 1  # torchao 0.18 fails on single-input-channel convs
    ):
        return "torchao_intx_conv2d"
    return "lowbit"


def _linear_view(layer: nn.Module) -> nn.Module:
    """A fake-quant ``Conv1D`` (weight ``(in, out)``) as the :class:`QATLinear` it computes: its weight
    transposed (a copy), its bias and its quantizer, for the Linear conversions."""
    weight = layer.weight.detach().t().contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    linear.__class__ = QATLinear
    linear.add_module("quantizer", layer.quantizer)
    return linear


def _build(layer: nn.Module, fmt: str) -> nn.Module:
    if is_conv1d(layer):
        layer = _linear_view(layer)
    if fmt == "lowbit_attention":
        return convert_attention(layer)
    if fmt == "torchao_int8_weight":
        return _torchao_linear(layer, dynamic_activations=False)
    if fmt == "torchao_int8_dynamic":
        return _torchao_linear(layer, dynamic_activations=True)
    if fmt == "torchao_intx_conv2d":
        return _torchao_conv2d(layer)
    if fmt == "int8_linear":
        return Int8Linear.from_layer(layer)
    return LowBitLayer.from_layer(layer)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def batchnorm_pairs(model: nn.Module, convs: Collection[str] | None = None) -> list[tuple[str, str]]:
    """``(conv, bn)`` name pairs where a fake-quant Conv1d/2d (or, with ``convs``, any Conv1d/2d of
    those names) feeds only a BatchNorm (found by ``torch.fx``), each of the two called once.

    Returns ``[]`` when the model cannot be traced symbolically (data-dependent control flow).
    """
    import torch.fx as fx

    from lightning_compress._tracing import LayerTracer
    from lightning_compress.quantization.layers import QATConv1d, QATConv2d

    try:
        graph = LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models are simply not folded
        return []
    modules = dict(model.named_modules())
    # a module called more than once (a conv shared by two branches, one BatchNorm after two convs) cannot take
    # in one BatchNorm: its other calls would have it applied too, or another one lost
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" and calls[str(node.target)] == 1 else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or not node.args:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if convs is None:
            eligible = type(conv) in (QATConv1d, QATConv2d)
        else:
            eligible = isinstance(conv, (nn.Conv1d, nn.Conv2d)) and str(src.target) in convs
        if eligible and calls[str(src.target)] == 1 and len(src.users) == 1 and conv.out_channels == bn.num_features:
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _folds_batchnorm(fmt: str, granularity: Any) -> bool:
    """Whether a layer of this format and granularity takes in the BatchNorm that follows it (per-channel
    or grouped scales absorb BatchNorm's per-channel factor exactly; a single per-tensor scale cannot)."""
    return fmt == "lowbit" and granularity != "per_tensor"


def _fold_bn(layer: LowBitLayer, bn: nn.modules.batchnorm._BatchNorm) -> LowBitLayer:
    """Exact for per-channel/group scales: ``bn(s q * x + b) = (f s) q * x + f (b - mean) + beta``.

    The integer weights stay as they are; torch's own ``fuse_conv_bn_weights`` scales the
    per-channel scales (in the place of a float weight) and folds the bias."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    scale, bias = fuse_conv_bn_weights(
        layer.scale.float(),
        layer.bias,
        bn.running_mean.float(),
        bn.running_var.float(),
        bn.eps,
        None if bn.weight is None else bn.weight.detach().float(),
        None if bn.bias is None else bn.bias.detach().float(),
    )
    spec = {**layer.spec, "bias": int(bn.running_mean.numel())}
    out = LowBitLayer(spec)
    out.compute_dtype = layer.compute_dtype
    out.qweight.copy_(layer.qweight)
    parts = [scale.detach().reshape(-1), bias.detach()]
    qparams = layer._input_qparams()
    if qparams is not None:
        parts.extend(t.reshape(1) for t in qparams)
    out.params.copy_(torch.cat(parts))
    return out


def _renormalise_embeddings(layers: Collection[nn.Module]) -> None:
    """Every row of an embedding with ``max_norm`` renormalised in place, as a lookup of it would: the converted
    table holds the rows as the fake-quantised layer looks them up, and the converted layer looks up without
    renormalising (rounding may put a row a hair above ``max_norm``; the fake-quantised layer uses it so)."""
    with torch.no_grad():
        for layer in layers:
            if layer_kind(layer) == "embedding" and layer.max_norm is not None:
                rows = torch.arange(layer.weight.shape[0], device=layer.weight.device)
                torch.embedding_renorm_(layer.weight, rows, layer.max_norm, layer.norm_type)


def check_quantization_finite(layers: dict[str, nn.Module], where: str, action: str) -> list[str]:
    """Weights and observed input ranges of the fake-quantised layers must be finite (see :func:`check_finite`)."""
    tensors: list[tuple[str, torch.Tensor]] = [(f"{n}.{p}", w) for n, m in layers.items() for p, w in quantised_weights(m).items()]
    for n, m in layers.items():
        obs = m.quantizer.observer
        if obs is not None and obs.is_initialized():
            tensors += [(f"{n} input range (min)", obs.min_val), (f"{n} input range (max)", obs.max_val)]
    return check_finite(tensors, where, action)


def convert_fake_quant(
    model: nn.Module, backend: str = "auto", inplace: bool = False, fold_bn: bool = True, on_nonfinite: str | None = "error"
) -> nn.Module:
    """Replace every fake-quant layer of ``model`` (a copy unless ``inplace``) with its low-bit form.

    An embedding with ``max_norm`` has every row renormalised first (in ``model`` too when ``inplace``), as a
    lookup of it renormalises it. With ``fold_bn``, a BatchNorm fed only by a per-channel (or grouped) low-bit conv is folded into
    that conv's scales and bias (exact, with the BatchNorm's running statistics) and replaced by
    ``nn.Identity``. The result carries ``quantization_spec`` (``{layer: {"format": ..., ...}}``,
    plus ``"folded_bn"`` names), used by :func:`save_quantized`/:func:`load_quantized`. It is in
    ``eval()`` mode.

    A NaN or infinite weight or observed input range would give NaN scales and meaningless integers: with
    ``on_nonfinite="error"`` it is refused (naming the tensors) before anything changes, with ``"warn"`` converted
    with a warning, with ``None`` not looked for (the caller has checked).

    Raises:
        ValueError: unknown ``backend`` or ``on_nonfinite``, no fake-quant layer in ``model``, or a non-finite
            weight or range with ``on_nonfinite="error"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid choices: {list(BACKENDS)}")
    if on_nonfinite is not None and on_nonfinite not in NONFINITE_ACTIONS:
        raise ValueError(f"unknown on_nonfinite {on_nonfinite!r}; valid choices: {[*NONFINITE_ACTIONS, None]}")
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("the model has no fake-quantised layer to convert (prepare it with prepare_fake_quant first)")
    if on_nonfinite is not None:
        check_quantization_finite(layers, "convert_fake_quant", on_nonfinite)
    unobserved = [n for n, m in layers.items() if m.quantizer.observer is not None and not m.quantizer.observer.is_initialized()]
    if unobserved:
        rank_zero_warn(
            f"{len(unobserved)} of {len(layers)} layers quantise their inputs but never observed an input range "
            f"{preview(unobserved)}: they are converted with float inputs (weight-only). Run the prepared model on "
            "data with observing on first (QuantizeCallback does it in training steps, or method='ptq' calibrates)"
        )
    out = model if inplace else copy_model(model)
    pairs = dict(batchnorm_pairs(out)) if fold_bn else {}
    spec: dict[str, dict[str, Any]] = {}
    layers = fake_quant_layers(out)
    _renormalise_embeddings(layers.values())
    modules = dict(out.named_modules())
    holders = Counter(id(m.weight) for m in layers.values() if layer_kind(m) != "attention")
    stored: dict[int, LowBitLayer] = {}  # tied weights: the first layer's converted form
    with torch.no_grad():
        for name, layer in layers.items():
            kind = layer_kind(layer)
            tied = kind != "attention" and holders[id(layer.weight)] > 1
            in_attention = isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention)
            fmt = _choose_format(layer, backend, plain=tied or in_attention)
            entry: dict[str, Any] = {"format": fmt, "bits": layer.quantizer.bits, "kind": kind}
            if fmt == "lowbit_attention":
                entry["spec"] = attention_spec(layer, layer.quantizer.bits, layer.quantizer.granularity)
            weight_id = id(layer.weight) if kind != "attention" else None
            new = _build(layer, fmt)
            if tied and isinstance(new, LowBitLayer):
                first = stored.setdefault(weight_id, new)
                if first is not new and first.packed.shape == new.packed.shape and torch.equal(first.packed, new.packed):
                    new.packed = first.packed  # one tensor in state_dict under both names: stored once
            bn_name = pairs.get(name)
            if bn_name and _folds_batchnorm(fmt, layer.quantizer.granularity):
                new = _fold_bn(new, out.get_submodule(bn_name))
                _set_submodule(out, bn_name, nn.Identity())
                entry["folded_bn"] = bn_name
            if isinstance(new, (LowBitLayer, Int8Linear)):
                entry["spec"] = new.spec
            _set_submodule(out, name, new)
            spec[name] = entry
    disable_fast_paths(out, [out.get_submodule(n) for n in spec])
    out.quantization_spec = spec
    out.quantization_fold_bn = fold_bn
    return out.eval()
