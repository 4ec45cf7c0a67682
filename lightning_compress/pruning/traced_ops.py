"""The torch.fx nodes the channel graph knows, by what they do to channels, and how it reads a node.

Element-wise ops and pooling pass channels through, binary ops merge the groups of their operands,
reductions, reshapes and concatenations change the layout; :mod:`~lightning_compress.pruning.graph` never
guesses through any other op.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "BINARY_FUNCTIONS",
    "BINARY_METHODS",
    "CAT_FUNCTIONS",
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES",
    "NORM_MODULES",
    "POOL_FUNCTIONS",
    "POOL_MODULES",
    "REDUCE_FUNCTIONS",
    "REDUCE_METHODS",
    "RESHAPE_FUNCTIONS",
    "RESHAPE_METHODS",
    "SHAPE_METHODS",
    "describe_node",
    "traced_shape",
]


ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clamp, torch.clip, torch.abs, operator.neg,
    operator.pos, torch.neg,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs", "neg",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
}  # fmt: skip
POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d,
}  # fmt: skip
BINARY_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCE_FUNCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
CAT_FUNCTIONS: set[Any] = {torch.cat, torch.concat, torch.concatenate}
RESHAPE_FUNCTIONS: set[Any] = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"flatten", "view", "reshape"}
SHAPE_METHODS = {"size", "dim", "numel"}


def traced_shape(node: Any) -> tuple[int, ...] | None:
    """The traced shape of a node's value if it is a tensor, else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def describe_node(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    target = getattr(node.target, "__name__", str(node.target))
    kind = "method" if node.op == "call_method" else "function"
    return f"{kind} '{target}' (graph node '{node.name}')"
