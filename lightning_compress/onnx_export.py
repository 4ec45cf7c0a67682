"""ONNX export of a compressed model: int8 weights behind ``DequantizeLinear``, static int8 activations
as ``QuantizeLinear``/``DequantizeLinear`` pairs, both built from the model's own scales.

The converted layers (``Int8Linear``, ``LowBitLayer``) compute with ``torch._int_mm`` and packed
nibbles, which the ONNX exporter cannot translate. So the export runs on an equivalent view of the
model in which each converted layer multiplies ``dequantize(q, scale)`` and, where the layer quantises
its input, ``quantize_dequantize(x, scale, zero_point)``. Those two are small custom operators
(``lightning_compress::dequantize_weight``, ``lightning_compress::quantize_dequantize``) that run in
PyTorch and translate to the standard ONNX operators, so the file holds the integer weights
themselves (an int8 initializer per layer, one scale per output channel). Removed channels and heads
are simply absent: the model is already smaller. onnxruntime then checks the file against PyTorch.

Needs the optional ``onnx`` extra: ``pip install "lightning-compress[onnx]"`` (onnx, onnxscript,
onnxruntime).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["export_onnx", "load_onnx"]

_EXTRA = 'format="onnx" needs onnx, onnxscript and onnxruntime: pip install "lightning-compress[onnx]"'


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


class _QDQLayer(nn.Module):
    """A converted Linear/Conv as ONNX will hold it: int8 weight, per-channel scale, optional input QDQ."""

    def __init__(self, kind: str, q: Tensor, scale: Tensor, bias: Tensor | None, act: tuple[Tensor, Tensor] | None, op: dict[str, Any]) -> None:
        super().__init__()
        self.kind, self.op = kind, op
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.act = act is not None
        if act is not None:
            self.register_buffer("act_scale", act[0].detach().to(torch.float32).reshape(()).clone())
            self.register_buffer("act_zero", act[1].detach().reshape(()).clone())

    def forward(self, x: Tensor) -> Tensor:
        w = torch.ops.lightning_compress.dequantize_weight(self.q, self.scale)
        if self.act:
            x = torch.ops.lightning_compress.quantize_dequantize(x, self.act_scale, self.act_zero)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        if self.kind == "embedding":
            return F.embedding(x, w, self.op.get("padding_idx"))
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, w, self.bias, self.op["stride"], self.op["padding"], self.op["dilation"], self.op["groups"])


def _per_channel(scale: Tensor, rows: int, name: str, granularity: Any) -> Tensor:
    if granularity not in ("per_channel", "per_tensor"):
        raise ValueError(
            f"format='onnx' stores one scale per output channel; layer {name!r} has scales per group of {granularity} "
            "weights. Export it with format='compact', or quantise with granularity='per_channel'"
        )
    return scale.reshape(-1).expand(rows) if scale.numel() == 1 else scale.reshape(-1)


def _qdq_view(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A CPU copy of ``model`` with every converted layer replaced by a :class:`_QDQLayer`; and
    ``{layer: how it is stored}``."""
    from lightning_compress.quantization.convert import _set_submodule
    from lightning_compress.quantization.lowbit import Int8Linear, LowBitLayer, unpack_int4

    view = copy.deepcopy(model).cpu().eval()
    stored: dict[str, str] = {}
    for name, layer in list(view.named_modules()):
        if isinstance(layer, Int8Linear):
            s_w = layer.affine[0] / layer.input_qparams[0]
            in_scale, in_zero = layer.input_qparams
            new = _QDQLayer("linear", layer.weight_t.t(), s_w, layer.bias, (in_scale, in_zero.round().to(torch.int8)), {})
            stored[name] = "int8 weights, int8 activations (QuantizeLinear/DequantizeLinear)"
        elif isinstance(layer, LowBitLayer):
            spec = layer.spec
            shape = tuple(spec["weight_shape"])
            if spec["bits"] > 8:
                raise ValueError(f"layer {name!r} has {spec['bits']}-bit weights; ONNX int8 holds at most 8")
            q = unpack_int4(layer.qweight, math.prod(shape)) if spec["bits"] <= 4 else layer.qweight
            scale = _per_channel(layer.scale, shape[0], name, spec["granularity"])
            qparams = layer._input_qparams()
            act = None
            if qparams is not None:
                if spec["activation_bits"] != 8:
                    raise ValueError(f"layer {name!r} quantises its input to {spec['activation_bits']} bits; ONNX holds 8")
                act = (qparams[0], qparams[1].round().to(torch.uint8))
            op = {k: spec.get(k) for k in ("stride", "dilation", "groups", "padding_idx")}
            if spec["kind"] in ("conv1d", "conv2d"):
                if spec.get("padding_mode", "zeros") != "zeros":
                    raise ValueError(f"layer {name!r} pads with {spec['padding_mode']!r}; format='onnx' handles zero padding")
                op["padding"] = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
                op["stride"], op["dilation"] = tuple(op["stride"]), tuple(op["dilation"])
            new = _QDQLayer(spec["kind"], q.reshape(shape), scale, layer.bias, act, op)
            stored[name] = f"{spec['bits']}-bit weights in int8" + (", int8 activations" if act else "")
        else:
            if type(layer).__module__.startswith("torchao") or any(type(p).__module__.startswith("torchao") for p in layer.parameters(recurse=False)):
                raise ValueError(f"layer {name!r} holds torchao tensors, which ONNX export does not take; convert with backend='auto'")
            continue
        _set_submodule(view, name, new)
    return view, stored


def _translations() -> dict[Any, Any]:
    from onnxscript import opset18 as op

    def dq_weight(q: Any, scale: Any) -> Any:
        return op.DequantizeLinear(q, scale, axis=0)

    def qdq(x: Any, scale: Any, zero_point: Any) -> Any:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    return {torch.ops.lightning_compress.dequantize_weight.default: dq_weight, torch.ops.lightning_compress.quantize_dequantize.default: qdq}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple[Tensor, ...],
    *,
    traced_inputs: tuple[Tensor, ...] | None = None,
    dynamic_shapes: Any = None,
    tolerance: float = 2e-3,
) -> dict[str, Any]:
    """Write ``model`` as ONNX at ``path`` and check it in onnxruntime against PyTorch on ``example_inputs``.

    ``traced_inputs`` and ``dynamic_shapes`` (default: the example, static shapes) are what the exporter
    traces with (:func:`lightning_compress.export` passes a batch dimension of any size).

    Returns:
        ``{"bytes", "layers": {layer: how it is stored}, "max_abs_diff", "onnxruntime_ms", "torch_ms"}``
        (the latencies at the example's batch, interleaved medians, 1 thread).

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing (the message says what to install).
        ValueError: a layer ONNX cannot hold as int8 (the message names it and the way out), or
            onnxruntime's outputs differ from PyTorch's by more than ``tolerance`` times the largest
            output on the example batch. (An activation within float error of a rounding half can take
            the neighbouring int8 level in one runtime: a difference of one step times the weights, seen
            up to 1e-3 of the output range on LeNet-300-100.)
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - the exporter's translation library
    except ImportError as err:
        raise ImportError(_EXTRA) from err
    from lightning_compress.measure import measure_latency

    view, stored = _qdq_view(model)
    inputs = tuple(t.cpu() for t in example_inputs)
    traced = inputs if traced_inputs is None else tuple(t.cpu() for t in traced_inputs)
    program = torch.onnx.export(view, traced, dynamo=True, dynamic_shapes=dynamic_shapes, custom_translation_table=_translations(), verbose=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(program.model_proto, os.fspath(tmp))
    session = onnxruntime.InferenceSession(os.fspath(tmp), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run_onnx(*xs: Tensor) -> Any:
        return session.run(None, {n: x.numpy() for n, x in zip(names, xs)})

    reference = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        expected = reference(*inputs)
    got = torch.from_numpy(run_onnx(*inputs)[0])
    diff = float((got - expected).abs().max())
    if diff > tolerance * max(1.0, float(expected.abs().max())):
        os.unlink(tmp)
        raise ValueError(f"onnxruntime's outputs differ from PyTorch's by {diff:.3g} (tolerance {tolerance:g}); not written")
    os.replace(tmp, path)
    timed = measure_latency({"onnxruntime": run_onnx, "torch": reference}, inputs, batch_size=None, repeats=20, iters=None)
    return {
        "bytes": path.stat().st_size,
        "layers": stored,
        "max_abs_diff": diff,
        "onnxruntime_ms": timed["onnxruntime"]["median_ms"],
        "torch_ms": timed["torch"]["median_ms"],
    }


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """A callable running the ONNX file at ``path`` in onnxruntime: tensors in, the first output as a tensor.

    Raises:
        ImportError: onnxruntime is missing.
        ValueError: the file is not a model onnxruntime can load.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(_EXTRA) from err
    try:
        session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"{os.fspath(path)!r} is not an ONNX model onnxruntime can load ({type(err).__name__}: {err})") from err
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)})[0])

    return run
