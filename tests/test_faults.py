"""All or nothing in setup, non-finite values caught, bad values refused before training."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassifierModule, CompressionReport, DistillationModule, PruningCallback, QuantizeCallback
from lightning_compress.models import MLP


def _loaders(inf: bool = False) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    train_x = x.clone()
    if inf:
        train_x[3, 5] = float("inf")
    return DataLoader(TensorDataset(train_x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=32)


def _trainer(tmp_path: Any, callbacks: list, **kw: Any) -> Trainer:
    args = trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    args.update(kw)
    return Trainer(callbacks=callbacks, **args)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))


def _structure(module: nn.Module) -> dict[str, Any]:
    """Everything a plugin's setup could change: classes, parameter objects, buffers, hooks, values."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {
        "types": [(n, type(m)) for n, m in module.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in module.named_parameters()],
        "buffers": [n for n, _ in module.named_buffers()],
        "hooks": [(n, h, len(getattr(m, h))) for n, m in module.named_modules() for h in hooks],
        "values": {k: v.clone() for k, v in module.state_dict().items()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    values_equal = a["values"].keys() == b["values"].keys() and all(torch.equal(a["values"][k], b["values"][k]) for k in a["values"])
    return values_equal and all(a[k] == b[k] for k in ("types", "params", "buffers", "hooks"))


def _plugins(failing: str) -> dict[str, Any]:
    return {
        "quant": QuantizeCallback(start_epoch=1, latency="none", include=["nomatch"] if failing == "quant" else None),
        "prune": PruningCallback(0.5, start_epoch=1, verbose=False, include=["nomatch"] if failing == "prune" else None),
        "report": CompressionReport(print_table=False),
    }


@pytest.mark.parametrize("failing", ["quant", "prune"])
@pytest.mark.parametrize("order", list(itertools.permutations(["quant", "prune", "report"])))
def test_a_failing_plugin_leaves_the_model_exactly_as_it_was(tmp_path, failing, order) -> None:
    module = ClassifierModule(_net(), num_classes=2)
    before = _structure(module)
    plugins = _plugins(failing)
    with pytest.raises(ValueError, match="pattern 'nomatch' matches no weight"):
        _trainer(tmp_path, [plugins[name] for name in order]).fit(module, *_loaders())
    assert _same(before, _structure(module))
    # the same (healthy) plugins can be used again on the same module
    plugins[failing] = _plugins("none")[failing]
    _trainer(tmp_path, [plugins[name] for name in order]).fit(module, *_loaders())
    assert plugins["prune"].sparsity == pytest.approx(0.5, abs=0.01)


def test_a_failing_module_setup_undoes_the_plugins(tmp_path) -> None:
    teacher, student = MLP(16, (32,), 2), MLP(16, (8,), 2)
    module = DistillationModule(teacher, student, temperature={0: 4.0, 5: 2.0})  # a schedule past max_epochs
    before = _structure(module)
    with pytest.raises(ValueError, match="epoch"):
        _trainer(tmp_path, [QuantizeCallback(latency="none"), PruningCallback(0.5, verbose=False)]).fit(module, *_loaders())
    assert _same(before, _structure(module))


# --------------------------------------------------------------------------- non-finite values


def test_a_nan_weight_stops_a_mask_update_naming_the_layer_and_step(tmp_path) -> None:
    module = ClassifierModule(MLP(16, (32,), 2), num_classes=2)
    with torch.no_grad():
        module.model.net[1].weight[3, 4] = float("nan")
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=0, verbose=False)
    with pytest.raises(ValueError, match=r"mask update at epoch 0, step 0: non-finite values .* \['model.net.1.weight'\].*on_nonfinite='warn'"):
        _trainer(tmp_path, [prune]).fit(module, *_loaders())


def test_on_nonfinite_warn_prunes_the_nan_first_and_reports_only_exact_zeros(tmp_path) -> None:
    seed_everything(0)
    module = ClassifierModule(MLP(16, (32,), 2), num_classes=2)
    with torch.no_grad():
        module.model.net[1].weight[3, 4] = float("nan")
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=0, verbose=False, on_nonfinite="warn")
    with pytest.warns(UserWarning, match=r"non-finite values .*model.net.1.weight"):
        _trainer(tmp_path, [prune]).fit(module, *_loaders())
    weight = module.model.net[1].weight
    assert weight[3, 4].item() == 0.0 and bool(torch.isfinite(weight).all())
    weights = [module.model.net[1].weight, module.model.net[3].weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert prune.sparsity == pytest.approx(zeros) == pytest.approx(0.5, abs=0.01)


def test_a_nan_weight_under_qat_stops_conversion_naming_the_layer(tmp_path) -> None:
    module = ClassifierModule(MLP(16, (32,), 2), num_classes=2)
    quant = QuantizeCallback(latency="none")

    class Poison(CompressionReport):
        def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
            with torch.no_grad():
                pl_module.model.net[3].weight[0, 0] = float("nan")

    with pytest.raises(ValueError, match=r"conversion at the end of fit: non-finite values .*'model.net.3.weight'"):
        _trainer(tmp_path, [quant, Poison(print_table=False)], max_epochs=1).fit(module, *_loaders())
    assert quant.quantized_model is None


def test_an_inf_in_ptq_calibration_data_leaves_that_batch_out_of_the_ranges(tmp_path) -> None:
    """A calibration batch holding inf is left out of the input ranges (it made them infinite, an error at the end of
    calibration); the ranges come from the other batches and the converted model is finite."""
    module = ClassifierModule(MLP(16, (32,), 2), num_classes=2)
    quant = QuantizeCallback(method="ptq", calibration_batches=4, latency="none")
    train, val = _loaders(inf=True)
    _trainer(tmp_path, [quant]).fit(module, train, val)
    ranges = [torch.stack([l.quantizer.observer.min_val, l.quantizer.observer.max_val]) for l in quant._layers.values()]
    assert all(bool(r.isfinite().all()) and float(r[1] - r[0]) > 0 for r in ranges)
    clean = torch.cat([x for x, _ in train])
    clean = clean[clean.isfinite().all(1)]
    assert bool(quant.quantized_model(clean).isfinite().all())


# --------------------------------------------------------------------------- values refused before training


def test_quantisation_that_would_never_run_is_a_setup_error(tmp_path) -> None:
    module = ClassifierModule(MLP(16, (32,), 2), num_classes=2)
    before = _structure(module)
    with pytest.raises(ValueError, match=r"start_epoch=5 is not before max_epochs=3: no QAT would run"):
        _trainer(tmp_path, [QuantizeCallback(start_epoch=5)], max_epochs=3).fit(module, *_loaders())
    assert _same(before, _structure(module))


@pytest.mark.parametrize("plugin", [PruningCallback, QuantizeCallback])
def test_nan_max_drop_is_refused_by_every_plugin(plugin) -> None:
    with pytest.raises(ValueError, match="max_drop must be a finite number >= 0, got nan"):
        plugin(monitor="val_acc", max_drop=float("nan"))


def test_pruning_state_that_does_not_fit_names_the_layer(tmp_path) -> None:
    small = PruningCallback(0.5, start_epoch=0, schedule="one_shot", verbose=False)
    _trainer(tmp_path, [small], max_epochs=1).fit(ClassifierModule(MLP(16, (32,), 2), num_classes=2), *_loaders())
    big = PruningCallback(0.5, start_epoch=0, schedule="one_shot", verbose=False)
    _trainer(tmp_path, [big], max_epochs=1).fit(ClassifierModule(MLP(16, (64,), 2), num_classes=2), *_loaders())
    with pytest.raises(ValueError, match=r"weight 'model.net.1.weight' is \(64, 16\) in the model, but its saved mask is \(32, 16\)"):
        big.load_state_dict(small.state_dict())


# --------------------------------------------------------------------------- checkpoints of earlier releases


def test_a_checkpoint_written_by_release_0_1_0_resumes(tmp_path) -> None:
    """tests/data/v010_prune_qat.ckpt: PruningCallback(granularity=...) and QuantizeCallback(mode="qat")
    state (version 1, masks kept with make_permanent=False) from lightning-compress 0.1.0, after one float
    and one pruned, fake-quantised epoch."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "v010_prune_qat.ckpt"
    seed_everything(0)
    module = ClassifierModule(MLP(16, (32,), 2), num_classes=2)
    prune = PruningCallback(0.5, structure="unstructured", schedule="one_shot", start_epoch=1, verbose=False, make_permanent=False)
    quant = QuantizeCallback(method="qat", start_epoch=1, latency="none", convert_on_fit_end=False)
    trainer = _trainer(tmp_path, [prune, quant], max_epochs=3)
    trainer.fit(module, *_loaders(), ckpt_path=str(path))
    saved = torch.load(path, weights_only=True)["state_dict"]
    for name in ("model.net.1.weight", "model.net.3.weight"):
        was_pruned = saved[name] == 0
        assert bool((module.state_dict()[name][was_pruned] == 0).all()), name  # the old masks are in force
        assert bool((~prune.masks[name])[was_pruned].all())
    assert prune.sparsity == pytest.approx(0.5, abs=0.01) and prune.compression_summary()["updates"] == 1
    assert quant.state_dict()["current_bits"] == 8 and quant.is_active()


def test_export_refuses_a_model_with_a_nan_weight(tmp_path) -> None:
    from lightning_compress import export_for_cpu

    net = MLP(16, (8,), 2)
    with torch.no_grad():
        net.net[3].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"export_for_cpu\('.*m.pt2'\): non-finite values .*\['net.3.bias'\]"):
        export_for_cpu(net, torch.randn(1, 16), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_checkpoints_of_every_plugin_load_weights_only(tmp_path) -> None:
    """Resume reads checkpoints with torch.load(weights_only=True): plugin state must be plain data."""
    module = ClassifierModule(_net(), num_classes=2)
    plugins = [PruningCallback(0.5, start_epoch=1, verbose=False, monitor="val_acc", max_drop=0.5, rewind_epoch=0),
               QuantizeCallback(start_epoch=1, latency="none"), CompressionReport(print_table=False)]
    trainer = _trainer(tmp_path, plugins)
    trainer.fit(module, *_loaders())
    trainer.save_checkpoint(tmp_path / "all.ckpt")
    checkpoint = torch.load(tmp_path / "all.ckpt", weights_only=True)
    assert {"PruningCallback", "QuantizeCallback"} <= {key.split("{")[0] for key in checkpoint["callbacks"]}
    resumed = _trainer(tmp_path, [PruningCallback(0.5, start_epoch=1, verbose=False, monitor="val_acc", max_drop=0.5, rewind_epoch=0),
                                  QuantizeCallback(start_epoch=1, latency="none")], max_epochs=3)
    resumed.fit(ClassifierModule(_net(), num_classes=2), *_loaders(), ckpt_path=str(tmp_path / "all.ckpt"), weights_only=True)


class _OneBadStep(ClassifierModule):
    """Float16 mixed precision's usual accident at one step: gradients that overflow under the loss scale, or an
    input holding inf; the GradScaler skips that step and training goes on."""

    def __init__(self, bad: str) -> None:
        super().__init__(MLP(16, (32,), 4), num_classes=4)
        self.bad, self.losses = bad, []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == 3 and self.current_epoch == 0 and self.bad == "input":
            x = x.clone()
            x[0, 0] = float("inf")
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss * 1e6 if self.global_step == 3 and self.bad == "gradient" else loss


@pytest.mark.parametrize(("plugin", "bad"), [("taylor", "gradient"), ("wanda", "input"), ("qat", "input")])
def test_a_step_the_grad_scaler_skips_leaves_scores_and_ranges_finite(tmp_path, plugin: str, bad: str) -> None:
    """The step's inf/NaN went into Taylor's sums, Wanda's input norms (the next update then pruned the first k
    entries of every row) and QAT's input ranges (every later forward NaN, every later step skipped)."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins import MixedPrecision

    seed_everything(0)
    module = _OneBadStep(bad)
    if plugin == "qat":
        callback = QuantizeCallback(start_epoch=0, latency="none")
    else:
        callback = PruningCallback(0.5, schedule="one_shot", start_epoch=1, criterion=plugin, verbose=False)
    seen: dict[str, torch.Tensor] = {}

    class Scores(Callback):  # what the update at epoch 1 reads, before it reads it
        def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 1 and plugin != "qat":
                criterion = callback.options.criterion
                seen.update(criterion.accum if plugin == "taylor" else criterion.sq)

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    _trainer(tmp_path, [Scores(), callback], max_epochs=2, plugins=[scaler]).fit(module, loader, loader)
    assert all(v == v for i, v in enumerate(module.losses) if i != 3)  # no NaN loss but the bad step's own
    if plugin == "qat":
        ranges = [torch.stack([l.quantizer.observer.min_val, l.quantizer.observer.max_val]) for l in callback._layers.values()]
        assert all(bool(r.isfinite().all()) for r in ranges) and bool(callback.quantized_model(x).isfinite().all())
    else:
        assert seen and all(bool(v.isfinite().all()) for v in seen.values())
        assert callback.sparsity == pytest.approx(0.5, abs=0.01)


class _DataInSetup(ClassifierModule):
    """The pattern of Lightning's docs: the dataset is built in the module's setup(), which Lightning calls after
    the callbacks' setup."""

    def __init__(self) -> None:
        super().__init__(MLP(16, (32,), 2), num_classes=2)

    def setup(self, stage: str) -> None:
        self.train_ds = _loaders()[0].dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=16)


@pytest.mark.parametrize("plugin", ["ptq", "channel", "wanda"])
def test_data_built_in_the_modules_setup_is_a_clear_error_naming_the_order(tmp_path, plugin: str) -> None:
    """A raw AttributeError ('no attribute train_ds') from inside the plugin, with no word about why."""
    module = _DataInSetup()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = {
        "ptq": QuantizeCallback(method="ptq", start_epoch=1, latency="none"),
        "channel": PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, verbose=False),
        "wanda": PruningCallback(0.5, criterion="wanda", schedule="one_shot", start_epoch=0, verbose=False),
    }[plugin]
    with pytest.raises(ValueError, match=r"no attribute 'train_ds'\)\. If _DataInSetup\.setup\(\) builds it: Lightning calls that after the callbacks' setup"):
        _trainer(tmp_path, [callback]).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()) and type(module.model.net[1]) is nn.Linear
