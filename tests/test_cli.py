from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import MLP, ClassifierModule
from lightning_compress.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _shrink_config(name: str, tmp_path: Path, max_epochs: int | None = None) -> Path:
    """A copy of configs/<name> (with fewer epochs if given) writing under tmp_path."""
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    if max_epochs is not None:
        config["trainer"]["max_epochs"] = max_epochs
    config["trainer"]["default_root_dir"] = str(tmp_path)
    logger = config["trainer"].get("logger")
    if isinstance(logger, dict):
        logger["init_args"]["save_dir"] = str(tmp_path)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(config))
    return out


def test_quickstart_through_the_console_script(tmp_path: Path) -> None:
    config = _shrink_config("quickstart.yaml", tmp_path)
    exe = Path(sys.executable).with_name("lightning-compress")
    result = subprocess.run(
        [str(exe), "fit", "--config", str(config), "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compression report" in result.stdout
    reports = list(tmp_path.rglob("compression_report.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".png").is_file()
    data = json.loads(reports[0].read_text())
    # the showcase: channels pruned and removed, then int8; accuracy kept
    assert set(data["plugins"]) == {"PruningCallback", "QuantizeCallback"}
    assert data["ratios"]["params"] > 9 and data["ratios"]["size"] > 20
    assert data["compressed"]["metrics"]["val_acc"] > data["baseline"]["metrics"]["val_acc"] - 0.02


def test_cli_in_process_builds_from_class_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    config = _shrink_config("quickstart.yaml", tmp_path)
    cli = cli_main(["--config", str(config)], run=False)
    assert type(cli.model).__name__ == "ClassifierModule"
    assert type(cli.model.model).__name__ == "MLP"
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ == "CompressionReport"]


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_cli_other_subcommands_run(sub: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    config = _shrink_config("quickstart.yaml", tmp_path)
    cli = cli_main([sub, "--config", str(config), "--trainer.enable_progress_bar=false"])
    assert cli.trainer.state.finished


def test_cli_rejects_bad_batch_size(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    config = _shrink_config("quickstart.yaml", tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -4"):
        cli_main(["--config", str(config), "--data.init_args.batch_size=-4"], run=False)


class OwnLoaders(ClassifierModule):
    """A module that brings its own dataloaders: no datamodule anywhere."""

    def __init__(self) -> None:
        super().__init__(MLP(64, (16,), 10))

    def _loader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 64, generator=generator), torch.randint(0, 10, (64,), generator=generator)), batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def test_a_config_without_data_fits_a_module_with_its_own_dataloaders(tmp_path: Path, monkeypatch) -> None:
    """``data`` is optional, as in a plain Trainer.fit(model): the module's own loaders train and validate,
    and a PruningCallback from the same YAML prunes."""
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    config = {
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning_compress.PruningCallback",
                                   "init_args": {"target_sparsity": 0.5, "schedule": "one_shot", "start_epoch": 0}}]},
        "model": {"class_path": f"{__name__}.OwnLoaders"},
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.datamodule is None and cli.trainer.state.finished and "val_acc" in cli.trainer.callback_metrics
    weights = [m.weight for m in cli.model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("target_sparsity", 1.5, "PruningCallback: target_sparsity must be a number in [0, 1), got 1.5"),
        ("structure", "diagonal", "PruningCallback: unknown structure 'diagonal'; valid: ['unstructured', 'channel'"),
    ],
)
def test_the_command_names_a_bad_config_value_in_one_line(key: str, value: object, said: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """A value a callback refuses while the CLI builds it from the YAML: the command prints the callback's
    own message, named, in one line, and exits with status 2, not jsonargparse's kilobytes of traceback.
    The same error from cli_main stays an exception, and an error from anywhere else is not rewritten."""
    from lightning_compress.cli import config_error
    from lightning_compress.cli import console_main

    config = yaml.safe_load(_shrink_config("prune.yaml", tmp_path).read_text())
    config["trainer"]["callbacks"][0]["init_args"][key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["lightning-compress", "fit", "--config", str(bad)])
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "false")  # off: the one line (any set value used to mean on)
    with pytest.raises(SystemExit) as exited:
        console_main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"lightning-compress: error: {said}") and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before training
    with pytest.raises(ValueError) as raised:
        cli_main(["fit", "--config", str(bad)])
    assert (config_error(raised.value) or "").startswith(said)
    assert config_error(ValueError("not from a config")) is None


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"include": ["nonexistent"]}, "PruningCallback: include pattern 'nonexistent' matches no weight to prune"),
        ({"monitor": "val_accuracy"}, "PruningCallback(monitor='val_accuracy'): that metric was never logged"),
    ],
)
def test_a_setting_refused_in_setup_or_the_sanity_check_is_one_line(changes: dict, said: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Refused in the callback's setup or at the sanity check, before any training batch: a 40-line traceback with
    status 1 before; now the one line and status 2 of a value refused while the config is built. A refusal after
    training began keeps its traceback."""
    from lightning_compress.cli import console_main

    config = yaml.safe_load(_shrink_config("prune.yaml", tmp_path, max_epochs=3).read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(changes, start_epoch=1, end_epoch=2)
    config["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["lightning-compress", "fit", "--config", str(bad)])
    with pytest.raises(SystemExit) as exited:
        console_main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and err.startswith(f"lightning-compress: error: {said}"), err
    if "monitor" in changes:  # a name the sanity check cannot tell apart from a training metric: refused after epoch 0
        config["trainer"]["callbacks"][0]["init_args"]["monitor"] = "accuracy"
        bad.write_text(yaml.safe_dump(config))
        with pytest.raises(ValueError, match=r"monitor='accuracy'"):
            console_main()


def test_a_refusal_when_the_fit_starts_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """CompressionReport refuses a manual-optimisation module without an example input in on_fit_start, before any
    training batch: that was a 15-frame traceback with status 1."""
    from lightning_compress.cli import console_main

    monkeypatch.setattr(sys, "argv", [
        "lightning-compress", "fit", "--model=test_report._ManualModule", "--data=lightning_compress.DigitsDataModule",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=lightning_compress.CompressionReport",
    ])
    with pytest.raises(SystemExit) as exited:
        console_main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("lightning-compress: error: CompressionReport needs to run training_step"), err


@pytest.mark.parametrize(
    ("name", "plugin"),
    [
        ("prune.yaml", "PruningCallback"),
        ("prune_channels.yaml", "PruningCallback"),
        ("qat.yaml", "QuantizeCallback"),
        ("ptq.yaml", "QuantizeCallback"),
        ("qat_cnn_4bit.yaml", "QuantizeCallback"),
    ],
)
def test_plugin_configs_run_as_they_are(name: str, plugin: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    config = _shrink_config(name, tmp_path)  # same epochs and schedule, output under tmp_path
    cli = cli_main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "CompressionReport").report
    assert plugin in report["plugins"]
    # every config compresses: fewer non-zero weights or fewer bytes than the baseline
    assert report["ratios"]["nonzero_params"] > 1.2 or report["ratios"]["size"] > 3
    if name == "qat_cnn_4bit.yaml":  # BatchNorm statistics recomputed with the 4-bit weights at the end
        assert report["plugins"]["QuantizeCallback"]["bn_reestimated"]["layers"] == 4
    if name in ("qat.yaml", "ptq.yaml"):  # the converted model is written where the config says
        import torch

        from lightning_compress import MLP, load, load_for_cpu, load_quantized

        quant = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "QuantizeCallback")
        log_dir = Path(cli.trainer.log_dir)
        assert report["plugins"]["QuantizeCallback"]["saved_to"]["path"] == str(log_dir / "model_int8.safetensors")
        x = torch.randn(7, 64)
        with torch.no_grad():
            ref = quant.quantized_model(x)
            torch.testing.assert_close(load_quantized(MLP(64, [256, 128], 10), log_dir / "model_int8.safetensors")(x), ref, atol=0, rtol=0)
        if name == "qat.yaml":  # and the serving package, from any batch size, of the images the step passes
            torch.testing.assert_close(load_for_cpu(log_dir / "model_int8.pt2")(x.view(7, 1, 8, 8)), ref, atol=1e-5, rtol=1e-5)
        else:  # and the ONNX file, run in onnxruntime
            assert report["plugins"]["QuantizeCallback"]["exported_to"]["format"] == "onnx"
            x = torch.randn(200, 64)
            ref, onnx_out = quant.quantized_model(x), load(log_dir / "model_int8.onnx")(x.view(200, 1, 8, 8))
            assert ((onnx_out - ref).abs().amax(1) <= 2e-3 * ref.abs().max()).float().mean() >= 0.99


def test_a_missing_file_the_model_needs_is_named_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """configs/distill.yaml before the teacher was trained: the module's FileNotFoundError, not 80 lines of
    jsonargparse around it."""
    from lightning_compress.cli import console_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-compress", "fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "distill.yaml")])
    with pytest.raises(SystemExit) as exited:
        console_main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("lightning-compress: error: DistillationModule: teacher_ckpt 'runs/teacher/digits_teacher.ckpt' not found")


def test_check_command_builds_a_callbacks_nested_classes(tmp_path: Path) -> None:
    """A criterion given by class path inside a callback (as docs/pruning.md shows) is built before the callback,
    as the parser builds it; check_command refused it as a dict."""
    from lightning_compress.cli import check_command

    config = yaml.safe_load(_shrink_config("prune.yaml", tmp_path).read_text())
    config["trainer"]["callbacks"][0]["init_args"]["criterion"] = {
        "class_path": "lightning_compress.pruning.Wanda", "init_args": {"calibration_batches": 8}
    }
    path = tmp_path / "wanda.yaml"
    path.write_text(yaml.safe_dump(config))
    check_command(["fit", "--config", str(path)])
    config["trainer"]["callbacks"][0]["init_args"]["criterion"]["init_args"]["calibration_batches"] = 0
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="PruningCallback: wanda criterion needs calibration_batches >= 1, got 0"):
        check_command(["fit", "--config", str(path)])


_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["sweep", "--spec", "missing.yaml"], "no config at 'missing.yaml'"),
        (["sweep", "--spec", str(_CONFIGS / "sweep.yaml")], "sweep spec: no config at 'configs/quickstart.yaml', read from the current directory"),
        (["tune", "--config", str(_CONFIGS / "quickstart.yaml")], "nothing to tune: pass --lr-find and/or --batch-size {power,binsearch}"),
        (["tune", "--config", str(_CONFIGS / "quickstart.yaml"), "--lr-find", "--lr-key", "model.nope"], "key 'model.nope': ClassifierModule has no argument 'nope'"),
        (["sensitivity", "--config", str(_CONFIGS / "sensitivity.yaml"), "--bits", "3,x"], "--bits must be comma-separated integers, got '3,x'"),
        (["sensitivity", "--config", str(_CONFIGS / "sensitivity.yaml"), "--ckpt_path", "gone.ckpt"], "--ckpt_path 'gone.ckpt': no checkpoint there"),
        (["pipeline"], "no config at 'configs/teacher.yaml'"),
        (["pipeline", "--export-to", "s.onnx", "--onnx-tolerance", "-1"], r"onnx_tolerance must be a number in (0, 1), got -1.0"),
    ],
)
def test_the_extra_commands_refuse_bad_settings_in_one_line(args: list[str], said: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """sweep, tune, sensitivity and pipeline check their settings before anything runs and print what is wrong in
    one line with status 2, as fit does, instead of a traceback around it (pipeline's exited 1); nothing is written."""
    from lightning_compress.cli import console_main

    monkeypatch.chdir(tmp_path)  # the spec's relative config path is read from here: it is not found
    monkeypatch.setattr(sys, "argv", ["lightning-compress", *args])
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        console_main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"lightning-compress: error: {said}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_an_error_of_the_users_own_code_keeps_its_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    """settings_checked one-lines what this library refuses; a ValueError raised by the user's module (imported to
    check a key) keeps its traceback, pointing at the user's line."""
    from lightning_compress.cli import CommandError, settings_checked
    from lightning_compress.tuning.config import load_config

    with pytest.raises(CommandError, match=r"no config at 'x\.yaml'") as refused, settings_checked():
        load_config("x.yaml")
    assert isinstance(refused.value.__cause__, FileNotFoundError)
    (tmp_path / "broken_user_model.py").write_text('WIDTH = int("64px")\n')
    (tmp_path / "cfg.yaml").write_text("model:\n  class_path: broken_user_model.Model\ntrainer: {max_epochs: 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from lightning_compress.tuning.tune import main as tune

    with pytest.raises(ValueError, match=r"invalid literal for int\(\) with base 10: '64px'") as raised:
        tune(["--config", "cfg.yaml", "--lr-find", "--lr-key", "model.width"])
    assert not isinstance(raised.value, CommandError)


def test_python_dash_m_runs_this_librarys_subcommands(tmp_path: Path) -> None:
    """`python -m lightning_compress.cli` knew LightningCLI's subcommands only (no pipeline, sweep, tune, sensitivity);
    a subcommand's refusal is the same one line (exit 2) as from the console script."""
    result = subprocess.run([sys.executable, "-m", "lightning_compress", "sweep", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "usage: lightning-compress sweep" in result.stdout, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "lightning_compress.cli", "tune", "--config", str(ROOT / "configs" / "quickstart.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    said = result.stderr.strip().splitlines()
    assert result.returncode == 2 and said[-1] == "lightning-compress: error: nothing to tune: pass --lr-find and/or --batch-size {power,binsearch}", said


def test_an_option_is_taken_by_its_whole_name_only(tmp_path: Path, monkeypatch, capsys) -> None:
    """argparse's prefix matching took --trainer.max_step=5 for --trainer.max_steps and trained 5 steps; a misspelt
    option (a prefix of a real one, or of --config) is refused before anything runs, the real one still works."""
    config = _shrink_config("prune.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    for args, wrong in ((["--config", str(config), "--trainer.max_step=5"], "--trainer.max_step=5"), (["--conf", str(config)], "--conf")):
        with pytest.raises(SystemExit):
            cli_main(["fit", *args, "--print_config"])
        assert "unrecognized arguments: " + wrong in capsys.readouterr().err
    with pytest.raises(SystemExit) as printed:
        cli_main(["fit", "--config", str(config), "--trainer.max_steps=5", "--print_config"])
    assert printed.value.code == 0 and "max_steps: 5" in capsys.readouterr().out
    from lightning_compress.cli import check_command  # the pipeline's check before its teacher trains

    with pytest.raises(SystemExit):
        check_command(["fit", "--config", str(config), "--trainer.max_step=5"])
    assert "unrecognized arguments: --trainer.max_step=5" in capsys.readouterr().err


@pytest.mark.parametrize("command, required, abbreviated", [
    ("sweep", ["--spec", "sweep.yaml"], ["--tri", "3"]),
    ("tune", ["--config", "x.yaml"], ["--lr-f"]),
    ("sensitivity", ["--config", str(ROOT / "configs" / "quickstart.yaml")], ["--monit", "val_loss"]),  # the rest goes to LightningCLI
    ("pipeline", [], ["--teach", "configs/teacher.yaml"]),
])
def test_the_library_commands_take_options_by_their_whole_name_only(command: str, required: list[str], abbreviated: list[str],
                                                                    capsys) -> None:
    """sweep, tune, sensitivity and pipeline parse their own options, as the LightningCLI subcommands do: a prefix of
    an option is refused, not read as the option."""
    import importlib

    from lightning_compress.cli import EXTRA_SUBCOMMANDS

    with pytest.raises(SystemExit) as refused:
        importlib.import_module(EXTRA_SUBCOMMANDS[command]).main([*required, *abbreviated])
    assert refused.value.code == 2
    assert f"unrecognized arguments: {abbreviated[0]}" in capsys.readouterr().err


def test_a_misspelt_subcommand_lists_every_subcommand(monkeypatch, capsys) -> None:
    """`lightning-compress pipline` was answered with LightningCLI's own choices (fit, validate, test, predict), without
    this library's commands."""
    from lightning_compress.cli import console_main

    monkeypatch.setattr(sys, "argv", ["lightning-compress", "pipline", "--config", "x.yaml"])
    with pytest.raises(SystemExit) as exited:
        console_main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2
    assert err == ("lightning-compress: error: unknown subcommand 'pipline'; valid choices: 'fit', 'validate', 'test', "
                   "'predict', 'pipeline', 'sweep', 'tune', 'sensitivity'")
