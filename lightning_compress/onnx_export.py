"""ONNX export of a compressed model: int8 weights behind ``DequantizeLinear``, static int8 activations
as ``QuantizeLinear``/``DequantizeLinear`` pairs, both built from the model's own scales.

The converted layers (``Int8Linear``, ``LowBitLayer``) compute with ``torch._int_mm`` and packed
nibbles, which the ONNX exporter cannot translate. So the export runs on an equivalent view of the
model in which each converted layer multiplies ``dequantize(q, scale)`` and, where the layer quantises
its input, ``quantize_dequantize(x, scale, zero_point)``. Those two are small custom operators
(``lightning_compress::dequantize_weight``, ``lightning_compress::quantize_dequantize``) that run in
PyTorch and translate to the standard ONNX operators, so the file holds the integer weights
themselves (an int8 initializer per layer, one scale per output channel; a converted
``nn.MultiheadAttention`` reads its projection weights from them too). Removed channels and heads
are simply absent: the model is already smaller. onnxruntime then checks the file against PyTorch.

Needs the optional ``onnx`` extra: ``pip install "lightning-compress[onnx]"`` (onnx, onnxscript,
onnxruntime).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.module_copy import copy_model
from lightning_compress.onnx_load import (
    _EXTRA,
    GRAPH_DIGEST_KEY,
    OPTIMIZATION_KEY,
    FIXED_KEY,
    OUTPUTS_KEY,
    POSITIONAL_KEY,
    graph_digest,
    inference_session,
    load_onnx,
)
from lightning_compress.quantization.lowbit import CONV_OPS
from lightning_compress.token_mask import call_mask, token_rows

__all__ = ["export_onnx", "load_onnx"]

#: The suffix of an ONNX file: :func:`lightning_compress.load` picks the reader by it.
ONNX_SUFFIX = ".onnx"


@torch.library.custom_op("lightning_compress::dequantize_weight", mutates_args=())
def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` with one scale per output channel (dimension 0): ONNX ``DequantizeLinear(axis=0)``."""
    return q.to(torch.float32) * scale.reshape(-1, *([1] * (q.dim() - 1)))


@dequantize_weight.register_fake
def _(q: Tensor, scale: Tensor) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("lightning_compress::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(clamp(round(x / s) + z) - z) * s`` on the range of ``zero_point``'s dtype (uint8 or int8):
    ONNX ``QuantizeLinear`` then ``DequantizeLinear``."""
    low, high = (0, 255) if zero_point.dtype == torch.uint8 else (-128, 127)
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, low, high) - z) * scale


@quantize_dequantize.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty_like(x)


def _int8_weight(q: Tensor) -> Tensor:
    """``q`` as contiguous int8: itself when it is already (a weight tied between layers stays one tensor)."""
    return q if q.dtype == torch.int8 and q.is_contiguous() else q.to(torch.int8).contiguous()


def _scale_vector(scale: Tensor) -> Tensor:
    """``scale`` as a contiguous float32 vector: itself when it is already one."""
    if scale.dtype == torch.float32 and scale.dim() == 1 and scale.is_contiguous():
        return scale
    return scale.to(torch.float32).reshape(-1).contiguous()


class _QDQLayer(nn.Module):
    """A converted Linear/Conv as ONNX will hold it: int8 weight, per-channel scale, optional input QDQ."""

    def __init__(self, kind: str, q: Tensor, scale: Tensor, bias: Tensor | None, act: tuple[Tensor, Tensor] | None, op: dict[str, Any]) -> None:
        super().__init__()
        self.kind, self.op = kind, op
        self.register_buffer("q", _int8_weight(q))
        self.register_buffer("scale", _scale_vector(scale))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.act = act is not None
        if act is not None:
            self.register_buffer("act_scale", act[0].detach().to(torch.float32).reshape(()).clone())
            self.register_buffer("act_zero", act[1].detach().reshape(()).clone())

    @property
    def weight(self) -> Tensor:
        """The float weight, for models that read it outside the layer (ViT casts its input to the patch
        projection's ``weight.dtype``); as the converted layers, which keep a readable ``.weight``."""
        return torch.ops.lightning_compress.dequantize_weight(self.q, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.act:
            x = torch.ops.lightning_compress.quantize_dequantize(x, self.act_scale, self.act_zero)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        if self.kind == "embedding":
            return F.embedding(x, w, self.op.get("padding_idx"))
        conv = CONV_OPS[self.kind]
        return conv(x, w, self.bias, self.op["stride"], self.op["padding"], self.op["dilation"], self.op["groups"])


def _per_channel(scale: Tensor, rows: int, name: str, granularity: Any) -> Tensor:
    if granularity not in ("per_channel", "per_tensor"):
        raise ValueError(
            f"format='onnx' stores one scale per output channel; layer {name!r} has scales per group of {granularity} "
            "weights. Export it as a compact artifact (a .safetensors path), or quantise with granularity='per_channel'"
        )
    return scale.reshape(-1).expand(rows) if scale.numel() == 1 else scale.reshape(-1)


def _qdq_view(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A CPU copy of ``model`` with every converted layer replaced by a :class:`_QDQLayer`; and
    ``{layer: how it is stored}``."""
    from lightning_compress.quantization.convert import _set_submodule
    from lightning_compress.quantization.int8_linear import Int8Linear
    from lightning_compress.quantization.lowbit import LowBitLayer, unpack_int4

    view = copy_model(model).cpu().eval()
    stored: dict[str, str] = {}
    shared: dict[tuple[int, int, tuple[int, ...]], tuple[Tensor, Tensor]] = {}  # a tied weight's int8 values and scales, made once
    for name, layer in list(view.named_modules()):
        if isinstance(layer, Int8Linear):
            s_w = layer.affine[0] / layer.input_qparams[0]
            in_scale, in_zero = layer.input_qparams
            new = _QDQLayer("linear", layer.weight_t.t(), s_w, layer.bias, (in_scale, in_zero.round().to(torch.int8)), {})
            new.in_features, new.out_features = layer.in_features, layer.out_features
            stored[name] = "int8 weights, int8 activations (QuantizeLinear/DequantizeLinear)"
        elif isinstance(layer, LowBitLayer):
            spec = layer.spec
            shape = tuple(spec["weight_shape"])
            if spec["bits"] > 8:
                raise ValueError(f"layer {name!r} has {spec['bits']}-bit weights; ONNX int8 holds at most 8")
            if layer._renormalises_at_lookup():
                raise ValueError(
                    f"layer {name!r} is an embedding with max_norm={spec['max_norm']} converted before its rows were "
                    "renormalised at conversion: it renormalises them at each lookup, which an ONNX graph does not do. "
                    "Export it as .pt2 or .safetensors, or convert the fake-quantised model again"
                )
            packed = layer.packed  # tied layers share it: one object, or (loaded from a .pt file) one memory
            key = (packed.untyped_storage().data_ptr(), packed.storage_offset(), tuple(packed.shape))
            if key not in shared:
                q = unpack_int4(layer.qweight, math.prod(shape)) if spec["bits"] <= 4 else layer.qweight
                shared[key] = _int8_weight(q.reshape(shape)), _scale_vector(_per_channel(layer.scale, shape[0], name, spec["granularity"]))
            q, scale = shared[key]
            qparams = layer._input_qparams()
            act = None
            if qparams is not None:
                if spec["activation_bits"] != 8:
                    raise ValueError(f"layer {name!r} quantises its input to {spec['activation_bits']} bits; ONNX holds 8")
                act = (qparams[0], qparams[1].round().to(torch.uint8))
            op = {k: spec.get(k) for k in ("stride", "dilation", "groups", "padding_idx")}
            if spec["kind"] in CONV_OPS:
                if spec.get("padding_mode", "zeros") != "zeros":
                    raise ValueError(f"layer {name!r} pads with {spec['padding_mode']!r}; format='onnx' handles zero padding")
                op["padding"] = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
                op["stride"], op["dilation"] = tuple(op["stride"]), tuple(op["dilation"])
            new = _QDQLayer(spec["kind"], q, scale, layer.bias, act, op)
            for attr, value in layer.float_attributes().items():  # a forward may read them (Whisper: conv1.stride)
                setattr(new, attr, value)
            stored[name] = f"{spec['bits']}-bit weights in int8" + (", int8 activations" if act else "")
        else:
            if type(layer).__module__.startswith("torchao") or any(type(p).__module__.startswith("torchao") for p in layer.parameters(recurse=False)):
                raise ValueError(f"layer {name!r} holds torchao tensors, which ONNX export does not take; convert with backend='auto'")
            if isinstance(layer, nn.MultiheadAttention):
                _attention_view(layer)
            continue
        _set_submodule(view, name, new)
    return view, stored


def _qdq_weight(child: nn.Module) -> Tensor:
    return child.weight  # a _QDQLayer's dequantize(q, scale)


def _attention_view(layer: nn.MultiheadAttention) -> None:
    """Make a converted attention module read its projection weights (``in_proj_weight``, or
    ``q/k/v_proj_weight``) from its packed children, in place: the children become :class:`_QDQLayer`
    and these weights their ``dequantize(q, scale)``, so the file holds them as int8 behind
    ``DequantizeLinear`` rather than the module's float copy (a non-persistent buffer)."""
    from lightning_compress.quantization.lowbit_attention import read_packed_projections

    read_packed_projections(layer, _qdq_weight)


def _float32_reference(model: nn.Module) -> nn.Module:
    """A CPU float32 copy of ``model`` in eval mode; converted attention modules re-read their projection
    weights from their integers (their float copy was rounded to the model's dtype)."""
    from lightning_compress.quantization.lowbit_attention import _refresh_attention

    reference = copy_model(model).cpu().eval().float()
    for layer in reference.modules():
        if isinstance(layer, nn.MultiheadAttention):
            _refresh_attention(layer)
    return reference


def _export_failure(model: nn.Module, err: BaseException) -> str:
    """One paragraph for a failed ``torch.onnx.export``: the innermost cause's first line (torch.onnx wraps it in
    screens of next steps), and what to try, by the step that failed."""
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    cause = chain[-1]
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(cause).splitlines()]
    why = f"{type(cause).__name__}: {next((line for line in lines if line), '')[:400]}"
    if "torch.export" in str(err).split("\n", 1)[0]:
        hint = "torch.export could not capture the model's forward, which every format needs; make that code exportable"
    elif any(type(e).__name__ == "DispatchError" for e in chain):
        hint = ("the graph holds an operator ONNX has no translation for (a library's own kernel, such as a mixture of "
                "experts' grouped matmul): a compact artifact (.safetensors) or a .pt2 package takes any operator torch.export captures")
    else:  # captured, every operator translatable, and torch.onnx's own rewriting of the graph failed
        hint = ("torch.export captured the model, and torch.onnx failed while turning that graph into ONNX (a limitation of "
                "torch.onnx with this model, not of the model): a compact artifact (.safetensors) or a .pt2 package takes "
                "the graph as captured; a converted int8 model exports through other operators and may convert")
    return f"torch.onnx could not convert {type(model).__name__} ({why}); nothing written. {hint}"


def _strip_debug_metadata(proto: Any) -> None:
    """Drop the exporter's debugging records in place: each node's ``metadata_props`` (stack traces with
    source paths, fx node names, module classes) and ``doc_string``, the graph's (the program's
    signature) and those of its inputs, outputs, values and initializers, in subgraphs and functions too.
    The model-level ``metadata_props`` stay."""

    def clear(message: Any) -> None:
        if "metadata_props" in message.DESCRIPTOR.fields_by_name:
            message.ClearField("metadata_props")

    def nodes(owner: Any) -> None:
        for node in owner.node:
            clear(node)
            node.ClearField("doc_string")
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graph(attribute.g)
                for sub in attribute.graphs:
                    graph(sub)

    def graph(g: Any) -> None:
        clear(g)
        for part in (g.input, g.output, g.value_info, g.initializer, g.sparse_initializer):
            for message in part:
                clear(message)
        nodes(g)

    graph(proto.graph)
    for function in proto.functions:
        clear(function)
        nodes(function)


def _positional_inputs(forward: Any, file_inputs: list[str], inputs: tuple[Tensor, ...], named: dict[str, Tensor]) -> list[str] | None:
    """The file's inputs ``forward`` takes positionally, in its parameter order: its leading positional
    parameters that are inputs of the file; with a positional example only, the file's own order (the
    exporter keeps it). ``None`` where neither is known (a ``*args`` forward given keyword inputs too)."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = []
    for p in parameters:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name not in file_inputs:
            break
        positional.append(p.name)
    if len(positional) >= len(inputs) and set(file_inputs) <= {p.name for p in parameters}:
        return positional
    if not named and len(file_inputs) == len(inputs):
        return list(file_inputs)
    return None


def _translations() -> dict[Any, Any]:
    from onnxscript import opset18 as op

    def dq_weight(q: Any, scale: Any) -> Any:
        return op.DequantizeLinear(q, scale, axis=0)

    def qdq(x: Any, scale: Any, zero_point: Any) -> Any:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    return {torch.ops.lightning_compress.dequantize_weight.default: dq_weight, torch.ops.lightning_compress.quantize_dequantize.default: qdq}


#: The share of output rows that may differ beyond the tolerance, and by how much at most (rounding flips).
_FLIPPED_ROWS, _FLIP_FACTOR = 0.01, 20.0


def check_agreement(got: list[Tensor], expected: list[Tensor], tolerance: float, int8_activations: bool = True) -> float:
    """The largest difference between onnxruntime's outputs ``got`` and PyTorch's ``expected``; a
    ``ValueError`` when more than 1% of the output rows (and more than one: vectors along the last dimension, a
    position's logits; of an output of 4 or more dimensions, a feature map, each entry) differ by more than
    ``tolerance`` times the largest output (at least 1), or any by more than 20 times that. A rounding flip
    of an int8 activation moves one position's logits, but spreads over a neighbourhood of a feature map:
    along a map's last dimension (its width) it reaches most rows it crosses. The error suggests such flips
    as the cause only for a model with ``int8_activations``; without them no rounding differs between runtimes.

    Example:
        >>> out = torch.zeros(200, 3)
        >>> shifted = out.clone()
        >>> shifted[0] += 0.01  # one row a few tolerances off: a rounding flip
        >>> check_agreement([shifted], [out], 2e-3)
        0.009999999776482582
    """
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    bound = tolerance * max(1.0, max(float(e.abs().max()) for e in expected))
    rows = [_output_rows((g - e).abs()) for g, e in zip(got, expected)]
    total = sum(r.numel() for r in rows)
    flipped = sum(int((r > bound).sum()) for r in rows)
    beyond = float(flipped) / max(1, total)
    if (flipped > 1 and beyond > _FLIPPED_ROWS) or diff > _FLIP_FACTOR * bound:
        cause = (
            "Rounding flips of int8 activations spread through deep models: if the predictions agree, pass a larger "
            f"onnx_tolerance (now {tolerance:g})"
            if int8_activations
            else "The model quantises no activation, so no rounding step differs between the runtimes: an operator is "
            "computed differently (export it as .pt2 or .safetensors instead), or, for a deep model in float, pass a larger "
            f"onnx_tolerance (now {tolerance:g})"
        )
        raise ValueError(
            f"onnxruntime's outputs differ from PyTorch's by up to {diff:.3g}, beyond {bound:.3g} in {beyond:.1%} of the output "
            f"rows (allowed: {_FLIPPED_ROWS:.0%} of the rows, each within {_FLIP_FACTOR:g}x); not written. {cause}"
        )
    return diff


def check_agreement_at_tokens(
    got: list[Tensor], expected: list[Tensor], tokens: Tensor | None, tolerance: float, int8_activations: bool = True
) -> float:
    """:func:`check_agreement` at the tokens of a ``(batch, seq_len)`` padding mask (``None``: everywhere): an output
    ``(batch, seq_len, ...)`` keeps its tokens' rows; a ``(batch, seq_len)`` output (a position's score, as a
    question-answering model's ``start_logits``) keeps its rows, a sample each, with the padded entries taken as
    agreeing. A padded position is no answer of the model: with left padding its attention sees no token.

    Example:
        >>> tokens = torch.tensor([[False, True, True]] * 100)
        >>> got = torch.zeros(100, 3)
        >>> got[:, 0] = 1.0  # the padded position differs in every sample
        >>> check_agreement_at_tokens([got], [torch.zeros(100, 3)], tokens, 2e-3)
        0.0
    """
    pairs = [
        (torch.where(tokens, g, e), e) if tokens is not None and g.dim() == 2 and g.shape == tokens.shape
        else (token_rows(g, tokens), token_rows(e, tokens))
        for g, e in zip(got, expected)
    ]  # fmt: skip
    return check_agreement([g for g, _ in pairs], [e for _, e in pairs], tolerance, int8_activations)


def _output_rows(t: Tensor) -> Tensor:
    """The largest entry of each output row :func:`check_agreement` counts (a vector along the last dimension; of
    an output of 4 or more dimensions, each entry)."""
    return t.reshape(-1, t.shape[-1]).amax(1) if 0 < t.dim() < 4 and t.shape[-1] > 0 else t.reshape(-1)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple[Tensor, ...],
    *,
    kwargs: dict[str, Tensor] | None = None,
    constants: dict[str, Any] | None = None,
    traced_inputs: tuple[tuple[Tensor, ...], dict[str, Tensor]] | None = None,
    dynamic_shapes: Any = None,
    tolerance: float = 2e-3,
) -> dict[str, Any]:
    """Write ``model`` as ONNX at ``path`` and check it in onnxruntime against PyTorch on the example.

    ``example_inputs`` and ``kwargs`` are ``forward``'s positional and keyword tensors; ``constants``
    keyword settings fixed in the file (``use_cache=False``). ``traced_inputs`` (positional, keyword) and
    ``dynamic_shapes`` (default: the example, static shapes) are what the exporter traces with
    (:func:`lightning_compress.export` passes a batch dimension of any size). An output object (a Hugging
    Face ``ModelOutput``) is written as its tensors (:func:`~lightning_compress.outputs.serve_plainly`).

    A model held in bfloat16, float16 or float64 (or given such inputs) is written computing in float32:
    its int8 weights and scales are exact in float32, and the check compares against a float32 copy of
    the model. The file records the names of the inputs ``forward`` takes positionally, in its order
    (:data:`POSITIONAL_KEY`), for :func:`load_onnx`; the exporter's debugging records (stack traces, node
    names) are left out.

    Returns:
        ``{"bytes", "layers": {layer: how it is stored}, "max_abs_diff", "onnxruntime_ms", "torch_ms"}``
        (the latencies at the example's batch, interleaved medians, 1 thread; ``max_abs_diff`` over every
        output), plus ``"note"`` when the graph computes in float32 for a model held in another precision,
        or when onnxruntime's default graph optimisations compute it differently: they fuse the
        quantise/dequantise pairs around a layer into integer kernels that round the layer's output
        differently (an int8 CNN with BatchNorm and a residual add: 34% of the output rows beyond the
        tolerance); the file is then checked, and records that it runs, with them off
        (:data:`~lightning_compress.onnx_load.OPTIMIZATION_KEY`). The file records the SHA-256 of its graph
        (:data:`~lightning_compress.onnx_load.GRAPH_DIGEST_KEY`), which :func:`load_onnx` checks.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing (the message says what to install).
        ValueError: ``path`` does not end in ``.onnx`` (nothing is written).
        ValueError: a layer ONNX cannot hold as int8 (the message names it and the way out), or
            onnxruntime's outputs differ from PyTorch's by more than ``tolerance`` times the largest
            output (at least 1) in more than 1% of the output rows (vectors along the last dimension),
            or by more than 20 times that anywhere. An activation within float error of a rounding half
            can take the neighbouring int8 level in one runtime: a difference of one step times the
            weights at that row, seen up to 1e-3 of the output range on LeNet-300-100 and at 3 of 256
            positions of a 2-block int8 Llama (2.3e-3). A wrong scale or layer changes most rows.
            No file appears at ``path`` (and no temporary file stays) unless the check passes.
    """
    path = Path(path)
    if path.suffix != ONNX_SUFFIX:
        raise ValueError(
            f"an ONNX file path must end in {ONNX_SUFFIX!r} (lightning_compress.load reads a file by its suffix); got {os.fspath(path)!r}"
        )
    try:
        import onnx
        import onnxruntime  # noqa: F401 - checked here, run through inference_session
        import onnxscript  # noqa: F401 - the exporter's translation library
    except ImportError as err:
        raise ImportError(_EXTRA) from err
    from lightning_compress.measure import measure_latency
    from lightning_compress.outputs import serve_plainly

    view, stored = _qdq_view(model)
    inputs = tuple(t.cpu() for t in example_inputs)
    named = {k: t.cpu() for k, t in (kwargs or {}).items()}
    traced, traced_named = (inputs, named) if traced_inputs is None else traced_inputs
    traced, traced_named = tuple(t.cpu() for t in traced), {k: t.cpu() for k, t in traced_named.items()}
    held = {t.dtype for t in (*model.parameters(), *model.buffers(), *inputs, *named.values()) if t.is_floating_point()}
    other = sorted(str(d).removeprefix("torch.") for d in held - {torch.float32})
    note = None
    if other:
        view = view.float()
        reference = _float32_reference(model)
        inputs, named, traced, traced_named = (
            tuple(_as_float32(t) for t in inputs), {k: _as_float32(t) for k, t in named.items()},
            tuple(_as_float32(t) for t in traced), {k: _as_float32(t) for k, t in traced_named.items()},
        )  # fmt: skip
        note = (
            f"the model or its example holds {' and '.join(other)}: the ONNX graph computes in float32 (its int8 weights and scales "
            "are exact in float32), takes float32 inputs and returns float32 outputs; checked against a float32 copy of the model"
        )
    else:
        reference = copy_model(model).cpu().eval()
    plain = serve_plainly(reference, inputs, named, dict(constants or {}))
    serve_plainly(view.eval(), inputs, named, dict(constants or {}), plain)
    try:
        program = torch.onnx.export(
            view, traced, kwargs=traced_named or None, dynamo=True, dynamic_shapes=dynamic_shapes,
            custom_translation_table=_translations(), verbose=False,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - torch.onnx raises its own types, with screens of detail
        raise ValueError(_export_failure(model, err)) from err
    proto = program.model_proto
    _strip_debug_metadata(proto)
    initializers = {i.name for i in proto.graph.initializer}
    file_inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    positional = _positional_inputs(reference.forward, file_inputs, inputs, named)
    if positional is not None:
        proto.metadata_props.add(key=POSITIONAL_KEY, value=json.dumps(positional))
    if constants:
        proto.metadata_props.add(key=FIXED_KEY, value=json.dumps(constants))
    proto.metadata_props.add(key=GRAPH_DIGEST_KEY, value=graph_digest(proto.graph))
    with torch.no_grad():
        leaves, structure = torch.utils._pytree.tree_flatten(reference(*inputs, **named))
    if all(leaf is None or isinstance(leaf, Tensor) for leaf in leaves):  # the file's outputs: the tensors, in order
        record = {"spec": torch.utils._pytree.treespec_dumps(structure), "none": [i for i, v in enumerate(leaves) if v is None]}
        proto.metadata_props.add(key=OUTPUTS_KEY, value=json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(proto, os.fspath(tmp))
        try:
            session = inference_session(tmp, "all")
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load the exported graph ({type(err).__name__}: {err}); not written") from err
        # the file's inputs in forward's order: named after its arguments when there are keyword inputs
        names = list(inspect.signature(reference.forward).bind(*inputs, **named).arguments) if named else []
        feed_names = names if sorted(names) == sorted(i.name for i in session.get_inputs()) else [i.name for i in session.get_inputs()]
        order = [k for k in names if k in named] + [k for k in named if k not in names]
        named = {k: named[k] for k in order}  # keyword inputs in forward's order, as feed_names
        feed = (*inputs, *named.values())

        def run_onnx(*xs: Tensor) -> Any:
            return session.run(None, {n: x.numpy() for n, x in zip(feed_names, xs)})

        def run_torch(*xs: Tensor) -> Any:
            return reference(*xs[: len(inputs)], **dict(zip(named, xs[len(inputs) :])))

        rows = sum(_output_rows(t).numel() for t in leaves if isinstance(t, Tensor))  # the example's, run above
        probes, expected = [], []
        for f in _probe_feeds(feed, _probe_count(rows)):
            try:
                with torch.no_grad():
                    outs = [t for t in torch.utils._pytree.tree_leaves(run_torch(*f)) if isinstance(t, Tensor)]
            except Exception:  # noqa: BLE001 - a noisy copy the model does not take: the example itself is checked
                if f is feed:
                    raise
                continue
            if f is feed or all(bool(torch.isfinite(t).all()) for t in outs if t.is_floating_point()):
                probes.append(f)
                expected += outs

        def onnx_outputs() -> list[Tensor]:
            return [torch.from_numpy(a) for f in probes for a in run_onnx(*f)]

        # a padded position's outputs are no answer of the model (with left padding its attention sees no token,
        # and runtimes fill that row differently): compared at the tokens only
        tokens = call_mask(reference.forward, inputs, named)
        quantised_inputs = any("int8 activations" in how for how in stored.values())

        def agreement(got: list[Tensor]) -> float:
            return check_agreement_at_tokens(got, expected, tokens, tolerance, quantised_inputs)

        got = onnx_outputs()
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise ValueError(f"onnxruntime gave outputs {[tuple(g.shape) for g in got]}, PyTorch {[tuple(e.shape) for e in expected]}; not written")
        try:
            diff = agreement(got)
        except ValueError as fused:
            # onnxruntime's default graph optimisations fuse quantise/dequantise pairs around a layer into
            # integer kernels that round differently from the model: check without them
            session = inference_session(tmp, "disable_all")
            diff = agreement(onnx_outputs())
            proto.metadata_props.add(key=OPTIMIZATION_KEY, value="disable_all")
            onnx.save(proto, os.fspath(tmp))
            unoptimized = (
                f"onnxruntime's graph optimisations compute this model differently ({str(fused).split('; not written')[0]}); "
                "the file records that it runs with them off (load applies it), where it agrees with PyTorch"
            )
            note = unoptimized if note is None else f"{note}; {unoptimized}"
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    timed = measure_latency({"onnxruntime": run_onnx, "torch": run_torch}, feed, batch_size=None, repeats=20, iters=None)
    result = {
        "bytes": path.stat().st_size,
        "layers": stored,
        "max_abs_diff": diff,
        "onnxruntime_ms": timed["onnxruntime"]["median_ms"],
        "torch_ms": timed["torch"]["median_ms"],
    }
    if note is not None:
        result["note"] = note
    return result


#: Noisy copies of the example the check runs besides it: a few rows can agree by chance where an arithmetic
#: differs (a fused int8 kernel: 2 example rows passed, 34% of 200 other rows did not).
_PROBES = 8
#: The output rows the check compares at least, where the example is small, and the most copies it runs for them.
_CHECKED_ROWS, _MOST_PROBES = 32, 32


def _probe_count(rows: int) -> int:
    """How many noisy copies to check besides an example of ``rows`` output rows: :data:`_PROBES`, more for a small
    example (up to :data:`_MOST_PROBES`) so that about :data:`_CHECKED_ROWS` rows are compared: a fault that moves
    a third of the rows passes 9 one-row copies one time in seven (one flipped row is forgiven), 33 almost never."""
    return min(_MOST_PROBES, max(_PROBES, math.ceil(_CHECKED_ROWS / max(1, rows)) - 1))


def _probe_feeds(feed: tuple[Tensor, ...], probes: int) -> list[tuple[Tensor, ...]]:
    """The example, plus (when it has floating inputs) ``probes`` copies with Gaussian noise of a quarter of each
    floating input's spread added (seeded: the same every time); integer inputs (token ids), floating inputs
    holding whole numbers only (ids cast in ``forward``, a mask of ones) and inputs with non-finite entries (an
    additive ``-inf`` mask) stay. An all-zero input (the ``example_input_array`` of
    :class:`~lightning_compress.ClassifierModule`) gets noise: at zero every int8 input is its zero point
    whatever its scale, so the example alone checks no scale. A copy the model fails on or answers with
    non-finite outputs is dropped."""
    if not any(t.is_floating_point() for t in feed):
        return [feed]
    generator = torch.Generator().manual_seed(0)

    def noisy(t: Tensor) -> Tensor:
        # ids held as floats (cast with .long() in forward) and masks with -inf entries stay as they are
        if not t.is_floating_point() or t.numel() < 2 or not bool(torch.isfinite(t).all()):
            return t
        if bool((t == t.round()).all()) and bool(t.any()):
            return t
        spread = float(t.float().std()) or 1.0
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * (0.25 * spread)
        return (t.float() + noise).to(t.dtype)

    return [feed, *(tuple(noisy(t) for t in feed) for _ in range(probes))]


def _as_float32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() else t
