"""``lightning-compress sweep``: real trials on digits, a Pareto front whose configs reproduce, resume,
two workers on one SQLite study, seeds, early stopping, and bad specs refused before any trial."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="the [sweep] extra (optuna) is not installed")

from lightning_compress.cli import cli_main  # noqa: E402
from lightning_compress.tuning.config import load_config  # noqa: E402
from lightning_compress.tuning.results import mean_se  # noqa: E402
from lightning_compress.tuning.space import load_spec, parse_constraint  # noqa: E402
from lightning_compress.tuning.sweep import BoundPruner, TrialSeededSampler, check_space_values, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def spec_dict(tmp_path: Path, **changes) -> dict:
    spec = {
        "config": str(ROOT / "configs" / "prune.yaml"),
        "study": "t",
        "out": str(tmp_path / "sweep"),
        "trials": 3,
        "objectives": {"artifact_bytes": "minimize"},
        "constraints": ["val_acc >= 0.5"],
        "space": {"PruningCallback.target_sparsity": {"low": 0.5, "high": 0.95}, "model.optimizer.lr": [0.05, 0.1]},
        "overrides": {"trainer.max_epochs": 3, "trainer.limit_train_batches": 8, "trainer.limit_val_batches": 3,
                      "PruningCallback.start_epoch": 1, "PruningCallback.end_epoch": 2,
                      "PruningCallback.verbose": False, "trainer.callbacks.1": None, "trainer.enable_checkpointing": False},
    }
    spec.update(changes)
    return spec


def finished(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def test_sweep_writes_a_front_whose_configs_reproduce(tmp_path: Path, monkeypatch) -> None:
    result = run_sweep(load_spec(spec_dict(tmp_path)))
    study, front, files = result["study"], result["front"], result["files"]
    assert len(finished(study)) == 3 and front
    for t in finished(study):
        m = t.user_attrs["metrics"]
        assert m["artifact_bytes"] == os.path.getsize(Path(t.user_attrs["config"]).parent / "model.safetensors")
        assert m["parameters"] < 64 * 256 + 256 * 128 + 128 * 10  # pruned: fewer non-zero weights than the dense MLP
    # the front: feasible, non-dominated, best (smallest) first
    sizes = [t.user_attrs["metrics"]["artifact_bytes"] for t in front]
    assert sizes == sorted(sizes) and all(t.user_attrs["metrics"]["val_acc"] >= 0.5 for t in front)
    with open(files["pareto_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == [t.number for t in front]
    assert Path(files["pareto_png"]).stat().st_size > 0 and "Pareto front" in Path(files["pareto_md"]).read_text()
    # a front member's YAML is an ordinary config, run as written: it gives the same metric (deterministic: true) and
    # writes where the base config writes, not into the trial's folder (whose logs it overwrote)
    best = front[0]
    trial_dir = Path(best.user_attrs["config"]).parent
    before = {p: p.read_bytes() for p in trial_dir.rglob("*") if p.is_file()}
    assert str(trial_dir) not in Path(rows[0]["config"]).read_text()
    (tmp_path / "again").mkdir()
    monkeypatch.chdir(tmp_path / "again")
    cli = cli_main(["fit", "--config", rows[0]["config"]])
    assert float(cli.trainer.callback_metrics["val_acc"]) == pytest.approx(best.user_attrs["metrics"]["val_acc"], abs=0)
    assert {p: p.read_bytes() for p in trial_dir.rglob("*") if p.is_file()} == before
    assert Path(cli.trainer.log_dir).resolve().is_relative_to(tmp_path / "again")


def test_resume_adds_only_the_missing_trials(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(tmp_path))
    first = run_sweep(spec, trials=2)["study"]
    before = {t.number: t.params for t in finished(first)}
    assert len(before) == 2
    study = run_sweep(spec, trials=3)["study"]
    after = {t.number: t.params for t in finished(study)}
    assert len(after) == 3 and all(after[n] == p for n, p in before.items())
    assert after[2] not in before.values()  # the resumed study samples a new config, not trial 0's again


def test_sampler_is_reproducible_and_each_process_samples_new_configs() -> None:
    """One uninterrupted study samples the same values for the same seed; a second sampler (a resumed study,
    another worker) on the same study continues with new ones, past TPE's ten random start-up trials too."""

    def xs(study) -> list[float]:
        return [t.params["x"] for t in study.trials]

    def run(study, n: int) -> None:
        study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=n)

    one = optuna.create_study(sampler=TrialSeededSampler(0))
    run(one, 12)
    same = optuna.create_study(sampler=TrialSeededSampler(0))
    run(same, 12)
    assert xs(one) == xs(same)
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=TrialSeededSampler(0))
    run(first, 6)
    resumed = optuna.load_study(storage=storage, study_name="s", sampler=TrialSeededSampler(0))
    run(resumed, 6)
    assert xs(resumed)[:6] == xs(one)[:6] and len(set(xs(resumed))) == 12
    other = optuna.create_study(sampler=TrialSeededSampler(1))
    run(other, 2)
    assert xs(other) != xs(one)[:2]


@pytest.mark.slow  # 20-35 s of two processes or many fits: run with -m slow
def test_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(tmp_path, trials=4)))
    # the probe runs once here, so the two workers do not race to create the study
    run_sweep(load_spec(spec_path), trials=1)
    cmd = [sys.executable, "-c", "import sys; from lightning_compress.tuning.sweep import main; main(sys.argv[1:])",
           "--spec", str(spec_path)]
    workers = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    trials = finished(study)
    assert 4 <= len(trials) <= 5  # each worker stops once the study holds 4; one may finish its last trial as well
    assert len({t.user_attrs["worker"] for t in trials[1:]}) == 2  # both workers ran trials of the same study


def test_seeds_report_mean_and_standard_error(tmp_path: Path) -> None:
    """Each seed re-run sets seed_everything and keeps the data module's own seed, which chooses the validation split
    (every seed is measured on the trial's split); the re-run is built from the trial's stored values."""
    result = run_sweep(load_spec(spec_dict(tmp_path, trials=2)), seeds=2)
    member = result["front"][0].number
    for seed in (0, 1):
        config = load_config(tmp_path / "sweep" / "seeds" / f"{member:04d}" / f"seed{seed}" / "config.yaml")
        assert config["seed_everything"] == seed and config["data"]["init_args"].get("seed", 0) == 0
    rows = result["seeds"]
    assert {r["seed"] for r in rows} == {0, 1} and {r["trial"] for r in rows} == {t.number for t in result["front"]}
    runs = [r["val_acc"] for r in rows if r["trial"] == result["front"][0].number]
    mean, se = mean_se(runs)
    assert se == pytest.approx(abs(runs[0] - runs[1]) / 2)  # two seeds: s.e. = |a - b| / 2
    assert f"{mean:.4g} ± {se:.4g}" in Path(result["files"]["seeds_md"]).read_text()


def test_seed_tables_follow_the_current_front(tmp_path: Path) -> None:
    """A resumed sweep without --seeds whose front changed (a stricter constraint) does not leave the seed tables of
    the earlier front; when the member is on the front again, its re-runs on record are summarised again."""
    loose = spec_dict(tmp_path, trials=1, constraints=["val_acc >= 0.0"])
    first = run_sweep(load_spec(loose), seeds=2)
    member = first["front"][0].number
    table = (tmp_path / "sweep" / "seeds.md").read_text()
    assert f"| {member} | 2 |" in table
    strict = run_sweep(load_spec(spec_dict(tmp_path, trials=1, constraints=["val_acc >= 1.01"])))
    assert strict["front"] == [] and strict["seeds"] is None
    assert not (tmp_path / "sweep" / "seeds.md").exists() and not (tmp_path / "sweep" / "seeds.csv").exists()
    with open(tmp_path / "sweep" / "seed_runs.csv") as f:
        assert sorted((int(r["trial"]), int(r["seed"])) for r in csv.DictReader(f)) == [(member, 0), (member, 1)]
    again = run_sweep(load_spec(loose))
    assert [t.number for t in again["front"]] == [member]
    assert (tmp_path / "sweep" / "seeds.md").read_text() == table


def test_trials_missing_the_constraint_stop_early(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(tmp_path, trials=2, constraints=["val_acc >= 0.999"], pruner={"warmup_epochs": 1}))
    study = run_sweep(spec)["study"]
    states = [t.state for t in finished(study)]
    assert states == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [0] for t in finished(study))  # reported from epoch 1, stopped there
    with open(tmp_path / "sweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["state"], r["error"]) for r in rows] == [("pruned", "")] * 2  # stopped by the pruner, not failed


def test_every_validation_of_a_step_based_trial_is_reported(tmp_path: Path) -> None:
    """Optuna's callback reported at step=current_epoch: with max_steps and val_check_interval every validation but
    the first of an epoch was dropped ("this step=0 is already reported"), and the validation after the fit was
    reported as one more step, pruning a trial that had finished training. Every validation of the fit is reported
    now, in order (4 of them, at steps 4, 8, 12 and 16)."""
    overrides = {**spec_dict(tmp_path)["overrides"], "trainer.max_epochs": None, "trainer.max_steps": 16,
                 "trainer.val_check_interval": 4, "trainer.limit_train_batches": None}
    spec = load_spec(spec_dict(tmp_path, trials=1, constraints=["val_acc >= 0.0"], pruner={"warmup_epochs": 0},
                               overrides=overrides, space={"PruningCallback.target_sparsity": [0.5]}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is already reported.*")
        study = run_sweep(spec)["study"]
    (trial,) = finished(study)
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert list(trial.intermediate_values) == [0, 1, 2, 3]


def test_a_step_budget_that_ends_before_the_pruners_warm_up_is_said(tmp_path: Path) -> None:
    """The spec's check compares warmup_epochs with max_epochs; a max_steps fit that ends inside epoch 0 reported
    nothing with warmup_epochs=1, in silence, so no trial of the study could be stopped. It is said when training
    starts; a warm-up the fit reaches is not."""
    from lightning_compress import ClassifierModule, DigitsDataModule
    from lightning_compress.models import MLP
    from lightning_compress.tuning.sweep import ValidationReports

    class Trial:
        def __init__(self) -> None:
            self.values: list[float] = []

        def report(self, value: float, step: int) -> None:
            self.values.append(value)

        def should_prune(self) -> bool:
            return False

    def fit(max_steps: int, warmup: int) -> tuple[Trial, list[str]]:
        trial = Trial()
        trainer = L.Trainer(max_steps=max_steps, val_check_interval=4, callbacks=[ValidationReports(trial, "val_acc", warmup)],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, default_root_dir=tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(ClassifierModule(MLP(64, (16,), 10)), datamodule=DigitsDataModule(batch_size=64))
        return trial, [str(w.message) for w in caught if "sweep pruner" in str(w.message)]

    trial, said = fit(max_steps=8, warmup=1)  # 20 batches an epoch
    assert trial.values == []
    assert len(said) == 1 and "max_steps=8 ends the fit in epoch 0 (20 steps an epoch), before the pruner's warmup_epochs=1" in said[0]
    trial, said = fit(max_steps=24, warmup=1)
    assert len(trial.values) == 1 and said == []


def test_front_checks_the_constraints_of_the_current_spec(tmp_path: Path) -> None:
    """A resumed study with a changed constraint judges every trial's stored metrics by the new one."""
    loose = run_sweep(load_spec(spec_dict(tmp_path, trials=1, constraints=["val_acc >= 0.0"])))
    assert len(loose["front"]) == 1

    def meets() -> list[str]:
        with open(tmp_path / "sweep" / "trials.csv") as f:
            return [row["meets constraints"] for row in csv.DictReader(f)]

    assert meets() == ["True"]
    strict = run_sweep(load_spec(spec_dict(tmp_path, trials=1, constraints=["val_acc >= 1.01"])))
    assert len(finished(strict["study"])) == 1  # no new trial: only the judgement changed
    assert strict["front"] == [] and meets() == ["False"]
    assert list((tmp_path / "sweep" / "pareto").glob("*.yaml")) == []  # the first front's member is no longer one
    assert "0 of 1 complete trials" in Path(strict["files"]["pareto_md"]).read_text()


def test_pruner_stops_only_while_the_best_value_misses_the_bound() -> None:
    """A dip below the bound after the metric met it does not stop a trial (its final value may meet it again);
    a trial whose best value since the warm-up step misses it is stopped from that step on."""
    study = optuna.create_study(direction="minimize", pruner=BoundPruner(parse_constraint("val_acc >= 0.95"), warmup_steps=1))

    def decisions(values: list[float]) -> list[bool]:
        trial = study.ask()
        out = []
        for step, value in enumerate(values):
            trial.report(value, step)
            out.append(trial.should_prune())
        return out

    assert decisions([0.50, 0.96, 0.90, 0.97]) == [False, False, False, False]  # dipped at epoch 2, met the bound at 1
    assert decisions([0.50, 0.90, 0.96]) == [False, True, False]  # warm-up step 0 is never judged
    assert decisions([0.99, 0.90]) == [False, True]  # nor counted: a dense epoch met it before compression began
    low = optuna.create_study(pruner=BoundPruner(parse_constraint("val_loss <= 0.5")))
    trial = low.ask()
    trial.report(0.4, 0)
    trial.report(0.8, 1)
    assert not trial.should_prune()  # for <=, the best is the lowest
    with pytest.raises(ValueError, match="needs an absolute constraint"):
        BoundPruner(parse_constraint("val_loss <= 1.1 * baseline"))


def test_constraint_relative_to_the_dense_baseline(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(tmp_path, trials=1, constraints=["val_loss <= 3 * baseline"]))
    study = run_sweep(spec)["study"]
    baseline = study.user_attrs["baseline"]
    assert baseline["parameters"] == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10  # dense: no callback pruned it
    trial = finished(study)[0]
    assert trial.user_attrs["violations"] == [pytest.approx(trial.user_attrs["metrics"]["val_loss"] - 3 * baseline["val_loss"])]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"space": {"PruningCallback.sparsity": {"low": 0.1, "high": 0.9}}}, "PruningCallback has no argument 'sparsity'"),
        ({"space": {"QuantizeCallback.weight_bits": [4, 8]}}, "no class 'QuantizeCallback' in the config"),
        ({"space": {"model.optimizer.lr": {"low": 0.1, "high": 0.01}}}, "needs finite numbers low < high"),
        # Optuna's OverflowError at the first trial, after the probe fit had trained
        ({"space": {"model.optimizer.lr": {"low": 0.001, "high": float("inf")}}}, r"needs finite numbers low < high, got low=0.001 high=inf"),
        ({"space": {"model.optimizer.lr": {"low": float("nan"), "high": 0.1}}}, r"needs finite numbers low < high, got low=nan"),
        # float()'s own message, which named neither the constraint nor its form
        ({"constraints": ["val_acc >= 0.9.5"]}, r"constraint 'val_acc >= 0.9.5': '0.9.5' is not a finite number; write 'metric OP number'"),
        ({"constraints": ["val_acc >= 1e"]}, r"constraint 'val_acc >= 1e': '1e' is not a finite number"),
        # taken as they were: an empty study name, a storage of 3, and out=3 a raw TypeError
        ({"study": ""}, r"study must be a name \(a non-empty string\), got ''"),
        ({"storage": 3}, r"storage must be an Optuna storage URL or None \(a non-empty string\), got 3"),
        ({"out": True}, r"out must be a folder path or None \(a non-empty string\), got True"),
        ({"objectives": {"artifact_bytes": "smallest"}}, r"direction 'smallest'; valid: \['minimize', 'maximize'\]"),
        ({"constraints": ["val_acc ~ 0.9"]}, "is not 'metric OP number'"),
        ({"budget": 3}, r"unknown field\(s\) \['budget'\]"),
        ({"overrides": {"trainer.strategy": "ddp", "trainer.devices": 2}}, "run one sweep worker per device on one storage"),
        # strategy auto on two devices is DDP: every process ran the sweep loop, and every trial failed to copy its model
        ({"overrides": {"trainer.devices": 2}}, r"sweep runs its fits in its own process on one device, and the config asks for devices=2"),
        ({"pruner": {"warmup_epochs": 1}, "objectives": ["artifact_bytes", "latency_ms"]}, "single-objective studies only"),
        ({"space": {"trainer.max_epochs": {"low": 1, "high": 8, "step": 2, "log": True}}},
         r"space\['trainer.max_epochs'\]: Optuna takes no step with log: true .* got step=2"),
        ({"space": {"model.optimizer.lr": {"low": 0.01, "high": 0.1, "step": 0.01, "log": True}}}, "takes no step with log"),
        ({"space": {"PruningCallback.target_sparsity": {"low": 0.5, "high": 0.95, "step": 0.1}}},
         r"step=0.1 does not divide high - low = 0.95 - 0.5"),
        ({"space": {"trainer.max_epochs": {"low": 1, "high": 5, "step": 0}}}, "step must be a positive number, got 0"),
        ({"space": {"model.optimizer.lr": {"low": 0.01, "high": 0.1, "log": "yes"}}}, "log must be true or false, got 'yes'"),
        ({"pruner": {"warmup_epochs": 1}, "constraints": ["val_loss <= 2 * baseline"]},
         r"pruner: needs an absolute constraint on a metric the run logs per epoch .* \['val_loss <= 2 \* baseline'\]"),
        ({"pruner": {"warmup_epochs": 1, "monitor": "val_loss"}}, r"monitor 'val_loss' needs an absolute constraint on it"),
        ({"pruner": {"warmup_epochs": 1, "monitor": "artifact_bytes"}, "constraints": ["artifact_bytes <= 50000"]},
         "monitor 'artifact_bytes' is measured once on the final model"),
        ({"pruner": {"warmup_epochs": -1}}, "warmup_epochs must be an integer >= 0, got -1"),
        ({"objectives": ["val_acc", "pruning/sparsity"]}, r"cannot tell whether to minimize or maximize 'pruning/sparsity'"),
        ({"sampler_seed": "abc"}, "sampler_seed must be an integer >= 0, got 'abc'"),
        ({"pruner": {"warmup_epochs": 3}}, r"warmup_epochs=3 is not below trainer.max_epochs=3, so the pruner could never stop"),
    ],
)
def test_bad_specs_are_refused_on_reading(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_spec(spec_dict(tmp_path, **changes))
    assert not (tmp_path / "sweep").exists()  # refused before the storage is opened


def test_a_learning_rate_a_one_cycle_schedule_replaces_is_not_swept(tmp_path: Path) -> None:
    """configs/lm_dense.yaml's OneCycleLR sets the rate from max_lr: trials differing in the optimizer's lr would all
    train alike. Its max_lr is what to sweep."""
    lm = str(ROOT / "configs" / "lm_dense.yaml")
    with pytest.raises(ValueError, match=r"space key 'model.optimizer.lr': the config's OneCycleLR at 'model.init_args.scheduler' "
                                         r"sets the learning rate .* name model.init_args.scheduler.init_args.max_lr instead"):
        load_spec(spec_dict(tmp_path, config=lm, objectives={"val_loss": "minimize"}, constraints=[], overrides={},
                            space={"model.optimizer.lr": [1e-3, 3e-3]}))
    spec = load_spec(spec_dict(tmp_path, config=lm, objectives={"val_loss": "minimize"}, constraints=[], overrides={},
                               space={"model.scheduler.max_lr": [1e-3, 3e-3]}))
    assert spec.space[0].key.key == "model.scheduler.max_lr"
    # the trials' overrides take the schedule out, or put one in that scales the lr: the lr is searched
    for scheduler in (None, {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 10}}):
        spec = load_spec(spec_dict(tmp_path, config=lm, objectives={"val_loss": "minimize"}, constraints=[],
                                   overrides={"model.scheduler": scheduler}, space={"model.optimizer.lr": [1e-3, 3e-3]}))
        assert spec.space[0].key.key == "model.optimizer.lr"


def test_a_direction_the_metric_name_contradicts_is_warned_about(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"objectives\['val_loss'\]: 'val_loss' is to maximize, but its name says it is a metric to minimize"):
        load_spec(spec_dict(tmp_path, objectives={"val_loss": "maximize"}))


def test_a_range_yaml_reads_as_strings_is_read_as_numbers(tmp_path: Path) -> None:
    """``1e-4`` (no dot) is a string to YAML 1.1, a number to LightningCLI: the space reads it as the number."""
    raw = yaml.safe_load("space: {model.optimizer.lr: {low: 1e-4, high: 1e-1, log: true}}")
    assert raw["space"]["model.optimizer.lr"]["low"] == "1e-4"
    param = load_spec(spec_dict(tmp_path, space=raw["space"])).space[0]
    assert (param.low, param.high, param.log) == (1e-4, 0.1, True)
    choices = yaml.safe_load("space: {model.optimizer.lr: [1e-4, 1e-3]}")["space"]
    assert load_spec(spec_dict(tmp_path, space=choices)).space[0].choices == (1e-4, 1e-3)


def test_list_objectives_take_their_direction_from_known_names(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(tmp_path, objectives=["val_f1", "val_auroc", "val/mAP", "val_r2", "val_loss", "test_err",
                                                     "val_ppl", "latency_ms", "artifact_bytes"]))
    assert spec.objectives == {
        "val_f1": "maximize", "val_auroc": "maximize", "val/mAP": "maximize", "val_r2": "maximize", "val_loss": "minimize",
        "test_err": "minimize", "val_ppl": "minimize", "latency_ms": "minimize", "artifact_bytes": "minimize",
    }


@pytest.mark.parametrize("name", ["val_acc_drop", "acc_gap", "val_f1_std", "val_auc_delta"])
def test_a_change_or_spread_of_a_metric_has_no_direction_from_its_name(tmp_path: Path, name: str) -> None:
    """val_acc_drop was maximised in list form, and {val_acc_drop: minimize} warned that its name says maximize: the
    drop, gap, spread or change of an accuracy is not an accuracy. The direction must be given, and is not doubted."""
    with pytest.raises(ValueError, match=rf"cannot tell whether to minimize or maximize '{name}' from its name"):
        load_spec(spec_dict(tmp_path, objectives=[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_spec(spec_dict(tmp_path, objectives={name: "minimize"})).objectives == {name: "minimize"}


def test_pruner_monitors_the_first_constraint_on_a_logged_metric(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(tmp_path, constraints=["artifact_bytes <= 50000", "val_acc >= 0.5"], pruner={"warmup_epochs": 1}))
    assert spec.pruner_monitor == "val_acc" and str(spec.pruner_constraint) == "val_acc >= 0.5"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"PruningCallback.target_sparsity": [0.5, 1.5]}, r"space\['PruningCallback.target_sparsity'\]: the value 1.5 is refused: "
                                                        r"PruningCallback: target_sparsity"),
        ({"trainer.max_epochs": {"low": 1.0, "high": 3.0}}, r"space\['trainer.max_epochs'\]: the value 1.0 is refused: .*max_epochs"),
    ],
)
def test_space_values_a_class_refuses_fail_before_any_trial(tmp_path: Path, space: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_sweep(load_spec(spec_dict(tmp_path, space=space)))
    assert not (tmp_path / "sweep" / "trials").exists()


def test_a_value_refused_only_beside_the_base_value_of_another_searched_key_passes(tmp_path: Path) -> None:
    """start_epoch=4 is refused beside the base end_epoch=2, but end_epoch is searched too (5 or 6), and
    start_epoch=4 builds with those: the space is valid. A value no combination takes is still refused."""
    space = {"PruningCallback.start_epoch": [1, 4], "PruningCallback.end_epoch": [5, 6]}
    check_space_values(load_spec(spec_dict(tmp_path, space=space, overrides={**spec_dict(tmp_path)["overrides"], "trainer.max_epochs": 8})))
    with pytest.raises(ValueError, match=r"space\['PruningCallback.start_epoch'\]: the value 7 is refused: PruningCallback: end_epoch"):
        check_space_values(load_spec(spec_dict(tmp_path, space={**space, "PruningCallback.start_epoch": [1, 7]})))


def test_a_sweep_whose_trials_all_fail_says_why(tmp_path: Path) -> None:
    """A value that builds but fails once training starts: every trial fails, and the sweep says why."""
    spec = load_spec(spec_dict(tmp_path, trials=2, space={"PruningCallback.exclude": ["no_such_layer"]}))
    with pytest.raises(RuntimeError, match=r"all 2 trial\(s\) of study 't' failed, none completed \(each one's reason is in "
                       r".*trials.csv\); the first, trial 0 .*no_such_layer"):
        run_sweep(spec)
    with open(tmp_path / "sweep" / "trials.csv") as f:  # written before the error that points to it
        assert ["no_such_layer" in row["error"] for row in csv.DictReader(f)] == [True, True]
    # the fix changes a searched list, which Optuna refuses under the same parameter name: the failed study is replaced
    fixed = run_sweep(load_spec(spec_dict(tmp_path, trials=1, space={"PruningCallback.exclude": ["model.net.1"]})))
    assert [t.state.name for t in fixed["study"].get_trials(deepcopy=False)] == ["COMPLETE"]


def test_unlogged_metric_and_bad_storage_fail_before_any_trial(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(tmp_path, constraints=["val_f1 >= 0.9"]))
    with pytest.raises(ValueError, match=r"no run logs \['val_f1'\]: the metrics available are \[.*'val_acc'"):
        run_sweep(spec)
    assert not (tmp_path / "sweep" / "trials").exists()
    bad = load_spec(spec_dict(tmp_path, storage=f"sqlite:///{tmp_path}/missing/dir/study.db"))
    with pytest.raises(ValueError, match="cannot open the study storage 'sqlite:///"):
        run_sweep(bad)
    with pytest.raises(ValueError, match="cannot open the study storage 'nosuchdb://"):
        run_sweep(load_spec(spec_dict(tmp_path, storage="nosuchdb://x")))


def test_constraint_parsing() -> None:
    c = parse_constraint("val_ppl <= 1.05 * baseline")
    assert (c.metric, c.op, c.value, c.relative) == ("val_ppl", "<=", 1.05, True)
    assert c.violation({"val_ppl": 10.0}, {"val_ppl": 10.0}) == pytest.approx(-0.5)
    assert parse_constraint("val_acc >= 0.97").violation({"val_acc": math.nan}, None) == math.inf  # NaN never meets it
    # a strict bound is missed at equality, a non-strict one met
    assert parse_constraint("val_acc > 0.5").violation({"val_acc": 0.5}, None) > 0
    assert parse_constraint("val_loss < 0.3").violation({"val_loss": 0.3}, None) > 0
    assert parse_constraint("val_acc >= 0.5").violation({"val_acc": 0.5}, None) == 0
    assert BoundPruner(parse_constraint("val_acc > 0.5")).misses([0.4, 0.5]) and not BoundPruner(parse_constraint("val_acc > 0.5")).misses([0.51])


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_mnist.yaml"])
def test_shipped_specs_are_valid(name: str) -> None:
    spec = load_spec(ROOT / "configs" / name)
    assert spec.constraints and spec.space


def test_shipped_digits_recipe_runs(tmp_path: Path) -> None:
    """configs/sweep.yaml as shipped, cut to one trial of a few batches per epoch."""
    raw = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    raw["overrides"].update({"trainer.limit_train_batches": 3, "trainer.limit_val_batches": 2, "trainer.enable_checkpointing": False})
    raw.update(trials=1, out=str(tmp_path / "out"), constraints=["val_acc >= 0.0"])
    result = run_sweep(load_spec(raw))
    (trial,) = result["front"]
    assert trial.user_attrs["metrics"]["artifact_bytes"] > 0
    assert set(trial.params) == {"PruningCallback.target_sparsity", "QuantizeCallback.weight_bits", "model.optimizer.lr"}


def test_without_optuna_the_command_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the [sweep] extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'lightning-compress\[sweep\]'"):
        run_sweep(load_spec(spec_dict(tmp_path)))


def test_command_line_sets_overrides(tmp_path: Path) -> None:
    from lightning_compress.tuning.sweep import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(tmp_path, trials=1)))
    result = main(["--spec", str(spec_path), "--set", "trainer.max_epochs=2", "--set", "data.batch_size=32"])
    config = yaml.safe_load(Path(finished(result["study"])[0].user_attrs["config"]).read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["data"]["init_args"]["batch_size"] == 32
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        main(["--spec", str(spec_path), "--set", "trainer.max_epochs"])


@pytest.mark.slow  # 20-35 s of two processes or many fits: run with -m slow
def test_sweep_on_an_attention_language_model(tmp_path: Path) -> None:
    """configs/lm_prune.yaml: nn.MultiheadAttention, dict batches, step-based validation (which the
    probe must not trip over), and a perplexity constraint relative to the dense baseline."""
    spec = load_spec({
        "config": str(ROOT / "configs" / "lm_prune.yaml"), "study": "lm", "out": str(tmp_path / "lm"), "trials": 1,
        "objectives": {"artifact_bytes": "minimize"}, "constraints": ["val_ppl <= 1.5 * baseline"],
        "space": {"PruningCallback.target_sparsity": {"low": 0.3, "high": 0.6}, "PruningCallback.criterion": ["magnitude", "wanda"]},
        "overrides": {"trainer.max_steps": 10, "trainer.val_check_interval": 5, "trainer.limit_val_batches": 2,
                      "trainer.callbacks.1": None, "TextDataModule.max_bytes": 100_000, "trainer.enable_checkpointing": False},
    })
    study = run_sweep(spec)["study"]
    (trial,) = finished(study)
    m = trial.user_attrs["metrics"]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert m["pruning/sparsity"] == pytest.approx(trial.params["PruningCallback.target_sparsity"], abs=0.01)
    assert m["artifact_bytes"] > 0 and m["val_ppl"] > 1
    assert trial.user_attrs["violations"] == [pytest.approx(m["val_ppl"] - 1.5 * study.user_attrs["baseline"]["val_ppl"])]


def test_a_failed_trial_does_not_use_up_the_budget_and_its_reason_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception in a trial (here a KeyError from the user's code in trial 0) fails that trial only: the sweep
    goes on until the study holds the trials asked for, and trials.csv says why the failed one failed."""
    from lightning_compress.tuning import sweep

    real = sweep.fit_config

    def fails_first_trial(config, run_dir: Path, **kwargs):
        if run_dir.name == "0000":
            raise KeyError("a key the user's step needs")
        return real(config, run_dir, **kwargs)

    monkeypatch.setattr(sweep, "fit_config", fails_first_trial)
    result = run_sweep(load_spec(spec_dict(tmp_path, trials=2)))
    states = {t.number: t.state.name for t in result["study"].get_trials(deepcopy=False)}
    assert states == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}
    with open(result["files"]["trials_csv"]) as f:
        rows = {int(r["trial"]): r for r in csv.DictReader(f)}
    assert rows[0]["error"] == "KeyError: \"a key the user's step needs\"" and rows[1]["error"] == ""


def test_a_trial_stopped_by_ctrl_c_is_retried_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a trial's fit (which Lightning turns into sys.exit(1)) left it RUNNING with no reason, retried only
    once its heartbeat was stale. It is recorded as interrupted, the sweep stops, and the next run of the command
    runs it again with the same parameters, once."""
    from lightning.pytorch import Callback

    from lightning_compress.tuning import sweep

    real = sweep.fit_config

    class CtrlC(Callback):
        def on_train_batch_start(self, *args) -> None:
            raise KeyboardInterrupt

    def interrupted_once(config, run_dir: Path, **kwargs):
        if run_dir.name == "0000":
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), CtrlC()]
        return real(config, run_dir, **kwargs)

    monkeypatch.setattr(sweep, "fit_config", interrupted_once)
    spec = load_spec(spec_dict(tmp_path, trials=1))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec)
    result = run_sweep(spec)
    trials = {t.number: t for t in result["study"].get_trials(deepcopy=False)}
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["error"] == sweep.INTERRUPTED
    assert trials[1].state.name == "COMPLETE" and trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    assert sweep.retry_interrupted(result["study"]) == []  # once


def test_failures_stop_the_run_after_as_many_as_the_trials_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_compress.tuning import sweep

    real = sweep.fit_config

    def only_trial_0_runs(config, run_dir: Path, **kwargs):
        if "trials" in run_dir.parts and run_dir.name != "0000":
            raise TypeError("a bug in the user's step")
        return real(config, run_dir, **kwargs)

    monkeypatch.setattr(sweep, "fit_config", only_trial_0_runs)
    with pytest.warns(UserWarning, match=r"3 trials failed in this run \(trials \[1, 2, 3\]; .*stopped with 1 of the 3"):
        result = run_sweep(load_spec(spec_dict(tmp_path, trials=3)))
    assert len(result["study"].get_trials(deepcopy=False)) == 4


def test_a_float_range_over_an_integer_argument_fails_before_any_trial(tmp_path: Path) -> None:
    """A float range samples fractions, which the parser refuses for an integer argument (it would exit the process
    mid-sweep): a value inside the range is built too, and the error says how to write the range."""
    refused = load_spec(spec_dict(tmp_path, space={"PruningCallback.target_sparsity": {"low": 0.0, "high": 1.0}}))
    with pytest.raises(ValueError, match=r"the value 1\.0 is refused: PruningCallback: target_sparsity must be a number in \[0, 1\), got 1\.0") as raised:
        check_space_values(refused)
    assert "write the ends as integers" not in str(raised.value)  # the value is refused, not its type
    spec = load_spec(spec_dict(tmp_path, space={"data.batch_size": {"low": 16.0, "high": 64.0}}))
    with pytest.raises(ValueError, match=r"space\['data.batch_size'\]: the value 16.0 is refused: .*Expected a <class 'int'>.*"
                       r"write the ends as "
                       r"integers: \{low: 16, high: 64\}"):
        check_space_values(spec)


def test_a_study_of_another_search_is_not_resumed(tmp_path: Path) -> None:
    """A second spec with another space (or base config, or overrides) in the same study would mix its trials with the
    first one's; it is refused, naming what differs. Constraints and the trial count may change."""
    run_sweep(load_spec(spec_dict(tmp_path, trials=1)))
    with pytest.raises(ValueError, match=r"study 't' .* holds trials of another search: its \['space'\] differ"):
        run_sweep(load_spec(spec_dict(tmp_path, trials=2, space={"PruningCallback.target_sparsity": [0.5, 0.6]})))
    with pytest.raises(ValueError, match=r"holds trials of another search: its \['objectives'\] differ"):
        run_sweep(load_spec(spec_dict(tmp_path, trials=2, objectives={"parameters": "minimize"})))  # values of other units
    again = run_sweep(load_spec(spec_dict(tmp_path, trials=1, constraints=["val_acc >= 0.4"])))
    assert len(again["study"].get_trials(deepcopy=False)) == 1  # resumed: nothing more to run


def test_a_measured_objective_the_run_cannot_measure_fails_before_any_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an example input there is no artifact to measure: every trial would end with a NaN objective."""
    import lightning_compress.plugin

    monkeypatch.setattr(lightning_compress.plugin, "example_input", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"the sweep needs \['artifact_bytes'\].*could not measure them \(no example input"):
        run_sweep(load_spec(spec_dict(tmp_path)))
    assert not (tmp_path / "sweep" / "trials").exists()


def test_trial_and_seed_counts_are_checked(tmp_path: Path) -> None:
    from lightning_compress.tuning.sweep import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(tmp_path)))
    for args, message in ((["--trials", "0"], "trials must be an integer >= 1, got 0"), (["--seeds", "-1"], "seeds must be an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            main(["--spec", str(spec_path), *args])
    assert not (tmp_path / "sweep").exists()


def test_a_config_with_ckpt_path_fine_tunes_from_it(tmp_path: Path) -> None:
    """A top-level ckpt_path (as `lightning-compress fit --config` takes it) is passed to the trial's fit, and stays in its
    config.yaml, which is written as given (the CLI's own copy does not overwrite it)."""
    from lightning_compress.tuning.trial import fit_config, trial_config

    spec = load_spec(spec_dict(tmp_path))
    keys = {k.key: k for k in spec.overrides}
    values = {**spec.overrides, keys["trainer.enable_checkpointing"]: True, spec.space[0].key: 0.5}
    fit_config(trial_config(spec.config, values, tmp_path / "first"), tmp_path / "first", measure=False)
    (ckpt,) = (tmp_path / "first").rglob("*.ckpt")
    values.update({keys["trainer.enable_checkpointing"]: False, keys["trainer.max_epochs"]: 4})
    config = trial_config({**spec.config, "ckpt_path": str(ckpt)}, values, tmp_path / "again")
    fit_config(config, tmp_path / "again", measure=False, header="fine-tune")
    with open(tmp_path / "again" / "logs" / "version_0" / "metrics.csv") as f:
        epochs = {int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("epoch")}
    assert epochs == {3}  # epochs 0-2 came from the checkpoint
    assert load_config(tmp_path / "again" / "config.yaml")["ckpt_path"] == str(ckpt)
    assert (tmp_path / "again" / "config.yaml").read_text().startswith("# fine-tune")


def test_check_same_search_resumes_old_records_refuses_reordered_objectives_and_spares_running_trials(tmp_path: Path) -> None:
    """A study recorded before its search held the objectives resumes with the same spec; objectives in another
    order are refused (Optuna's directions follow the order); a study whose trial is running under another search is
    refused, not deleted under its worker."""
    import json

    from lightning_compress.tuning.sweep import _search_of, check_same_search, open_study

    two = {"artifact_bytes": "minimize", "val_acc": "maximize"}
    spec = load_spec(spec_dict(tmp_path, objectives=two))
    study = open_study(spec)
    old = {k: v for k, v in json.loads(_search_of(spec)).items() if k != "objectives"}
    study.set_user_attr("search", json.dumps(old, sort_keys=True))
    trial = study.ask()
    study.tell(trial, [1.0, 0.5])
    assert check_same_search(spec, study) is study  # an old record, the same spec: resumed
    swapped = load_spec(spec_dict(tmp_path, objectives=dict(reversed(list(two.items())))))
    with pytest.raises(ValueError, match=r"its \['objectives'\] differ"):
        check_same_search(swapped, open_study(swapped))
    busy = load_spec(spec_dict(tmp_path, study="busy", out=str(tmp_path / "busy")))
    running = check_same_search(busy, open_study(busy))
    running.ask()  # another worker's trial, not finished
    other = load_spec(spec_dict(tmp_path, study="busy", out=str(tmp_path / "busy"), space={"PruningCallback.target_sparsity": [0.5]}))
    with pytest.raises(ValueError, match=r"its \['space'\] differ"):
        check_same_search(other, open_study(other))
    assert len(open_study(busy).get_trials(deepcopy=False)) == 1  # still there


def test_a_failed_study_with_a_waiting_retry_of_a_killed_trial_is_replaced(tmp_path: Path) -> None:
    """A killed worker's trial is failed and its retry waits (Optuna's heartbeat retry): the study still holds only
    failures, so a changed spec replaces it (it was refused)."""
    from lightning_compress.tuning.sweep import check_same_search, open_study

    spec = load_spec(spec_dict(tmp_path))
    study = check_same_search(spec, open_study(spec))
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({})
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))[0]
    study._storage.set_trial_system_attr(waiting._trial_id, "failed_trial", failed.number)
    changed = load_spec(spec_dict(tmp_path, space={"PruningCallback.target_sparsity": [0.5]}))
    assert check_same_search(changed, open_study(changed)).get_trials(deepcopy=False) == []


def test_a_config_with_its_own_model_checkpoint_sweeps_into_the_trials_folders(tmp_path: Path) -> None:
    """A config whose ModelCheckpoint writes a fixed file (configs/teacher.yaml does): the probe failed ("configured
    with enable_checkpointing=False but found ModelCheckpoint"), and each trial would have overwritten the project's
    file. The probe writes none; each trial writes its own, under its run folder."""
    from lightning_compress.tuning.config import load_config, write_config

    config = load_config(ROOT / "configs" / "prune.yaml")
    project = tmp_path / "project_ckpts"
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"dirpath": str(project), "filename": "best", "monitor": "val_acc", "mode": "max"}})
    overrides = {k: v for k, v in spec_dict(tmp_path)["overrides"].items() if k != "trainer.enable_checkpointing"}
    spec = spec_dict(tmp_path, config=str(write_config(config, tmp_path / "with_ckpt.yaml")), trials=1,
                     space={"PruningCallback.target_sparsity": [0.5]}, overrides=overrides)
    study = run_sweep(load_spec(spec))["study"]
    (trial,) = finished(study)
    assert not project.exists()
    assert [p.name for p in (Path(trial.user_attrs["config"]).parent / "checkpoints").iterdir()] == ["best.ckpt"]


def test_a_trial_whose_guard_restores_at_the_last_validation_reports_the_model_it_returns(tmp_path: Path) -> None:
    """A pruning guard that trips at the fit's last validation restores the last good weights: the trial's row held
    the discarded 97%-sparse model's val_acc and sparsity next to the restored model's file. It now measures the
    returned model (the weights of epoch 1's validation) and reads its sparsity."""
    from lightning_compress.tuning.trial import fit_config

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 3, "accelerator": "cpu", "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "logs", "version": 0}},
            "callbacks": [{"class_path": "lightning_compress.PruningCallback", "init_args": {
                "target_sparsity": 0.97, "schedule": "one_shot", "start_epoch": 2, "monitor": "val_acc", "max_drop": 0.03, "verbose": False}}],
        },
        "model": {"class_path": "lightning_compress.ClassifierModule", "init_args": {
            "model": {"class_path": "lightning_compress.MLP", "init_args": {"in_features": 64, "hidden": [32], "num_classes": 10}}}},
        "data": {"class_path": "lightning_compress.DigitsDataModule", "init_args": {"batch_size": 64}},
    }
    with pytest.warns(UserWarning, match="accuracy guard"):
        metrics = fit_config(config, tmp_path / "run", measure=False)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        logged = {int(r["epoch"]): float(r["val_acc"]) for r in csv.DictReader(f) if r.get("val_acc")}
    assert logged[2] < logged[1] - 0.03  # the pruned model's validation, which the guard undid
    assert metrics["val_acc"] == pytest.approx(logged[1], abs=1e-6) and metrics["pruning/sparsity"] == 0.0


def test_the_pareto_plot_draws_the_objective_and_skips_a_study_that_measured_nothing(tmp_path: Path, monkeypatch) -> None:
    """With objectives {val_acc: maximize} and a size constraint, the plot's quality axis was the constraint's
    artifact_bytes (the objective appeared nowhere); with every quality NaN, the sweep crashed writing the plot
    after all trials had trained ("Data cannot be log-scaled")."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from lightning_compress.tuning.results import _plot

    drawn: list = []
    monkeypatch.setattr(plt, "close", drawn.append)
    spec = SimpleNamespace(objectives={"val_acc": "maximize"}, study="s",
                           constraints=[SimpleNamespace(metric="artifact_bytes", relative=False, value=7000.0)])

    def trials(*acc: float) -> list:
        return [SimpleNamespace(user_attrs={"metrics": {"artifact_bytes": 4000.0 + 1000 * i, "val_acc": a, "latency_ms": 1.0}})
                for i, a in enumerate(acc)]

    assert _plot(spec, trials(0.8, 0.9), trials(0.8, 0.9), tmp_path / "a.png") == tmp_path / "a.png"
    assert drawn[-1].axes[0].get_ylabel() == "val_acc"
    assert _plot(spec, trials(math.nan, math.nan), [], tmp_path / "b.png") is None and not (tmp_path / "b.png").exists()


def test_a_relative_constraint_the_baseline_cannot_measure_is_refused_before_any_trial(tmp_path: Path) -> None:
    """pruning/sparsity >= 0.5 * baseline: the dense baseline logs no sparsity, and every trial trained to its end
    before failing its constraint check with an empty reason."""
    from lightning_compress.cli import CommandError

    spec = load_spec(spec_dict(tmp_path, constraints=["pruning/sparsity >= 0.5 * baseline"]))
    with pytest.raises(CommandError, match=r"relative to the dense baseline .* which logs no \['pruning/sparsity'\]"):
        run_sweep(spec)
    assert not (tmp_path / "sweep" / "trials").exists()


def test_a_refused_space_value_is_said_before_the_probe_fit(tmp_path: Path, monkeypatch) -> None:
    """The space was checked after a probe fit that ran the config's whole epoch budget."""
    from lightning_compress.tuning import sweep

    monkeypatch.setattr(sweep, "probe_metrics", lambda spec: pytest.fail("the probe fit ran before the space check"))
    spec = load_spec(spec_dict(tmp_path, space={"PruningCallback.target_sparsity": [0.5, 1.5]}))
    with pytest.raises(ValueError, match=r"the value 1.5 is refused"):
        run_sweep(spec)


def test_a_numeric_study_name_from_yaml_is_taken_as_its_text(tmp_path: Path) -> None:
    """`study: 2024` is a number in YAML; the field checks refused it, where it had been the study '2024'."""
    spec = load_spec(spec_dict(tmp_path, study=2024))
    assert spec.study == "2024"


def test_a_resumed_fit_refuses_searching_what_its_checkpoint_puts_back(tmp_path: Path) -> None:
    """A config with ckpt_path resumes: Lightning puts the checkpoint's optimizer state back, so trials at lr 5.0 and
    1e-6 both trained at the checkpoint's 0.05 and scored alike. Optimizer and scheduler keys are refused before any
    trial; other keys are searched as before."""
    from lightning_compress.tuning.config import write_config

    config = load_config(ROOT / "configs" / "prune.yaml")
    config["ckpt_path"] = str(tmp_path / "trained.ckpt")
    path = write_config(config, tmp_path / "resume.yaml")
    with pytest.raises(ValueError, match=r"space: searches \['model.optimizer.lr'\], but the config's ckpt_path"):
        load_spec(spec_dict(tmp_path, config=str(path)))
    only_sparsity = {"PruningCallback.target_sparsity": {"low": 0.5, "high": 0.95}}
    assert [p.key.key for p in load_spec(spec_dict(tmp_path, config=str(path), space=only_sparsity)).space] == [
        "PruningCallback.target_sparsity"
    ]
    # the ckpt_path the fits run with: set by the overrides (--set ckpt_path=...), or dropped there
    fresh = {**spec_dict(tmp_path)["overrides"], "ckpt_path": None}
    assert load_spec(spec_dict(tmp_path, config=str(path), overrides=fresh)).space
    resumed = {**spec_dict(tmp_path)["overrides"], "ckpt_path": str(tmp_path / "trained.ckpt")}
    with pytest.raises(ValueError, match=r"space: searches \['model.optimizer.lr'\]"):
        load_spec(spec_dict(tmp_path, overrides=resumed))
    # a module's own learning rate or weight decay goes to the optimizer the resume restores
    from lightning_compress.tuning.config import ConfigKey, restored_on_resume

    assert restored_on_resume(ConfigKey("model.lr", ("model", "init_args", "lr"), None))
    assert restored_on_resume(ConfigKey("model.weight_decay", ("model", "init_args", "weight_decay"), None))
    assert not restored_on_resume(ConfigKey("model.width", ("model", "init_args", "width"), None))


def test_keys_into_classes_written_by_their_short_names_resolve() -> None:
    """LightningCLI takes `class_path: PruningCallback` and `class_path: SGD`; every sweep key into them was refused
    ("has no module part"), and tune found no learning rate."""
    from lightning_compress.tuning.config import resolve_key
    from lightning_compress.tuning.tune import find_lr_key

    config = load_config(ROOT / "configs" / "prune.yaml")
    config["trainer"]["callbacks"][0]["class_path"] = "PruningCallback"
    config["model"]["init_args"]["optimizer"]["class_path"] = "SGD"
    assert resolve_key(config, "PruningCallback.target_sparsity").path == ("trainer", "callbacks", 0, "init_args", "target_sparsity")
    assert find_lr_key(config).key == "model.init_args.optimizer.init_args.lr"
    with pytest.raises(ValueError, match=r"class_path 'NoSuchThing' has no module part, and no class of that name is in"):
        resolve_key({**config, "model": {"class_path": "NoSuchThing", "init_args": {}}}, "model.width")


def test_a_projects_own_class_by_its_short_name_resolves_once_the_config_imports_its_module(tmp_path: Path, monkeypatch) -> None:
    """LightningCLI resolves `class_path: Damping` among the subclasses imported (here by the model's full path, from
    the same module); a sweep key into it was refused ("has no module part"). Two imported classes of one name are
    ambiguous, named."""
    import sys

    from lightning_compress.tuning.config import class_of, resolve_key

    package = tmp_path / "own_project_sweep_key"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "parts.py").write_text(
        "from lightning.pytorch import Callback\n"
        "from lightning_compress import ClassifierModule\n"
        "class OwnModule(ClassifierModule):\n    pass\n"
        "class Damping(Callback):\n    def __init__(self, strength: float = 0.1):\n        self.strength = strength\n"
    )
    (package / "other.py").write_text("class Damping:\n    pass\nclass OwnModule:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(ROOT / "configs" / "prune.yaml")
    config["model"]["class_path"] = "own_project_sweep_key.parts.OwnModule"
    config["trainer"]["callbacks"].append({"class_path": "Damping", "init_args": {"strength": 0.5}})
    try:
        where = resolve_key(config, "Damping.strength")
        assert where.path == ("trainer", "callbacks", len(config["trainer"]["callbacks"]) - 1, "init_args", "strength")
        with pytest.raises(ValueError, match=r"Damping has no argument 'strenght'; valid: \['strength'\]"):
            resolve_key(config, "Damping.strenght")
        import own_project_sweep_key.other  # noqa: F401 - a second class of that name, no callback

        assert resolve_key(config, "Damping.strength").owner_class().__module__ == "own_project_sweep_key.parts"
        with pytest.raises(ValueError, match=r"'Damping' is ambiguous: classes \['own_project_sweep_key.other.Damping', 'own_project_sweep_key.parts.Damping'\]"):
            class_of("Damping")  # at no position of a config: any class of the name
        # the model position takes LightningModules only: other.OwnModule, no LightningModule, is not it
        config["model"]["class_path"] = "OwnModule"
        assert resolve_key(config, "model.num_classes").owner_class().__name__ == "OwnModule"
    finally:
        for name in [m for m in sys.modules if m.startswith("own_project_sweep_key")]:
            del sys.modules[name]


def test_a_second_study_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    """`--study B` alone kept the spec's out: study B wrote its trials over study A's trials/0000, and A's seed
    re-runs then reported B's 2-bit model as A's 8-bit trial. The folder names its study; another one is refused
    before anything runs, and the same study resumes there."""
    from lightning_compress.tuning.sweep import claim_out, open_study

    def start(study: str, out: Path = tmp_path / "sweep") -> None:  # as run_sweep does, before its probe
        spec = load_spec(spec_dict(tmp_path, study=study, out=str(out)))
        open_study(spec)
        claim_out(spec)

    start("A")
    assert json.loads((tmp_path / "sweep" / "study.json").read_text()) == {"study": "A"}
    with pytest.raises(ValueError, match=r"holds the trials of study 'A'.*study 'B' would write its trials over them.*delete"):
        start("B")
    start("A")  # the same study resumes
    start("B", tmp_path / "b")
    # a folder from before the file: its trials and its default storage's other study tell
    (tmp_path / "b" / "study.json").unlink()
    (tmp_path / "b" / "trials").mkdir()
    with pytest.raises(ValueError, match=r"holds the trials of study \['B'\] \(its study.db\)"):
        start("C", tmp_path / "b")
    (tmp_path / "sweep" / "study.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"does not say which study the folder holds"):
        start("A")


def test_a_trial_whose_fit_ends_before_its_first_validation_is_validated(tmp_path: Path) -> None:
    """max_steps within the first epoch: the fit never validated, the trial's val_* were NaN, its constraints unmet
    and the front empty, with nothing said. The returned model is validated once after the fit."""
    from lightning_compress.tuning.trial import fit_config

    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 3, "accelerator": "cpu", "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False},
        "model": {"class_path": "lightning_compress.ClassifierModule", "init_args": {
            "model": {"class_path": "lightning_compress.MLP", "init_args": {"in_features": 64, "hidden": [16], "num_classes": 10}}}},
        "data": {"class_path": "lightning_compress.DigitsDataModule", "init_args": {"batch_size": 32}},
    }  # fmt: skip
    metrics = fit_config(config, tmp_path / "run", measure=False)
    assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["val_loss"] > 0
    # without validation data there is nothing to measure, as in the fit
    metrics = fit_config({**config, "data": {"class_path": "user_project.TrainOnlyDigits"}}, tmp_path / "noval", measure=False)
    assert "val_acc" not in metrics and "train_loss" in metrics


def test_overrides_that_break_the_config_are_named_not_a_space_value(tmp_path: Path) -> None:
    """An override `monitor: null` beside the config's max_drop was reported as `space['PruningCallback.target_sparsity']:
    the value 0.5 is refused`, blaming the space for the override."""
    overrides = {**spec_dict(tmp_path)["overrides"], "PruningCallback.monitor": None}
    with pytest.raises(ValueError, match=r"the config with the sweep's overrides \[.*'PruningCallback.monitor'.*\] does not build, "
                       r"before any value of the space is in it .*: PruningCallback: max_drop=.* needs a monitor"):
        check_space_values(load_spec(spec_dict(tmp_path, overrides=overrides)))


def test_a_probe_fit_that_fails_says_it_is_the_probe_of_the_base_config(tmp_path: Path) -> None:
    """end_epoch=6 past max_epochs=3 in the overrides, with end_epoch searched in [2, 3]: the sweep stopped with the
    callback's message alone, which read as if a searched value had been refused."""
    overrides = {**spec_dict(tmp_path)["overrides"], "PruningCallback.end_epoch": 6}
    spec = load_spec(spec_dict(tmp_path, overrides=overrides, space={"PruningCallback.end_epoch": [2, 3]}))
    with pytest.raises(ValueError, match=r"the probe fit of the config with the sweep's overrides \[.*\] \(two batches per epoch, run "
                       r"before any trial .*no value of the space is in it\) failed: end_epoch=6 is past max_epochs=3"):
        run_sweep(spec)
    assert not (tmp_path / "sweep" / "trials").exists()
