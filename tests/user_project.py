"""A LightningModule as a user writes it, importable by class path in the tests' configs: nothing of this library
in it (no ``allow_shrunk_checkpoints``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class PlainClassifier(LightningModule):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class LateBuiltClassifier(PlainClassifier):
    """Its layers are built in ``configure_model`` (as FSDP users build theirs), not in ``__init__``."""

    def __init__(self, hidden: int = 256) -> None:
        LightningModule.__init__(self)
        self.hidden = hidden
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))


class ForwardingDistillation(LightningModule):
    """A module that hands its arguments on (``**kwargs``), as a thin subclass of a library module does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs


class TrainOnlyDigits(LightningDataModule):
    """Training data and no validation data."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,))), batch_size=16)


class SelfDistilling(LightningModule):
    """A project's own distillation module: it takes ``teacher_ckpt`` (read as its teacher's weights) and has no
    ``student`` child; its network is itself."""

    def __init__(self, teacher_ckpt: str | None = None) -> None:
        super().__init__()
        self.teacher_ckpt = teacher_ckpt
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)
