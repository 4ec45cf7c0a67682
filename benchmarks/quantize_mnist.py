"""MNIST: float vs int8 QAT vs int8 PTQ vs 4-bit weight-only QAT (ours), and torchao's own QAT as the peer.

Models: LeNet-300-100 (``MLP(784, (300, 100), 10)``, the Linear-heavy one) and ``ResCNN`` (conv + BN +
residual). Recipe: Adam lr 1e-3, batch 128, ``--epochs`` epochs for every run. QAT runs train the
same number of epochs with fake quantisation from epoch ``epochs - qat_epochs`` (float before), so the
float run and the QAT run differ only in the last ``--qat-epochs`` epochs. PTQ calibrates the
trained float model on ``calibration_batches=32`` training batches. The torchao peer:
``QATConfig`` prepare (int8 per-token activations, int8 per-channel weights) on the Linear layers for
the same last epochs, then ``step="convert"`` and ``Int8DynamicActivationInt8WeightConfig``.

Reported per run: test accuracy (official 10,000 test images), bytes of ``torch.save(state_dict)`` and
of the files a user keeps (float: the state_dict; converted: :func:`save_quantized`, state plus the
quantisation spec, as ``.pt`` and as ``.safetensors``),
CPU latency ratio float/converted (so > 1 means faster) at batch 1 and 64, eager,
``compile_for_cpu`` and ``export_for_cpu`` packages (float and converted in the same mode), interleaved medians of ``--repeats`` timings with the spread, and the fit-time
ratio of the QAT epochs over float epochs. ``torch.set_num_threads(--threads)``. Writes
``benchmarks/results/quantize_mnist.json`` and prints a table.

    python benchmarks/quantize_mnist.py                                   # full: 5 epochs, 2 QAT epochs
    python benchmarks/quantize_mnist.py --epochs 2 --qat-epochs 1 --cnn-train-subset 10000
    python benchmarks/quantize_mnist.py --latency-only --repeats 31 --out quantize_latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from lightning_compress import ClassifierModule, MNISTDataModule
from lightning_compress.deploy import compile_for_cpu, export_for_cpu, load_for_cpu
from lightning_compress.models import MLP, ResCNN
from lightning_compress.quantization import QuantizeCallback, batchnorm_layers, reestimate_batchnorm, save_quantized
from lightning_compress.quantization.convert import import_torchao
from lightning_compress.report import measure_latency, serialized_size
from _common import DEFAULT_MNIST, EpochTimer, RESULTS, mnist_missing  # noqa: E402 - benchmarks/ is on sys.path when run as a script



class TorchaoQAT(Callback):
    """The peer: torchao's QATConfig prepare on the Linear layers from ``start_epoch``, convert at fit end."""

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.converted: nn.Module | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.start_epoch:
            tq = import_torchao()
            from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

            # torchao 0.18 infers no QAT config from Int8DynamicActivationInt8WeightConfig: spell it out
            # (int8 asymmetric per-token activations, int8 symmetric per-channel weights). FakeQuantizedLinear
            # keeps the same Parameter objects, so the optimizer is unaffected.
            config = QATConfig(
                activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"),
                step="prepare",
            )
            tq.quantize_(pl_module.model, config)

    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        tq = import_torchao()
        from torchao.quantization.qat import QATConfig

        model = copy.deepcopy(pl_module.model).eval()
        tq.quantize_(model, QATConfig(step="convert"))  # drops the fake quantisers
        tq.quantize_(model, tq.Int8DynamicActivationInt8WeightConfig())
        self.converted = model


def _trainer(args: argparse.Namespace, callbacks: list[Callback], epochs: int, limit: float | int) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=limit,
        deterministic=True,
    )


def _net(kind: str) -> nn.Module:
    return MLP(784, (300, 100), 10) if kind == "mlp" else ResCNN(1, 10, width=32)


def _test_acc(trainer: Trainer, model: nn.Module, dm: MNISTDataModule) -> float:
    module = ClassifierModule(model)
    return float(trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"])


def _packaged(model: nn.Module, tmp: str, name: str) -> Any:
    """``model`` through :func:`export_for_cpu` (AOTInductor, any batch size), loaded back."""
    return load_for_cpu(export_for_cpu(model, torch.randn(2, 1, 28, 28), Path(tmp) / f"{name}.pt2"))


def _latency(float_model: nn.Module, quant: nn.Module, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    float_model, quant = float_model.eval(), quant.eval()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            packaged: dict[str, Any] | None = {k: _packaged(m, tmp, k) for k, m in (("float", float_model), ("quantized", quant))}
        except Exception as err:  # noqa: BLE001 - e.g. torchao layers torch.export cannot capture: report, go on
            packaged, package_error = None, f"{type(err).__name__}: {err}"[:200]
        for batch in (1, 64):
            x = torch.randn(batch, 1, 28, 28)
            # fresh dynamo caches per group: all our models share one forward code object, and past its
            # cache_size_limit (8 graphs) torch.compile silently falls back to eager
            torch._dynamo.reset()
            compiled = {k: compile_for_cpu(m) for k, m in (("float", float_model), ("quantized", quant))}  # each compiles a copy
            modes: dict[str, Any] = {"eager": {"float": float_model, "quantized": quant}, "compiled": compiled, "packaged": packaged}
            for mode, models in modes.items():
                try:
                    if models is None:
                        raise RuntimeError(package_error)
                    res = measure_latency(models, x, batch_size=None, repeats=repeats, warmup=3, num_threads=None, iters=None)
                except Exception as err:  # noqa: BLE001 - report, do not abort the table
                    out[f"{mode}_b{batch}"] = {"error": f"{type(err).__name__}: {err}"[:200]}
                    continue
                f, q = res["float"], res["quantized"]
                out[f"{mode}_b{batch}"] = {
                    "float_ms": f["median_ms"],
                    "quantized_ms": q["median_ms"],
                    "speedup": f["median_ms"] / q["median_ms"],
                    "speedup_range": [f["min_ms"] / q["max_ms"], f["max_ms"] / q["min_ms"]],
                }
    return out


def run_model(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs if kind == "mlp" or args.cnn_epochs is None else args.cnn_epochs
    qat_epochs = args.qat_epochs
    start = max(0, epochs - qat_epochs)
    subset = args.train_subset if kind == "mlp" else args.cnn_train_subset
    dm = MNISTDataModule(root=str(args.data), batch_size=128, train_subset=subset)
    rows: dict[str, Any] = {}

    def fit(callbacks: list[Callback], seed: int = 0) -> tuple[nn.Module, list[float], float]:
        seed_everything(seed)
        timer = EpochTimer()
        module = ClassifierModule(_net(kind))
        trainer = _trainer(args, [timer, *callbacks], epochs, 1.0)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        return module, timer.times, time.perf_counter() - t0

    tester = _trainer(args, [], 1, 1.0)
    # float
    float_module, float_times, float_fit = fit([])
    float_net = copy.deepcopy(float_module.model).eval()
    rows["float"] = {"test_acc": _test_acc(tester, float_net, dm), **_sizes(float_net), "fit_s": float_fit}
    if batchnorm_layers(float_net):  # QAT re-estimates BN statistics at its end; the float model gets the same
        float_bn = copy.deepcopy(float_net)
        dm.setup("fit")
        reestimate_batchnorm(float_bn, dm.train_dataloader(), max_batches=32)
        rows["float"]["test_acc_bn_reestimated"] = _test_acc(tester, float_bn, dm)
        print(f"[{kind}] float acc with BN statistics re-estimated {rows['float']['test_acc_bn_reestimated']:.4f}", flush=True)
    print(f"[{kind}] float acc {rows['float']['test_acc']:.4f}", flush=True)
    qat_float_epochs = float_times[start:] or float_times

    variants = {
        "int8_qat": dict(weight_bits=8, activation_bits=8, start_epoch=start),
        "w4_qat": dict(weight_bits=4, activation_bits=None, start_epoch=start),
    }
    for name, kwargs in variants.items():
        cb = QuantizeCallback(latency="none", **kwargs)
        module, times, fit_s = fit([cb])
        q = cb.quantized_model
        assert q is not None
        rows[name] = {
            "test_acc": _test_acc(tester, q, dm),
            "fake_quant_test_acc": _test_acc(tester, module.model, dm),
            **_sizes(q),
            "formats": sorted({v["format"] for v in q.quantization_spec.values()}),
            "qat_epoch_time_ratio": (sum(times[start:]) / len(times[start:])) / (sum(qat_float_epochs) / len(qat_float_epochs)),
            "fit_s": fit_s,
            "latency": _latency(float_net, q, args.repeats),
        }
        print(f"[{kind}] {name} acc {rows[name]['test_acc']:.4f}", flush=True)

    # PTQ of the trained float model: a second short fit that only calibrates
    ptq_module = ClassifierModule(copy.deepcopy(float_net))
    cb = QuantizeCallback(method="ptq", calibration_batches=32, latency="none")
    t0 = time.perf_counter()
    _trainer(args, [cb], 1, 1.0).fit(ptq_module, datamodule=dm)
    q = cb.quantized_model
    assert q is not None
    rows["int8_ptq"] = {
        "test_acc": _test_acc(tester, q, dm),
        **_sizes(q),
        "formats": sorted({v["format"] for v in q.quantization_spec.values()}),
        "calibration_s": time.perf_counter() - t0,
        "latency": _latency(float_net, q, args.repeats),
    }
    print(f"[{kind}] int8_ptq acc {rows['int8_ptq']['test_acc']:.4f}", flush=True)

    if kind == "mlp":  # torchao QAT covers nn.Linear only
        peer = TorchaoQAT(start)
        module, times, fit_s = fit([peer])
        assert peer.converted is not None
        rows["torchao_int8_qat"] = {
            "test_acc": _test_acc(tester, peer.converted, dm),
            **_sizes(peer.converted),
            "qat_epoch_time_ratio": (sum(times[start:]) / len(times[start:])) / (sum(qat_float_epochs) / len(qat_float_epochs)),
            "fit_s": fit_s,
            "latency": _latency(float_net, peer.converted, args.repeats),
        }
        print(f"[{kind}] torchao acc {rows['torchao_int8_qat']['test_acc']:.4f}", flush=True)
    base = rows["float"]
    for row in rows.values():
        row["size_ratio"] = base["bytes"] / row["bytes"]
        row["file_ratio"] = base["file_bytes"] / row["file_bytes"]
        if row["file_bytes_safetensors"] is not None:
            row["file_ratio_safetensors"] = base["file_bytes_safetensors"] / row["file_bytes_safetensors"]
    return rows


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _sizes(model: nn.Module) -> dict[str, Any]:
    """Bytes of the state_dict (``torch.save``) and of the files a user stores: the float state_dict, or
    :func:`save_quantized` (state plus the quantisation spec) as ``.pt`` and ``.safetensors``."""
    out: dict[str, Any] = {"bytes": serialized_size(model)}
    if getattr(model, "quantization_spec", None) is None:  # the float model, or torchao's own conversion
        try:
            st: int | None = serialized_size(model, "safetensors")
        except ValueError:  # torchao tensor subclasses: torch.save only
            st = None
        return {**out, "file_bytes": out["bytes"], "file_bytes_safetensors": st}
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, Path(tmp) / "q.pt")
        out["file_bytes"] = (Path(tmp) / "q.pt").stat().st_size
        try:
            save_quantized(model, Path(tmp) / "q.safetensors")
        except ValueError:  # torchao tensor subclasses: torch.save only
            out["file_bytes_safetensors"] = None
        else:
            out["file_bytes_safetensors"] = (Path(tmp) / "q.safetensors").stat().st_size
    return out


def latency_only(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of every CPU path on LeNet-300-100 shapes, many interleaved repeats (kernels do not
    depend on trained values): float, ours (auto: static int8 ``torch._int_mm``; 4-bit packed),
    torchao int8 dynamic, and the deprecated ``torch.ao`` dynamic quantisation as a reference. Each
    path is timed in a pair with float; the speedups are against that pair's float timings."""
    import warnings

    from lightning_compress.quantization import QuantSettings, convert_fake_quant, fake_quant_layers, prepare_fake_quant

    torch.manual_seed(0)
    float_net = MLP(784, (300, 100), 10).eval()
    x_cal = torch.rand(256, 1, 28, 28)
    variants: dict[str, nn.Module] = {}
    for name, settings, backend in (
        ("ours_int8", QuantSettings(bits=8), "auto"),
        ("torchao_int8_dynamic", QuantSettings(bits=8), "torchao"),
        ("ours_w4_packed", QuantSettings(bits=4, activation_bits=None), "auto"),
    ):
        net = copy.deepcopy(float_net)
        prepare_fake_quant(net, settings)
        for layer in fake_quant_layers(net).values():
            layer.quantizer.observing = True
        with torch.no_grad():
            net(x_cal)
        for layer in fake_quant_layers(net).values():
            layer.quantizer.observing = False
        variants[name] = convert_fake_quant(net, backend=backend)
    out: dict[str, Any] = {}

    def measure_pair(name: str, model: nn.Module) -> None:
        # float and one variant at a time: interleaving many models lets them evict each other's
        # weights and kernels from the caches, which skews a 0.1 ms forward
        try:  # one package per model serves every batch size
            packaged: Any = _packaged(model, tmp, "".join(c if c.isalnum() else "_" for c in name))
        except Exception as err:  # noqa: BLE001 - e.g. a model torch.export cannot capture: report, go on
            packaged = err
        for batch in (1, 64):
            x = torch.rand(batch, 1, 28, 28)
            for mode in ("eager", "compiled", "packaged"):
                models: dict[str, Any] = {"float": float_net, name: model}
                torch._dynamo.reset()  # see _latency: stay under dynamo's per-code cache limit
                key = f"{mode}_b{batch}"
                if mode == "compiled":
                    models = {k: compile_for_cpu(m) for k, m in models.items()}  # each compiles a copy
                elif mode == "packaged":
                    if isinstance(packaged, Exception):
                        out.setdefault(key, {})[name] = {"error": f"{type(packaged).__name__}: {packaged}"[:200]}
                        continue
                    models = {"float": float_package, name: packaged}
                try:
                    res = measure_latency(models, x, batch_size=None, repeats=args.repeats, warmup=3, num_threads=None, iters=None)
                except Exception as err:  # noqa: BLE001
                    out.setdefault(key, {})[name] = {"error": str(err)[:200]}
                    continue
                f, fmin = res["float"]["median_ms"], res["float"]["min_ms"]
                for k, v in res.items():
                    if k == "float" and "float" in out.get(key, {}):
                        continue  # the first pair's float timing stands for the row
                    out.setdefault(key, {})[k] = {
                        "median_ms": v["median_ms"],
                        "min_ms": v["min_ms"],
                        "speedup": f / v["median_ms"],
                        "speedup_of_minima": fmin / v["min_ms"],
                    }

    with tempfile.TemporaryDirectory() as tmp:
        float_package = _packaged(float_net, tmp, "float")
        for name, model in variants.items():
            measure_pair(name, model)
        # last: importing the deprecated torch.ao stack is not free of side effects on later timings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from torch.ao.quantization import quantize_dynamic
            except ImportError:  # removed from torch: the reference row is left out, the rest is kept
                quantize_dynamic = None
            if quantize_dynamic is not None:
                measure_pair("torch.ao_dynamic (deprecated)", quantize_dynamic(copy.deepcopy(float_net), {nn.Linear}, dtype=torch.qint8))
    return out


def _fmt_lat(row: dict[str, Any], key: str) -> str:
    lat = row.get("latency", {}).get(key)
    if not lat:
        return "-"
    return f"{lat['speedup']:.2f}x" if "speedup" in lat else "err"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cnn-epochs", type=int, default=None, help="epochs of the CNN runs (default --epochs)")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=None, help="training images for the MLP (default all 55,000)")
    p.add_argument("--cnn-train-subset", type=int, default=None, help="training images for the CNN")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="quantize_mnist.json", help="file name under benchmarks/results/")
    p.add_argument("--latency-only", action="store_true", help="only the latency of every CPU path on LeNet shapes")
    args = p.parse_args(argv)
    if (missing := mnist_missing(args.data)) and not args.latency_only:  # the latency paths time random inputs
        print(missing, file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    import_torchao()
    if args.latency_only:
        lat = latency_only(args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps({"config": vars(args) | {"data": str(args.data)}, "latency": lat}, indent=2))
        names = list(next(v for v in lat.values() if "error" not in v))
        print(f"{'path':32} " + " ".join(f"{k:>12}" for k in lat))
        for n in names:
            cells = [f"{lat[k][n]['speedup']:.2f}/{lat[k][n]['speedup_of_minima']:.2f}x" if "speedup" in lat[k].get(n, {}) else "err" for k in lat]
            print(f"{n:32} " + " ".join(f"{c:>12}" for c in cells))
        for mode in ("compiled", "packaged"):
            for batch in (1, 64):
                fast, eager = lat.get(f"{mode}_b{batch}", {}), lat.get(f"eager_b{batch}", {})
                if "median_ms" in fast.get("ours_int8", {}) and "float" in eager:
                    print(
                        f"ours_int8 {mode} vs float eager, batch {batch}: "
                        f"{eager['float']['median_ms'] / fast['ours_int8']['median_ms']:.2f}x (medians)"
                    )
        print("float time / path time, medians/minima of interleaved timings (> 1 = faster than float in the same mode)")
        return 0
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for kind in args.models.split(","):
        results[kind] = run_model(kind, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(results, indent=2))
    head = (
        f"{'model':5} {'run':17} {'acc':>7} {'state':>9} {'state':>6} {'.pt':>6} {'.safet.':>7} {'eager b1':>8} {'eager b64':>9} "
        f"{'comp b1':>8} {'comp b64':>9} {'pkg b1':>7} {'pkg b64':>8} {'QAT ep':>7}"
    )
    print(head)
    for kind in args.models.split(","):
        for name, row in results[kind].items():
            ratio = row.get("qat_epoch_time_ratio")
            print(
                f"{kind:5} {name:17} {row['test_acc']*100:6.2f}% {row['bytes']:9d} {row['size_ratio']:5.2f}x "
                f"{row['file_ratio']:5.2f}x {_fmt_ratio(row.get('file_ratio_safetensors')):>7} "
                f"{_fmt_lat(row, 'eager_b1'):>8} {_fmt_lat(row, 'eager_b64'):>9} {_fmt_lat(row, 'compiled_b1'):>8} "
                f"{_fmt_lat(row, 'compiled_b64'):>9} {_fmt_lat(row, 'packaged_b1'):>7} {_fmt_lat(row, 'packaged_b64'):>8} "
                f"{'-' if ratio is None else f'{ratio:.2f}x':>7}"
            )
    print("state: bytes and ratio of torch.save(state_dict); .pt / .safet.: float file over the save_quantized file "
          "(state plus the quantisation spec), torch.save and safetensors")
    print("latency columns: float time / converted time (> 1 = converted faster), interleaved medians; eager, "
          "compile_for_cpu (comp), export_for_cpu packages (pkg), float and converted in the same mode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
