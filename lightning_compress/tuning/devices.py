"""The tuning commands' fits run in their own process on one device: one check of a config (or a built Trainer).

``sensitivity``, ``tune`` and ``sweep`` run their fits and probes inside the command's process and read the results
there. A config asking for several devices or processes would have Lightning start the whole command again on each
(DDP: every rank scans, searches and writes the same files) or shard the weights (FSDP2: the probes then fail on
sharded tensors after the dense fit). :func:`check_one_device` refuses such a config before anything trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_one_device"]


def _strategy_class(strategy: Any) -> type | None:
    """The class a ``trainer.strategy`` setting builds: a registered name (``ddp``, ``fsdp``), a class path mapping, an
    instance; ``None`` for ``auto`` or one it cannot tell."""
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    if isinstance(strategy, Strategy):
        return type(strategy)
    if isinstance(strategy, str):
        return StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None  # (.get builds one)
    path = strategy.get("class_path") if isinstance(strategy, Mapping) else getattr(strategy, "class_path", None)
    if isinstance(path, str):
        from lightning_compress.tuning.config import class_of

        return class_of(path, Strategy)
    return None


def _device_count(devices: Any) -> int | None:
    """How many devices a ``trainer.devices`` setting asks for; ``None`` for ``auto`` (all of the accelerator's)."""
    if isinstance(devices, bool) or devices is None or devices == "auto":
        return None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        parts = [p for p in devices.split(",") if p.strip()]
        if len(parts) > 1 or devices.strip().endswith(","):
            return len(parts)
        devices = parts[0] if parts else devices
    try:
        count = int(devices)
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None  # -1: every device, as "auto"


def check_one_device(trainer: Any, command: str) -> None:
    """Refuse a Trainer, or a config's ``trainer`` section, that would train on several devices or processes.

    Raises:
        ValueError: a parallel strategy (DDP, FSDP, ``ModelParallelStrategy``, DeepSpeed), more than one device or
            node, or ``devices: auto``/``-1`` on a machine with several GPUs; the message names the setting.

    Example:
        >>> check_one_device({"devices": 1, "strategy": "auto"}, "tune")
        >>> check_one_device({"devices": 2}, "tune")
        Traceback (most recent call last):
        ...
        ValueError: tune runs its fits in its own process on one device, and the config asks for devices=2; set trainer.devices: 1 and trainer.strategy: auto
    """
    from lightning.pytorch.strategies import ParallelStrategy

    if isinstance(trainer, Mapping):
        settings = dict(trainer)
    else:  # a built Trainer: what it resolved
        settings = {"strategy": trainer.strategy, "devices": len(getattr(trainer, "device_ids", []) or [0]), "num_nodes": trainer.num_nodes}
    asked = None
    strategy = _strategy_class(settings.get("strategy"))
    if strategy is not None and issubclass(strategy, ParallelStrategy):
        asked = f"strategy={strategy.__name__}"
    count = _device_count(settings.get("devices", "auto"))
    nodes = settings.get("num_nodes", 1)
    if asked is None and count is not None and count > 1:
        asked = f"devices={settings['devices']!r}"
    if asked is None and isinstance(nodes, int) and not isinstance(nodes, bool) and nodes > 1:
        asked = f"num_nodes={nodes}"
    if asked is None and count is None and str(settings.get("accelerator", "auto")) in ("auto", "gpu", "cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            asked = f"devices={settings.get('devices', 'auto')!r}, which is all {torch.cuda.device_count()} GPUs of this machine"
    if asked is not None:
        more = "; for a sweep on several devices, run one sweep worker per device on one storage" if command == "sweep" else ""
        raise ValueError(
            f"{command} runs its fits in its own process on one device, and the config asks for {asked}; set "
            f"trainer.devices: 1 and trainer.strategy: auto{more}"
        )
