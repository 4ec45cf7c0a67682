"""DistillationModule: frozen teacher, checkpoints, losses, features, cache, bad input (digits, tiny nets)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassifierModule, DigitsDataModule
from lightning_compress.distillation import DistillationModule, kl_div_distill
from lightning_compress.models import MLP, LeNet5
from lightning_compress.schedules import Linear


def student() -> MLP:
    return MLP(64, (16,), 10)


def teacher() -> LeNet5:
    return LeNet5(image_size=8)


def make_trainer(tmp_path: Path, epochs: int = 1, **kwargs: Any) -> Trainer:
    return Trainer(max_epochs=epochs, **trainer_kwargs(tmp_path, **kwargs))


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, digits: DigitsDataModule) -> Path:
    """A LeNet5 trained 4 epochs on digits by ClassifierModule: checkpoint keys ``model.*``."""
    seed_everything(0)
    root = tmp_path_factory.mktemp("teacher")
    module = ClassifierModule(teacher(), optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))
    trainer = make_trainer(root, epochs=4)
    trainer.fit(module, digits)
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, 1.5, {0: 0.5, 2: 1.2}, Linear(0.0, 2.0, 0, 3)])
def test_alpha_outside_unit_interval(alpha: Any) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationModule(student(), teacher(), alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, {0: 4.0, 3: 0.0}, float("nan")])
def test_temperature_not_positive(temperature: Any) -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationModule(student(), teacher(), temperature=temperature)


def test_feature_name_missing_lists_closest() -> None:
    with pytest.raises(ValueError, match=r"student has no module named 'net.11'.*'net.1'"):
        DistillationModule(student(), teacher(), features={"net.11": "classifier.4"})
    with pytest.raises(ValueError, match=r"teacher has no module named 'classifer.4'.*'classifier.4'"):
        DistillationModule(student(), teacher(), features={"net.2": "classifer.4"})


def test_teacher_ckpt_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        DistillationModule(student(), teacher(), teacher_ckpt=str(tmp_path / "nope.ckpt"))


def test_teacher_ckpt_without_matching_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match="no key of the teacher checkpoint matches"):
        DistillationModule(student(), teacher(), teacher_ckpt=str(path))
    partial = {f"model.{k}": v for k, v in teacher().state_dict().items() if not k.startswith("classifier.5")}
    torch.save({"state_dict": partial}, path)
    with pytest.raises(ValueError, match=r"best key prefix 'model\.' lacks.*classifier\.5"):
        DistillationModule(student(), teacher(), teacher_ckpt=str(path))


def test_other_init_errors() -> None:
    with pytest.raises(ValueError, match="valid names"):
        DistillationModule(student(), teacher(), distill_loss="kld")
    with pytest.raises(ValueError, match="cache_teacher_outputs"):
        DistillationModule(student(), teacher(), features={"net.2": "classifier.4"}, cache_teacher_outputs=True)
    with pytest.raises(ValueError, match="same module"):
        net = student()
        DistillationModule(net, net)
    with pytest.raises(ValueError, match="feature_loss"):
        DistillationModule(student(), teacher(), feature_loss="l1")  # type: ignore[arg-type]


def test_logit_shape_mismatch_at_first_batch(tmp_path: Path, digits: DigitsDataModule) -> None:
    module = DistillationModule(MLP(64, (16,), 10), MLP(64, (16,), 12), num_classes=10)
    with pytest.raises(ValueError, match=r"student logits \(64, 10\) and teacher logits \(64, 12\)"):
        make_trainer(tmp_path, limit_train_batches=1, num_sanity_val_steps=0).fit(module, digits)


# --------------------------------------------------------------------------------------------------
# teacher loading
# --------------------------------------------------------------------------------------------------
def test_teacher_ckpt_prefix_discovery(tmp_path: Path, teacher_ckpt: Path) -> None:
    m = DistillationModule(student(), teacher(), teacher_ckpt=str(teacher_ckpt))
    assert m.teacher_prefix == "model."
    trained = torch.load(teacher_ckpt, weights_only=False)["state_dict"]
    assert torch.equal(m.teacher.features[0].weight, trained["model.features.0.weight"])
    # plain state_dict, nested prefix, safetensors
    plain = tmp_path / "plain.pt"
    torch.save(m.teacher.state_dict(), plain)
    assert DistillationModule(student(), teacher(), teacher_ckpt=str(plain)).teacher_prefix == ""
    nested = tmp_path / "nested.pt"
    torch.save({f"net.backbone.{k}": v for k, v in m.teacher.state_dict().items()}, nested)
    assert DistillationModule(student(), teacher(), teacher_ckpt=str(nested)).teacher_prefix == "net.backbone."
    from safetensors.torch import save_file

    st = tmp_path / "t.safetensors"
    save_file(m.teacher.state_dict(), str(st))
    m2 = DistillationModule(student(), teacher(), teacher_ckpt=str(st))
    assert torch.equal(m2.teacher.features[0].weight, m.teacher.features[0].weight)


class _TeacherModeSpy(Callback):
    """Switches the teacher to train mode at each epoch end; records its mode at each epoch's first batch."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen.append(pl_module.teacher.training)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        pl_module.teacher.train()


# --------------------------------------------------------------------------------------------------
# a real run
# --------------------------------------------------------------------------------------------------
def test_fit_freezes_teacher_and_checkpoints_student_only(tmp_path: Path, digits: DigitsDataModule, teacher_ckpt: Path) -> None:
    seed_everything(0)
    module = DistillationModule(student(), teacher(), teacher_ckpt=str(teacher_ckpt), temperature=4.0, alpha=0.7)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    spy = _TeacherModeSpy()
    trainer = make_trainer(tmp_path, epochs=2, callbacks=[ckpt_cb, spy], enable_checkpointing=True, logger=CSVLogger(tmp_path))
    trainer.fit(module, digits)
    assert spy.seen == [False, False]  # teacher.train() by a callback is undone at the next epoch start

    # teacher: bit-identical, frozen, in eval mode, not in the optimizer
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training and module.student.training
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.student.parameters()}
    module.train()  # Lightning may call train() on the whole module: the teacher stays in eval
    assert not module.teacher.training

    # metrics: each loss term separately, student and teacher accuracy, agreement
    metrics = trainer.callback_metrics
    for key in ("distill_loss", "ce_loss", "train_loss", "val_acc", "val_agreement", "temperature", "alpha"):
        assert key in metrics, key
    assert "feature_loss" not in metrics
    assert module.teacher_val_accuracy is not None and module.teacher_val_accuracy > 0.6
    import csv

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r.get("teacher_val_acc")) == 1  # teacher accuracy logged once
    assert sum(1 for r in rows if r.get("val_agreement")) == 2  # agreement every epoch

    # checkpoint: student only; strict loading with the teacher given again
    ckpt = torch.load(ckpt_cb.best_model_path or tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    path = tmp_path / "ckpt" / "last.ckpt"
    loaded = DistillationModule.load_from_checkpoint(path, student=student(), teacher=teacher(), strict=True)
    assert torch.equal(loaded.student.net[1].weight, module.student.net[1].weight)
    assert torch.equal(loaded.teacher.features[0].weight, module.teacher.features[0].weight)  # from teacher_ckpt again
    assert loaded.hparams.alpha == 0.7

    # export the student alone, loadable into its plain class strictly
    exported = module.export_student(tmp_path / "student.pt")
    plain = student()
    plain.load_state_dict(torch.load(exported), strict=True)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(plain(x), module.student(x))
    assert set(module.student_state_dict()) == set(plain.state_dict())

    # test metrics and the report contract
    trainer.test(module, digits, verbose=False)
    assert {"test_acc", "test_agreement", "teacher_test_acc"} <= set(trainer.callback_metrics)
    summary = module.compression_summary()
    assert summary["teacher_params"] > summary["student_params"] > 0
    assert summary["teacher_ckpt_prefix"] == "model." and summary["distill_loss"] == "kl"
    assert module.compressed_artifact() is module.student and module.compression_baseline() is module.teacher
    assert module.is_active() and module.compression_state() == {"temperature": 4.0, "alpha": 0.7}
    # the example input the report times and an export checks is a real sample (it was zeros)
    example = module.example_input_array
    assert example.shape == (1, 1, 8, 8) and bool(example.abs().sum() > 0)


def test_distillation_improves_on_label_free_student(tmp_path: Path, digits: DigitsDataModule, teacher_ckpt: Path) -> None:
    """Unlabeled batches (inputs only) train the student from the teacher alone, and it learns."""
    assert digits.train_set is not None
    unlabeled = DataLoader(TensorDataset(digits.train_set.tensors[0]), batch_size=64, shuffle=True)
    seed_everything(0)
    module = DistillationModule(
        student(), teacher(), teacher_ckpt=str(teacher_ckpt), alpha=1.0, temperature=2.0,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    trainer = make_trainer(tmp_path, epochs=4)
    trainer.fit(module, unlabeled, digits.val_dataloader())
    assert "ce_loss" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["val_agreement"]) > 0.6  # learned from the teacher without labels
    assert float(trainer.callback_metrics["val_acc"]) > 0.5


def test_save_teacher_keeps_teacher_keys(tmp_path: Path, digits: DigitsDataModule, teacher_ckpt: Path) -> None:
    module = DistillationModule(student(), teacher(), teacher_ckpt=str(teacher_ckpt), save_teacher=True)
    trainer = make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, digits)
    path = tmp_path / "with_teacher.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("teacher.") for k in state)
    # such a checkpoint can itself serve as teacher_ckpt (prefix 'teacher.' preferred over 'student.')
    m = DistillationModule(student(), teacher(), teacher_ckpt=str(path))
    assert m.teacher_prefix == "teacher."
    loaded = DistillationModule.load_from_checkpoint(path, student=student(), teacher=teacher(), teacher_ckpt=None)
    assert torch.equal(loaded.teacher.features[0].weight, module.teacher.features[0].weight)


def two_arg_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """A user loss given by import path (``fn(student_logits, teacher_logits)``, no temperature)."""
    return (student - teacher).abs().mean()


# The import path is built from ``__name__`` (the name pytest imported this file under), not spelled
# "tests.test_...": ``tests`` has no ``__init__.py``, so it is a package only when the working directory
# is on ``sys.path`` (``python -m pytest``), not under the ``pytest`` script.
@pytest.mark.parametrize("loss", ["mse", "cosine", f"{__name__}.two_arg_loss"])
def test_other_losses_and_schedules(tmp_path: Path, digits: DigitsDataModule, loss: str) -> None:
    module = DistillationModule(student(), teacher(), distill_loss=loss, temperature={0: 8.0, 1: 2.0}, alpha=Linear(1.0, 0.5, 0, 2))
    trainer = make_trainer(tmp_path, epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    assert float(trainer.callback_metrics["temperature"]) == 2.0
    assert module.compression_state()["temperature"] == 2.0
    assert 0.5 < float(trainer.callback_metrics["alpha"]) < 1.0


def test_schedule_ending_after_max_epochs_is_refused(tmp_path: Path, digits: DigitsDataModule) -> None:
    module = DistillationModule(student(), teacher(), alpha=Linear(1.0, 0.5, 0, 10))
    with pytest.raises(ValueError, match="max_epochs=2"):
        make_trainer(tmp_path, epochs=2).fit(module, digits)


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_shape", [True, False])
def test_feature_hints_projection_trained_and_checkpointed(tmp_path: Path, digits: DigitsDataModule, with_shape: bool) -> None:
    seed_everything(0)
    module = DistillationModule(
        student(), teacher(), features={"net.2": "classifier.4"}, feature_weight=0.5,
        example_input_shape=(1, 8, 8) if with_shape else None,
    )
    assert (len(module.projections) == 1) is with_shape  # sized at construction, or in setup from one batch
    trainer = make_trainer(tmp_path, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    proj = module.projections["net__2"]
    assert proj.proj.weight.shape == (84, 16)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in proj.parameters()} <= opt_params
    assert "feature_loss" in trainer.callback_metrics and float(trainer.callback_metrics["feature_loss"]) > 0
    assert not module.feature_capture.handles  # hooks live only while training
    path = tmp_path / "f.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillationModule.load_from_checkpoint(path, student=student(), teacher=teacher())  # strict
    assert torch.equal(loaded.projections["net__2"].proj.weight, proj.proj.weight)


def test_feature_hints_without_a_shape_or_a_training_batch_say_what_to_pass(tmp_path: Path) -> None:
    module = DistillationModule(student(), teacher(), features={"net.2": "classifier.4"})
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match=r"features: cannot size the projections .*empty.*example_input_shape"):
        make_trainer(tmp_path, limit_val_batches=0).fit(module, train_dataloaders=empty)
    assert len(module.projections) == 0


def test_attention_transfer_between_conv_features(tmp_path: Path, digits: DigitsDataModule) -> None:
    small = LeNet5(image_size=8)
    module = DistillationModule(small, teacher(), features={"features.1": "features.4"}, feature_loss="attention")
    trainer = make_trainer(tmp_path, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    assert len(module.projections) == 0
    assert float(trainer.callback_metrics["feature_loss"]) > 0


# --------------------------------------------------------------------------------------------------
# teacher-output cache: tests/test_teacher_cache.py
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# loss blow-up guard
# --------------------------------------------------------------------------------------------------
def test_nonfinite_loss_stops_with_advice(tmp_path: Path, digits: DigitsDataModule) -> None:
    def nan_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (s * float("nan")).sum()

    module = DistillationModule(student(), teacher(), distill_loss=nan_loss, temperature=20.0)
    with pytest.raises(FloatingPointError, match="Lower the learning rate"):
        make_trainer(tmp_path, limit_train_batches=2, num_sanity_val_steps=0).fit(module, digits)


def test_growing_loss_warns(tmp_path: Path, digits: DigitsDataModule) -> None:
    calls = {"n": 0}

    def growing(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return (s * 0).sum() + float(calls["n"] ** 2)

    module = DistillationModule(student(), MLP(64, (16,), 10), distill_loss=growing, alpha=1.0)
    with pytest.warns(RuntimeWarning, match="blowing up"):
        make_trainer(tmp_path, epochs=3, limit_val_batches=0).fit(module, digits)
    assert module.loss_watch.warned


class _ScaledMSE(nn.Module):
    """A loss with a learnable parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ((student * self.scale - teacher) ** 2).mean()


def test_loss_module_with_parameters_is_registered_once(tmp_path: Path, digits: DigitsDataModule) -> None:
    module = DistillationModule(student(), teacher(), distill_loss=_ScaledMSE())
    assert [k for k in module.state_dict() if "scale" in k] == ["distill_criterion.scale"]
    trainer = make_trainer(tmp_path, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(module.distill_criterion.scale) in opt_params
    assert float(module.distill_criterion.scale) != 1.0


# --------------------------------------------------------------------------------------------------
# unlabeled samples in validation, epoch means of a fit cut short, option errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignored_labels_leave_the_classifier_validation_metrics(tmp_path: Path, ignore_index: int) -> None:
    """val_acc, val_loss and teacher_val_acc count the labeled samples only; agreement counts all."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    y[:8] = ignore_index  # the first batch has no labeled sample
    y[8::2] = ignore_index  # the others half
    module = DistillationModule(MLP(64, (8,), 10), MLP(64, (32,), 10), ignore_index=ignore_index)
    val = DataLoader(TensorDataset(x, y), batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = make_trainer(tmp_path).validate(module, val, verbose=False)[0]
    with torch.no_grad():
        zs, zt = module.student(x), module.teacher(x)
    labeled = y != ignore_index
    assert int(labeled.sum()) == 12
    assert got["val_acc"] == pytest.approx(float((zs.argmax(-1) == y)[labeled].float().mean()))
    assert got["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(zs[labeled], y[labeled])), rel=1e-5)
    assert module.teacher_val_accuracy == pytest.approx(float((zt.argmax(-1) == y)[labeled].float().mean()))
    assert got["val_agreement"] == pytest.approx(float((zs.argmax(-1) == zt.argmax(-1)).float().mean()))
    assert any(f"no labeled sample (every label is ignore_index={ignore_index})" in str(w.message) for w in caught)


def test_fit_ending_mid_epoch_on_max_steps_logs_the_epoch_means(tmp_path: Path) -> None:
    seen: list[float] = []

    def recorded_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        value = kl_div_distill(s, t, temperature)
        seen.append(float(value.detach()))
        return value

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(80, 64), torch.randint(0, 10, (80,))), batch_size=8)  # 10 batches
    module = DistillationModule(student(), MLP(64, (32,), 10), distill_loss=recorded_kl, alpha=0.75)
    trainer = Trainer(max_steps=4, **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path), limit_val_batches=0))
    trainer.fit(module, data)
    assert trainer.global_step == 4 and len(seen) == 4
    import csv

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("distill_loss")]
    assert len(rows) == 1  # once, for the epoch cut short after 4 of its 10 batches
    assert float(rows[0]["distill_loss"]) == pytest.approx(sum(seen) / 4, rel=1e-6)
    assert float(rows[0]["alpha"]) == 0.75 and float(rows[0]["temperature"]) == 4.0
    assert float(rows[0]["ce_loss"]) > 0


def test_temperature_schedule_name_says_what_is_valid() -> None:
    with pytest.raises(ValueError, match=r"'cubic' names a schedule that runs from 0 to 1.*a number > 0.*map.*Schedule"):
        DistillationModule(student(), teacher(), temperature="cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("class_dim", [0, -2, True, 1.0])
def test_class_dim_must_be_minus_one_or_a_dimension(class_dim: Any) -> None:
    with pytest.raises(ValueError, match=rf"class_dim must be -1 .* or a dimension >= 1 .*got {class_dim!r}"):
        DistillationModule(student(), teacher(), class_dim=class_dim)


@pytest.mark.parametrize("shape", [(0,), (1, -8), "1x8x8", (1.5, 8), (True, 8)])
def test_an_example_input_shape_that_sizes_nothing_is_refused(shape: object) -> None:
    with pytest.raises(ValueError, match=r"example_input_shape must be the positive sizes of one sample"):
        DistillationModule(student(), teacher(), example_input_shape=shape)  # type: ignore[arg-type]


def test_each_validation_loader_has_its_own_student_metrics(tmp_path: Path, digits: DigitsDataModule) -> None:
    """DistillationModule with two validation loaders: its validation_step takes the loader index (Lightning refused
    it), and each loader's accuracy and agreement are its own, as validating it alone gives."""
    from torch.utils.data import DataLoader, TensorDataset

    seed_everything(0)
    module = DistillationModule(student(), teacher(), num_classes=10)
    x, y = digits.val_set.tensors
    easy, hard = DataLoader(TensorDataset(x, y), batch_size=64), DataLoader(TensorDataset(x.flip(-1), y), batch_size=64)
    check = make_trainer(tmp_path)
    both = check.validate(module, [easy, hard], verbose=False)
    for i, loader in enumerate((easy, hard)):
        alone = DistillationModule(module.student, module.teacher, num_classes=10)
        (result,) = make_trainer(tmp_path).validate(alone, loader, verbose=False)
        for key in ("val_acc", "val_agreement"):
            assert both[i][f"{key}/dataloader_idx_{i}"] == pytest.approx(result[key]), key


def test_with_several_validation_loaders_the_teachers_baseline_pairs_with_the_first(tmp_path: Path, digits: DigitsDataModule) -> None:
    """The teacher is measured on the first validation loader, but its accuracy was reported as val_acc, while the
    student's are val_acc/dataloader_idx_N: no row of the report had both. It is now that loader's key."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import CompressionReport

    seed_everything(0)
    module = DistillationModule(student(), teacher(), num_classes=10)
    x, y = digits.val_set.tensors
    loaders = [DataLoader(TensorDataset(x, y), batch_size=64), DataLoader(TensorDataset(x.flip(-1), y), batch_size=64)]
    report = CompressionReport(print_table=False, plot=False, dirpath=tmp_path)
    trainer = make_trainer(tmp_path, callbacks=[report], limit_train_batches=2)
    trainer.fit(module, digits.train_dataloader(), loaders)
    baseline, compressed = report.report["baseline"]["metrics"], report.report["compressed"]["metrics"]
    assert set(baseline) == {"val_acc/dataloader_idx_0"} and "val_acc/dataloader_idx_0" in compressed
    with torch.no_grad():
        accuracy = float((module.teacher.eval()(x).argmax(1) == y).float().mean())
    assert baseline["val_acc/dataloader_idx_0"] == pytest.approx(accuracy, abs=1e-6)


def test_the_logged_task_loss_is_the_mean_over_labelled_samples(tmp_path: Path) -> None:
    """Semi-supervised batches (labels -100 where unknown): ce_loss was averaged over every sample of the epoch,
    also those of batches with no label (logged 0.674 where the labelled batch's CE was 1.349), and weighted partly
    labelled batches by their size. It is now the mean over the labelled samples; distill_loss stays over all."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 4), nn.Linear(8, 4)
    x = torch.randn(12, 8)
    y = torch.tensor([0, 1, 2, 3, -100, -100, -100, -100, 0, -100, -100, 3])  # labelled, unlabelled, partly labelled
    module = DistillationModule(student, teacher, temperature=2.0, alpha=0.5, num_classes=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_val_batches=0))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    with torch.no_grad():
        ce = F.cross_entropy(student(x), y, ignore_index=-100)  # over the 6 labelled samples
        kd = F.kl_div(F.log_softmax(student(x) / 2, -1), F.log_softmax(teacher(x) / 2, -1), log_target=True, reduction="batchmean") * 4
    assert float(trainer.callback_metrics["ce_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(trainer.callback_metrics["distill_loss"]) == pytest.approx(float(kd), rel=1e-5)


class _OneLogit(nn.Module):
    def __init__(self, squeeze: bool) -> None:
        super().__init__()
        self.fc, self.squeeze = nn.Linear(8, 1), squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out.squeeze(-1) if self.squeeze else out


@pytest.mark.parametrize("squeeze", [True, False])
def test_single_logit_binary_classifiers_are_refused_in_setup(tmp_path: Path, squeeze: bool) -> None:
    """(N,) logits were distilled as one softmax over the batch, (N, 1) with a loss of exactly 0 (a single logit's
    softmax is 1): both trained silently. Refused before any step, naming the two-logit form."""
    torch.manual_seed(0)
    module = DistillationModule(_OneLogit(squeeze), _OneLogit(squeeze), num_classes=2)
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 2, (16,))), batch_size=8)
    with pytest.raises(ValueError, match=r"one logit per sample .* torch.stack\(\[torch.zeros_like\(z\), z\], -1\)"):
        Trainer(max_epochs=1, **trainer_kwargs(tmp_path)).fit(module, loader)
    assert module.student.fc.weight.grad is None  # no step ran


def test_a_class_count_other_than_num_classes_is_said_before_training(tmp_path: Path) -> None:
    """num_classes=10 given, unlike the logits' 3 classes: warned at the first validation, after training, and
    a ModelCheckpoint on val_acc then failed. Said in setup, before any step (a fit without validation needs no
    metric, so it is not refused)."""
    module = DistillationModule(nn.Linear(8, 3), nn.Linear(8, 3), num_classes=10)
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,))), batch_size=8)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_val_batches=0))
        trainer.fit(module, loader)
    said = [str(w.message) for w in caught if "the logits have 3 classes" in str(w.message)]
    assert len(said) == 1 and "but num_classes=10: val_acc" in said[0] and "set num_classes=3" in said[0]


def test_the_accuracies_of_a_classifier_with_any_class_count_are_computed_by_default(tmp_path: Path) -> None:
    """A three-label classifier (a Hugging Face head with num_labels=3) with the default num_classes: val_acc,
    val_agreement and teacher_val_acc were dropped (num_classes was 10 by default) and the report's baseline was empty.
    They are the arg-max matches, as counted by hand."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 3), nn.Linear(8, 3)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    module = DistillationModule(student, teacher)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=1))
    trainer.fit(module, loader, loader)
    with torch.no_grad():
        s, t = student(x).argmax(-1), teacher(x).argmax(-1)
    logged = trainer.callback_metrics
    assert float(logged["val_acc"]) == pytest.approx(float((s == y).float().mean()))
    assert float(logged["val_agreement"]) == pytest.approx(float((s == t).float().mean()))
    assert float(logged["teacher_val_acc"]) == pytest.approx(float((t == y).float().mean()))


def test_a_student_sharing_a_module_with_the_teacher_is_refused() -> None:
    """A student built around the teacher's embeddings (student.embed = teacher.embed): freezing the teacher froze
    them in the student, which trained without them and said nothing."""
    teacher, student = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)), nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    student[0] = teacher[0]
    with pytest.raises(ValueError, match=r"the student shares 2 trainable parameter\(s\) with the teacher, e.g. \['0.weight', '0.bias'\]"):
        DistillationModule(student, teacher, num_classes=4)
    assert student[0].weight.requires_grad  # refused before the teacher was frozen
    student[0].requires_grad_(False)  # a backbone shared and frozen on purpose: freezing the teacher changes nothing
    DistillationModule(student, teacher, num_classes=4)


class _DictBlock(nn.Module):
    """A block returning its feature in a mapping, as Hugging Face modules return a ModelOutput."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(8, width)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": torch.relu(self.fc(x)), "pooled": x.mean(-1)}


class _WithDictBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.block, self.head = _DictBlock(width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x)["last_hidden_state"])


def test_feature_hints_read_a_module_that_returns_a_mapping_and_attention_needs_maps(tmp_path: Path) -> None:
    """A feature module returning a ModelOutput failed in setup ('... object has no attribute shape'); its first
    tensor is now the feature. feature_loss='attention' on (N, D) features was refused at the first step only."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,))), batch_size=8)
    module = DistillationModule(_WithDictBlock(8), _WithDictBlock(16), num_classes=4, features={"block": "block"})
    Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_val_batches=0)).fit(module, loader)
    assert tuple(module.projections["block"].proj.weight.shape) == (16, 8)  # sized from last_hidden_state
    attention = DistillationModule(_WithDictBlock(8), _WithDictBlock(16), num_classes=4, features={"block": "block"},
                                   feature_loss="attention")
    with pytest.raises(ValueError, match=r"feature_loss='attention' compares \(N, C, H, W\) maps, but the pair 'block' -> 'block' gives student \(2, 8\)"):
        Trainer(max_epochs=1, **trainer_kwargs(tmp_path)).fit(attention, loader)
    assert attention.student.head.weight.grad is None


class _Keywords(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


@pytest.mark.parametrize("layout", ["tuple", "dict"])
def test_inputs_given_as_a_mapping_reach_a_keyword_network(tmp_path: Path, layout: str) -> None:
    """({input_ids, attention_mask}, labels) and {"inputs": {...}, "labels": ...}: setup skipped all its checks and
    the first step failed inside the network ('dict' object has no attribute 'size'). The inputs' entries are now
    its keywords, with the checks in setup (a teacher with other classes is refused there)."""
    torch.manual_seed(0)
    ids, labels = torch.randint(0, 20, (16, 6)), torch.randint(0, 3, (16,))
    mask = torch.ones(16, 6, dtype=torch.long)
    samples = [({"input_ids": i, "attention_mask": m}, y) if layout == "tuple" else {"inputs": {"input_ids": i, "attention_mask": m}, "labels": y}
               for i, m, y in zip(ids, mask, labels)]
    loader = DataLoader(samples, batch_size=8)
    module = DistillationModule(_Keywords(3), _Keywords(3), num_classes=3)
    trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path))
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 2 and "val_acc" in trainer.callback_metrics and "ce_loss" in trainer.callback_metrics
    with pytest.raises(ValueError, match=r"student logits \(8, 3\) and teacher logits \(8, 5\) differ"):
        Trainer(max_epochs=1, **trainer_kwargs(tmp_path)).fit(DistillationModule(_Keywords(3), _Keywords(5), num_classes=3), loader)


def test_a_batch_laid_out_labels_first_is_refused_in_setup(tmp_path: Path) -> None:
    """(labels, inputs): setup ran the networks on the labels, and the error came from inside the model."""
    loader = DataLoader(TensorDataset(torch.randint(0, 4, (16,)), torch.randn(16, 8)), batch_size=8)
    with pytest.raises(ValueError, match=r"looks laid out \(labels, inputs\), while DistillationModule reads \(inputs, labels\)"):
        Trainer(max_epochs=1, **trainer_kwargs(tmp_path)).fit(DistillationModule(nn.Linear(8, 4), nn.Linear(8, 4), num_classes=4), loader)


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("num_classes", "3", r"num_classes must be an integer >= 2 or None \(read from the logits\), got '3'"),
        ("feature_weight", True, r"feature_weight must be a finite number >= 0, got True"),
        ("feature_weight", "0.5", r"feature_weight must be a finite number >= 0, got '0.5'"),
        ("ignore_index", None, r"ignore_index must be an integer .* got None"),
        ("ignore_index", -100.7, r"ignore_index must be an integer .* got -100.7"),
        ("save_teacher", "false", r"save_teacher must be True or False, got 'false'"),
        ("cache_teacher_outputs", "false", r"cache_teacher_outputs must be True or False, got 'false'"),
        ("optimizer", "adam", r"optimizer must be a callable taking the parameters .* got 'adam'"),
        # a true string: the teacher file was unpickled with weights_only=False
        ("trust_pickle", "false", r"trust_pickle must be True or False, got 'false'"),
    ],
)
def test_options_of_the_wrong_type_are_refused_naming_them(option: str, value: Any, said: str) -> None:
    """Strings and None were taken: 'false' turned the cache on and saved the teacher, -100.7 became -100, 'adam'
    failed when the fit started, and '3' failed with a bare TypeError."""
    with pytest.raises(ValueError, match=said):
        DistillationModule(nn.Linear(8, 4), nn.Linear(8, 4), **{option: value})


def test_a_pickled_teacher_file_is_not_read_on_a_true_string(tmp_path: Path) -> None:
    """The file reader itself refuses a string flag: read_state_dict(path, trust_pickle='false') unpickled the file."""
    from lightning_compress.distillation.teacher import read_state_dict

    path = tmp_path / "whole_module.pt"
    torch.save(nn.Linear(8, 4), path)  # a pickled module: only weights_only=False reads it
    with pytest.raises(ValueError, match=r"trust_pickle must be True or False, got 'false'"):
        read_state_dict(path, trust_pickle="false")
    with pytest.raises(ValueError, match=r"trust_pickle must be True or False, got 'false'"):
        DistillationModule(nn.Linear(8, 4), nn.Linear(8, 4), teacher_ckpt=str(path), trust_pickle="false")


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


@pytest.mark.parametrize("kept", ["emb.weight", "head.weight"])
def test_a_teacher_file_holding_a_tied_weight_once_loads(tmp_path: Path, kept: str) -> None:
    """save_pretrained writes a weight tied to the embedding once: the file lacked 'lm_head.weight' and was refused
    ("lacks or mismatches 1 of 29 entries"). Either name of the weight now loads it."""
    torch.manual_seed(0)
    trained = _TiedLM()
    state = {k: v for k, v in trained.state_dict().items() if k == kept}
    torch.save(state, tmp_path / "teacher.pt")
    teacher = _TiedLM()
    DistillationModule(_TiedLM(), teacher, teacher_ckpt=str(tmp_path / "teacher.pt"), num_classes=16)
    assert torch.equal(teacher.head.weight, trained.emb.weight) and teacher.head.weight is teacher.emb.weight


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_a_distillation_module_with_a_keyword_student_exports_with_any_batch(tmp_path: Path, suffix: str) -> None:
    """The module's forward(*args, **kwargs) passes a Hugging Face student's keywords on: torch.export could not
    give them a dynamic batch (AssertionError: Must provide a tree_name...), and the hint named dynamic_batch=False."""
    import lightning_compress as lc

    torch.manual_seed(0)
    module = DistillationModule(_Keywords(3), _Keywords(3), num_classes=3).eval()
    example = {"input_ids": torch.randint(0, 20, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    lc.export(module, tmp_path / f"m{suffix}", example)
    loaded = lc.load(tmp_path / f"m{suffix}")
    other = {"input_ids": torch.randint(0, 20, (5, 6)), "attention_mask": torch.ones(5, 6, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**other), module(**other), atol=1e-5, rtol=1e-5)


def test_the_named_forward_export_builds_is_the_copys_own() -> None:
    """The forward that names a **kwargs module's keyword inputs called the original module, so every copy an
    exporter made (the float32 reference, a CPU copy) ran the original: a converted model's ONNX export failed."""
    import copy

    from lightning_compress.capture import named_keyword_forward

    torch.manual_seed(0)
    module = DistillationModule(_Keywords(3), _Keywords(3), num_classes=3).eval()
    example = {"input_ids": torch.randint(0, 20, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    named = named_keyword_forward(module, (), example)
    assert list(inspect.signature(named.forward).parameters) == ["input_ids", "attention_mask"]
    twin = copy.deepcopy(named)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        assert torch.equal(named(**example), module(**example)) and not torch.equal(twin(**example), module(**example))


class _OneTuple(nn.Module):
    """Takes its inputs as one tuple argument."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = _Keywords(classes)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.net(*inputs)


@pytest.mark.parametrize("make", [_Keywords, _OneTuple])
def test_inputs_given_as_a_tuple_are_spread_over_a_forward_that_takes_them(tmp_path: Path, make: Any) -> None:
    """((ids, mask), labels): the network got the list as its one argument and failed inside (BERT: 'list' object
    has no attribute 'size'). A forward with as many positional parameters gets them spread; one taking a single
    argument gets the tuple, as before."""
    torch.manual_seed(0)
    ids, labels = torch.randint(0, 20, (16, 6)), torch.randint(0, 3, (16,))
    loader = DataLoader([((i, torch.ones(6, dtype=torch.long)), y) for i, y in zip(ids, labels)], batch_size=8)
    module = DistillationModule(make(3), make(3), num_classes=3)
    trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path))
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 2 and "val_acc" in trainer.callback_metrics


def test_a_scheduled_temperature_with_a_plugin_batch_run_in_setup_raises_no_false_unsized_warning(tmp_path: Path) -> None:
    """The report runs a training step at fit start, before Lightning has sized the loader: a scheduled temperature
    then warned 'the training loader has no length' for a sized loader, and used up the once-per-fit warning."""
    from lightning_compress import CompressionReport

    seed_everything(0)
    module = DistillationModule(MLP(64, (16,), 10), MLP(64, (32,), 10), temperature={0: 8.0, 1: 4.0})
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    trainer = Trainer(max_epochs=2, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=3, limit_val_batches=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert not [w for w in caught if "no length" in str(w.message)]
    assert module.current_temperature(0) == 4.0  # epoch 2's value: the schedule ran


def test_agreement_with_several_validation_loaders_is_the_first_loaders(tmp_path: Path) -> None:
    """With two validation loaders the summary's val_agreement was None (Lightning logs val_agreement/dataloader_idx_N)."""

    class TwoValidationLoaders(DigitsDataModule):
        def val_dataloader(self) -> list[DataLoader]:
            return [DataLoader(self.val_set, batch_size=64), DataLoader(self.test_set, batch_size=64)]

    seed_everything(0)
    module = DistillationModule(MLP(64, (16,), 10), MLP(64, (32,), 10))
    trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=3))
    trainer.fit(module, TwoValidationLoaders())
    first = float(trainer.callback_metrics["val_agreement/dataloader_idx_0"])
    assert module.compression_summary()["val_agreement"] == pytest.approx(first)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_student_keeps_tied_weights_one_tensor(tmp_path: Path, suffix: str) -> None:
    """A student whose head is tied to its embedding: student_state_dict cloned each name, so a .pt file held the
    table twice (2.56 MB for a 1.28 MB table). One tensor now under both names; the .safetensors file keeps a copy
    per name (the format shares nothing) and both load strictly."""
    from lightning_compress.lm import GPTDecoder

    def tied() -> nn.Module:
        torch.manual_seed(0)
        return GPTDecoder(vocab_size=5000, d_model=64, n_layers=1, n_heads=2, max_len=16).eval()

    student = tied()
    names = [n for n, p in student.named_parameters(remove_duplicate=False) if p is student.tok_emb.weight]
    assert len(names) == 2  # the embedding and the head
    module = DistillationModule(student, tied(), num_classes=5000)
    state = module.student_state_dict()
    first, second = (state[n] for n in names)
    assert first.data_ptr() == second.data_ptr()
    path = module.export_student(tmp_path / f"student{suffix}")
    table = 5000 * 64 * 4
    assert path.stat().st_size < (1.3 if suffix == ".pt" else 2.3) * table
    plain = tied()
    if suffix == ".pt":
        plain.load_state_dict(torch.load(path), strict=True)
    else:
        from safetensors.torch import load_file

        plain.load_state_dict(load_file(path), strict=True)
    ids = torch.randint(0, 5000, (2, 16))
    assert torch.equal(plain(ids), student(ids))


def test_safetensors_tensors_keeps_a_tied_weight_once_or_copies_it_per_name() -> None:
    """One rule for tied weights in safetensors files: the library's own files keep the table once with an alias
    (the compact writer, the report's size), export_student's a copy per name (a strict load with load_file alone)."""
    from lightning_compress.measure import safetensors_tensors

    table = torch.randn(6, 4)
    state = {"emb.weight": table, "head.weight": table, "head.bias": torch.zeros(6)}
    kept, aliases = safetensors_tensors(state)
    assert list(kept) == ["emb.weight", "head.bias"] and aliases == {"head.weight": "emb.weight"}
    copied, none = safetensors_tensors(state, tied="copy")
    assert list(copied) == list(state) and none == {}
    assert torch.equal(copied["head.weight"], table) and copied["head.weight"].data_ptr() != copied["emb.weight"].data_ptr()
    with pytest.raises(ValueError, match=r"tied must be 'alias' or 'copy', got 'share'"):
        safetensors_tensors(state, tied="share")


def test_a_checkpoint_of_scheduled_temperature_and_alpha_resumes_and_loads(tmp_path: Path) -> None:
    """A Schedule given as temperature (as the README shows) is kept in the hyperparameters; torch.load with
    weights_only=True, which Lightning reads checkpoints with, refused it: no resume, no load_from_checkpoint, no
    test(ckpt_path=...) after a whole fit. The library's schedule classes load; a schedule class of one's own is
    said at construction, with the call that allows it."""
    from lightning_compress.schedules import StepMap

    def build() -> DistillationModule:
        seed_everything(0)
        return DistillationModule(MLP(64, (16,), 10), MLP(64, (32,), 10), temperature=Linear(4.0, 1.0, 0, 2), alpha=StepMap({0: 0.9, 1: 0.5}))

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    make_trainer(tmp_path, epochs=2, callbacks=[checkpoints], enable_checkpointing=True, limit_train_batches=2).fit(build(), DigitsDataModule(batch_size=64))
    last = tmp_path / "ck" / "last.ckpt"
    loaded = DistillationModule.load_from_checkpoint(last, student=MLP(64, (16,), 10), teacher=MLP(64, (32,), 10))
    assert loaded.temperature_schedule(1.0) == pytest.approx(2.5) and loaded.alpha_schedule(1.0) == 0.5
    resumed = make_trainer(tmp_path, epochs=3, limit_train_batches=2)
    resumed.fit(build(), DigitsDataModule(batch_size=64), ckpt_path=last)
    assert resumed.current_epoch == 3

    class Halving(Linear):
        def __call__(self, t: float) -> float:
            return super().__call__(t) / 2

    with pytest.warns(UserWarning, match=r"temperature is a .*Halving, a schedule class of your own: .*add_safe_globals\(\[.*Halving\]\)"):
        DistillationModule(MLP(64, (16,), 10), MLP(64, (32,), 10), temperature=Halving(4.0, 2.0, 0, 1))


def test_a_scheduled_alpha_that_weighs_in_the_task_loss_is_not_a_blow_up(tmp_path: Path, digits: DigitsDataModule) -> None:
    """alpha from 1 to 0.5 adds half the task loss to a sum that was the (small) distillation term alone: the sum
    rose 20x and the watchdog warned that the loss was blowing up, advising a lower learning rate. It watches each
    term on its own; a term that does blow up is still said, by name (test_growing_loss_warns)."""
    seed_everything(0)
    module = DistillationModule(student(), MLP(64, (16,), 10), alpha={0: 1.0, 1: 0.5}, optimizer=lambda p: torch.optim.SGD(p, lr=1e-4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, epochs=2, limit_val_batches=0, limit_train_batches=24)
        trainer.fit(module, digits)
    sums = module.loss_watch.emas
    assert sums["ce_loss"] > 20 * sums["distill_loss"]  # the sum at alpha 0.5 is more than 10x the one at alpha 1
    assert not [w for w in caught if "blowing up" in str(w.message)] and not module.loss_watch.warned


def test_the_frozen_teachers_eval_mode_notice_is_silenced_for_its_fit_only(tmp_path: Path, digits: DigitsDataModule) -> None:
    """Lightning warns about modules in eval mode when training starts; the frozen teacher is one by design. The
    filter that silenced it stayed in warnings.filters for the rest of the process, so a later fit of another
    module with a module left in eval mode by mistake was not told."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    def eval_mode_filters() -> list[Any]:
        return [f for f in warnings.filters if f[1] is not None and "eval mode" in f[1].pattern]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = len(eval_mode_filters())
        make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0).fit(DistillationModule(student(), teacher()), digits)
        assert len(eval_mode_filters()) == before
        plain = ClassifierModule(MLP(64, (16,), 10))
        plain.model.net[0].eval()  # a module left in eval mode
        make_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0).fit(plain, digits)
    said = [str(w.message) for w in caught if issubclass(w.category, PossibleUserWarning) and "in eval mode" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("Found 1 module(s) in eval mode")


def test_a_scheduler_can_step_every_optimizer_step(tmp_path: Path, digits: DigitsDataModule) -> None:
    """A warm-up schedule counted in steps (Hugging Face's) was stepped once an epoch: 4 steps into a fit it had
    not moved. scheduler_interval="step" steps it with the optimizer; a bad value is refused on construction."""

    def fit(interval: str) -> float:
        module = DistillationModule(
            student(), teacher(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10), scheduler_interval=interval,
        )  # fmt: skip
        trainer = make_trainer(tmp_path, limit_train_batches=4, limit_val_batches=0)
        trainer.fit(module, digits)
        return trainer.optimizers[0].param_groups[0]["lr"]

    assert fit("step") == pytest.approx(0.1 * (0.1 + 0.9 * 4 / 10))
    assert fit("epoch") == pytest.approx(0.1 * (0.1 + 0.9 * 1 / 10))
    with pytest.raises(ValueError, match=r"scheduler_interval must be one of \['step', 'epoch'\], got 'batch'"):
        DistillationModule(student(), teacher(), scheduler_interval="batch")


def test_a_lazy_student_is_accepted_and_exported_without_a_resize_warning(tmp_path) -> None:
    """A student with lazy layers (shapes known after its first forward) is built (reading its shapes at construction
    raised), and its export after the forward has no resize warning."""
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    module = DistillationModule(student, MLP(64, (32,), 10))
    student(torch.zeros(2, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = module.export_student(tmp_path / "student.pt")
    assert torch.load(path)["1.weight"].shape == (16, 64)
