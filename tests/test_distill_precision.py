"""DistillationModule and dtypes: networks the user cast, Trainer precisions, ``teacher_dtype``, the batch seen in setup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.distillation import DistillationModule
from lightning_compress.models import MLP, LeNet5

FEATURES = {"net.2": "classifier.4"}  # student (N, 16) -> teacher (N, 84): a learned linear projection


def student() -> MLP:
    return MLP(64, (16,), 10)


def teacher() -> LeNet5:
    return LeNet5(image_size=8)


def loader(dtype: torch.dtype = torch.float32, n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g).to(dtype)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=8)


def make_trainer(tmp_path: Path, epochs: int = 1, **kwargs: Any) -> Trainer:
    kwargs = {"limit_train_batches": 2, "limit_val_batches": 1, **kwargs}
    return Trainer(max_epochs=epochs, **trainer_kwargs(tmp_path, **kwargs))


def floating_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}


# --------------------------------------------------------------------------------------------------
# feature projections follow the student's dtype
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("example_input_shape", [None, (1, 8, 8)])
def test_projections_in_the_dtype_of_a_student_cast_by_the_user(
    tmp_path: Path, dtype: torch.dtype, example_input_shape: tuple[int, ...] | None
) -> None:
    seed_everything(0)
    module = DistillationModule(
        student().to(dtype), teacher().to(dtype), features=FEATURES, example_input_shape=example_input_shape
    )
    trainer = make_trainer(tmp_path)
    trainer.fit(module, loader(dtype), loader(dtype, 8))
    assert trainer.global_step == 2
    assert floating_dtypes(module.projections) == {dtype}
    assert torch.isfinite(trainer.callback_metrics["feature_loss"]) and float(trainer.callback_metrics["feature_loss"]) > 0

    # projections rebuilt from a checkpoint take the dtype of the student they are given, and train on
    path = tmp_path / "features.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillationModule.load_from_checkpoint(path, student=student().to(dtype), teacher=teacher().to(dtype))
    assert floating_dtypes(loaded.projections) == {dtype}
    assert torch.equal(loaded.projections["net__2"].proj.weight, module.projections["net__2"].proj.weight)
    again = make_trainer(tmp_path)
    again.fit(loaded, loader(dtype), loader(dtype, 8))
    assert again.global_step == 2


def test_projections_under_a_true_precision_trainer_are_cast_with_the_module(tmp_path: Path) -> None:
    seed_everything(0)
    module = DistillationModule(student(), teacher(), features=FEATURES)
    trainer = make_trainer(tmp_path, precision="64-true")
    trainer.fit(module, loader(), loader(n=8))
    assert floating_dtypes(module.projections) == floating_dtypes(module.student) == {torch.float64}
    path = tmp_path / "f64.ckpt"
    trainer.save_checkpoint(path)
    resumed = DistillationModule(student(), teacher(), features=FEATURES)
    make_trainer(tmp_path, epochs=2, precision="64-true").fit(resumed, loader(), loader(n=8), ckpt_path=path)
    assert floating_dtypes(resumed.projections) == {torch.float64}


# --------------------------------------------------------------------------------------------------
# the batch setup runs both networks on is prepared as the loop prepares it
# --------------------------------------------------------------------------------------------------
class CastAfterTransfer(DistillationModule):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x.float(), y


class CastInTransfer(DistillationModule):
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        x, y = super().transfer_batch_to_device(batch, device, dataloader_idx)
        return x.float(), y


class CastBeforeTransfer(DistillationModule):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x.float(), y


@pytest.mark.parametrize("module_class", [CastBeforeTransfer, CastInTransfer, CastAfterTransfer])
def test_setup_runs_the_networks_on_the_batch_the_transfer_hooks_prepared(tmp_path: Path, module_class: type) -> None:
    seed_everything(0)
    module = module_class(student(), teacher(), features=FEATURES)  # float32 networks, float64 data
    trainer = make_trainer(tmp_path)
    trainer.fit(module, loader(torch.float64), loader(torch.float64, 8))
    assert trainer.global_step == 2
    assert floating_dtypes(module.projections) == {torch.float32}


# --------------------------------------------------------------------------------------------------
# teacher_dtype under the Trainer's precision
# --------------------------------------------------------------------------------------------------
def test_teacher_dtype_is_kept_under_64_true_through_fit_resume_and_validate(tmp_path: Path) -> None:
    seed_everything(0)
    net = teacher()
    cast = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items() if v.is_floating_point()}
    module = DistillationModule(student(), net, teacher_dtype="bfloat16", save_teacher=True, cache_teacher_outputs=True)
    trainer = make_trainer(tmp_path, precision="64-true")
    trainer.fit(module, loader(), loader(n=8))
    assert floating_dtypes(module.student) == {torch.float64}
    assert floating_dtypes(module.teacher) == {torch.bfloat16}
    assert all(torch.equal(module.teacher.state_dict()[k], v) for k, v in cast.items())
    assert {t.store.dtype for t in module.teacher_cache.tables.values()} == {torch.bfloat16}  # the teacher's logits
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    with torch.no_grad():  # bf16 teacher logits, compared in the student's dtype
        x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
        student_logits = module(x)
        expected = module.teacher(x.to(torch.bfloat16)).to(torch.float64)
        assert torch.equal(module.teacher_logits(x, student_logits), expected)

    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    resumed = DistillationModule(student(), teacher(), teacher_dtype="bfloat16", save_teacher=True)  # weights from the file
    resume = make_trainer(tmp_path, epochs=2, precision="64-true", limit_val_batches=0)  # no validation: on_fit_start alone
    resume.fit(resumed, loader(), loader(n=8), ckpt_path=path)
    assert floating_dtypes(resumed.teacher) == {torch.bfloat16}
    assert all(torch.equal(resumed.teacher.state_dict()[k], v) for k, v in cast.items())

    for stage in ("validate", "test", "predict"):
        getattr(make_trainer(tmp_path, precision="64-true"), stage)(resumed, loader(n=8))
        assert floating_dtypes(resumed.teacher) == {torch.bfloat16}, stage
        assert all(torch.equal(resumed.teacher.state_dict()[k], v) for k, v in cast.items()), stage


@pytest.mark.parametrize(("teacher_dtype", "precision"), [("bfloat16", "16-true"), ("float16", "bf16-true")])
def test_teacher_dtype_the_precision_would_round_is_refused_in_setup(
    tmp_path: Path, teacher_dtype: str, precision: str
) -> None:
    module = DistillationModule(student(), teacher(), teacher_dtype=teacher_dtype)  # type: ignore[arg-type]
    other = "float16" if teacher_dtype == "bfloat16" else "bfloat16"
    match = rf"teacher_dtype='{teacher_dtype}' cannot be kept under precision='{precision}'.*teacher_dtype='{other}' or None"
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, precision=precision).fit(module, loader(), loader(n=8))
    assert floating_dtypes(module.teacher) == {torch.float32}  # refused before any cast


@pytest.mark.parametrize(
    ("teacher_dtype", "precision"), [("bfloat16", "bf16-true"), ("float16", "16-true"), ("bfloat16", "32-true")]
)
def test_teacher_dtype_that_fits_the_precision_trains(tmp_path: Path, teacher_dtype: str, precision: str) -> None:
    seed_everything(0)
    sgd = lambda params: torch.optim.SGD(params, lr=0.01)  # noqa: E731 - Adam's eps underflows in pure float16
    module = DistillationModule(student(), teacher(), teacher_dtype=teacher_dtype, optimizer=sgd)  # type: ignore[arg-type]
    trainer = make_trainer(tmp_path, precision=precision)
    trainer.fit(module, loader(), loader(n=8))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert floating_dtypes(module.teacher) == {getattr(torch, teacher_dtype)}


def test_a_float16_teacher_computes_in_float16_under_the_trainers_autocast(tmp_path: Path) -> None:
    """bf16-mixed (what 16-mixed becomes on the CPU) ran the float16 teacher under its bfloat16 autocast: a
    BatchNorm teacher failed ('mixed dtype (CPU)') and others computed in bfloat16, although the README recommends
    the pair. The teacher now computes in its own dtype in training and validation."""
    from lightning_compress.models import ResCNN

    seed_everything(0)
    module = DistillationModule(student(), ResCNN(width=8), teacher_dtype="float16")  # type: ignore[arg-type]
    seen: set[tuple[torch.dtype, bool]] = set()
    module.teacher.fc.register_forward_hook(lambda m, args, out: seen.add((out.dtype, torch.is_autocast_enabled("cpu"))))
    trainer = make_trainer(tmp_path, precision="bf16-mixed")
    trainer.fit(module, loader(), loader(n=8))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert seen == {(torch.float16, False)}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_feature_hints_with_a_float16_teacher_train(tmp_path: Path, precision: str) -> None:
    """Sizing the projections ran the float16 teacher on float32 inputs ('Input type (torch.FloatTensor) and weight
    type (torch.HalfTensor)'): setup failed under any precision."""
    from lightning_compress.models import ResCNN

    seed_everything(0)
    module = DistillationModule(student(), ResCNN(width=8), teacher_dtype="float16", features={"net.1": "fc"})  # type: ignore[arg-type]
    trainer = make_trainer(tmp_path, precision=precision)
    trainer.fit(module, loader(), loader(n=8))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"]) and len(module.projections) == 1


def test_a_teacher_kept_in_bfloat16_is_reported_as_the_float_model_it_is(tmp_path: Path) -> None:
    """The report cast its baseline copy to the teacher's bfloat16: half the teacher's bytes (a size ratio of 8.75x
    for 17.3x), no MACs and no latency (a float32 input into bfloat16 weights)."""
    import io

    from lightning_compress import CompressionReport

    seed_everything(0)
    net = teacher()
    float_bytes = io.BytesIO()
    torch.save(net.state_dict(), float_bytes)
    module = DistillationModule(student(), net, teacher_dtype="bfloat16")
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    make_trainer(tmp_path, callbacks=[report]).fit(module, loader(), loader(n=8))
    baseline = report.report["baseline"]
    assert abs(baseline["size_bytes"] - float_bytes.getbuffer().nbytes) < 4096  # float32, as the teacher was given
    assert baseline["macs"] and baseline["latency_ms"] and "latency_note" not in report.report
