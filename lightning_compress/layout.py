"""Which dimension of a model's inputs is the batch: 0, or 1 for sequence-first models.

PyTorch's own sequence layers take ``(seq, batch, features)`` unless built with ``batch_first=True``
(``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``/``DecoderLayer``, ``nn.Transformer``,
``nn.RNN``/``LSTM``/``GRU``), and a model built on them is usually called sequence-first too. What
repeats one sample into a batch (latency), cuts one sample out (MACs per sample) or marks the batch
as dynamic (export) must know which dimension that is. It is read from the model itself: the first
of those layers the call reaches, when it is sequence-first, says the batch size ``N`` (dimension 1
of its input); the inputs are sequence-first when their dimension 1, not 0, has that size. "The
inputs" are their first tensor as :func:`~lightning_compress.measure.first_tensor` finds it, the one
whose batch the measurements resize.

Example:
    >>> from torch import nn
    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False
    >>> input_batch_dim(layer, (torch.randn(5, 3, 8),), {})  # (seq 5, batch 3, features 8)
    1
    >>> input_batch_dim(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), (torch.randn(3, 5, 8),), {})
    0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.measure import first_tensor

__all__ = ["input_batch_dim", "sequence_first_layers"]

#: PyTorch layers whose ``batch_first`` says their input layout (``False``: ``(seq, batch, ...)``).
_LAYOUT_LAYERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer, nn.RNNBase)


class _Reached(Exception):
    """Raised by the pre-hook to stop the forward at the first layout layer it reaches."""


def _batch_first(layer: nn.Module) -> bool:
    """A layout layer's ``batch_first`` (a transformer layer keeps it on its attention)."""
    if hasattr(layer, "batch_first"):
        return bool(layer.batch_first)
    return bool(getattr(getattr(layer, "self_attn", None), "batch_first", True))


def sequence_first_layers(model: nn.Module) -> list[nn.Module]:
    """The layout layers of ``model`` (those with a ``batch_first`` setting), if any is sequence-first; else ``[]``."""
    layers = [m for m in model.modules() if isinstance(m, _LAYOUT_LAYERS)]
    return layers if any(not _batch_first(m) for m in layers) else []


def _reached_layer(
    model: nn.Module, layers: list[nn.Module], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[nn.Module, torch.Tensor | None] | None:
    """The first of ``layers`` the call reaches and its input (the forward stops there), or ``None``
    when the call reaches none or fails first. Every module's train/eval mode is left as it was."""
    reached: list[tuple[nn.Module, torch.Tensor | None]] = []

    def hook(module: nn.Module, hook_args: tuple[Any, ...], hook_kwargs: dict[str, Any]) -> None:
        reached.append((module, first_tensor(hook_args, hook_kwargs)))
        raise _Reached

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    except _Reached:
        pass
    except Exception:  # noqa: BLE001 - the call itself fails: nothing to learn from it
        return None
    finally:
        for m, mode in modes.items():
            m.training = mode
        for handle in handles:
            handle.remove()
    return reached[0] if reached else None


def _narrowed(value: Any, size: int) -> Any:
    """``value`` with every tensor whose dimension 0 has ``size`` cut to its first entry there."""
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() and value.shape[0] == size else value
    if isinstance(value, Mapping):
        return {k: _narrowed(v, size) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_narrowed(v, size) for v in value)
    return value


def input_batch_dim(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The batch dimension of the call ``model(*args, **kwargs)``: 1 when the first layout layer the call
    reaches is sequence-first and the first input tensor holds its batch size in dimension 1, else 0.

    Runs the forward (no gradients, every module's mode kept) up to that layer, only when ``model`` holds
    a sequence-first layer; a call that fails before reaching one is taken as batch-first. When both
    dimensions have the batch size (as many steps as samples), a second call with dimension 0 cut to
    one entry tells them apart: the layer's batch size stays when dimension 0 is the sequence.
    """
    layers = sequence_first_layers(model)
    first = first_tensor(args, kwargs)
    if not layers or first is None or first.dim() < 2:
        return 0
    found = _reached_layer(model, layers, args, kwargs)
    if found is None:
        return 0
    layer, seen = found
    if _batch_first(layer) or seen is None or seen.dim() < 3:  # batch-first, or an unbatched call
        return 0
    batch = seen.shape[1]
    if first.shape[1] != batch:
        return 0
    if first.shape[0] != batch:
        return 1
    cut = _reached_layer(model, layers, _narrowed(args, batch), _narrowed(dict(kwargs), batch))
    if cut is None or cut[1] is None or cut[1].dim() < 3:
        return 1  # the layer reached is sequence-first: its layout is the likelier
    return 1 if cut[1].shape[1] == batch else 0
