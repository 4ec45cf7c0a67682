from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import trainer_kwargs
from lightning_compress import MLP, ClassifierModule, DigitsDataModule, GPTDecoder, LanguageModelModule, LeNet5


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


@pytest.mark.parametrize("cli_class", [False, True])
def test_a_plateau_scheduler_watches_its_metric(tmp_path: Path, cli_class: bool) -> None:
    """ReduceLROnPlateau as the module's scheduler (its type allows it) failed every fit: Lightning needs the metric it
    watches. LightningCLI's ReduceLROnPlateau names it; torch's own watches val_loss."""
    from lightning.pytorch.cli import ReduceLROnPlateau

    plateau = partial(ReduceLROnPlateau, monitor="val_acc", mode="max") if cli_class else partial(
        torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)
    module = ClassifierModule(LeNet5(1, 10, image_size=8), optimizer=partial(torch.optim.SGD, lr=0.1), scheduler=plateau)
    trainer = L.Trainer(max_epochs=3, **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    config = trainer.lr_scheduler_configs[0]
    assert config.monitor == ("val_acc" if cli_class else "val_loss") and trainer.state.finished


def test_checkpoint_reloads_strictly(tmp_path: Path) -> None:
    module = ClassifierModule(LeNet5(1, 10, image_size=8), num_classes=10)
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ClassifierModule.load_from_checkpoint(path, model=LeNet5(1, 10, image_size=8))
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda: ClassifierModule(LeNet5(), num_classes=1), r"num_classes must be an integer >= 2, got 1"),
        # a bare TypeError ('<' between str and int)
        (lambda: ClassifierModule(LeNet5(), num_classes="10"), r"num_classes must be an integer >= 2, got '10'"),
        # failed at the fit's first step ('str' object is not callable), or with an empty parameter list
        (lambda: ClassifierModule(LeNet5(), optimizer="adam"), r"optimizer must be a callable taking the parameters .* got 'adam'"),
        (lambda: ClassifierModule(LeNet5(), scheduler="step"), r"scheduler must be a callable taking the optimizer .* got 'step'"),
        (lambda: ClassifierModule(3), r"model must be an nn.Module \(the network to train\), got int"),
        # None failed at the fit's start with "an empty parameter list"; it stays allowed where configure_model builds it
        (lambda: ClassifierModule(None), r"model must be an nn.Module \(the network to train\), got NoneType"),
        (lambda: ClassifierModule(LeNet5(), example_input_shape=[-1]), r"example_input_shape must be the positive sizes of one sample"),
        (lambda: ClassifierModule(LeNet5(), example_input_shape=[True]), r"example_input_shape must be the positive sizes of one sample"),
        (lambda: LanguageModelModule("not a model"), r"model must be an nn.Module \(the network to train\), got str"),
        (lambda: LanguageModelModule(GPTDecoder(vocab_size=16, max_len=8, d_model=8, n_heads=2, n_layers=1), optimizer="adam"),
         r"optimizer must be a callable"),
    ],
)
def test_module_options_are_checked_at_construction(make, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        make()


def test_a_module_that_builds_its_model_in_configure_model_may_start_without_one(tmp_path: Path) -> None:
    class Lazy(ClassifierModule):
        def configure_model(self) -> None:
            if self.model is None:
                self.model = MLP(64, (16,), 10)

    module = Lazy(None)
    L.Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1)).fit(module, DigitsDataModule(batch_size=32))
    assert isinstance(module.model, MLP)


def test_several_validation_loaders_leave_no_module_in_eval_mode_for_training(tmp_path: Path) -> None:
    """The second loader's metric, made during the sanity check, stayed in eval mode into training, and Lightning warned
    of a module in eval mode at the start of training."""
    import warnings

    from torch.utils.data import DataLoader

    class TwoValidationLoaders(DigitsDataModule):
        def val_dataloader(self) -> list[DataLoader]:
            return [DataLoader(self.val_set, batch_size=64), DataLoader(self.test_set, batch_size=64)]

    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10))
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=2, num_sanity_val_steps=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, TwoValidationLoaders())
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert "val_acc/dataloader_idx_1" in trainer.callback_metrics


def test_each_validation_loader_has_its_own_accuracy(tmp_path: Path) -> None:
    """Two validation loaders: Lightning's multi-loader keys (val_acc/dataloader_idx_N) each hold that loader's
    accuracy, equal to validating it alone; one shared metric pooled both (0.435 for a loader whose own was 0.281)."""
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10))
    data = DigitsDataModule(batch_size=32)
    L.Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=5, limit_val_batches=0)).fit(module, data)
    data.setup("fit")
    x, y = data.val_set.tensors
    easy = DataLoader(TensorDataset(x, y), batch_size=32)
    hard = DataLoader(TensorDataset(x.flip(-1), y), batch_size=32)  # mirrored digits: another accuracy
    check = L.Trainer(**trainer_kwargs(tmp_path))
    both = check.validate(module, [easy, hard], verbose=False)
    alone = [check.validate(module, loader, verbose=False)[0]["val_acc"] for loader in (easy, hard)]
    assert both[0]["val_acc/dataloader_idx_0"] == pytest.approx(alone[0]) and both[1]["val_acc/dataloader_idx_1"] == pytest.approx(alone[1])
    assert alone[0] != pytest.approx(alone[1])
