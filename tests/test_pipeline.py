"""``lightning-compress pipeline``: teacher, then a student distilled, pruned and quantised, then the artifact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_compress as lc
from lightning_compress import DigitsDataModule
from lightning_compress.cli import CommandError
from lightning_compress.pipeline import main, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _test_split() -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule(batch_size=1000)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


@pytest.mark.timeout(660)  # the subprocess's own limit decides: ~25 s alone, several minutes on 2 busy cores
def test_the_main_job_as_the_readme_runs_it(tmp_path: Path) -> None:
    """The README's first command, from a folder holding the configs: one process, every stage."""
    (tmp_path / "configs").symlink_to(CONFIGS)
    exe = Path(sys.executable).with_name("lightning-compress")
    result = subprocess.run(
        [str(exe), "pipeline", "--student-args", "--trainer.enable_progress_bar=false", "--teacher-args",
         "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compression report" in result.stdout and "exported the compressed student" in result.stdout
    artifact = tmp_path / "runs" / "pipeline" / "student.safetensors"
    model = lc.load(artifact)
    x, y = _test_split()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.92  # the int8, 80%-sparse student, from the file alone (val_acc 0.98; 0.930 on the 270 test images)
    assert artifact.stat().st_size < 15_000


@pytest.mark.parametrize("artifact", ["student.safetensors", "student.onnx"])
def test_run_pipeline_chains_the_teacher_checkpoint_and_exports_what_it_trained(tmp_path: Path, monkeypatch, artifact: str) -> None:
    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
             "--trainer.enable_progress_bar=false"]
    result = run_pipeline(CONFIGS / "teacher.yaml", CONFIGS / "pipeline.yaml", teacher_args=short,
                          student_args=[*short[1:], "--trainer.max_epochs=8"], export_to=f"out/{artifact}", onnx_tolerance=1e-3)
    assert Path(result["teacher_ckpt"]).is_file() and "val_acc" in result["student_metrics"]
    loaded = lc.load(tmp_path / "out" / artifact)
    x, _ = _test_split()
    with torch.no_grad():
        if artifact.endswith(".onnx"):  # the suffix picks the format; onnxruntime agrees within the tolerance
            assert result["artifact"]["format"] == "onnx"
            expected, got = result["model"](x), loaded(x)
            rows_within = (got - expected).abs().amax(1) <= 1e-3 * expected.abs().max()
            assert rows_within.float().mean() >= 0.99 and (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
        else:
            assert torch.equal(loaded(x), result["model"](x))
    assert {v["format"] for v in result["model"].quantization_spec.values()} == {"int8_linear"}


def test_missing_configs_fail_before_anything_trains(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config at 'nowhere.yaml'"):
        run_pipeline("nowhere.yaml", CONFIGS / "pipeline.yaml")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--export-to", "out/s.onnx", "--onnx-tolerance", "0"], r"onnx_tolerance must be a number in \(0, 1\), got 0.0"),
        (["--export-to", "out/s.pt2x"], None),  # any other suffix is a compact artifact: accepted
        (["--export-to", "out/s.ONNX"], r"the suffix picks the format as written, and '.ONNX' is not '.onnx'"),
        (["--export-to", "."], r"'.' is a folder; give the artifact file's path"),
    ],
)
def test_a_bad_export_is_refused_before_anything_trains(tmp_path: Path, monkeypatch, args: list, said: str | None) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [*args, "--teacher", "nowhere.yaml"]  # the export is checked first; then the missing config stops it
    with pytest.raises(CommandError, match=said or "no config at 'nowhere.yaml'"):  # the command's one line
        main(argv)
    assert not (tmp_path / "runs").exists()


def test_an_export_path_under_a_file_is_refused_before_anything_trains(tmp_path: Path, monkeypatch) -> None:
    """``--export-to notes.txt/s.safetensors`` with notes.txt a file: FileExistsError after both stages had trained."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CommandError, match=r"--export-to 'notes.txt/s.safetensors' cannot be written: 'notes.txt' is a file, not a folder"):
        main(["--export-to", "notes.txt/s.safetensors"])
    assert not (tmp_path / "runs").exists() and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--student-args", "--trainer.max_epochs=1", "--teacher", "t.yaml"],
         r"--teacher is among the student stage's arguments \(everything after --student-args goes to that stage's LightningCLI"),
        (["--teacher-args", "--export-to=x.onnx"], r"--export-to is among the teacher stage's arguments"),
        (["--student-args", "--model.init_args.teacher_ckpt", "other.ckpt"],
         r"the student stage's arguments set teacher_ckpt='other.ckpt', which would replace the checkpoint the teacher stage writes"),
        (["--student-args", "--model.teacher_ckpt=other.ckpt"], r"set teacher_ckpt='other.ckpt'"),
        (["--student-args", '--model.init_args={"teacher_ckpt": "other.ckpt"}'], r"set teacher_ckpt='other.ckpt'"),
    ],
)
def test_stage_arguments_the_pipeline_would_misread_are_refused(tmp_path: Path, monkeypatch, args: list, said: str) -> None:
    """The pipeline's own options after --student-args reached the student's LightningCLI ("no config at
    'configs/teacher.yaml'" for a --teacher given there), and a teacher_ckpt given to the student stage replaced the
    checkpoint the teacher had just written, in silence, or failed after its fit when it did not exist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError, match=said):
        main(["--teacher", str(CONFIGS / "teacher.yaml"), "--student", str(CONFIGS / "pipeline.yaml"), *args])
    assert not (tmp_path / "runs").exists()


def test_a_stage_config_that_does_not_parse_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    """The parser's usage and error named neither stage (``usage: ... fit``, ``No module named 'nomod'``)."""
    monkeypatch.chdir(tmp_path)
    student = tmp_path / "student.yaml"
    student.write_text((CONFIGS / "pipeline.yaml").read_text().replace("lightning_compress.DistillationModule", "nomod.Distill"))
    with pytest.raises(SystemExit):
        main(["--teacher", str(CONFIGS / "teacher.yaml"), "--student", str(student)])
    assert f"the student stage's command line (--config {student}) does not parse" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_report_folder_the_student_stage_cannot_write_is_refused_before_the_teacher_trains(tmp_path: Path, monkeypatch) -> None:
    """The student's CompressionReport(dirpath=...) was checked in its setup, after the teacher's whole fit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CommandError, match=r"the student stage's CompressionReport: dirpath 'notes.txt' cannot be written: it is a file, not a folder"):
        main(["--teacher", str(CONFIGS / "teacher.yaml"), "--student", str(CONFIGS / "pipeline.yaml"), "--student-args",
              "--trainer.callbacks.init_args.dirpath=notes.txt"])
    assert not (tmp_path / "runs").exists()


def test_a_student_module_of_the_users_own_without_a_student_child_is_exported(tmp_path: Path, monkeypatch) -> None:
    """A project's module that takes teacher_ckpt and has no ``student`` child, without a QuantizeCallback, crashed after
    both stages: "'SelfDistilling' object has no attribute 'student'". Its network is the module itself."""
    monkeypatch.chdir(tmp_path)
    student = tmp_path / "student.yaml"
    student.write_text(
        "trainer: {max_epochs: 2, limit_train_batches: 4, limit_val_batches: 2, enable_progress_bar: false, logger: false,\n"
        "  callbacks: [{class_path: lightning_compress.PruningCallback, init_args: {target_sparsity: 0.5, schedule: one_shot}}]}\n"
        "model: {class_path: user_project.SelfDistilling}\n"
        "data: {class_path: lightning_compress.DigitsDataModule}\n"
    )
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    result = run_pipeline(CONFIGS / "teacher.yaml", student, teacher_args=short, export_to="out/s.safetensors")
    assert type(result["model"]).__name__ == "SelfDistilling" and result["model"].teacher_ckpt == result["teacher_ckpt"]
    x, _ = _test_split()
    with torch.no_grad():
        assert torch.equal(lc.load(tmp_path / "out" / "s.safetensors")(x), result["model"](x))


def test_a_bad_student_option_fails_before_the_teacher_trains(tmp_path: Path, monkeypatch) -> None:
    """A typo in the student's config was reported after the whole teacher stage had trained."""
    from lightning_compress.cli import config_error

    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "student.yaml"
    typo.write_text((CONFIGS / "pipeline.yaml").read_text().replace("schedule: cubic", "schedule: cubc"))
    assert typo.read_text() != (CONFIGS / "pipeline.yaml").read_text()
    with pytest.raises(ValueError) as raised:
        main(["--student", str(typo), "--teacher", str(CONFIGS / "teacher.yaml")])
    assert config_error(raised.value).startswith("PruningCallback: unknown schedule 'cubc'; valid names: ['constant', 'cubic'")
    assert not (tmp_path / "runs").exists()


def test_stage_arguments_given_with_an_equals_sign_reach_their_stage(tmp_path: Path, monkeypatch) -> None:
    """``--student-args=--trainer.max_epochs=0`` went to argparse, which stored it where nothing read it: the stages ran
    with their full settings in silence."""
    import lightning_compress.pipeline as pipeline

    seen: dict = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **kw: seen.update(kw))
    main(["--teacher", str(CONFIGS / "teacher.yaml"), "--teacher-args=--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--student-args=--trainer.max_epochs=2"])
    assert seen["teacher_args"] == ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    assert seen["student_args"] == ["--trainer.max_epochs=2"]
    main(["--teacher-args=", "--trainer.max_epochs=1", "--student-args="])  # nothing after "=": no empty argument
    assert seen["teacher_args"] == ["--trainer.max_epochs=1"] and seen["student_args"] == []


class EveryEpochCheckpoint(ModelCheckpoint):
    """A project's own checkpoint class: the pipeline reads it as the ModelCheckpoint it is."""


@pytest.mark.parametrize(
    ("stage", "args", "said"),
    [
        ("--teacher-args", ["--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"],
         "the teacher stage would write no checkpoint for the student stage: enable_checkpointing is false"),
        ("--teacher-args", ['--trainer.callbacks=[{"class_path": "test_pipeline.EveryEpochCheckpoint", "init_args": {"save_top_k": 0}}]'],
         "the teacher stage would write no checkpoint for the student stage: its \\(first\\) ModelCheckpoint saves nothing"),
        ("--student-args", ["--model=lightning_compress.ClassifierModule", "--model.model=lightning_compress.MLP",
                            "--model.model.in_features=64", "--model.model.num_classes=10"],
         "the student stage's model lightning_compress.ClassifierModule takes no teacher_ckpt"),
        # DistillationModule's own options are checked by its constructor, which runs only after the teacher's fit
        ("--student-args", ["--model.init_args.temperature=-1"], "DistillationModule: temperature must be > 0 at every epoch, got -1"),
        ("--student-args", ["--model.init_args.alpha={0: 0.5, 2: 1.5}"], "DistillationModule: alpha must be in \\[0, 1\\] at every epoch, got 1.5"),
        ("--student-args", ["--model.init_args.distill_loss=kld"], "DistillationModule: .*'kld'.*'kl'"),
        ("--student-args", ["--model.init_args.num_classes=1"], "DistillationModule: num_classes must be an integer >= 2 or None \\(read from the logits\\), got 1"),
        ("--student-args", ["--data=lightning_compress.MNISTDataModule", "--data.root=nowhere"],
         "MNISTDataModule: MNIST files missing in folder 'nowhere' \\(which does not exist\\)"),
        ("--student-args", ["--data.init_args.val_fraction=1.5"], "DigitsDataModule: val_fraction must be in \\(0, 1\\), got 1.5"),
    ],
)
def test_stages_that_cannot_chain_fail_before_the_teacher_trains(tmp_path: Path, monkeypatch, stage: str, args: list, said: str) -> None:
    """A teacher that writes no checkpoint failed after its whole fit; a student that is not a distillation module
    failed on an option the user never wrote (teacher_ckpt='teacher.ckpt'). Both are refused before training."""
    from lightning_compress.cli import CommandError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError, match=said):
        main(["--teacher", str(CONFIGS / "teacher.yaml"), "--student", str(CONFIGS / "pipeline.yaml"), stage, *args])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # 20-35 s of two processes or many fits: run with -m slow
@pytest.mark.timeout(660)  # the subprocess's own limit decides
def test_the_pipeline_under_ddp_writes_the_same_artifact_on_every_rank(tmp_path: Path) -> None:
    """strategy='ddp' on 2 CPU processes (Lightning relaunches the command per rank): both stages run on
    both ranks, and each rank's artifact is byte for byte rank 0's."""
    (tmp_path / "configs").symlink_to(CONFIGS)
    exe = Path(sys.executable).with_name("lightning-compress")
    ddp = ["--trainer.enable_progress_bar=false", "--trainer.strategy=ddp", "--trainer.devices=2"]
    result = subprocess.run(
        [str(exe), "pipeline", "--teacher-args", *ddp, "--trainer.max_epochs=2", "--student-args", *ddp, "--trainer.max_epochs=8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = tmp_path / "runs" / "pipeline" / "student.safetensors"
    rank1 = tmp_path / "runs" / "pipeline" / "student.rank1.safetensors"
    assert rank0.read_bytes() == rank1.read_bytes()
    x, _ = _test_split()
    with torch.no_grad():
        assert lc.load(rank0)(x).shape == (len(x), 10)


def test_a_student_that_takes_teacher_ckpt_by_keywords_or_inheritance_is_accepted() -> None:
    """A DistillationModule subclass, or a module forwarding **kwargs, takes teacher_ckpt without naming it; the check
    refused them. Only the first ModelCheckpoint counts: it is the one the teacher's checkpoint is read from."""
    from types import SimpleNamespace

    from lightning_compress.cli import CommandError
    from lightning_compress.pipeline import _check_stages

    def trainer(*checkpoints: dict) -> SimpleNamespace:
        entries = [SimpleNamespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=c) for c in checkpoints]
        return SimpleNamespace(trainer=SimpleNamespace(callbacks=entries, enable_checkpointing=None))

    for student in ("user_project.ForwardingDistillation", "lightning_compress.DistillationModule"):
        _check_stages(trainer({}), SimpleNamespace(model=SimpleNamespace(class_path=student)))
    with pytest.raises(CommandError, match=r"its \(first\) ModelCheckpoint saves nothing"):
        _check_stages(trainer({"save_top_k": 0}, {}), SimpleNamespace(model=SimpleNamespace(class_path="lightning_compress.DistillationModule")))
