"""What a network returns, read the same way everywhere.

- :func:`logits_of`: the logits in a network's output (a tensor, a Hugging Face ``ModelOutput`` or any
  dict or object with ``logits``, a tuple), for the losses and metrics of the project's modules.
- :func:`plain_output`: the output as plain tensors, tuples and dicts, which is what an exported
  artifact returns (:func:`serve_plainly`), so loading it needs none of the model's classes (a
  ``ModelOutput`` or a dataclass becomes a ``dict`` of its tensors, a number a 0-d tensor; a cache object,
  which is not a tensor, is left out).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_plain", "logits_of", "plain_output", "serve_plainly"]


def logits_of(output: Any, who: str) -> Tensor:
    """The logits in what a network returned: a tensor as it is, the ``logits`` entry of a dict or output
    object, or the first tensor of a tuple or list.

    Example:
        >>> logits_of({"loss": torch.tensor(0.0), "logits": torch.ones(1, 2)}, "student").shape
        torch.Size([1, 2])
        >>> logits_of((torch.ones(1, 3), None), "teacher").shape
        torch.Size([1, 3])
    """
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = next((o for o in output if isinstance(o, Tensor)), None)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the {who} returned {type(output).__name__}, which holds no logits tensor; return a tensor, a dict or an "
            "output object with a 'logits' entry, or a tuple whose first tensor is the logits"
        )
    return logits


def is_plain(output: Any) -> bool:
    """Whether ``output`` is made of tensors, ``None``, plain tuples, lists and dicts only.

    Example:
        >>> import torch
        >>> is_plain((torch.ones(1), {"a": torch.ones(1)})), is_plain(object())
        (True, False)
    """
    if output is None or isinstance(output, Tensor):
        return True
    if type(output) in (tuple, list):
        return all(is_plain(v) for v in output)
    if type(output) is dict:
        return all(is_plain(v) for v in output.values())
    return False


def plain_output(output: Any) -> Any:
    """``output`` as plain tensors, tuples and dicts: a mapping (a ``ModelOutput``) or a dataclass becomes a ``dict``
    of its entries that hold tensors, any tuple a ``tuple``, a Python number a 0-d tensor; anything else that is not
    a tensor (a cache object) is ``None``.

    Example:
        >>> import torch
        >>> from collections import OrderedDict
        >>> plain_output(OrderedDict(logits=torch.ones(1), past_key_values=object()))
        {'logits': tensor([1.])}
        >>> plain_output((torch.ones(1), 3.0, 2))
        (tensor([1.]), tensor(3.), tensor(2))
    """
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, (bool, torch.SymBool)):
        return torch.scalar_tensor(output, dtype=torch.bool)
    if isinstance(output, (int, torch.SymInt)):  # a size read from an input stays one of the graph (a SymInt when traced)
        return torch.scalar_tensor(output, dtype=torch.int64)
    if isinstance(output, (float, torch.SymFloat)):
        return torch.scalar_tensor(output)
    if dataclasses.is_dataclass(output) and not isinstance(output, (type, Mapping)):
        output = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, Mapping):
        entries = {k: plain_output(v) for k, v in output.items()}
        return {k: v for k, v in entries.items() if v is not None}
    if isinstance(output, (tuple, list)):
        return type(output)(plain_output(v) for v in output) if type(output) in (tuple, list) else tuple(plain_output(v) for v in output)
    return None


def serve_plainly(
    snapshot: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Tensor], constants: dict[str, Any], plain: bool | None = None
) -> bool:
    """Make ``snapshot``'s ``forward`` (a private copy's) what an artifact runs: the keyword settings
    ``constants`` fixed, and the output as plain tensors, tuples and dicts (:func:`plain_output`) when
    the model's own is anything else (a Hugging Face ``ModelOutput``), so loading needs none of its
    classes. The signature stays the model's, so the batch dimensions are named after its arguments.
    Runs ``forward`` once on the example to see what it returns, unless ``plain`` says so already (what
    this function returned for another copy of the same model); returns it."""
    forward = snapshot.forward
    if plain is None:
        with torch.no_grad():
            plain = is_plain(forward(*inputs, **kwargs, **constants))
    if plain and not constants:
        return plain

    @functools.wraps(forward)
    def served(*args: Any, **named: Any) -> Any:
        out = forward(*args, **named, **constants)
        return out if plain else plain_output(out)

    snapshot.forward = served  # type: ignore[method-assign]
    return plain
