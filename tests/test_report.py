from __future__ import annotations

import copy
import io
import json
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import calibrate, trainer_kwargs
from lightning_compress import ClassifierModule, CompressionCallback, CompressionReport, DigitsDataModule, PruningCallback, compression_report
from lightning_compress.models import MLP
from lightning_compress.report import count_parameters, measure_latency, print_report, serialized_size


def test_counts_match_hand_count() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    # 4*3 + 3 + 3*2 + 2 = 23
    with torch.no_grad():
        net[0].weight[0].zero_()  # 4 zeros
        net[2].bias.zero_()  # 2 zeros
    assert count_parameters(net) == (23, 17)


def test_shared_parameters_counted_once() -> None:
    lin = nn.Linear(5, 5)
    net = nn.Sequential(lin, lin)
    assert count_parameters(net)[0] == 30


def test_size_is_the_torch_save_artifact() -> None:
    net = nn.Linear(100, 50)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    size = serialized_size(net)
    assert size == buffer.getbuffer().nbytes
    assert 4 * 5050 < size < 4 * 5050 + 4096  # float32 payload plus a small container
    half = nn.Linear(100, 50).half()
    assert serialized_size(half) < 0.6 * size


def test_latency_is_measured_and_ordered() -> None:
    from lightning_compress.report import count_macs

    small = nn.Linear(16, 16)
    big = nn.Sequential(nn.Linear(16, 512), *[nn.Linear(512, 512) for _ in range(5)])
    x = torch.randn(1, 16)
    assert count_macs(big, x) >= 30 * count_macs(small, x)  # thousands of times more work, in fact
    lat = measure_latency([small, big], x, batch_size=8, repeats=15, warmup=2, num_threads=1)
    assert len(lat) == 2 and all(v["median_ms"] > 0 for v in lat)
    assert all(v["min_ms"] <= v["p10_ms"] <= v["median_ms"] <= v["p90_ms"] <= v["max_ms"] for v in lat)
    few = measure_latency([small, big], x, batch_size=8, repeats=2, warmup=0, num_threads=1)  # the report's repeats=2
    assert all(v["min_ms"] <= v["p10_ms"] <= v["p90_ms"] <= v["max_ms"] for v in few), few  # quantiles of the samples
    # medians of interleaved runs: the much larger model is slower, by a wide margin, whatever the noise
    assert lat[1]["median_ms"] > 3 * lat[0]["median_ms"], lat
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied"):
        measure_latency([big], torch.randn(1, 8), batch_size=2, repeats=1, warmup=0)  # wrong width: forward fails
    with pytest.raises(ValueError, match="batch_size"):
        measure_latency([small], torch.randn(1, 16), batch_size=0)


def test_threads_restored_after_measurement() -> None:
    before = torch.get_num_threads()
    measure_latency([nn.Linear(4, 4)], torch.randn(1, 4), batch_size=2, repeats=2, warmup=0, num_threads=1)
    assert torch.get_num_threads() == before


def test_plain_function_report_schema() -> None:
    base, comp = MLP(64, (64,), 10), MLP(64, (16,), 10)
    r = compression_report(
        base, comp, torch.randn(1, 64), baseline_metrics={"val_acc": 0.9}, compressed_metrics={"val_acc": 0.85},
        batch_size=4, repeats=3, warmup=1,
    )
    for key in ("baseline", "compressed"):
        assert {"params", "nonzero_params", "size_bytes", "latency_ms", "metrics", "sparsity"} <= set(r[key])
    assert r["baseline"]["params"] == 64 * 64 + 64 + 64 * 10 + 10
    assert r["compressed"]["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert r["ratios"]["params"] == pytest.approx(r["baseline"]["params"] / r["compressed"]["params"])
    assert r["ratios"]["size"] == pytest.approx(r["baseline"]["size_bytes"] / r["compressed"]["size_bytes"])
    assert r["baseline"]["macs"] == 64 * 64 + 64 * 10 and r["compressed"]["macs"] == 64 * 16 + 16 * 10
    assert r["ratios"]["macs"] == pytest.approx(4736 / 1184)
    assert r["compressed"]["metrics"] == {"val_acc": 0.85}
    console_out = io.StringIO()
    from rich.console import Console

    print_report(r, Console(file=console_out, width=120))
    assert "size on disk" in console_out.getvalue() and "val_acc" in console_out.getvalue()


@pytest.mark.parametrize(("bits", "activation_bits"), [(8, 8), (4, None)])  # Int8Linear; packed 4-bit LowBitLayer
def test_plain_function_counts_a_converted_models_weights(bits: int, activation_bits: int | None) -> None:
    """compression_report(baseline, quant.quantized_model, x) reported 0 parameters: converted layers hold their
    weights in buffers. They count as the weights and biases they stand for, zeros of the rounding included."""
    from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant

    torch.manual_seed(0)
    base = MLP(64, (64,), 10)
    fake = copy.deepcopy(base)
    prepare_fake_quant(fake, QuantSettings(bits=bits, activation_bits=activation_bits))
    calibrate(fake, torch.randn(32, 64))
    converted = convert_fake_quant(fake).eval()
    r = compression_report(base, converted, torch.randn(1, 64), batch_size=4, repeats=2, warmup=0)
    weights = [m.weight for m in converted.modules() if hasattr(m, "packed")]
    assert r["compressed"]["params"] == r["baseline"]["params"] == 64 * 64 + 64 + 64 * 10 + 10
    assert r["compressed"]["nonzero_params"] == r["compressed"]["params"] - sum(int((w == 0).sum()) for w in weights) < r["compressed"]["params"]


class _ZeroHalf(CompressionCallback):
    """A test plugin: zeroes half of the first layer at epoch 2 (after two dense epochs)."""

    def __init__(self) -> None:
        self.done = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 2 and not self.done:
            with torch.no_grad():
                w = pl_module.model.net[1].weight
                w[: w.shape[0] // 2].zero_()
            self.done = True

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.done:
            g = pl_module.model.net[1].weight.grad
            g[: g.shape[0] // 2].zero_()

    def compression_state(self) -> dict[str, float]:
        return {"sparsity": 0.5 if self.done else 0.0}

    def compression_summary(self) -> dict:
        return {"notes": "half of layer 1 removed"}

    def is_active(self) -> bool:
        return self.done


def test_callback_writes_json_and_png(tmp_path: Path) -> None:
    L.seed_everything(0)
    report = CompressionReport(batch_size=8, repeats=3, warmup=1, print_table=False)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = L.Trainer(max_epochs=4, callbacks=[_ZeroHalf(), report], **trainer_kwargs(tmp_path, limit_train_batches=3))
    trainer.fit(module, DigitsDataModule(batch_size=32))
    path = tmp_path / "compression_report.json"
    data = json.loads(path.read_text())
    assert (tmp_path / "compression_report.png").stat().st_size > 1000
    base, comp = data["baseline"], data["compressed"]
    assert base["params"] == comp["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert base["nonzero_params"] - comp["nonzero_params"] == 16 * 64
    assert comp["sparsity"] == pytest.approx(16 * 64 / comp["params"])
    # lr 0: the model does not move, so the dense epochs' metrics are the baseline's
    assert base["metrics_epoch"] == 1 and comp["metrics_epoch"] == 3
    assert set(base["metrics"]) == {"val_acc", "val_loss"}
    assert [h["state"]["sparsity"] for h in data["history"]] == [0.0, 0.0, 0.5, 0.5]
    assert data["plugins"]["_ZeroHalf"]["notes"] == "half of layer 1 removed"
    assert data["ratios"]["latency"] > 0
    trainer.test(module, DigitsDataModule(batch_size=32), verbose=False)
    assert "test_acc" in json.loads(path.read_text())["compressed"]["metrics"]


def test_baseline_is_taken_before_plugins_change_the_model(tmp_path: Path) -> None:
    class Shrinker(CompressionCallback):
        def setup(self, trainer, pl_module, stage) -> None:
            super().setup(trainer, pl_module, stage)
            pl_module.model = MLP(64, (8,), 10)

    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False)
    # the report is listed after the plugin, yet measures the model before the plugin's setup
    trainer = L.Trainer(max_epochs=1, callbacks=[Shrinker(), report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    trainer.fit(ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=16))
    assert report.report["baseline"]["params"] == 64 * 32 + 32 + 330
    assert report.report["compressed"]["params"] == 64 * 8 + 8 + 90
    assert report.report["ratios"]["params"] > 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": -1}, {"repeats": 0}, {"filename": "x.txt"}, {"num_threads": 0}, {"plot": "false"}, {"print_table": None},
        # taken until the end of fit, where the latency note blamed the model ("a model failed on the example input")
        {"repeats": 2.5}, {"num_threads": 1.5}, {"warmup": float("nan")}, {"repeats": True},
        # bare TypeError/AttributeError, or a late one in setup
        {"repeats": "30"}, {"filename": None}, {"dirpath": 3},
        # a folder in the name: the report was lost at the end of fit (FileNotFoundError), or written outside dirpath
        {"filename": "sub/report.json"}, {"filename": "../report.json"}, {"filename": ".json"},
    ],
)
def test_bad_report_arguments(kwargs) -> None:
    option, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=rf"^{option} must be .*got {re.escape(repr(value))}$"):
        CompressionReport(**kwargs)


class _BufferArtifact(CompressionCallback):
    """Returns a converted-looking artifact: int8 weights as buffers, no Parameters."""

    def __init__(self) -> None:
        self.artifact = None

    def on_fit_end(self, trainer, pl_module) -> None:
        class Int8MLP(nn.Module):
            def __init__(self, source: nn.Module) -> None:
                super().__init__()
                self.src = [source]
                for i, p in enumerate(source.parameters()):
                    self.register_buffer(f"w{i}", p.detach().to(torch.int8))

            def forward(self, x):
                return self.src[0](x)

        self.artifact = Int8MLP(pl_module.model)

    def compressed_artifact(self):
        return self.artifact

    def is_active(self) -> bool:
        return True


def test_converted_artifact_counts_logical_weights_and_its_own_bytes(tmp_path: Path) -> None:
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False)
    plugin = _BufferArtifact()
    module = ClassifierModule(MLP(64, (32,), 10))
    trainer = L.Trainer(max_epochs=1, callbacks=[plugin, report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    r = report.report
    assert r["compressed"]["params"] == r["baseline"]["params"] == 64 * 32 + 32 + 330
    assert r["compressed"]["size_bytes"] == serialized_size(plugin.artifact)
    assert r["compressed"]["macs"] == r["baseline"]["macs"] == 64 * 32 + 32 * 10  # counted on the float model
    assert r["ratios"]["size"] > 2  # int8 buffers against float32 parameters (plus a fixed container overhead)


@pytest.mark.parametrize("bits", [2, 8])
def test_the_zeros_that_low_bit_rounding_makes_are_counted(tmp_path: Path, bits: int) -> None:
    """At 2 bits most weights round to zero; the report counted the float latent weights (0.0% sparsity) where
    the converted model is 63% zeros. Its non-zero count is now the converted weights' own."""
    from lightning_compress import QuantizeCallback

    torch.manual_seed(0)
    quant = QuantizeCallback(weight_bits=bits, activation_bits=None, start_epoch=1, latency="none")
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False)
    trainer = L.Trainer(max_epochs=2, callbacks=[quant, report], **trainer_kwargs(tmp_path, limit_train_batches=4))
    trainer.fit(ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=16))
    layers = [m for m in quant.quantized_model.modules() if type(m).__name__ == "LowBitLayer"]
    zeros = sum(int((m.weight == 0).sum()) for m in layers)  # the converted weights, as the model runs them
    biases_and_weights = sum(m.weight.numel() + m.bias.numel() for m in layers)
    r = report.report
    assert r["compressed"]["params"] == r["baseline"]["params"] == biases_and_weights
    assert r["compressed"]["nonzero_params"] == biases_and_weights - zeros - sum(int((m.bias == 0).sum()) for m in layers)
    assert zeros > (0.4 if bits == 2 else 0) * biases_and_weights  # 2 bits: most weights are zeros


# ------------------------------------------------------------- the metrics describe the model fit returns
def _bias_free_module() -> ClassifierModule:
    """Every parameter is a prunable weight, so the pruning guard's restore puts back the whole model."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 10, bias=False))
    return ClassifierModule(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))


def test_guard_tripping_at_the_last_validation_reports_the_restored_model(tmp_path: Path) -> None:
    from lightning_compress import PruningCallback

    L.seed_everything(0)
    module, data = _bias_free_module(), DigitsDataModule(batch_size=32)
    # dense for epochs 0-2, then 98% at once in the last epoch: its validation trips the guard
    prune = PruningCallback(0.98, schedule="one_shot", start_epoch=3, monitor="val_acc", max_drop=0.05, verbose=False)
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)
    trainer = L.Trainer(max_epochs=4, callbacks=[prune, report], **trainer_kwargs(tmp_path, limit_train_batches=6))
    with pytest.warns(UserWarning, match="accuracy guard") as record:
        trainer.fit(module, data)
    assert [e["epoch"] for e in prune.compression_summary()["guard"]["events"]] == [3]
    assert not [w for w in record if "cannot run" in str(w.message)]  # it ran: no warning that it cannot
    # the metrics the fit leaves are the returned model's sparsity, not the rejected 98% (no step logged it after)
    assert float(trainer.callback_metrics["pruning/sparsity"]) == pytest.approx(0.0)
    assert float(trainer.callback_metrics["pruning/guard_tripped"]) == 1.0
    returned = L.Trainer(**trainer_kwargs(tmp_path)).validate(module, data, verbose=False)[0]
    r = report.report
    discarded = r["history"][-1]["metrics"]["val_acc"]  # the validation of the 98%-sparse weights
    assert returned["val_acc"] > discarded + 0.05
    # and the history pairs it with the sparsity it measured (it showed the restored 0%)
    assert r["history"][-1]["state"]["sparsity"] == pytest.approx(0.98, abs=1e-3) and r["history"][-1]["active"]
    assert r["compressed"]["metrics"]["val_acc"] == pytest.approx(returned["val_acc"])
    assert r["compressed"]["metrics"]["val_loss"] == pytest.approx(returned["val_loss"], rel=1e-5)
    assert r["compressed"]["metrics_epoch"] == 2 and r["compressed"]["sparsity"] == 0.0
    assert "from the validation at epoch 2" in r["compressed_note"]
    # the baseline is the last epoch before compression, not the epoch after the guard undid it all
    assert r["baseline"]["metrics_epoch"] == 2
    assert r["baseline"]["metrics"] == r["compressed"]["metrics"]


def test_model_changed_after_its_last_validation_has_no_compressed_metrics(tmp_path: Path) -> None:
    from lightning_compress import PruningCallback

    L.seed_everything(0)
    # the schedule ends at max_epochs: its last step is taken when training ends, after the last validation
    prune = PruningCallback(0.6, schedule="linear", start_epoch=1, end_epoch=3, verbose=False)
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)
    trainer = L.Trainer(max_epochs=3, callbacks=[prune, report], **trainer_kwargs(tmp_path, limit_train_batches=3))
    module, data = ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=32)
    with pytest.warns(UserWarning, match="the last pruning step gets no fine-tuning"):
        trainer.fit(module, data)
    r = copy.deepcopy(report.report)
    assert prune.sparsity == pytest.approx(0.6, abs=0.01)  # what fit returned
    assert r["history"][-1]["state"]["sparsity"] == pytest.approx(0.3, abs=0.01)  # what the last validation saw
    assert r["compressed"]["metrics"] == {} and "metrics_epoch" not in r["compressed"]
    assert "changed after the last validation (epoch 2" in r["compressed_note"]
    assert "trainer.validate" in r["compressed_note"]
    console_out = io.StringIO()
    from rich.console import Console

    print_report(r, Console(file=console_out, width=200))
    assert "Compressed metrics: none" in console_out.getvalue()
    # a validation on other data is not compared with the baseline's validation
    val_set = data.val_dataloader().dataset
    with pytest.warns(UserWarning, match=rf"this trainer.validate ran 100 samples where the fit's validation ran {len(val_set)}: other data"):
        trainer.validate(module, DataLoader(torch.utils.data.Subset(data.test_set, range(100)), batch_size=32), verbose=False)
    assert report.report["compressed"]["metrics"] == {}
    # the note's advice: trainer.validate of the returned model fills its metrics (it changed nothing before), on
    # the fit's validation samples, whatever the loader's batch size
    validated = trainer.validate(module, DataLoader(val_set, batch_size=7, shuffle=True), verbose=False)[0]
    assert report.report["compressed"]["metrics"]["val_acc"] == pytest.approx(validated["val_acc"])
    assert report.report["compressed_note"] == "Compressed metrics: from trainer.validate of the model fit returned."
    assert json.loads(Path(report.report_path).read_text())["compressed"]["metrics"]["val_loss"] == pytest.approx(validated["val_loss"])


def test_a_metric_never_logged_is_a_warning_naming_the_logged_keys(tmp_path: Path) -> None:
    report = CompressionReport(metrics=["val_ac", "test_acc"], batch_size=4, repeats=2, warmup=0, print_table=False)
    module, data = ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32)
    trainer = L.Trainer(max_epochs=1, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    with pytest.warns(UserWarning, match=r"CompressionReport\(metrics=\['val_ac', 'test_acc'\]\): 'val_ac' was never "
                      r"logged; logged keys: \[.*'val_acc', 'val_loss'\]") as record:
        trainer.fit(module, data)
    assert not [w for w in record if "'test_acc' was" in str(w.message)]  # Trainer.test logs it later
    assert report.report["compressed"]["metrics"] == {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # test_acc is logged by the test: no warning now
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.test(module, data, verbose=False)
    assert set(report.report["compressed"]["metrics"]) == {"test_acc"}
    assert CompressionReport(metrics="val_acc").metrics == ["val_acc"]  # one key as a string


class _LogsNothingInValidation(ClassifierModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self(x)  # measured, never logged


def test_validations_that_log_nothing_are_said_so_for_both_models(tmp_path: Path) -> None:
    """Pruning from epoch 1, validations at epochs 0-2 logging no metric: the baseline note said compression "was
    active at the first validation of this fit, epoch 0", which it was not, and the empty compressed row had no note."""
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False)
    prune = PruningCallback(0.6, start_epoch=1, end_epoch=2, verbose=False)
    trainer = L.Trainer(max_epochs=3, callbacks=[prune, report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    trainer.fit(_LogsNothingInValidation(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32))
    assert [v["epoch"] for v in report.validations] == [0, 1, 2] and not report.validations[0]["active"]
    for row in ("baseline", "compressed"):
        assert report.report[row]["metrics"] == {}
        assert "logged no metric" in report.report[f"{row}_note"] and "barebones" in report.report[f"{row}_note"]
    assert "was active" not in report.report["baseline_note"]


@pytest.mark.parametrize("bad", [[], [""], ["val_acc", 3], ("val_acc", None), 7])
def test_bad_metrics_option(bad) -> None:
    with pytest.raises(ValueError, match=rf"metrics must be None .* got {re.escape(repr(bad))}"):
        CompressionReport(metrics=bad)


class _ManualModule(L.LightningModule):
    """Manual optimisation, and nothing that sets example_input_array."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimisation_without_example_input_fails_before_training(tmp_path: Path) -> None:
    module = _ManualModule()
    report = CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)
    trainer = L.Trainer(max_epochs=1, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    with pytest.raises(ValueError, match=r"CompressionReport .* manual optimisation .* Set example_input_array on the "
                       r"LightningModule where only the model's input is needed \(the report"):
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0  # said before training, not after it
    module.example_input_array = torch.zeros(1, 1, 8, 8)
    trainer = L.Trainer(max_epochs=1, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert report.report["compressed"]["params"] == 64 * 16 + 16 + 16 * 10 + 10

    class SetsItsExampleInSetup(_ManualModule):  # the module's setup runs after the callbacks'
        def setup(self, stage: str) -> None:
            self.example_input_array = torch.zeros(1, 1, 8, 8)

    trainer = L.Trainer(max_epochs=1, callbacks=[report], **trainer_kwargs(tmp_path, limit_train_batches=2))
    trainer.fit(SetsItsExampleInSetup(), DigitsDataModule(batch_size=16))
    assert report.report["compressed"]["params"] == 64 * 16 + 16 + 16 * 10 + 10


# ---------------------------------------------------------------------- a guard with nothing to read
def _guarded(kind: str):
    from lightning_compress import PruningCallback, QuantizeCallback

    if kind == "PruningCallback":
        return PruningCallback(0.9, schedule="one_shot", monitor="val_acc", max_drop=0.01, verbose=False)
    return QuantizeCallback(weight_bits={0: 8, 1: 4}, monitor="val_acc", max_drop=0.01, latency="none")


@pytest.mark.parametrize("kind", ["PruningCallback", "QuantizeCallback"])
@pytest.mark.parametrize(
    ("fit_kwargs", "reason"),
    [
        ({"limit_val_batches": 0}, "limit_val_batches=0"),
        ({"val_loader": False}, r"there is no validation dataloader"),
        ({"check_val_every_n_epoch": 3}, r"check_val_every_n_epoch=3 is more than max_epochs=2"),
    ],
    ids=["limit_val_batches=0", "no-val-loader", "check_val_every_n_epoch"],
)
def test_a_guard_that_cannot_run_is_a_warning_when_training_starts(tmp_path: Path, kind: str, fit_kwargs, reason) -> None:
    import warnings

    fit_kwargs = dict(fit_kwargs)
    val_loader = fit_kwargs.pop("val_loader", True)
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    loaders = (data.train_dataloader(), data.val_dataloader()) if val_loader else (data.train_dataloader(),)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[_guarded(kind)], **trainer_kwargs(tmp_path, limit_train_batches=2, **fit_kwargs)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ClassifierModule(MLP(64, (16,), 10)), *loaders)
    said = [str(w.message) for w in record if "accuracy guard cannot run" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{kind}(monitor='val_acc')"), said
    assert re.search(rf"cannot run because {reason}", said[0]), said


@pytest.mark.parametrize(
    ("kind", "late", "max_epochs", "every", "reason"),
    [
        ("PruningCallback", {"schedule": "one_shot", "start_epoch": 4}, 5, 2, r"the fit's last validation is after epoch 3"),
        ("PruningCallback", {"schedule": "one_shot", "start_epoch": 3}, 5, 2, None),
        ("PruningCallback", {"schedule": "linear", "start_epoch": 1, "end_epoch": 3}, 3, 1,
         r"it comes when training ends.*It is not taken, and the fit ends below its target"),
        ("PruningCallback", {"schedule": "linear", "start_epoch": 1, "end_epoch": 2}, 3, 1, None),
        ("QuantizeCallback", {"weight_bits": {0: 8, 4: 4}}, 5, 2, r"the fit's last validation is after epoch 3"),
        ("QuantizeCallback", {"weight_bits": {0: 8, 2.5: 6, 3: 4}}, 5, 2, None),
        # max_steps ends the fit (2 steps an epoch): the epochs it completes are validated, the partial last one is not
        ("PruningCallback", {"schedule": "one_shot", "start_epoch": 2}, (10, 5), 1,
         r"but max_steps=5 ends training at epoch 2\.5, within epoch 2, which is never validated"),
        ("PruningCallback", {"schedule": "one_shot", "start_epoch": 1}, (10, 5), 1, None),
        ("PruningCallback", {"schedule": "one_shot", "start_epoch": 2}, (-1, 6), 2,
         r"the fit's last validation is after epoch 1 \(check_val_every_n_epoch=2, max_steps=6 ends training at epoch 3\)"),
        ("QuantizeCallback", {"weight_bits": {0: 8, 2: 4}}, (10, 5), 1, r"but max_steps=5 ends training at epoch 2\.5, within epoch 2"),
        # an integer val_check_interval validates every that many batches, also within the last epoch
        ("PruningCallback", {"schedule": "one_shot", "start_epoch": 2}, (10, 5), (1, 1), None),
        ("QuantizeCallback", {"weight_bits": {0: 8, 2: 4}}, (10, 7), 1, None),
    ],
)
def test_a_guard_says_when_no_validation_judges_the_last_change(tmp_path: Path, kind, late, max_epochs, every, reason) -> None:
    import warnings

    from lightning_compress import PruningCallback, QuantizeCallback

    guard = {"monitor": "val_acc", "max_drop": 0.5}
    if kind == "PruningCallback":
        callback = PruningCallback(0.5, verbose=False, **late, **guard)
    else:
        callback = QuantizeCallback(latency="none", **late, **guard)
    max_epochs, max_steps = max_epochs if isinstance(max_epochs, tuple) else (max_epochs, -1)
    every, interval = every if isinstance(every, tuple) else (every, 1.0)
    trainer = L.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, callbacks=[callback], val_check_interval=interval,
        **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1, check_val_every_n_epoch=every),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32))
    said = [str(w.message) for w in record if "no validation judges it" in str(w.message)]
    if reason is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(f"{kind}(monitor='val_acc')") and re.search(reason, said[0]), said


class _FailsOnLargeBatches(nn.Module):
    """Runs on small batches only (a model that fixes its batch size somewhere in its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise RuntimeError(f"batch {x.shape[0]} is larger than 4")
        return self.fc(x)


def test_a_model_that_fails_at_the_latency_batch_leaves_a_note_not_a_crash(capsys) -> None:
    model = _FailsOnLargeBatches()
    with pytest.warns(UserWarning, match=r"CPU latency: not measured, a model failed on the example input at batch 16 \(RuntimeError: batch 16"):
        report = compression_report(model, model, torch.randn(2, 8), batch_size=16, repeats=2, warmup=1)
    assert report["compressed"]["latency_ms"] is None and report["ratios"]["latency"] is None
    assert report["baseline"]["params"] == 18 and report["baseline"]["macs"] == 16  # the rest is measured
    print_report(report)
    assert "CPU latency: not measured" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
@pytest.mark.parametrize("example", [False, True], ids=["batch", "example_input_array"])
def test_under_a_true_precision_both_models_are_measured_in_the_training_dtype(tmp_path, precision: str, example: bool) -> None:
    from lightning_compress.pruning import PruningCallback

    torch.manual_seed(0)
    module = ClassifierModule(MLP(64, (32,), 10), example_input_shape=(1, 64) if example else None)
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=1, dirpath=tmp_path)
    prune = PruningCallback(0.01, schedule="one_shot", start_epoch=1, verbose=False)
    trainer = L.Trainer(max_epochs=2, precision=precision, callbacks=[prune, report], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, DigitsDataModule(batch_size=16))
    base, comp = report.report["baseline"], report.report["compressed"]
    # the baseline copy was taken before Lightning cast the module: it is cast too (sizes equal at 1% zeros)
    assert base["size_bytes"] == comp["size_bytes"] and report.report["ratios"]["size"] == 1.0
    assert base["latency_ms"] and comp["latency_ms"] and base["macs"] == comp["macs"] == 64 * 32 + 32 * 10


@pytest.mark.parametrize(("setting", "value"), [("batch_size", 0), ("repeats", 0), ("seq_len", -3)])
def test_bad_timing_settings_are_errors_not_a_latency_note(setting: str, value: int) -> None:
    model = nn.Linear(8, 2)
    with pytest.raises(ValueError, match=f"got .*{value}"):
        compression_report(model, model, torch.randn(2, 8), **{"batch_size": 4, "repeats": 2, "warmup": 1, setting: value})


class _StepCallsItsChild(L.LightningModule):
    """A forward of its own, but a training step that calls the child directly (``self.model(...)``), as many
    Hugging Face projects do."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.model(x).softmax(-1)  # what serving calls; the step trains on the logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_step_that_calls_a_child_while_the_module_has_a_forward_is_measured(tmp_path: Path) -> None:
    """The report found no input when the module defined a forward that the step never called, and failed at the
    end of the fit saying the step calls neither forward nor a child; the child the step calls is measured."""
    report = CompressionReport(plot=False, print_table=False)
    L.Trainer(callbacks=[report], **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)).fit(
        _StepCallsItsChild(), DigitsDataModule(batch_size=16)
    )
    assert report.report["compressed"]["latency_ms"] > 0 and report.report["compressed"]["macs"] == 64 * 16 + 16 * 10


class OwnNames(L.LightningModule):
    """A project's own metric names (``val/acc``, ``my/testacc``) and a step that calls two children directly."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        self.net, self.head, self.split = MLP(16, (32,), 8), nn.Linear(8, 4), split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.net(x)))

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.net(x))) if self.split else self(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return nn.functional.cross_entropy(self._out(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        out = self._out(batch[0])
        self.log("val/loss", nn.functional.cross_entropy(out, batch[1]))
        self.log("val/acc", (out.argmax(1) == batch[1]).float().mean())

    def test_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.log("my/testacc", (self._out(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _own_names_fit(tmp_path: Path, metrics: list[str] | None, split: bool = False) -> CompressionReport:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import PruningCallback

    torch.manual_seed(0)
    x = torch.randn(128, 16)
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    report = CompressionReport(print_table=False, plot=False, metrics=metrics, repeats=2, warmup=1)
    trainer = L.Trainer(max_epochs=3, callbacks=[PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False), report],
                        **trainer_kwargs(tmp_path))  # fmt: skip
    module = OwnNames(split)
    trainer.fit(module, data, data)
    trainer.test(module, data, verbose=False)
    return report


@pytest.mark.parametrize("metrics", [None, ["val/acc", "my/testacc"]])
def test_a_projects_own_metric_names_are_reported(tmp_path: Path, metrics: list[str] | None) -> None:
    """Without `metrics`, names other than val_*/test_* were dropped (an empty table, a note blaming compression);
    a test metric of another name never reached the compressed model's metrics."""
    report = _own_names_fit(tmp_path, metrics).report
    assert "val/acc" in report["baseline"]["metrics"] and "val/acc" in report["compressed"]["metrics"]
    assert "my/testacc" in report["compressed"]["metrics"] and "baseline_note" not in report
    assert ("val/loss" in report["compressed"]["metrics"]) == (metrics is None)


def test_a_step_calling_two_children_is_measured_with_a_note(tmp_path: Path) -> None:
    """The report measures the child with the most trainable parameters the step calls; it says which others it
    leaves out."""
    with pytest.warns(UserWarning, match=r"measures 'net', the child with the most trainable parameters .* also calls \['head'\]"):
        report = _own_names_fit(tmp_path, None, split=True).report
    assert "head" in report["network_note"]
    assert report["baseline"]["params"] == sum(p.numel() for p in MLP(16, (32,), 8).parameters())


class _FrozenBackbone(L.LightningModule):
    """Fine-tuning a head on a frozen backbone, without a forward: the step calls both children."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 256), nn.ReLU()).requires_grad_(False)
        self.head = nn.Linear(256, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x.flatten(1))), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.head(self.backbone(x.flatten(1))).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_a_frozen_backbone_the_step_calls_is_named_as_left_out(tmp_path: Path) -> None:
    """The report measured the head alone (1,290 parameters of 50,826; 49.6% sparsity where the model is 1.3%)
    and said nothing: a frozen child was never looked at."""
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    trainer = L.Trainer(max_epochs=2, callbacks=[PruningCallback(0.5, schedule="one_shot", start_epoch=1, include="head", verbose=False),
                                                 report], **trainer_kwargs(tmp_path, limit_train_batches=4))
    with pytest.warns(UserWarning, match=r"measures 'head', .* also calls \['backbone'\]"):
        trainer.fit(_FrozenBackbone(), DigitsDataModule(batch_size=32))
    assert report.report["compressed"]["params"] == 256 * 10 + 10


class AliasedPart(OwnNames):
    """``self.encoder`` is a part of ``self.net`` under a second name; the step calls ``self.net`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = self.net.net[1]

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :4]


def test_no_network_note_for_a_part_of_the_measured_child() -> None:
    from lightning_compress.batches import forward_call

    call = forward_call(AliasedPart(), (torch.randn(4, 16), torch.zeros(4, dtype=torch.long)), "test")
    assert call.target == "net" and call.others == ()


def test_a_distillation_teachers_metrics_are_not_the_compressed_models(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import DistillationModule, PruningCallback

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=16)
    module = DistillationModule(MLP(16, (8,), 4), MLP(16, (32,), 4), num_classes=4)
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=1)
    trainer = L.Trainer(max_epochs=2, callbacks=[PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False), report],
                        **trainer_kwargs(tmp_path))  # fmt: skip
    trainer.fit(module, data, data)
    trainer.test(module, data, verbose=False)
    compressed = report.report["compressed"]["metrics"]
    assert "val_acc" in compressed and "test_acc" in compressed
    assert not [k for k in compressed if k.startswith("teacher_")]
    assert report.report["baseline"]["metrics"]["val_acc"] == module.teacher_val_accuracy


@pytest.mark.parametrize("averaging", ["EMAWeightAveraging", "StochasticWeightAveraging"])
def test_weight_averaging_validations_are_read_as_the_model_they_measured(tmp_path: Path, averaging: str) -> None:
    """EMAWeightAveraging validates with its average, put in after the validation starts: the report read each
    validation as the weights trained and said the model was changed after it. StochasticWeightAveraging validates
    the trained weights and puts its average in at the end: no metrics, and the note names it."""
    from lightning.pytorch import callbacks

    from lightning_compress import QuantizeCallback

    if not hasattr(callbacks, averaging):
        pytest.skip(f"{averaging} needs Lightning 2.6")
    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10))
    average = callbacks.EMAWeightAveraging(decay=0.9) if averaging == "EMAWeightAveraging" else callbacks.StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    report = CompressionReport(print_table=False, plot=False, dirpath=tmp_path)
    quant = QuantizeCallback(start_epoch=0, latency="none")
    trainer = L.Trainer(callbacks=[report, quant, average], **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=8))
    data = DigitsDataModule(batch_size=32)
    trainer.fit(module, data)
    compressed = report.report["compressed"]["metrics"]
    if averaging == "EMAWeightAveraging":
        assert compressed == pytest.approx(trainer.validate(module, data, verbose=False)[0], abs=1e-6)
    else:
        assert compressed == {} and "StochasticWeightAveraging put its average of the weights in" in report.report["compressed_note"]


def test_ptq_says_its_baseline_did_not_see_the_last_float_epoch(tmp_path: Path) -> None:
    """PTQ calibrates after its last float epoch, before that epoch's validation: the baseline (epoch 0) and the
    compressed metrics (epoch 1) were an epoch of training apart, read as quantisation gaining 14 points."""
    from lightning_compress import QuantizeCallback

    L.seed_everything(0)
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    quant = QuantizeCallback(method="ptq", start_epoch=2, calibration_batches=2, latency="none")
    L.Trainer(max_epochs=4, callbacks=[quant, report], **trainer_kwargs(tmp_path, limit_train_batches=4)).fit(
        ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule(batch_size=32))
    r = report.report
    assert r["baseline"]["metrics_epoch"] == 0 and r["compressed"]["metrics_epoch"] == 1
    assert r["baseline_note"].startswith("Baseline metrics: from the validation at epoch 0. The model then trained uncompressed")


class _TakesADict(L.LightningModule):
    """forward takes one structured argument: a dict of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 4)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.net(inputs["x"] * inputs["w"][:, None])

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_forward_taking_a_structure_of_tensors_is_measured(tmp_path: Path) -> None:
    """The report looked for a tensor among forward's top-level arguments only, and raised after all training."""
    data = [{"x": torch.randn(16), "w": torch.tensor(1.0)} for _ in range(32)]
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    L.Trainer(max_epochs=2, callbacks=[PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False), report],
              **trainer_kwargs(tmp_path)).fit(_TakesADict(), DataLoader(data, batch_size=8))
    r = report.report
    assert r["compressed"]["macs"] == 64 and r["compressed"]["latency_ms"] > 0 and r["latency_setup"]["batch_size"] == 64


@pytest.mark.parametrize(("batch", "seq"), [(4, 6), (6, 6)])
def test_a_square_mask_as_long_as_the_batch_is_not_resized_as_a_batch(batch: int, seq: int) -> None:
    """A (T, T) causal mask was taken for a batched tensor when T equals the batch size: MACs and latency lost."""
    from lightning_compress.measure import count_macs

    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    mask = nn.Transformer.generate_square_subsequent_mask(seq)
    r = compression_report(enc, enc, (torch.randn(batch, seq, 16), mask), batch_size=8, repeats=2, warmup=0)
    assert r["baseline"]["macs"] == count_macs(enc, (torch.randn(1, seq, 16), mask)) and r["baseline"]["latency_ms"] > 0


@pytest.mark.parametrize("square", [True, False])
def test_the_latency_is_timed_at_the_batch_the_report_names(square: bool) -> None:
    """Token ids and their mask of as many tokens as samples (16 x 16) were timed at 16 and labelled batch 64. A
    mask of the ids' shape and dtype follows the batch; a square mask that may not (a float causal one) keeps the
    input's batch, and the report names that batch, with a note."""
    seen: list[tuple[int, ...]] = []

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(input_ids.shape))
            return self.emb(input_ids).sum(-1) * attention_mask[..., :1].float()

    ids = torch.randint(0, 50, (16, 16))
    mask = torch.ones_like(ids) if not square else torch.zeros(16, 16)  # a float (T, T) mask: not the ids' dtype
    net = Tokens()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        r = compression_report(net, net, {"input_ids": ids, "attention_mask": mask}, batch_size=64, repeats=2, warmup=0)
    timed = 16 if square else 64
    assert seen[-1] == (timed, 16) and r["latency_setup"]["batch_size"] == timed
    notes = [str(w.message) for w in said if "timed at the input's own batch of 16" in str(w.message)]
    assert (len(notes) == 1 and r["latency_note"] in notes[0]) if square else (notes == [] and "latency_note" not in r)


def test_float_inputs_beside_a_float_square_mask_keep_their_batch() -> None:
    """Float (16, 16) inputs with a float (16, 16) additive mask: the mask has the inputs' shape and dtype, yet is not
    batched; resizing it with them failed the latency ("mat1 and mat2 shapes cannot be multiplied")."""
    net = nn.Linear(16, 16)

    class Masked(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return net(x) @ mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = compression_report(Masked(), Masked(), (torch.randn(16, 16), torch.randn(16, 16)), batch_size=64, repeats=2, warmup=0)
    assert r["baseline"]["latency_ms"] > 0 and r["latency_setup"]["batch_size"] == 16


def test_a_sequence_first_encoders_padding_mask_follows_the_batch() -> None:
    """src_key_padding_mask is (N, S) in either layout: beside a (S, N, E) input it was never resized (no MACs)."""
    from lightning_compress.measure import count_macs

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1, enable_nested_tensor=False)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.enc(x, src_key_padding_mask=mask)

    net = SequenceFirst().eval()
    x, mask = torch.randn(10, 4, 16), torch.zeros(4, 10, dtype=torch.bool)
    r = compression_report(net, net, (x, mask), batch_size=8, repeats=2, warmup=0)
    assert r["baseline"]["macs"] == count_macs(net, (x[:, :1], mask[:1])) and r["baseline"]["latency_ms"] > 0


def test_two_pruning_callbacks_keep_their_own_metrics_and_report_entries(tmp_path: Path) -> None:
    """Two PruningCallbacks (the library takes them: their state keys differ by structure and include) logged the same
    metric names and the report kept one summary: its history said 0% at an epoch where the first had pruned 50%."""
    from lightning_compress import PruningCallback

    import csv

    from lightning.pytorch.loggers import CSVLogger

    first = PruningCallback(0.5, include=r"net\.1", schedule="one_shot", start_epoch=1, verbose=False)
    second = PruningCallback(0.5, include=r"net\.3", structure="channel", schedule="one_shot", start_epoch=2, verbose=False)
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    trainer = L.Trainer(max_epochs=3, callbacks=[first, second, report],
                        **trainer_kwargs(tmp_path, limit_train_batches=3, logger=CSVLogger(tmp_path)))
    trainer.fit(ClassifierModule(MLP(64, (32, 16), 10)), DigitsDataModule(batch_size=32))
    # the second callback's per-layer metrics are marked on the metric, not after the layer (it read like a weight_2)
    columns = set(next(csv.reader(open(Path(trainer.log_dir) / "metrics.csv"))))
    assert {"pruning/sparsity_2", "pruning/sparsity_2/model.net.3.weight", "pruning/sparsity/model.net.1.weight"} <= columns
    assert set(report.report["plugins"]) == {"PruningCallback", "PruningCallback_2"}
    assert report.report["plugins"]["PruningCallback"]["layers"].keys() != report.report["plugins"]["PruningCallback_2"]["layers"].keys()
    by_epoch = {h["epoch"]: h["state"] for h in report.report["history"]}
    assert by_epoch[1]["sparsity"] == pytest.approx(0.5, abs=0.01) and by_epoch[1]["sparsity_2"] == 0.0
    assert by_epoch[2]["sparsity_2"] == pytest.approx(0.5, abs=0.1)
    metrics = trainer.callback_metrics
    assert float(metrics["pruning/sparsity"]) == pytest.approx(0.5, abs=0.01) and "pruning/sparsity_2" in metrics
