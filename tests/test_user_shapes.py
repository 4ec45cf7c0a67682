"""The plugins on the projects users bring: loaders passed to fit, the module's own loaders, dict
batches, keyword forwards, monitoring plugin metrics, one selection rule for every plugin."""

from __future__ import annotations

import logging

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import trainer_kwargs
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_compress import ClassifierModule, PruningCallback, QuantizeCallback
from lightning_compress.models import MLP
from lightning_compress.quantization import fake_quant_layers
from lightning_compress.selection import select_weights


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _loaders() -> tuple[DataLoader, DataLoader]:
    x, y = _data()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), DataLoader(TensorDataset(x, y), batch_size=32)


def _trainer(tmp_path: Any, callbacks: list, **kw: Any) -> Trainer:
    args = trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=2)
    args.update(kw)
    return Trainer(callbacks=callbacks, **args)


class DictDataset(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "label": self.y[i]}


class DictModule(LightningModule):
    """A user's module: dict batches, its own dataloaders, a keyword-only forward."""

    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        self.net = _bn_net()
        self.keyword = keyword

    def forward(self, *args: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(pixels if pixels is not None else args[0])

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(pixels=batch["pixels"]) if self.keyword else self(batch["pixels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self._logits(batch), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._logits(batch)
        self.log("val_acc", (logits.argmax(-1) == batch["label"]).float().mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(), batch_size=32)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


# --------------------------------------------------------------------------- input discovery


@pytest.mark.parametrize("source", ["fit_loaders", "module_hooks"])
def test_channel_pruning_finds_its_input_without_example_input_array(tmp_path, source) -> None:
    seed_everything(0)
    prune = PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    trainer = _trainer(tmp_path, [prune])
    if source == "fit_loaders":
        module = ClassifierModule(_bn_net(), num_classes=4)
        assert module.example_input_array is None
        trainer.fit(module, *_loaders())
        net = module.model
    else:
        module = DictModule()
        trainer.fit(module)
        net = module.net
    assert net[0].out_features == 16 and net[1].num_features == 16 and net[3].in_features == 16  # half removed
    assert prune.compression_summary()["shrunk"]["channels"]


class KeywordOnlyModule(DictModule):
    def forward(self, *, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(pixels)


def test_channel_pruning_on_a_keyword_forward(tmp_path) -> None:
    """A forward called by keyword that computes the same called by position is traced and shrunk; one that takes
    its input by name only is a setup error naming the fix, before any change."""
    seed_everything(0)
    module = DictModule(keyword=True)
    prune = PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    _trainer(tmp_path, [prune]).fit(module)
    assert module.net[0].out_features == 16
    strict = KeywordOnlyModule(keyword=True)
    before = {k: v.clone() for k, v in strict.state_dict().items()}
    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, verbose=False)
    with pytest.raises(ValueError, match=r"traces the model's forward with one input tensor.*\['pixels'\] keyword"):
        _trainer(tmp_path, [prune]).fit(strict)
    assert all(torch.equal(before[k], v) for k, v in strict.state_dict().items())


class NoForwardModule(LightningModule):
    """A user's module with no forward: its step calls a small input layer, then the network, then a loss
    module, as ``self.model(**batch)`` modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(16, 16)  # called first, fewer parameters than the network
        self.net = _bn_net()
        self.loss = nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self.net(self.scale(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_step_that_calls_its_network_directly_is_found_and_measured(tmp_path) -> None:
    """The call found is the largest child's (not the input layer called before it, nor the loss after);
    the report measures that network, and channel removal traces and shrinks it."""
    from lightning_compress import CompressionReport
    from lightning_compress.batches import forward_call

    module = NoForwardModule()
    x, y = _data(8)
    call = forward_call(module, (x, y), "test")
    assert call.target == "net" and len(call.args) == 1 and torch.allclose(call.args[0], module.scale(x))
    assert call.network(module) is module.net and call.network(module.net) is module.net
    report = CompressionReport(batch_size=8, repeats=2, warmup=1, print_table=False, plot=False)
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False)
    trainer = _trainer(tmp_path, [prune, report], max_epochs=2)
    trainer.fit(module, _loaders()[0])
    from lightning_compress.tuning.trial import measure_run

    run = measure_run(trainer, module, tmp_path / "net.lc")  # what a sweep trial measures
    assert run["parameters"] == sum(int((p != 0).sum()) for p in module.net.parameters()) and run["latency_ms"] > 0
    assert run["artifact_bytes"] > 0 and run["macs"] == 16 * 32 + 32 * 16 + 16 * 4
    measured = report.report
    assert measured["baseline"]["params"] == sum(p.numel() for p in module.net.parameters())
    assert measured["compressed"]["sparsity"] > 0.4 and measured["ratios"]["latency"] > 0
    # channel removal traces the network the step calls, with the input it gets: the input layer stays whole
    channel = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    shrunk = NoForwardModule()
    with pytest.warns(UserWarning, match=r"traces 'net', the network the training step calls; the selected weights outside it stay whole: \['scale\.weight'\]"):
        _trainer(tmp_path, [channel], max_epochs=3).fit(shrunk, _loaders()[0])
    hidden, second = shrunk.net[0].out_features, shrunk.net[3].out_features
    assert hidden == shrunk.net[1].num_features == shrunk.net[3].in_features and second == shrunk.net[5].in_features
    assert hidden + second == pytest.approx(24, abs=1) and hidden < 32 and second < 16  # half of 32 + 16 channels, globally
    assert shrunk.scale.weight.shape == (16, 16) and bool((shrunk.scale.weight != 0).all())
    assert channel.compression_summary()["shrunk"]["channels"] == {"net.0": [32, hidden], "net.3": [16, second]}


def test_the_model_call_is_never_a_teacher_nor_a_child_before_the_modules_own_forward() -> None:
    """A module with its own forward is measured through it even when its step calls a bigger child
    first; a module without one is measured through its largest trainable child, never a frozen teacher.
    Finding the call leaves BatchNorm statistics as they were."""
    from lightning_compress.batches import forward_call

    class WithForward(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.big, self.net = nn.Linear(16, 256), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.big(batch[0]).sum() + self(batch[0]).sum()

    class Distils(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = _bn_net(), nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 4))
            self.teacher.requires_grad_(False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self.student(batch[0]), self.teacher(batch[0]))

    x, y = _data(8)
    assert forward_call(WithForward(), (x, y), "test").target == ""
    module = Distils()
    stats = module.student[1].running_mean.clone()
    call = forward_call(module, (x, y), "test")
    assert call.target == "student" and torch.equal(module.student[1].running_mean, stats) and module.student.training


# --------------------------------------------------------------------------- dict batches


@pytest.mark.parametrize("keyword", [False, True])
def test_qat_with_batchnorm_on_dict_batches_reestimates_and_converts(tmp_path, keyword, caplog) -> None:
    seed_everything(0)
    module = DictModule(keyword=keyword)
    quant = QuantizeCallback(start_epoch=1, latency="none", bn_reestimate_batches=3)
    _trainer(tmp_path, [quant]).fit(module)
    summary = quant.compression_summary()
    assert summary["bn_reestimated"] == {"layers": 1, "batches": 3}
    x = DictDataset().x[:8]
    module.eval()
    with torch.no_grad():
        fake = module(pixels=x)
        real = quant.quantized_model(x) if quant.quantized_model is not module else None
    assert real is not None and torch.allclose(real, fake, atol=0.05 * fake.abs().max().item())
    # calibration and BatchNorm re-estimation read the batches an epoch of the fit runs, no more (limit_train_batches)
    limited, ptq = QuantizeCallback(start_epoch=1, latency="none"), QuantizeCallback(method="ptq", start_epoch=1, latency="none")
    _trainer(tmp_path, [limited], limit_train_batches=2).fit(DictModule(keyword=keyword))
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [ptq], limit_train_batches=2).fit(DictModule(keyword=keyword))
    assert limited.compression_summary()["bn_reestimated"]["batches"] == 2
    assert "calibrated activation ranges on 2 training batches" in caplog.text


def test_ptq_calibrates_on_dict_batches_passed_to_fit(tmp_path) -> None:
    seed_everything(0)
    module = DictModule()
    quant = QuantizeCallback(method="ptq", calibration_batches=3, latency="none")
    _trainer(tmp_path, [quant]).fit(module, DataLoader(DictDataset(), batch_size=16, shuffle=True))
    ranges = quant.compression_summary()["observer_ranges"]
    assert set(ranges) == {"net.0", "net.3", "net.5"} and all(hi > lo for lo, hi in ranges.values())


class SkipsEveryThird(ClassifierModule):
    """A step that skips some batches (a data filter): ``None`` for ``batch_idx % 3 == 0``, before its forward."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx % 3 == 0 else super().training_step(batch, batch_idx)


def test_batches_the_step_skips_are_not_counted_as_run(tmp_path) -> None:
    seed_everything(0)
    train, val = _loaders()
    module = SkipsEveryThird(_bn_net(), num_classes=4)
    bn = module.model[1]
    quant = QuantizeCallback(start_epoch=1, latency="none", bn_reestimate_batches=3, convert_on_fit_end=False)
    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, verbose=False)  # finds its input
    _trainer(tmp_path, [quant, prune], limit_train_batches=6).fit(module, train, val)
    assert quant.compression_summary()["bn_reestimated"] == {"layers": 1, "batches": 3}
    # statistics of batches that ran: a skipped batch used to leave them reset (mean 0, variance 1)
    assert bn.num_batches_tracked.item() == 3 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    # PTQ of the same step: the ranges are observed, so the inputs are quantised too (int8 x int8)
    seed_everything(0)
    ptq = QuantizeCallback(method="ptq", calibration_batches=2, latency="none")
    _trainer(tmp_path, [ptq], max_epochs=1).fit(SkipsEveryThird(_bn_net(), num_classes=4), train, val)
    assert all(hi > lo for lo, hi in ptq.compression_summary()["observer_ranges"].values())
    assert "int8 x int8" in repr(ptq.quantized_model)


@pytest.mark.parametrize(("criterion", "structure"), [("taylor", "unstructured"), ("entropy", "channel")])
def test_data_criteria_on_dict_batches(tmp_path, criterion, structure) -> None:
    seed_everything(0)
    prune = PruningCallback(0.5, criterion=criterion, structure=structure, schedule="one_shot", start_epoch=1, verbose=False)
    _trainer(tmp_path, [prune]).fit(DictModule())
    assert prune.sparsity == pytest.approx(0.5, abs=0.05)


class ManualModule(DictModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(batch["pixels"]), batch["label"]))
        opt.step()


def test_batches_that_cannot_run_fail_in_setup_before_any_change(tmp_path) -> None:
    module = ManualModule()
    types_before = [type(m) for m in module.modules()]
    with pytest.raises(ValueError, match=r"manual optimisation.*batch_forward=lambda module, batch"):
        _trainer(tmp_path, [QuantizeCallback(start_epoch=1, latency="none")]).fit(module)
    assert [type(m) for m in module.modules()] == types_before
    quant = QuantizeCallback(start_epoch=1, latency="none", batch_forward=lambda m, b: m(b["pixels"]))
    _trainer(tmp_path, [quant], max_epochs=2).fit(module)
    assert quant.compression_summary()["bn_reestimated"]["batches"] > 0


# --------------------------------------------------------------------------- metrics users can monitor


def test_model_checkpoint_monitors_pruning_sparsity(tmp_path) -> None:
    seed_everything(0)
    prune = PruningCallback(0.8, schedule="linear", start_epoch=0, end_epoch=2, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="pruning/sparsity", mode="max", save_top_k=1)
    trainer = _trainer(tmp_path, [prune, ckpt], enable_checkpointing=True)
    trainer.fit(ClassifierModule(MLP(16, (32,), 4), num_classes=4), *_loaders())
    assert "pruning/sparsity" in trainer.callback_metrics
    assert float(ckpt.best_model_score) == pytest.approx(0.8, abs=1e-3)


def test_quantisation_metrics_are_in_callback_metrics(tmp_path) -> None:
    quant = QuantizeCallback(start_epoch=1, latency="none", convert_on_fit_end=False)
    trainer = _trainer(tmp_path, [quant], max_epochs=2)
    trainer.fit(ClassifierModule(MLP(16, (32,), 4), num_classes=4), *_loaders())
    assert float(trainer.callback_metrics["quant/weight_bits"]) == 8.0
    assert float(trainer.callback_metrics["quant/fraction_quantized"]) == 1.0


def test_two_plugins_guard_the_same_metric(tmp_path) -> None:
    seed_everything(0)
    prune = PruningCallback(0.5, schedule="linear", start_epoch=1, end_epoch=3, monitor="val_acc", max_drop=0.5, verbose=False)
    quant = QuantizeCallback(weight_bits={0: 8, 2: 6}, monitor="val_acc", max_drop=0.5, latency="none")
    _trainer(tmp_path, [prune, quant], max_epochs=4).fit(ClassifierModule(MLP(16, (32,), 4), num_classes=4), *_loaders())
    p, q = prune.compression_summary(), quant.compression_summary()
    assert p["guard"]["baseline"] is not None and not p["guard"]["stopped"] and p["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [h["bits"] for h in q["history"]] == [8, 8, 6, 6] and q["locked_bits"] is None


# --------------------------------------------------------------------------- one selection rule


class WithTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.wrapper = nn.Module()
        self.wrapper.teacher = nn.Sequential(nn.Linear(8, 4))  # a teacher below the top level


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, ["student.0", "student.2"]),
        ([r"student\.2"], None, ["student.2"]),
        (None, [r"student\.0"], ["student.2"]),
        ([r"teacher"], None, ["wrapper.teacher.0"]),
        ([".*"], None, ["student.0", "student.2"]),
    ],
)
def test_pruning_and_quantisation_select_the_same_layers(include, exclude, expected) -> None:
    from lightning_compress.pruning.masks import select_parameters
    from lightning_compress.quantization.layer_selection import prepare_fake_quant
    from lightning_compress.quantization.layers import QuantSettings

    pruned = [n.rsplit(".", 1)[0] for n in select_parameters(WithTeacher(), include, exclude)]
    quantised = sorted(prepare_fake_quant(WithTeacher(), QuantSettings(), include, exclude))
    assert pruned == quantised == expected


@pytest.mark.parametrize(("include", "exclude", "match"), [(["nomatch"], None, "include pattern 'nomatch' matches no weight to"),
                                                           (None, ["nomatch"], "exclude pattern 'nomatch' matches none of the weights")])
def test_a_pattern_that_matches_nothing_is_the_same_error_in_every_plugin(tmp_path, include, exclude, match) -> None:
    for plugin in (PruningCallback(include=include, exclude=exclude), QuantizeCallback(include=include, exclude=exclude)):
        with pytest.raises(ValueError, match=match):
            _trainer(tmp_path, [plugin]).fit(ClassifierModule(MLP(16, (32,), 4), num_classes=4), *_loaders())


def test_select_weights_by_parameter_name() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    kind = lambda module, leaf: isinstance(module, nn.Linear) and leaf == "weight"  # noqa: E731
    assert select_weights(net, [r"1\.weight", "0"], None, kind, "prune") == ["0.weight", "1.weight"]
    assert select_weights(net, [".*"], None, kind, "prune") == ["0.weight"]  # ".*" takes no norm
    assert fake_quant_layers(net) == {}
    # an LSTM's weights by a regex over their names: the leaf names start with weight, which the pattern spells out
    lstm = nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8, num_layers=2))
    expected = ["0.weight", "1.weight_ih_l0", "1.weight_hh_l0", "1.weight_ih_l1", "1.weight_hh_l1"]
    assert select_weights(lstm, [".*", r"1\.weight_.*"], None, kind, "prune") == expected
    with pytest.raises(ValueError, match=r"include pattern '1\\\\\.\.\*' matches no weight to prune"):
        select_weights(lstm, [".*", r"1\..*"], None, kind, "prune")  # no kind spelt out: no LSTM weight, no bias


def test_distillation_on_dict_batches_with_named_keys(tmp_path) -> None:
    from lightning_compress import DistillationModule

    seed_everything(0)
    module = DistillationModule(MLP(16, (8,), 4), MLP(16, (32,), 4), num_classes=4, input_key="pixels", target_key="label",
                                cache_teacher_outputs=True)
    loaders = DataLoader(DictDataset(), batch_size=16, shuffle=True), DataLoader(DictDataset(), batch_size=32)
    trainer = _trainer(tmp_path, [])
    trainer.fit(module, *loaders)
    assert {"val_acc", "val_agreement", "ce_loss"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match=r"name the key with DistillationModule\(input_key=..., target_key=...\)"):
        _trainer(tmp_path, []).fit(DistillationModule(MLP(16, (8,), 4), MLP(16, (32,), 4), num_classes=4), *loaders)


class _KeywordStudent(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, hidden), nn.Linear(hidden, 4)

    def forward(self, *, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(pixels)))


def test_a_keyword_only_student_is_measured_by_the_report_and_the_latency_check(tmp_path) -> None:
    """The module remembered a positional example input, so the report and QuantizeCallback's latency check called
    ``forward(*, pixels)`` positionally and measured nothing; they call it as the step does."""
    from lightning_compress import CompressionReport, DistillationModule

    seed_everything(0)
    module = DistillationModule(_KeywordStudent(8), _KeywordStudent(32), num_classes=4, input_key="pixels", target_key="label")
    report = CompressionReport(repeats=2, warmup=1, plot=False, print_table=False)
    quant = QuantizeCallback(latency="eager")
    loaders = DataLoader(DictDataset(), batch_size=16), DataLoader(DictDataset(), batch_size=32)
    _trainer(tmp_path, [quant, report], max_epochs=1).fit(module, *loaders)
    assert set(module.example_input_array) == {"pixels"} and module.example_input_array["pixels"].shape == (1, 16)
    assert report.report["compressed"]["latency_ms"] > 0 and report.report["compressed"]["macs"] == 16 * 8 + 8 * 4
    assert report.report["baseline"]["macs"] == 16 * 32 + 32 * 4  # the teacher
    assert quant.compression_summary()["latency"]["eager"]["float_ms"] > 0


# ------------------------------------------------------------------------------ layers built in configure_model
class LazyModule(LightningModule):
    """Builds its network in ``configure_model``, as FSDP-ready Lightning projects do."""

    def __init__(self, idempotent: bool = True) -> None:
        super().__init__()
        self.idempotent = idempotent
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None and self.idempotent:
            return
        self.net = _bn_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_pruning_acts_on_layers_built_in_configure_model(tmp_path) -> None:
    seed_everything(0)
    module = LazyModule()
    cb = PruningCallback(0.5, schedule="one_shot", verbose=False)
    _trainer(tmp_path, [cb]).fit(module, *_loaders())
    assert cb.sparsity == pytest.approx(0.5, abs=0.01)
    assert sorted(cb.masks) == ["net.0.weight", "net.3.weight", "net.5.weight"]
    assert float((module.net[0].weight == 0).float().mean()) > 0.3  # type: ignore[index]


def test_qat_converts_layers_built_in_configure_model(tmp_path) -> None:
    seed_everything(0)
    module = LazyModule()
    cb = QuantizeCallback(latency="none")
    _trainer(tmp_path, [cb]).fit(module, *_loaders())
    assert len(fake_quant_layers(module)) == 3
    assert cb.quantized_model is not None


def test_a_configure_model_that_rebuilds_its_layers_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"configure_model built new layers.*idempotent"):
        _trainer(tmp_path, [PruningCallback(0.5, verbose=False)]).fit(LazyModule(idempotent=False), *_loaders())


@pytest.mark.parametrize("plugin", ["prune", "quantize"])
def test_a_sharding_strategy_is_refused_before_any_change(tmp_path, plugin) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_compress.plugin import check_strategy

    cb = PruningCallback(0.5) if plugin == "prune" else QuantizeCallback()
    module = ClassifierModule(MLP(16, (8,), 4))
    fake = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[cb])
    with pytest.raises(ValueError, match=r"does not support strategy FSDPStrategy.*'ddp'"):
        cb.setup(fake, module, "fit")  # type: ignore[arg-type]
    assert not fake_quant_layers(module) and all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU, nn.Flatten, MLP) for m in module.model.modules())
    check_strategy(SimpleNamespace(strategy=object()), "x")  # type: ignore[arg-type]


def test_a_sweep_measures_the_artifact_of_a_keyword_forward(tmp_path) -> None:
    """``artifact_bytes`` of a run whose module's forward is called by keyword (``self(pixels=...)``): the
    example call found in a batch is exported by keyword, so the sweep's size objective is a number."""
    import math

    from lightning_compress.tuning.trial import measure_run

    seed_everything(0)
    module = DictModule(keyword=True)
    prune = PruningCallback(0.7, schedule="one_shot", start_epoch=0, verbose=False)
    trainer = _trainer(tmp_path, [prune])
    trainer.fit(module)
    measured = measure_run(trainer, module, tmp_path / "artifact.safetensors")
    assert math.isfinite(measured["artifact_bytes"]) and measured["artifact_bytes"] == (tmp_path / "artifact.safetensors").stat().st_size
    import lightning_compress as lc

    pixels = torch.randn(5, *DictDataset().x.shape[1:])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(lc.load(tmp_path / "artifact.safetensors")(pixels=pixels), module(pixels=pixels))
