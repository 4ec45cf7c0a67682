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


def test_pipeline_config_distils_prunes_and_quantises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/pipeline.yaml: all three methods in one run; the report measures the int8 student."""
    from lightning_compress.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(CONFIGS / "teacher.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=4"])
    run = cli_main(["fit", "--config", str(CONFIGS / "pipeline.yaml"), "--trainer.enable_progress_bar=false"])
    callbacks = {type(cb).__name__: cb for cb in run.trainer.callbacks}
    report = callbacks["CompressionReport"].report
    student = run.model.student
    assert report["compressed"]["params"] == sum(p.numel() for p in student.parameters())
    assert report["compressed"]["sparsity"] > 0.75  # pruned weights stayed zero through int8
    # the artifact is the converted student alone (no teacher inside), int8 storage
    quantized = callbacks["QuantizeCallback"].quantized_model
    assert not any("teacher" in name for name in quantized.state_dict())
    assert report["compressed"]["size_bytes"] < 0.4 * sum(p.numel() * 4 for p in student.parameters())
