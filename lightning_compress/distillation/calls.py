"""How :class:`~lightning_compress.distillation.DistillationModule` calls its two networks on a batch,
reads their logits, and lines the labels up with them.

- **Keyword forwards.** A network whose ``forward`` names the batch's input key (a Hugging Face model's
  ``input_ids``, say) is called by keyword with every entry of the dict batch its ``forward`` names,
  labels and sample indices excepted: ``attention_mask``, ``token_type_ids`` or ``position_ids`` reach
  it as they reach it in the user's own training step. Any other network gets the input tensor alone.
  Each network is matched on its own, so a plain student can learn from a Hugging Face teacher.
- **Encoder-decoders.** A network that generates its target (:func:`is_seq2seq`: BART, T5, Marian,
  Whisper...), called on a batch without ``decoder_input_ids``, gets them teacher-forced on the batch's
  targets (``labels``, or the ``target_key``): its ``prepare_decoder_input_ids_from_labels`` (the targets
  shifted right, padding made the start token), or the targets as ``labels`` for a ``forward`` that
  shifts them. The logits are then the target's positions, scored against the labels as they are (never
  shifted again) and masked by ``decoder_attention_mask``, not by the source's ``attention_mask``
  (:func:`target_mask`).
- **Outputs** are read by :func:`lightning_compress.outputs.logits_of`: a tensor is the logits;
  otherwise the ``logits`` entry of a dict or an output object (Hugging Face's ``ModelOutput``), or the
  first tensor of a tuple.
- **Next-token labels.** Hugging Face's causal language models take ``labels`` equal to ``input_ids``
  and shift them inside the model. Labels that equal the inputs at every counted position are read
  that way: ``logits[..., t, :]`` is scored against the label at ``t + 1`` (the last position has none),
  where position ``t`` is not padding.
  ``DistillationModule(shift_labels=...)`` says so explicitly instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Collection, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.batches import ForwardCall
from lightning_compress.lm import labels_are_inputs

__all__ = [
    "cast_floating", "input_tensors", "is_seq2seq", "labels_are_inputs", "network_call", "target_mask",
    "shift_for_next_token", "with_input",
]

#: Inputs of an encoder-decoder's decoder: a batch that holds one is used as it is, not rebuilt from the labels.
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


#: What a ``forward`` taking ``**kwargs`` is listed with: its named parameters cannot tell what it reads.
_ANY = "**"


def _keyword_names(forward: Any, skip_first: bool) -> frozenset[str]:
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: positional only
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in parameters[int(skip_first):] if p.kind in kinds}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        names.add(_ANY)
    return frozenset(names)


@functools.lru_cache(maxsize=256)
def _class_forward_names(forward: Any) -> frozenset[str]:
    return _keyword_names(forward, skip_first=True)  # the class's function: its first parameter is self


def _forward_names(network: nn.Module) -> frozenset[str]:
    """The names ``network.forward`` takes by keyword, with :data:`_ANY` when it takes ``**kwargs``."""
    network = getattr(network, "_orig_mod", network)  # torch.compile's wrapper takes (*args, **kwargs)
    own = network.__dict__.get("forward")  # an instance's own forward (a patched one) comes first
    return _keyword_names(own, skip_first=False) if own is not None else _class_forward_names(type(network).forward)


def forward_names(network: nn.Module) -> frozenset[str]:
    """The parameter names ``network.forward`` takes by keyword (``**kwargs`` names none); looked up once
    per class.

    Example:
        >>> sorted(forward_names(nn.Linear(2, 2)))
        ['input']
    """
    return _forward_names(network) - {_ANY}


def takes_any_keyword(network: nn.Module) -> bool:
    """Whether ``network``'s ``forward`` takes ``**kwargs`` (a wrapper that passes them on)."""
    return _ANY in _forward_names(network)


def network_call(network: nn.Module, batch: Any, x: Tensor, skip: Collection[str], labels: Tensor | None = None) -> ForwardCall:
    """How to call ``network`` on ``batch`` whose input tensor is ``x``: by keyword when its ``forward``
    names the key ``x`` is under (with every other entry it names, those in ``skip`` excepted), else ``(x,)``;
    inputs given as a tuple, ``((ids, mask), labels)``, are its positional arguments when it takes that many.
    A sequence-to-sequence network (:func:`is_seq2seq`) is teacher-forced on the targets ``labels``.

    Example:
        >>> class Keywords(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None, labels=None):
        ...         return input_ids
        >>> batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.ones(2, 3)}
        >>> sorted(network_call(Keywords(), batch, batch["input_ids"], skip={"labels"}).kwargs)
        ['attention_mask', 'input_ids']
        >>> network_call(nn.Linear(3, 3), batch, batch["input_ids"], skip={"labels"}).kwargs
        {}
    """
    if isinstance(batch, Mapping):
        names = forward_names(network)
        given = {k: v for k, v in batch.items() if k in names and k not in skip}
        if any(v is x for v in given.values()):
            if is_seq2seq(network):
                given = _with_decoder_inputs(network, given, labels, sorted(batch))
            return ForwardCall((), given)
        others = sorted(k for k, v in batch.items() if k not in skip and v is not x)
        if others and takes_any_keyword(network):
            rank_zero_warn(
                f"DistillationModule: {type(network).__name__}.forward takes **kwargs and names no key of the batch, so it "
                f"is called with the input alone and {others} do not reach it; give it a forward that names them "
                "(input_ids, attention_mask...), or call the network inside it"
            )
    if isinstance(x, (list, tuple)) and _takes_positionally(network, len(x)):  # ((ids, mask), labels): model(ids, mask)
        return ForwardCall(tuple(x), {})
    return ForwardCall((x,), {})


def _takes_positionally(network: nn.Module, n: int) -> bool:
    """Whether ``network.forward`` takes ``n`` positional arguments (a tuple of inputs is then spread over them; a
    forward with fewer, ``forward(self, inputs)``, gets the tuple as its one argument)."""
    network = getattr(network, "_orig_mod", network)
    try:
        parameters = list(inspect.signature(network.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= n or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def is_seq2seq(network: nn.Module) -> bool:
    """Whether ``network`` is an encoder-decoder that generates the target: its ``forward`` takes
    ``decoder_input_ids`` and it builds them from labels (``prepare_decoder_input_ids_from_labels``: BART, T5,
    Marian, Pegasus...; a ``...ForConditionalGeneration`` whose ``forward`` shifts ``labels`` itself, Whisper).
    An encoder-decoder classifier (``BartForSequenceClassification``) feeds its decoder the source: not one.

    Example:
        >>> is_seq2seq(nn.Linear(2, 2))
        False
    """
    names = forward_names(network)
    if "decoder_input_ids" not in names:
        return False
    prepare = callable(getattr(network, "prepare_decoder_input_ids_from_labels", None))
    return prepare or ("labels" in names and type(network).__name__.endswith("ForConditionalGeneration"))


def _with_decoder_inputs(network: nn.Module, given: dict[str, Any], labels: Tensor | None, keys: list[str]) -> dict[str, Any]:
    """``given`` with a sequence-to-sequence network's decoder inputs built from the targets ``labels`` when the
    batch has none: without them a Hugging Face model shifts the *source* ids into its decoder and its logits are
    not the target's."""
    if any(k in given for k in DECODER_INPUTS):
        return given
    if labels is None:
        raise ValueError(
            f"{type(network).__name__} is an encoder-decoder that generates its target (its forward takes "
            f"decoder_input_ids), but the batch has no decoder_input_ids and no targets to build them from (its keys: "
            f"{keys}); give the targets as 'labels' (or name their key with target_key), or add 'decoder_input_ids' "
            "(the targets shifted right) to the batch"
        )
    prepare = getattr(network, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return {**given, "decoder_input_ids": prepare(labels=labels)}
    return {**given, "labels": labels}  # the forward shifts them into its decoder


def target_mask(batch: Any) -> Tensor | None:
    """The padding mask of a teacher-forced target's positions: ``batch["decoder_attention_mask"]``, else ``None``
    (the labels' ignore index marks the padding)."""
    mask = batch.get("decoder_attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, Tensor) else None


def shift_for_next_token(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Logits at positions ``0..T-2`` with the labels of positions ``1..T-1``; the padding mask stays with
    the logits (a prediction made at a padded position never counts, whatever its target).

    Example:
        >>> ids, mask = torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]])  # left padding
        >>> s, t, y, m = shift_for_next_token(torch.zeros(1, 4, 9), torch.zeros(1, 4, 9), ids.masked_fill(mask == 0, -100), mask)
        >>> tuple(s.shape), y.tolist(), m.tolist()
        ((1, 3, 9), [[5, 6, 7]], [[0, 1, 1]])
    """
    return (
        student_logits[..., :-1, :],
        teacher_logits[..., :-1, :],
        None if labels is None else labels[..., 1:],
        None if mask is None else mask[..., :-1],
    )


def input_tensors(call: ForwardCall) -> list[Tensor]:
    """Every tensor a call passes (what a cached output depends on)."""
    return [v for v in (*call.args, *call.kwargs.values()) if isinstance(v, Tensor)]


def with_input(call: ForwardCall, x: Tensor) -> ForwardCall:
    """``call`` with its one tensor replaced by ``x`` (some samples of it: the teacher cache's misses)."""
    return call.map(lambda v: x if isinstance(v, Tensor) else v)


def cast_floating(call: ForwardCall, dtype: torch.dtype) -> ForwardCall:
    """``call`` with its floating-point tensors cast to ``dtype`` (a teacher kept in bf16 or fp16)."""
    return call.map(lambda v: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)
