"""configs/teacher.yaml then configs/distill.yaml through the CLI, as documented (shortened runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_teacher_then_distill_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = pytest.importorskip("lightning_compress.cli", reason="the lightning-compress CLI is not available")
    monkeypatch.chdir(tmp_path)  # the configs write under runs/ relative to the working directory
    short = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]
    cli.cli_main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *short])
    ckpt = tmp_path / "runs" / "teacher" / "digits_teacher.ckpt"
    assert ckpt.is_file()
    run = cli.cli_main(["fit", "--config", str(CONFIGS / "distill.yaml"), *short])
    module = run.model
    assert type(module).__name__ == "DistillationModule"
    assert module.teacher_prefix == "model."
    trained = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(v, trained[f"model.{k}"]) for k, v in module.teacher.state_dict().items())
    assert "distill_loss" in run.trainer.callback_metrics and "val_agreement" in run.trainer.callback_metrics
    report = next(cb for cb in run.trainer.callbacks if type(cb).__name__ == "CompressionReport").report
    assert report["baseline"]["params"] == sum(p.numel() for p in module.teacher.parameters())
    assert report["compressed"]["params"] == sum(p.numel() for p in module.student.parameters())
    assert report["baseline"]["metrics"]["val_acc"] == pytest.approx(module.teacher_val_accuracy)
