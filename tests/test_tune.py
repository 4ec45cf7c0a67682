"""Config keys and ``lightning-compress tune``: the Tuner's searches on throwaway instances, the batch
size never above the training set, and nothing of a search reaching the real fit."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_compress.cli import cli_main
from lightning_compress.tuning.config import get_value, load_config, resolve_key, set_value, write_config
from lightning_compress.tuning.devices import check_one_device
from lightning_compress.tuning.tune import find_lr_key, main, tune_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small(name: str, tmp_path: Path, **changes) -> dict:
    """A config of configs/ cut to a few batches per epoch, writing under tmp_path."""
    config = load_config(CONFIGS / name)
    values = {"trainer.default_root_dir": str(tmp_path), "trainer.logger": False, "trainer.enable_checkpointing": False,
              "trainer.limit_val_batches": 2, "trainer.enable_progress_bar": False, **changes}
    if name != "distill.yaml":
        values["trainer.limit_train_batches"] = 6
    for key, value in values.items():
        config = set_value(config, resolve_key(config, key), value)
    config["trainer"]["callbacks"] = [c for c in config["trainer"].get("callbacks") or [] if "CompressionReport" not in c["class_path"]]
    return config


def test_keys_land_where_the_cli_reads_them() -> None:
    config = load_config(CONFIGS / "prune.yaml")
    assert resolve_key(config, "model.optimizer.lr").path == ("model", "init_args", "optimizer", "init_args", "lr")
    assert resolve_key(config, "SGD.lr").path == resolve_key(config, "model.init_args.optimizer.init_args.lr").path
    assert resolve_key(config, "PruningCallback.target_sparsity").path == ("trainer", "callbacks", 0, "init_args", "target_sparsity")
    where = resolve_key(config, "data.batch_size")
    changed = set_value(config, where, 17)
    assert get_value(changed, where) == 17 and get_value(config, where) == 64  # a copy; the original is untouched


def test_a_value_the_config_leaves_out_reads_as_its_class_default() -> None:
    """tune printed ``data.batch_size: None -> 256`` for a batch size left at the datamodule's default of 32."""
    from lightning_compress import DigitsDataModule
    from lightning_compress.tuning.config import value_or_default

    config = load_config(CONFIGS / "prune.yaml")
    where = resolve_key(config, "data.batch_size")
    del config["data"]["init_args"]["batch_size"]
    assert get_value(config, where) is None
    assert value_or_default(config, where) == inspect.signature(DigitsDataModule).parameters["batch_size"].default
    assert value_or_default(set_value(config, where, 17), where) == 17
    assert value_or_default(set_value(config, where, None), where) is None  # written as null: what the CLI passes


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("PruningCallback.target", "PruningCallback has no argument 'target'; valid: ['target_sparsity'"),
        ("Pruner.amount", "no class 'Pruner' in the config; its classes are"),
        ("trainer.max_epoch", "Trainer has no argument 'max_epoch'"),
        ("model.optimizer.betas", "SGD has no argument 'betas'"),
        ("trainer.callbacks.7.x", "is a list of 2; '7' is not an index"),
        ("lr", "neither a dotted config path"),
    ],
)
def test_unknown_keys_name_the_valid_arguments(key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_key(load_config(CONFIGS / "prune.yaml"), key)


def test_lr_key_found_or_explained() -> None:
    assert find_lr_key(load_config(CONFIGS / "prune.yaml")).key == "model.init_args.optimizer.init_args.lr"
    with pytest.raises(ValueError, match="pass --lr-key"):
        find_lr_key(load_config(CONFIGS / "qat.yaml"))  # the module's default optimizer is not in the config


def test_bad_requests_fail_before_any_search(tmp_path: Path) -> None:
    config = small("prune.yaml", tmp_path)
    with pytest.raises(ValueError, match="nothing to tune"):
        tune_config(config)
    with pytest.raises(ValueError, match=r"batch_size mode 'double'; valid: \['power', 'binsearch'\]"):
        tune_config(config, batch_size="double")
    with pytest.raises(ValueError, match=r"init_batch_size \(--init-batch-size\) must be an integer >= 1, got 0"):
        tune_config(config, batch_size="power", init_batch_size=0)
    with pytest.raises(ValueError, match="DigitsDataModule has no argument 'bs'"):
        tune_config(config, batch_size="power", batch_key="data.bs")
    with pytest.raises(ValueError, match=r"lr key 'model.model.in_features' names the argument 'in_features', not a learning rate"):
        tune_config(config, lr_find=True, lr_key="model.model.in_features")
    with pytest.raises(ValueError, match=r"batch key 'DigitsDataModule.num_workers' names the argument 'num_workers', not a batch size"):
        tune_config(config, batch_size="power", batch_key="DigitsDataModule.num_workers")
    # the whole search ran, then Lightning's restore failed (FSDP2), or every DDP rank searched and wrote the file
    for trainer, asked in (({"strategy": "ddp", "devices": 2}, "strategy=DDPStrategy"), ({"devices": 2}, "devices=2"),
                           ({"devices": "0,1"}, "devices='0,1'"), ({"num_nodes": 2}, "num_nodes=2"),
                           ({"strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}}, "strategy=ModelParallelStrategy")):
        with pytest.raises(ValueError, match=rf"tune runs its fits in its own process on one device, and the config asks for {asked}"):
            tune_config({**config, "trainer": {**config["trainer"], **trainer}}, lr_find=True)
    for trainer in ({"devices": 1}, {"strategy": {"class_path": "lightning.pytorch.strategies.SingleDeviceStrategy", "init_args": {"device": "cpu"}}}):
        check_one_device({**config["trainer"], **trainer}, "tune")  # one device: accepted
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("with_compression", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: 15 s more, -m slow
def test_batch_size_search_stops_at_the_training_set(tmp_path: Path, with_compression: bool) -> None:
    """Digits has 1,257 training images: doubling from 2 may try 2048 (a batch of the whole set), but
    the answer is the largest size tried that the set can fill, 1024 (Lightning itself returns 2048)."""
    config = small("prune.yaml", tmp_path)
    tuned, found = tune_config(config, batch_size="power", with_compression=with_compression)
    assert found == {"data.batch_size": 1024}
    assert get_value(tuned, resolve_key(tuned, "data.batch_size")) == 1024
    if not with_compression:
        _, found = tune_config(config, batch_size="binsearch")
        assert found["data.batch_size"] <= 1257


def test_lr_find_runs_all_its_steps_whatever_the_configs_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of 6 batches in the config: the finder still runs its 20 steps (the fit's limits are not the search's);
    a finder that diverges at once is an error, not a suggestion."""
    from lightning.pytorch.tuner import Tuner

    ran = []
    lr_find = Tuner.lr_find

    def counted(self, *args, **kwargs):
        finder = lr_find(self, *args, **kwargs)
        ran.append(len(finder.results["lr"]))
        return finder

    monkeypatch.setattr(Tuner, "lr_find", counted)
    config = small("prune.yaml", tmp_path, **{"trainer.max_epochs": 1})
    _, found = tune_config(config, lr_find=True, lr_find_kwargs={"num_training": 20})
    assert ran == [20] and 1e-8 < found["model.init_args.optimizer.init_args.lr"] < 1
    with pytest.raises(RuntimeError, match=r"stopped after \d of its 20 steps, the loss diverging at lr"):
        tune_config(config, lr_find=True, lr_find_kwargs={"num_training": 20, "min_lr": 1.0, "max_lr": 1e6})


@pytest.mark.parametrize(
    "name",
    # distill.yaml trains a teacher too (30 s): run with -m slow
    ["prune.yaml", "qat.yaml", "ptq.yaml", "prune_channels.yaml", pytest.param("distill.yaml", marks=pytest.mark.slow)],
)
def test_tuned_fit_equals_a_fit_given_the_values(tmp_path: Path, name: str) -> None:
    """With every plugin attached in its config: tune, then fit the tuned config; the result is
    bit-identical to fitting the original config with the found values typed in by hand, so nothing of
    the searches (masks, fake quantisation, the finder's callback, Trainer settings) leaks into the fit."""
    config = small(name, tmp_path / "a")
    if name == "distill.yaml":  # an untrained teacher will do: the check is on what reaches the fit
        config = set_value(config, resolve_key(config, "model.teacher_ckpt"), None)
    if name in ("qat.yaml", "ptq.yaml"):  # the module's default optimizer: give it in the config to tune its lr
        config = set_value(config, resolve_key(config, "model.optimizer"), {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}})
    lr_where = find_lr_key(config)
    tuned, found = tune_config(config, lr_find=True, lr_find_kwargs={"num_training": 20}, with_compression=True)
    assert set(found) == {lr_where.key} and found[lr_where.key] > 0

    def fit(cfg: dict, where: Path) -> dict[str, torch.Tensor]:
        cfg = set_value(cfg, resolve_key(cfg, "trainer.default_root_dir"), str(where))
        cli = cli_main(["fit", "--config", str(write_config(cfg, where / "c.yaml"))])
        return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}

    by_hand = set_value(config, lr_where, found[lr_where.key])
    a, b = fit(tuned, tmp_path / "tuned"), fit(by_hand, tmp_path / "by_hand")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_command_writes_the_tuned_config_and_fits_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(small("prune.yaml", tmp_path), tmp_path / "prune.yaml")
    result = main(["--config", str(path), "--batch-size", "power", "--fit"])
    assert result["found"] == {"data.batch_size": 1024}
    tuned = load_config(tmp_path / "prune.tuned.yaml")
    assert tuned["data"]["init_args"]["batch_size"] == 1024
    assert "data.batch_size: 64 -> 1024" in capsys.readouterr().out
    assert result["cli"].datamodule.batch_size == 1024 and result["cli"].trainer.state.finished


def test_lr_key_of_lightning_clis_top_level_optimizer() -> None:
    config = load_config(CONFIGS / "qat.yaml")
    config["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}
    assert find_lr_key(config).key == "optimizer.init_args.lr"


def test_the_lr_goes_where_a_scheduler_that_sets_the_rate_reads_it() -> None:
    """configs/lm_dense.yaml's OneCycleLR sets the rate from its max_lr: the found rate was written to the optimizer's
    lr, which the schedule ignores, so the tuned file trained exactly as before. It now goes to max_lr and reaches the
    scheduler the module builds; a key the scheduler overrides, and CyclicLR's two rates, are refused."""
    config = load_config(CONFIGS / "lm_dense.yaml")
    where = find_lr_key(config)
    assert where.key == "model.init_args.scheduler.init_args.max_lr"
    cli = cli_main(["--config", str(write_config(set_value(config, where, 0.00123), Path(tempfile.mkdtemp()) / "c.yaml"))], run=False)
    scheduler = cli.model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [g["max_lr"] for g in scheduler.optimizer.param_groups] == [0.00123]
    with pytest.raises(ValueError, match=r"lr key 'model.optimizer.lr': the config's OneCycleLR at 'model.init_args.scheduler' sets "
                                         r"the learning rate .* name model.init_args.scheduler.init_args.max_lr instead"):
        tune_config(config, lr_find=True, lr_key="model.optimizer.lr")
    config["model"]["init_args"]["scheduler"] = {"class_path": "torch.optim.lr_scheduler.CyclicLR",
                                                 "init_args": {"base_lr": 1e-4, "max_lr": 1e-2}}
    with pytest.raises(ValueError, match=r"CyclicLR .* pass --lr-key model.init_args.scheduler.init_args.base_lr or "
                                         r"model.init_args.scheduler.init_args.max_lr"):
        find_lr_key(config)
    top = load_config(CONFIGS / "qat.yaml")
    top["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}}
    top["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.1, "total_steps": 10}}
    assert find_lr_key(top).key == "lr_scheduler.init_args.max_lr"
    top["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 5}}  # scales the lr
    assert find_lr_key(top).key == "optimizer.init_args.lr"
    # a subclass that computes max_lr itself (from the optimizer's lr, or an argument of its own): not one that takes it
    top["lr_scheduler"] = {"class_path": f"{__name__}.OneCycleFromOptimizer", "init_args": {"total_steps": 10}}
    assert find_lr_key(top).key == "optimizer.init_args.lr"
    from lightning_compress.tuning.config import check_lr_takes_effect

    check_lr_takes_effect(top, resolve_key(top, "optimizer.lr"))  # accepted: that lr is the peak


class OneCycleFromOptimizer(torch.optim.lr_scheduler.OneCycleLR):
    """A user's one-cycle schedule peaking at the optimizer's own lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        super().__init__(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps)


def test_batch_size_search_on_a_config_that_validates_every_n_steps(tmp_path: Path) -> None:
    """The language-model configs validate every 100 batches; at a larger batch size the epoch is shorter than that,
    and Lightning refused the search's trial fit (val_check_interval must not exceed the training batches)."""
    config = small("prune.yaml", tmp_path, **{"trainer.val_check_interval": 5})
    tuned, found = tune_config(config, batch_size="power")
    assert found == {"data.batch_size": 1024}
    assert get_value(tuned, resolve_key(tuned, "trainer.val_check_interval")) == 5  # the fit's own setting is kept


def test_the_batch_cap_reads_the_modules_own_loaders() -> None:
    """A module that brings its own dataloaders (no datamodule): the training set's length still caps the search."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress.tuning.tune import _train_length

    class OwnLoaders(torch.nn.Module):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.zeros(300, 4)), batch_size=32)

    assert _train_length(SimpleNamespace(datamodule=None, model=OwnLoaders())) == 300
    assert _train_length(SimpleNamespace(datamodule=None, model=torch.nn.Linear(2, 2))) is None  # no loader: no cap


class LayersInConfigureModel(L.LightningModule):
    """Its layers are built in ``configure_model``, as FSDP users build them: nothing to load into before it runs."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width, self.net = width, None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, self.width), torch.nn.ReLU(), torch.nn.Linear(self.width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_searches_of_a_fine_tune_start_from_its_checkpoint_after_configure_model(tmp_path: Path) -> None:
    """A config with ckpt_path whose module builds its layers in configure_model: the search instance loads the
    checkpoint after building them (loading first found no layer to load into)."""
    from lightning_compress import DigitsDataModule
    from lightning_compress.tuning.tune import _instance

    trained = LayersInConfigureModel()
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(trained, DigitsDataModule(batch_size=32))  # fmt: skip
    ckpt = tmp_path / "trained.ckpt"
    trained.trainer.save_checkpoint(ckpt)
    config = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
        "model": {"class_path": f"{__name__}.LayersInConfigureModel", "init_args": {"width": 16}},
        "data": {"class_path": "lightning_compress.DigitsDataModule", "init_args": {"batch_size": 32}},
        "ckpt_path": str(ckpt),
    }
    with _instance(config) as cli:
        assert torch.equal(cli.model.net[1].weight, trained.net[1].weight)


def test_a_config_with_its_own_model_checkpoint_is_tuned_without_writing_it(tmp_path: Path) -> None:
    """The search instance turned checkpointing off and Lightning refused the config's ModelCheckpoint; it now leaves
    the checkpoint callbacks out and writes nothing into the project's folder."""
    project = tmp_path / "project_ckpts"
    config = small("prune.yaml", tmp_path, **{"trainer.enable_checkpointing": True})
    config["trainer"]["callbacks"].append({"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(project), "filename": "best"}})
    tuned, found = tune_config(config, lr_find=True, lr_find_kwargs={"num_training": 20})
    assert found and not project.exists()
    assert tuned["trainer"]["callbacks"][-1]["init_args"]["dirpath"] == str(project)  # the fit's own config is kept


def test_a_compression_callback_written_by_its_short_name_is_left_out_of_the_searches() -> None:
    """jsonargparse takes `class_path: PruningCallback`; the dense baseline and the search instance kept it."""
    from lightning_compress.tuning.trial import without_checkpoints, without_compression

    config = {"trainer": {"callbacks": [{"class_path": "PruningCallback", "init_args": {"target_sparsity": 0.5}},
                                        {"class_path": "ModelCheckpoint"}, {"class_path": "LearningRateMonitor"}]}}
    assert [c["class_path"] for c in without_compression(config)["trainer"]["callbacks"]] == ["ModelCheckpoint", "LearningRateMonitor"]
    assert [c["class_path"] for c in without_checkpoints(config)["trainer"]["callbacks"]] == ["PruningCallback", "LearningRateMonitor"]


def test_lr_find_on_a_config_that_resumes_is_refused(tmp_path: Path) -> None:
    """`tune --lr-find --fit` on a config with ckpt_path wrote lr 4.8e-05 and fitted at the checkpoint's 0.05: the
    resumed fit puts the checkpoint's optimizer back. Refused before any search."""
    config = small("prune.yaml", tmp_path)
    config["ckpt_path"] = str(tmp_path / "trained.ckpt")
    with pytest.raises(ValueError, match=r"lr_find tunes \['model.init_args.optimizer.init_args.lr'\], but the config's ckpt_path"):
        tune_config(config, lr_find=True)


class DatasetInSetup(L.LightningModule):
    """Builds its training set in ``setup`` and serves it from its own loaders, with its batch size an attribute
    (``stored_as`` names it; the constructor's argument is always ``batch_size``)."""

    def __init__(self, batch_size: int = 16, stored_as: str = "batch_size") -> None:
        super().__init__()
        setattr(self, stored_as, batch_size)
        self.stored_as, self.train_set = stored_as, None
        self.net = torch.nn.Linear(64, 10)

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        self.train_set = torch.utils.data.TensorDataset(torch.tensor(x[:600], dtype=torch.float32) / 16, torch.tensor(y[:600]))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=getattr(self, self.stored_as))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _own_loaders_config(tmp_path: Path, stored_as: str = "batch_size") -> dict:
    return {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "default_root_dir": str(tmp_path), "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": f"{__name__}.DatasetInSetup", "init_args": {"batch_size": 16, "stored_as": stored_as}},
    }


def test_the_batch_cap_holds_for_a_module_that_builds_its_dataset_in_setup(tmp_path: Path) -> None:
    """The cap asked the module's loader before the search, when the dataset its setup builds did not exist yet: the
    search wrote 1024 for a set of 600."""
    tuned, found = tune_config(_own_loaders_config(tmp_path), batch_size="power", batch_key="model.batch_size")
    assert found == {"model.batch_size": 512}


def test_a_batch_key_the_module_does_not_store_is_said_in_one_line(tmp_path: Path) -> None:
    """Lightning's search sets an attribute; a module keeping the argument under another name failed inside the Tuner
    with its MisconfigurationException."""
    with pytest.raises(ValueError, match=r"batch key 'model.batch_size': Lightning's batch-size search sets the size through "
                       r"an attribute 'batch_size' of the module or the datamodule .* \(self.batch_size = batch_size"):
        tune_config(_own_loaders_config(tmp_path, stored_as="bs"), batch_size="power", batch_key="model.batch_size")


def test_a_suggestion_on_the_plateau_before_the_fall_is_refused_with_the_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's finder picks the steepest slope against the learning rate itself, so noise between tiny rates can
    win: a suggestion of 4e-05 on a flat curve was written, and 3 epochs at it reached val_acc 0.16 (0.83 at the
    config's rate). The real sweep is kept; only the pick is moved onto its plateau."""
    from lightning.pytorch.tuner.lr_finder import _LRFinder

    picked = []

    def on_the_plateau(self, skip_begin: int = 10, skip_end: int = 1):
        self._optimal_idx = 1
        picked.append(self.results["lr"][1])
        return picked[-1]

    config = small("prune.yaml", tmp_path)
    monkeypatch.setattr(_LRFinder, "suggestion", on_the_plateau)
    with pytest.raises(RuntimeError, match=r"lies more than two decades before the loss starts falling: the smoothed loss is "
                       r".* search a range nearer the fall \(--min-lr .*; tune_config's lr_find_kwargs min_lr\)"):
        tune_config(config, lr_find=True, lr_find_kwargs={"num_training": 40})
    assert picked and picked[0] < 1e-7


def test_the_finders_range_is_set_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plateau refusal names a --min-lr; the command had no way to pass one."""
    from lightning.pytorch.tuner import Tuner

    seen = []
    lr_find = Tuner.lr_find

    def recorded(self, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("min_lr", "max_lr")})
        return lr_find(self, *args, **{**kwargs, "num_training": 20})

    monkeypatch.setattr(Tuner, "lr_find", recorded)
    path = write_config(small("prune.yaml", tmp_path), tmp_path / "prune.yaml")
    main(["--config", str(path), "--lr-find", "--min-lr", "1e-4", "--max-lr", "0.5"])
    assert seen == [{"min_lr": 1e-4, "max_lr": 0.5}]
    for bad in (["--min-lr", "0.5", "--max-lr", "1e-4"], ["--min-lr", "-1"]):
        with pytest.raises(ValueError, match=r"--min-lr/--max-lr must be finite, above 0 and min below max"):
            main(["--config", str(path), "--lr-find", *bad])
    with pytest.raises(ValueError, match=r"pass --lr-find too"):
        main(["--config", str(path), "--batch-size", "power", "--min-lr", "1e-4"])
