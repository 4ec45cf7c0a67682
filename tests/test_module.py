from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import trainer_kwargs
from lightning_compress import MLP, ClassifierModule, DigitsDataModule, LeNet5


def test_fit_logs_metrics_and_learns(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (64,), 10))
    trainer = L.Trainer(max_epochs=4, **trainer_kwargs(tmp_path))
    dm = DigitsDataModule(batch_size=32)
    trainer.fit(module, dm)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["val_acc"] > 0.8
    (result,) = trainer.test(module, dm, verbose=False)
    assert result["test_acc"] > 0.8
    assert module.example_input_array.shape == (1, 1, 8, 8)  # remembered from the first batch


def test_scheduler_callable_is_used(tmp_path: Path) -> None:
    module = ClassifierModule(
        LeNet5(1, 10, image_size=8),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = L.Trainer(max_epochs=2, **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


def test_checkpoint_reloads_strictly(tmp_path: Path) -> None:
    module = ClassifierModule(LeNet5(1, 10, image_size=8), num_classes=10)
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ClassifierModule.load_from_checkpoint(path, model=LeNet5(1, 10, image_size=8))
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_num_classes_validated() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        ClassifierModule(LeNet5(), num_classes=1)
