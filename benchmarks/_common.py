"""What every benchmark script shares: where data and results live, and an epoch timer."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_MNIST = Path(os.environ.get("LC_MNIST_DIR", SHARED_DATA / "mnist"))
DEFAULT_CIFAR10 = Path(os.environ.get("LC_CIFAR10_DIR", SHARED_DATA / "cifar10"))


def mnist_missing(folder: Path | str, option: str | None = "--data") -> str | None:
    """Why MNIST cannot be read from ``folder`` (the line a script prints before it skips), or ``None``."""
    folder = Path(folder)
    if any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
        return None
    how = f"give {option} or set LC_MNIST_DIR" if option else "set LC_MNIST_DIR"
    return f"MNIST not found under {folder} ({how}); skipping"


class EpochTimer(Callback):
    """Wall time of every training epoch (validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)
