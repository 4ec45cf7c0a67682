"""CompressionReport's records: which model each metric describes, across validations, tests and fits."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import trainer_kwargs
from lightning_compress import ClassifierModule, CompressionReport, DigitsDataModule, DistillationModule, PruningCallback
from lightning_compress.models import MLP

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _report() -> CompressionReport:
    return CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)


def _val_keys(record: dict) -> set[str]:
    return {k for k in record["metrics"] if k != "train_loss"}


# ------------------------------------------------------------------------------------ Trainer.test
def _kept_apart(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "other_model_tests" in str(w.message)]


def test_a_test_of_another_checkpoint_is_kept_apart_from_the_compressed_metrics(tmp_path: Path) -> None:
    L.seed_everything(0)
    module, data = ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=32)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    prune = PruningCallback(0.95, schedule="one_shot", start_epoch=2, verbose=False)
    report = _report()
    trainer = L.Trainer(
        max_epochs=3, callbacks=[prune, report, every_epoch],
        **trainer_kwargs(tmp_path, limit_train_batches=6, enable_checkpointing=True),
    )
    trainer.fit(module, data)
    final = tmp_path / "final.ckpt"
    trainer.save_checkpoint(final)  # the weights fit returned
    compressed = report.report["compressed"]
    assert compressed["sparsity"] > 0.9
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pruned = trainer.test(module, data, verbose=False)[0]  # the model fit returned: its row
    assert not _kept_apart(record)
    assert compressed["metrics"]["test_acc"] == pytest.approx(pruned["test_acc"])

    dense_ckpt = str(tmp_path / "ckpt" / "epoch=1.ckpt")  # written before pruning began
    with pytest.warns(UserWarning, match=r"tested the checkpoint '.*epoch=1\.ckpt', not the compressed model fit "
                      r"returned; its test metrics \(test_acc=.*\) are kept under report\['other_model_tests'\].*"
                      r"trainer\.test\(model, dataloaders\) without ckpt_path right after fit"):
        dense = trainer.test(ckpt_path=dense_ckpt, datamodule=data, verbose=False)[0]
    assert dense["test_acc"] > pruned["test_acc"] + 0.1  # another model indeed: the dense one scores far higher
    assert compressed["metrics"]["test_acc"] == pytest.approx(pruned["test_acc"])  # not overwritten
    assert [h["epoch"] for h in report.history] == [0, 1, 2]  # the fit's records, not those in the checkpoint
    assert report.report["other_model_tests"] == [
        {"ckpt_path": dense_ckpt, "metrics": pytest.approx({"test_acc": dense["test_acc"], "test_loss": dense["test_loss"]})}
    ]

    with warnings.catch_warnings(record=True) as record:  # a checkpoint of exactly the compressed weights
        warnings.simplefilter("always")
        again = trainer.test(ckpt_path=str(final), datamodule=data, verbose=False)[0]
    assert not _kept_apart(record)
    assert again["test_acc"] == pytest.approx(pruned["test_acc"])
    assert compressed["metrics"]["test_acc"] == pytest.approx(again["test_acc"])
    assert len(report.report["other_model_tests"]) == 1


# ------------------------------------------------------------------------------------ no validation
def _distillation() -> DistillationModule:
    return DistillationModule(student=MLP(64, (16,), 10), teacher=MLP(64, (32,), 10), temperature=4.0, alpha=0.9)


@pytest.mark.parametrize("kind", ["ClassifierModule", "DistillationModule"])
def test_without_validation_neither_row_has_metrics_and_both_notes_say_why(tmp_path: Path, kind: str) -> None:
    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10)) if kind == "ClassifierModule" else _distillation()
    callbacks = [PruningCallback(0.9, schedule="one_shot", start_epoch=2, verbose=False), _report()]
    report = callbacks[-1]
    trainer = L.Trainer(max_epochs=3, callbacks=callbacks, **trainer_kwargs(tmp_path, limit_train_batches=3, limit_val_batches=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*accuracy guard.*")
        trainer.fit(module, DigitsDataModule(batch_size=32))
    r = report.report
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2]
    assert all(_val_keys(h) == set() for h in r["history"])  # the training loss only
    for row in ("baseline", "compressed"):
        assert r[row]["metrics"] == {} and "metrics_epoch" not in r[row], row
        assert "No validation ran in this fit" in r[f"{row}_note"], row
    assert "active" not in r["baseline_note"]  # DistillationModule is active from the first step: not the cause


# ------------------------------------------------------------------------ epochs without validation
def test_an_epoch_without_validation_has_no_validation_metrics(tmp_path: Path) -> None:
    L.seed_everything(0)
    prune = PruningCallback(0.9, schedule="one_shot", start_epoch=2, verbose=False)
    report = _report()
    trainer = L.Trainer(
        max_epochs=5, callbacks=[prune, report], **trainer_kwargs(tmp_path, limit_train_batches=4, check_val_every_n_epoch=2)
    )
    trainer.fit(ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=32))
    r = report.report
    assert [v["epoch"] for v in report.validations] == [1, 3]
    validated = {h["epoch"]: h["metrics"]["val_acc"] for h in r["history"] if _val_keys(h)}
    assert set(validated) == {1, 3}
    assert validated == {v["epoch"]: v["metrics"]["val_acc"] for v in report.validations}
    assert all(set(h["metrics"]) == {"train_loss"} for h in r["history"] if h["epoch"] in (0, 2, 4))
    assert r["history"][2]["state"]["sparsity"] > 0.85  # pruned at epoch 2, and not validated then
    assert r["baseline"]["metrics_epoch"] == 1
    # epoch 4 trained on after the last validation: that validation did not measure the model fit returned
    assert r["compressed"]["metrics"] == {} and "metrics_epoch" not in r["compressed"]
    note = r["compressed_note"]
    assert "changed after the last validation (epoch 3, step 16): training continued for 4 more steps without " \
           "validation (to step 20, in epoch 4)" in note
    assert "accuracy guard" not in note and "trainer.validate" in note


def test_a_fit_ending_within_an_epoch_says_training_went_on_after_the_last_validation(tmp_path: Path) -> None:
    report = _report()
    trainer = L.Trainer(max_epochs=-1, max_steps=10, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=4))
    trainer.fit(ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32))
    r = report.report
    assert [(v["epoch"], v["step"]) for v in report.validations] == [(0, 4), (1, 8)]
    assert [_val_keys(h) != set() for h in r["history"]] == [True, True, False]
    assert r["compressed"]["metrics"] == {}
    assert "training continued for 2 more steps without validation (to step 10, in epoch 2)" in r["compressed_note"]


# ------------------------------------------------------------------------------------ a second fit
@pytest.mark.parametrize("second", ["same trainer", "new trainer"])
def test_a_second_fit_is_reported_on_its_own(tmp_path: Path, second: str) -> None:
    L.seed_everything(0)
    module, data = ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=32)
    # masks kept (make_permanent=False): the second fit trains the pruned model on, still pruned
    prune = PruningCallback(0.9, schedule="one_shot", start_epoch=1, make_permanent=False, verbose=False)
    callbacks = [prune, _report()]
    report = callbacks[-1]
    kwargs = trainer_kwargs(tmp_path, limit_train_batches=3, limit_val_batches=2)
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **kwargs)
    trainer.fit(module, data)
    first = report.report
    assert first["baseline"]["sparsity"] == 0.0 and first["baseline"]["metrics_epoch"] == 0
    pruned = first["compressed"]["sparsity"]
    assert pruned > 0.85

    if second == "same trainer":
        trainer.fit_loop.max_epochs = 4
        epochs = [2, 3]
    else:
        trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **kwargs)
        epochs = [0, 1]
    trainer.fit(module, data)
    r = report.report
    # this fit's own records: no epoch or validation of the first fit
    assert [h["epoch"] for h in r["history"]] == epochs
    assert [v["epoch"] for v in report.validations] == epochs
    # the baseline is the model as this fit began (pruned by the first), and the ratios agree with it
    assert r["baseline"]["sparsity"] == pytest.approx(pruned)
    assert r["ratios"]["nonzero_params"] == pytest.approx(1.0)
    # never the first fit's dense metrics next to the pruned baseline
    assert r["baseline"]["metrics"] == {} and "metrics_epoch" not in r["baseline"]
    assert f"active at the first validation of this fit, epoch {epochs[0]}" in r["baseline_note"]
    assert r["compressed"]["metrics"]["val_acc"] == pytest.approx(report.validations[-1]["metrics"]["val_acc"])
    assert r["compressed"]["metrics_epoch"] == epochs[-1]


class _OwnMetricName(ClassifierModule):
    """Logs its validation accuracy under a name without the ``val_`` prefix too."""

    def validation_step(self, batch, batch_idx) -> None:
        super().validation_step(batch, batch_idx)
        x, y = batch
        self.log("accuracy", (self(x).argmax(-1) == y).float().mean())


def test_a_validation_metric_of_any_name_stays_with_its_epoch(tmp_path: Path) -> None:
    report = CompressionReport(metrics=["accuracy", "train_loss"], batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)
    trainer = L.Trainer(
        max_epochs=4, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=3, check_val_every_n_epoch=2)
    )
    trainer.fit(_OwnMetricName(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32))
    history = report.report["history"]
    assert [sorted(h["metrics"]) for h in history] == [["train_loss"], ["accuracy", "train_loss"]] * 2
    assert report.report["compressed"]["metrics"] == {"accuracy": history[3]["metrics"]["accuracy"]}
    assert report.report["compressed"]["metrics_epoch"] == 3


def test_every_validation_of_an_epoch_is_reported_with_its_step_and_plotted_by_step(tmp_path: Path, monkeypatch) -> None:
    """With ``val_check_interval`` (as the language-model configs validate) ``history`` holds one record an epoch, and
    the plot had one point for a one-epoch fit; ``validations`` holds each, with its step and the pruning state then."""
    import lightning_compress.report as report_module

    plotted: list = []
    monkeypatch.setattr(report_module, "plot_history", lambda records, path, title="", x="epoch": plotted.append((records, x)))
    L.seed_everything(0)
    module, data = ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=32)
    prune = PruningCallback(0.8, start_epoch=0, end_epoch=1, update_every_n_steps=2, verbose=False)
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False)
    trainer = L.Trainer(max_epochs=1, val_check_interval=4, callbacks=[prune, report], **trainer_kwargs(tmp_path, limit_train_batches=12))
    trainer.fit(module, data)
    validations = report.report["validations"]
    assert [v["step"] for v in validations] == [4, 8, 12] and len(report.report["history"]) == 1
    assert all(_val_keys(v) == {"val_acc", "val_loss"} for v in validations)
    sparsity = [v["state"]["sparsity"] for v in validations]
    assert sparsity == sorted(sparsity) and 0 < sparsity[0] < sparsity[-1] <= 0.8 + 1e-6  # the state each validation measured
    assert validations[-1]["metrics"] == report.report["compressed"]["metrics"]
    assert plotted == [(validations, "step")]


def test_plot_history_names_the_valid_axes(tmp_path: Path) -> None:
    from lightning_compress.report_output import plot_history

    with pytest.raises(ValueError, match=r"x must be 'epoch' or 'step', got 'steps'"):
        plot_history([{"epoch": 0, "step": 4, "metrics": {"val_acc": 0.5}}], tmp_path / "p.png", x="steps")
    assert not (tmp_path / "p.png").exists()
