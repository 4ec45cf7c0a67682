"""Which positions of a batch are tokens and which are padding.

A padded batch of sequences carries an ``attention_mask`` of shape ``(batch, seq_len)``: non-zero at a token,
zero at padding. What a padded position computes is not part of the model's answer (its logits are not read,
its loss is ignored), so statistics of the layers' inputs and comparisons of outputs leave it out: Wanda's
input norms, the activation ranges quantisation observes, the ONNX file's agreement check. The mask is read
from a dict batch or a forward call; a tensor whose leading dimensions are the mask's is reduced to its token
positions (:func:`token_rows`); any other tensor is taken whole.

While a plugin runs a batch it knows the mask of, it makes it the current one (:func:`counting_tokens`, or
:func:`set_current`/``set_current(None)`` around a training step) for the hooks that read inputs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MASK_KEY", "batch_mask", "call_mask", "mask_entry", "mask_key_of", "counting_tokens", "current", "padding_mask", "set_current", "token_extremes",
    "token_rows", "zero_padding",
]

#: The key (and forward argument) of a padding mask: Hugging Face's name.
DEFAULT_MASK_KEY = "attention_mask"

_current: Tensor | None = None


def padding_mask(mask: Any) -> Tensor | None:
    """``mask`` as a ``bool`` ``(batch, seq_len)`` tensor of the tokens when it is a 2-D padding mask, else ``None``.

    A boolean or integer mask is one (non-zero = a token; Hugging Face's ``attention_mask``) and is read without
    waiting for the device. A floating mask is one only when it holds zeros and ones (read from the device); an
    additive mask (``0`` at tokens, ``-inf`` at padding) or a 4-D one is not.

    Example:
        >>> padding_mask(torch.tensor([[0, 1, 1]]))
        tensor([[False,  True,  True]])
        >>> padding_mask(torch.tensor([[0.0, float("-inf")]])) is None, padding_mask(torch.zeros(2, 3, 3)) is None
        (True, True)
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.numel() == 0 or mask.is_complex():
        return None
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        return None
    return mask != 0


def mask_entry(batch: Any, key: str | None = DEFAULT_MASK_KEY) -> Tensor | None:
    """The padding mask a dict batch holds at ``key`` (non-zero = a real token) as it is, else ``None``.

    Tuple and tensor batches carry none; ``key=None`` reads none. A key other than the default that is missing
    from a dict batch is an error (a misspelt key would otherwise count the padding silently), and so is an entry
    that is no tensor.

    Example:
        >>> mask_entry({"input_ids": torch.zeros(1, 3), "attention_mask": torch.tensor([[1, 1, 0]])})
        tensor([[1, 1, 0]])
        >>> mask_entry((torch.zeros(1, 3),)) is None
        True
    """
    if key is None or not isinstance(batch, Mapping):
        return None
    if key not in batch:
        if key != DEFAULT_MASK_KEY:
            raise ValueError(f"attention_mask_key={key!r} is not a key of the batch; its keys: {list(batch)}")
        return None
    mask = batch[key]
    if not isinstance(mask, Tensor):
        raise ValueError(f"batch[{key!r}] must be a tensor (1 = token, 0 = padding), got {type(mask).__name__}")
    return mask


def batch_mask(batch: Any, key: str | None = DEFAULT_MASK_KEY) -> Tensor | None:
    """The :func:`padding_mask` of a dict batch's ``key`` entry, or of a mapping of inputs inside it
    (``{"inputs": {"input_ids": ..., "attention_mask": ...}, "labels": ...}``), when it is a boolean or integer tensor;
    ``None`` for other batches and entries (a missing key, a ``None`` from a collate function: the plugins read any
    module's batches, and only :func:`mask_entry`'s reader, the module's own loss, refuses them), ``key=None``, and a
    batch with decoder inputs, whose positions are the target's. Read on the hot path of a training step, where a
    floating mask's check would wait for the device."""
    if key is None or not isinstance(batch, Mapping) or _has_decoder_inputs(batch):
        return None
    mask = batch.get(key)
    if mask is None:
        inner = next((v for v in batch.values() if isinstance(v, Mapping) and key in v), None)
        if inner is None or _has_decoder_inputs(inner):
            return None
        mask = inner[key]
    if not isinstance(mask, Tensor) or mask.is_floating_point():
        return None
    return padding_mask(mask)


def _has_decoder_inputs(inputs: Mapping[Any, Any]) -> bool:
    return any(str(k).startswith("decoder_") for k in inputs)


def mask_key_of(module: Any) -> str | None:
    """The batch key of the padding mask the plugins leave out of a training step's statistics, or ``None``: the
    module's own ``attention_mask_key`` (:class:`~lightning_compress.DistillationModule`; ``None`` there says the
    batch has none), else :data:`DEFAULT_MASK_KEY`. ``None`` too for a step that reads its own batches
    (``training_step(self, dataloader_iter)``: the batch a hook sees is not the one it runs) and for an
    encoder-decoder model (a Hugging Face config with ``is_encoder_decoder``), whose decoder inputs have the target's
    positions: with a target as long as the source, the source's mask would match them."""
    step = getattr(module, "training_step", None)
    try:
        reads_iterator = step is not None and "dataloader_iter" in inspect.signature(step).parameters
    except (TypeError, ValueError):
        reads_iterator = False
    if reads_iterator or not isinstance(module, torch.nn.Module):
        return None
    if any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in module.modules()):
        return None
    return getattr(module, "attention_mask_key", DEFAULT_MASK_KEY)


def call_mask(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The :func:`padding_mask` a call of ``forward`` is given: its ``attention_mask`` argument, by keyword or
    by position."""
    mask = kwargs.get(DEFAULT_MASK_KEY)
    if mask is None:
        try:
            mask = inspect.signature(forward).bind_partial(*args, **kwargs).arguments.get(DEFAULT_MASK_KEY)
        except (TypeError, ValueError):
            return None
    return padding_mask(mask)


def _matches(t: Tensor, mask: Tensor | None) -> bool:
    return mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape) and not t.is_nested


def token_rows(t: Tensor, mask: Tensor | None) -> Tensor:
    """``t`` at the mask's tokens, ``(tokens, *rest)``, when ``t``'s leading dimensions are the mask's shape;
    else ``t`` whole (reads the count from the device).

    Example:
        >>> token_rows(torch.arange(6.0).reshape(1, 3, 2), torch.tensor([[True, False, True]]))
        tensor([[0., 1.],
                [4., 5.]])
    """
    if mask is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(mask.shape) or t.is_nested:
        return t
    return t[mask.to(t.device)]


def zero_padding(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x`` (a layer's ``(batch, seq_len, features)`` input) with the padded positions of ``mask`` (default:
    :func:`current`) set to zero, for sums over tokens; ``x`` itself when no mask applies. No device read."""
    mask = current() if mask is None else mask
    if not _matches(x, mask):
        return x
    return x * mask.to(device=x.device).unsqueeze(-1).to(x.dtype)


def token_extremes(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """The smallest and largest entry of ``x`` (a layer's ``(batch, seq_len, features)`` input) over the tokens of
    :func:`current`, as 0-d tensors; ``None`` when no mask applies (take ``x`` whole). No device read."""
    mask = current()
    if not _matches(x, mask):
        return None
    padded = ~mask.to(x.device)  # type: ignore[union-attr]
    # masked_fill with a Python number: no tensor made from a host value (on a GPU, a copy that waits for the device)
    return x.amin(-1).masked_fill_(padded, float("inf")).min(), x.amax(-1).masked_fill_(padded, float("-inf")).max()


def current() -> Tensor | None:
    """The mask of the batch running now, when a plugin set one; ``None`` inside a compiled graph (a value read
    there would be baked into the graph)."""
    return None if torch.compiler.is_compiling() else _current


def set_current(mask: Tensor | None) -> None:
    """Make ``mask`` (a :func:`padding_mask`) the current one; ``None`` clears it."""
    global _current
    _current = mask


@contextlib.contextmanager
def counting_tokens(mask: Tensor | None) -> Iterator[None]:
    """:func:`current` is ``mask`` inside the block, and what it was before afterwards."""
    before = _current
    set_current(mask)
    try:
        yield
    finally:
        set_current(before)
