"""What :class:`~lightning_compress.QuantizeCallback` keeps in checkpoints: bits and observed ranges per layer, and the
state an evaluation from a checkpoint restores."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

__all__ = [
    "STATE_VERSION",
    "settings_changed",
    "apply_layer_states",
    "callback_state_in_checkpoint",
    "check_layer_bits",
    "check_state_version",
    "evaluation_state",
    "layer_states",
]

STATE_VERSION = 1


def check_state_version(state: Mapping[str, Any]) -> None:
    version = int(state.get("version", 1))
    if version > STATE_VERSION:
        raise ValueError(
            f"the checkpoint's quantisation state has version {version}, newer than this library reads "
            f"({STATE_VERSION}); upgrade lightning-compress"
        )


def check_layer_bits(state: Mapping[str, Any], current: Mapping[str, int]) -> None:
    """A run resumes with the per-layer bits it was trained with: the checkpoint's resolved
    ``{layer: bits}`` (``None`` for one width or a schedule) must equal ``current`` (``{}`` likewise).
    Checkpoints written before per-layer bits existed hold no entry and are not checked.

    >>> check_layer_bits({"layer_bits": {"fc": 4}}, {"fc": 4})
    >>> check_layer_bits({"layer_bits": {"fc": 4}}, {"fc": 8})
    Traceback (most recent call last):
    ...
    ValueError: the checkpoint was trained with per-layer weight bits {'fc': 4}, but this run asks for per-layer weight bits {'fc': 8}; resume with the weight_bits it was trained with
    """
    if "layer_bits" not in state:
        return
    saved = dict(state["layer_bits"] or {})
    if saved != dict(current):
        def said(bits: dict[str, int]) -> str:
            return f"per-layer weight bits {bits}" if bits else "one weight width for every layer"

        raise ValueError(
            f"the checkpoint was trained with {said(saved)}, but this run asks for {said(dict(current))}; resume "
            "with the weight_bits it was trained with"
        )


def settings_changed(state: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What a resumed run changes of the settings its checkpoint was trained with (``"settings"`` of the state:
    method, widths, scales), said as ``"weight_bits 8 -> 4, ..."``; ``None`` when nothing (or an older state).

    >>> settings_changed({"settings": {"weight_bits": 8, "method": "qat"}}, {"weight_bits": 4, "method": "qat"})
    'weight_bits 8 -> 4'
    """
    saved = state.get("settings")
    if not isinstance(saved, Mapping):
        return None
    changes = [f"{k} {saved[k]} -> {v}" for k, v in current.items() if k in saved and saved[k] != v]
    return ", ".join(changes) or None


def layer_states(layers: Mapping[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """``{layer: {bits, enabled, min, max, initialized}}`` of fake-quantised layers (ranges on the CPU)."""
    out = {}
    for name, layer in layers.items():
        qz = layer.quantizer
        entry: dict[str, Any] = {"bits": qz.bits, "enabled": qz.enabled}
        if qz.observer is not None:
            entry.update(
                min=qz.observer.min_val.detach().cpu().clone(),
                max=qz.observer.max_val.detach().cpu().clone(),
                initialized=qz.observer.is_initialized(),
            )
        out[name] = entry
    return out


def apply_layer_states(layers: Mapping[str, nn.Module], saved: Mapping[str, Any]) -> None:
    """Put :func:`layer_states` back; an error names a layer the state lacks or does not fit."""
    missing = sorted(set(layers) - set(saved))
    if missing:
        raise ValueError(
            f"the checkpoint's quantisation state has no entry for layers {missing}; it was saved with a "
            f"different include/exclude selection ({sorted(saved)})"
        )
    for name, layer in layers.items():
        entry, qz = saved[name], layer.quantizer
        if qz.observer is not None and "min" in entry:
            for key, buf in (("min", qz.observer.min_val), ("max", qz.observer.max_val)):
                if tuple(entry[key].shape) != tuple(buf.shape):
                    raise ValueError(
                        f"the checkpoint's quantisation state does not fit layer {name!r}: its input range is "
                        f"{tuple(entry[key].shape)}, this layer's {tuple(buf.shape)}"
                    )
    for name, layer in layers.items():  # all checked: apply
        entry, qz = saved[name], layer.quantizer
        qz.bits = int(entry["bits"])
        qz.enabled = bool(entry["enabled"])
        if qz.observer is not None and "min" in entry:
            qz.observer.min_val.copy_(entry["min"])
            qz.observer.max_val.copy_(entry["max"])
            qz.observer.set_initialized(bool(entry["initialized"]))


def callback_state_in_checkpoint(path: str, state_key: str) -> Any:
    """The state a callback saved under ``state_key`` in a Lightning checkpoint, or ``None``.

    Read without running code from the file (pickled hyper-parameter objects are skipped); a remote
    checkpoint is copied to a temporary file first."""
    from lightning.fabric.utilities.cloud_io import get_filesystem

    from lightning_compress._files import RESAVE_HINT, load_checkpoint

    fs = get_filesystem(path)
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        checkpoint = load_checkpoint(path, "checkpoint", hint=RESAVE_HINT)
    else:
        with tempfile.TemporaryDirectory() as tmp, fs.open(path, "rb") as src:
            local = os.path.join(tmp, "checkpoint.ckpt")
            with open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
            checkpoint = load_checkpoint(local, f"checkpoint (a copy of {path!r})", hint=RESAVE_HINT)
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    return callbacks.get(state_key) if isinstance(callbacks, Mapping) else None


def evaluation_state(trainer: Any, state_key: str, fitted: bool, quantised: bool = False) -> Any:
    """The QuantizeCallback state a ``validate``/``test``/``predict`` restores (Lightning restores no callback state
    outside fit): that of its ``ckpt_path``, or ``None`` with a warning saying that the model runs in float (no
    ``ckpt_path`` on a model the callback has not ``fitted`` and that holds no enabled fake-quantised layer, which
    ``quantised`` says: another callback's fit left them; a checkpoint without the state)."""
    stage = getattr(trainer.state.fn, "value", trainer.state.fn)
    if not trainer.ckpt_path:
        if not fitted and not quantised:
            rank_zero_warn(
                f"QuantizeCallback: trainer.{stage} without ckpt_path on a model this callback has not fitted: it runs in "
                "float. Give the checkpoint of the QAT/PTQ fit (ckpt_path=...) to measure the quantised model"
            )
        return None
    state = callback_state_in_checkpoint(trainer.ckpt_path, state_key)
    if state is None:
        rank_zero_warn(
            f"QuantizeCallback: {trainer.ckpt_path} holds no QuantizeCallback state (a file written with "
            f"ModelCheckpoint(save_weights_only=True), or by a fit without this callback), so trainer.{stage} runs the "
            "model in float, as the file holds it; give a full checkpoint of the QAT/PTQ fit to measure the quantised model"
        )
    return state

