"""Hugging Face configs after heads or neurons were removed.

``save_pretrained`` writes a model's config beside its weights and ``from_pretrained`` builds the layers from
that config, so a config still giving the former counts makes a file that does not load. After a removal (and
after a shrunk checkpoint resized a model) :func:`sync_hf_configs` sets the counts a config holds
(``num_attention_heads``, ``num_key_value_heads``, the feed-forward width) where one value describes every
layer, and keeps them only if a model built from the new config, on the ``meta`` device, has the shapes the
model has. Where no config can (layers keeping different counts; GPT-2 and BERT, whose head width is the model
width divided by the head count) the config is left as it was and a note says so.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn

from lightning_compress.pruning.units import unit_counts
from lightning_compress.selection import is_protected

__all__ = ["sync_hf_configs"]

#: Config fields holding the feed-forward width, by model family (``n_inner=None`` means 4 x the model width).
_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size")
_STACK_WIDTH_FIELDS = ("encoder_ffn_dim", "decoder_ffn_dim")


def _hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the outermost module of each Hugging Face config (a ``PreTrainedModel``)."""
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if callable(getattr(module, "save_pretrained", None)) and callable(getattr(config, "to_dict", None)) and id(config) not in seen:
            seen.add(id(config))
            found.append((name, module))
    return found


def _built_shapes(cls: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """The ``state_dict`` shapes of ``cls(config)`` built on the ``meta`` device (no memory), or ``None`` when it
    does not build."""
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = cls(config)
        return {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    except Exception:  # noqa: BLE001 - a class that does not build from its config alone
        return None
    finally:
        hf_logger.setLevel(level)


def _builder(model: nn.Module) -> tuple[type, dict[str, tuple[int, ...]]] | None:
    """The class that builds ``model`` from its config, with the shapes it builds: ``type(model)``, else the
    nearest ``transformers`` class it derives from (a subclass whose ``__init__`` takes more than the config),
    provided it builds every tensor ``model`` holds (a ``...PreTrainedModel`` base builds none); ``None``."""
    names = set(model.state_dict())
    for cls in [type(model)] + [c for c in type(model).__mro__[1:] if c.__module__.startswith("transformers.models.")]:
        shapes = _built_shapes(cls, model.config)
        if shapes is not None and names <= set(shapes):
            return cls, shapes
    return None


def _mismatch(built: dict[str, tuple[int, ...]], model: nn.Module) -> str | None:
    """The first tensor whose shape differs between a model built from a config and ``model``, or ``None``."""
    for key, tensor in model.state_dict().items():
        if key in built and built[key] != tuple(tensor.shape):
            return f"{key}: {built[key]} from the config, {tuple(tensor.shape)} in the model"
    return None


def _new_counts(config: Any, counts: dict[str, list[int]]) -> tuple[dict[str, int], str | None]:
    """The config fields that would describe ``counts`` (:func:`~lightning_compress.pruning.units.unit_counts`),
    or why none can."""
    changes: dict[str, int] = {}
    heads, neurons = set(counts["heads"]), set(counts["neurons"])
    if len(heads) > 1:
        return {}, f"its attention modules keep different numbers of heads ({min(heads)} to {max(heads)})"
    if len(neurons) > 1:
        return {}, f"its feed-forward layers keep different numbers of neurons ({min(neurons)} to {max(neurons)})"
    query, grouped = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    kv = grouped if isinstance(grouped, int) else query
    if heads and isinstance(query, int) and isinstance(kv, int) and kv > 0 and query % kv == 0:
        kept = heads.pop()  # a unit is a key/value head with its query heads
        changes["num_attention_heads"] = kept * (query // kv)
        if isinstance(grouped, int):
            changes["num_key_value_heads"] = kept
    if neurons:
        field = next((f for f in _WIDTH_FIELDS if hasattr(config, f) and (isinstance(getattr(config, f), int) or f == "n_inner")), None)
        # an encoder-decoder (BART, Marian, Whisper) holds one width per stack: the same count set in both
        fields = [field] if field else [f for f in _STACK_WIDTH_FIELDS if isinstance(getattr(config, f, None), int)]
        if not fields:
            return {}, "no field of its config holds the feed-forward width"
        width = neurons.pop()
        changes.update({f: width for f in fields})
    return changes, None


def _with_head_width(config: Any, changes: dict[str, int]) -> list[dict[str, int]]:
    """The fields to try: ``changes``, then, for fewer heads in a config without an integer ``head_dim``, with the
    head width written out as ``head_dim`` (Qwen2 and Phi read it when the config has it, and otherwise divide the
    model width by the new head count)."""
    tries = [changes]
    query, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if ("num_attention_heads" in changes and not isinstance(getattr(config, "head_dim", None), int)
            and isinstance(query, int) and isinstance(width, int) and query > 0 and width % query == 0):
        tries.append({**changes, "head_dim": width // query})
    return tries


def sync_hf_configs(model: nn.Module) -> list[str]:
    """Set the head and neuron counts in the config of each Hugging Face model inside ``model`` to what its layers
    hold now, where a config built that way gives the model's shapes; returns a note for each model whose config
    cannot describe them (its config is left unchanged). After half the heads of each layer of a Llama
    (4 query heads over 2 key/value heads) are removed, its config says 2 and 1, and ``save_pretrained`` writes
    a model ``from_pretrained`` builds (``tests/test_huggingface.py``).
    """
    notes = []
    for name, hf in reversed(_hf_models(model)):  # inner models first: a composite's config holds theirs
        if is_protected(name):
            continue  # a teacher is not pruned
        config = hf.config
        builder = _builder(hf)
        if builder is None:  # a custom class around a transformers body sharing its config: check the body
            for inner_name, inner in hf.named_modules():
                if inner_name and getattr(inner, "config", None) is config and (found := _builder(inner)) is not None:
                    hf, builder = inner, found
                    break
        if builder is None:
            notes.append(
                f"{type(hf).__name__}{f' ({name!r})' if name else ''}: its class does not build from its config alone, so "
                "its config could not be checked against the layers after the removal and was left as it was"
            )
            continue
        cls, built = builder
        if _mismatch(built, hf) is None:
            continue
        changes, why = _new_counts(config, unit_counts(hf))
        if why is None:
            for fields in _with_head_width(config, changes):
                trial = copy.deepcopy(config)
                for field, value in fields.items():
                    setattr(trial, field, value)
                shapes = _built_shapes(cls, trial)
                why = "it could not be built" if shapes is None else _mismatch(shapes, hf)
                if why is None:
                    for field, value in fields.items():
                        setattr(config, field, value)
                    break
            if why is None:
                continue
            why = f"with {', '.join(f'{k}={v}' for k, v in changes.items())} it still gives other shapes ({why})"
        where = f" ({name!r})" if name else ""
        notes.append(
            f"{type(hf).__name__}{where}: its config cannot describe the layers after the removal: {why}. Its "
            "save_pretrained writes weights from_pretrained refuses; save it with a Lightning checkpoint or "
            "torch.save of the state_dict and reload with lightning_compress.load_pruned"
        )
    return notes
