"""Reading inputs, labels and sample indices from the batches a training loader yields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_compress.batches import INDEX_KEYS, TARGET_KEYS, first_batch, to_module_device
from lightning_compress.distillation.calls import forward_names

__all__ = ["check_layout", "flat_batch", "split_batch"]

_X_KEYS = ("x", "input", "inputs", "input_ids", "image", "images", "pixel_values", "input_values", "input_features")  # the last: Hugging Face vision, audio


def flat_batch(batch: Any, input_key: str | None, network: nn.Module) -> Any:
    """``batch`` with inputs given as a mapping (``({"input_ids": ..., "attention_mask": ...}, labels)``, or
    ``{"inputs": {...}, "labels": ...}``) as one flat mapping, when ``network``'s ``forward`` takes some of the
    inputs' keys by name (a Hugging Face model): the inputs' entries, then the labels under ``"labels"`` (and an
    index under ``"index"``) unless the inputs hold them. A network that takes the mapping itself (its ``forward``
    names none of its keys, or names the key it is under) gets the batch as it is, as do other batches.

    Example:
        >>> import torch
        >>> class Keywords(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids
        >>> inputs = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)}
        >>> sorted(flat_batch((inputs, torch.ones(2)), None, Keywords()))
        ['attention_mask', 'input_ids', 'labels']
    """
    names = forward_names(network)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Mapping) and names & set(batch[0]):
        out = dict(batch[0])
        for key, value in zip(("labels", "index"), batch[1:3]):
            out.setdefault(key, value)
        return out
    if isinstance(batch, Mapping):
        key = input_key if input_key is not None else next((k for k in _X_KEYS if k in batch), None)
        inner = batch.get(key) if key is not None else None
        if isinstance(inner, Mapping) and key not in names and names & set(inner):
            out = dict(inner)
            for k, v in batch.items():
                if k != key:
                    out.setdefault(k, v)
            return out
    return batch


def check_layout(x: Any, y: Any) -> None:
    """A ``ValueError`` for a batch laid out ``(labels, inputs)``: the first element a vector of integers, the
    second a tensor with more dimensions or a mapping of inputs (the networks would be run on the labels)."""
    if isinstance(x, Tensor) and x.dim() == 1 and not x.is_floating_point() and (
        isinstance(y, Mapping) or (isinstance(y, Tensor) and y.dim() >= 2)
    ):
        second = f"a {type(y).__name__}" if isinstance(y, Mapping) else f"a tensor {tuple(y.shape)}"
        raise ValueError(
            f"the training batch's first element is a vector of integers {tuple(x.shape)} and its second {second}: it "
            "looks laid out (labels, inputs), while DistillationModule reads (inputs, labels); swap them in the "
            "dataset, or give dict batches with input_key/target_key"
        )


def split_batch(
    batch: Any, input_key: str | None = None, target_key: str | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(inputs, labels or None, sample indices or None)`` from a batch.

    Understood: a tensor (inputs only); a tuple/list ``(x,)``, ``(x, y)`` or ``(x, y, index)``; a dict
    with keys ``x``/``input``/``inputs``/``input_ids``/``image(s)``/``pixel_values``/``input_values``/``input_features``,
    optional ``y``/``label(s)``/``target(s)`` and
    ``index``/``idx``/``indices`` (what :class:`~lightning_compress.distillation.IndexedDataset` yields),
    or under the keys ``input_key``/``target_key`` when given (``"pixels"``, ``"input_ids"``...).

    Example:
        >>> import torch
        >>> x, y, i = split_batch((torch.zeros(2, 3), torch.tensor([1, 0])))
        >>> x.shape, y.tolist(), i
        (torch.Size([2, 3]), [1, 0], None)
        >>> x, y, _ = split_batch({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.ones(2, 5)})
        >>> x.shape, y.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        if input_key is not None and input_key not in batch:
            raise ValueError(f"input_key={input_key!r} is not a key of the batch; its keys: {list(batch)}")
        if target_key is not None and target_key not in batch:
            raise ValueError(f"target_key={target_key!r} is not a key of the batch; its keys: {list(batch)}")
        x = batch[input_key] if input_key is not None else next((batch[k] for k in _X_KEYS if k in batch), None)
        if x is None:
            raise ValueError(
                f"batch dict needs the inputs under one of {list(_X_KEYS)}, got keys {list(batch)}; name the key with "
                "DistillationModule(input_key=..., target_key=...)"
            )
        if target_key is not None:
            return x, batch[target_key], next((batch[k] for k in INDEX_KEYS if k in batch), None)
        y = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        i = next((batch[k] for k in INDEX_KEYS if k in batch), None)
        return x, y, i
    if isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        i = batch[2] if len(batch) > 2 else None
        return x, y, i
    raise ValueError(f"cannot read inputs from a batch of type {type(batch).__name__}")


def first_training_input(
    trainer: Any, pl_module: Any, input_key: str | None, target_key: str | None, *, required_for: str | None = None
) -> tuple[Any, Tensor] | None:
    """``(batch, its inputs)`` of the first training batch, read in ``setup`` from where the fit loop will
    read them (:func:`lightning_compress.batches.first_batch`) and prepared as the loop prepares a batch
    for ``training_step`` (:func:`lightning_compress.batches.to_module_device`: the precision plugin's input
    conversion and the module's batch-transfer hooks). Without a training batch: ``None`` (Lightning
    reports that itself), or, when ``required_for`` says what needs it, a ``ValueError``."""
    try:
        batch = first_batch(trainer, pl_module, f"DistillationModule({required_for})" if required_for else "DistillationModule")
    except ValueError as err:
        if required_for is None:
            return None
        raise ValueError(f"{required_for}: cannot size the projections ({err}); pass example_input_shape to DistillationModule") from err
    batch = flat_batch(to_module_device(pl_module, batch), input_key, pl_module.student)
    return batch, split_batch(batch, input_key, target_key)[0]
