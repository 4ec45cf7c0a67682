"""Scale: what each plugin costs in a fit of a GPT-style decoder, and what its converted model gains.

One dense fit and one fit per plugin, each from the same initial weights on the same synthetic tokens:

- step time: mean wall time between successive training steps after ``--warmup`` steps (mask updates
  included, so it is the amortised cost), as a ratio to the dense fit;
- memory: peak GPU memory of the fit, and what stays allocated at its end, over the dense fit,
  per pruned (or quantised) weight;
- mask updates: seconds per update, from ``PruningCallback``'s history, per 100M weights;
- serving: forward latency of the converted model against the dense model in the serving dtype
  (bfloat16 on a GPU), timed interleaved with medians; for 2:4 weights the table of which layers took
  the semi-structured sparse kernel (only where measured faster on this device); and the dense model
  with each layer on the fastest of torchao's int8/int4/float8 kernels where measured faster
  (``use_fastest_kernels``), with the table of which layer took which path.

    python benchmarks/scale_gpu.py              # GPU size: 100.2M parameters, bf16-mixed (needs CUDA)
    python benchmarks/scale_gpu.py --size cpu   # the same runs at CPU size (0.4M parameters, fp32)
    python benchmarks/scale_gpu.py --fsdp 2     # the same runs sharded by FSDP2 over 2 devices (or CPU processes)
    python benchmarks/scale_gpu.py --runs dense,qat,dense_compiled,qat_compiled  # also with the network compiled

With ``--fsdp N`` every fit runs under ``ModelParallelStrategy`` (``LanguageModelModule`` applies
``fully_shard``); memory per weight is then per weight each process holds (a ``1/N`` share), and the
serving comparison is skipped (the converted models are those rank 0 gathers).

Writes ``benchmarks/results/scale_<size>.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback, QuantizeCallback
from lightning_compress.lm import GPTDecoder, LanguageModelModule
from lightning_compress.measure import measure_latency
from lightning_compress.pruning.sparse_kernels import use_semi_structured
from lightning_compress.quantization import convert_fake_quant
from lightning_compress.quantization.kernels import use_fastest_kernels

RESULTS = Path(__file__).resolve().parent / "results"

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"model": {"d_model": 768, "n_layers": 14, "n_heads": 12, "max_len": 1024}, "batch": 8, "seq": 1024, "precision": "bf16-mixed", "steps": 100, "warmup": 10},
    "cpu": {"model": {"d_model": 128, "n_layers": 2, "n_heads": 4, "max_len": 128}, "batch": 8, "seq": 128, "precision": "32-true", "steps": 40, "warmup": 5},
}


class StepClock(Callback):
    """Wall time between successive training-step starts (the device synchronised before each reading)
    and the memory allocated when training ends; with ``profile``, a profile of five steps."""

    def __init__(self, profile: bool = False) -> None:
        self.profile = profile
        self._profiler: Any = None
        self.starts: list[float] = []
        self.end_allocated = 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.profile:  # steps 11-15 (after 10 untimed steps and 2 of warm-up)
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
                schedule=torch.profiler.schedule(wait=10, warmup=2, active=5, repeat=1),
            )
            self._profiler.start()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync()
        self.starts.append(time.perf_counter())
        if self._profiler is not None:
            self._profiler.step()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync()
        self.starts.append(time.perf_counter())
        if torch.cuda.is_available():
            self.end_allocated = torch.cuda.memory_allocated()
        if self._profiler is not None:
            self._profiler.stop()
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(self._profiler.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
            print(self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))

    def step_seconds(self, warmup: int) -> list[float]:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return gaps[warmup:]


def _model(size: dict[str, Any]) -> GPTDecoder:
    seed_everything(0, verbose=False)
    return GPTDecoder(vocab_size=256, attention="sdpa", dropout=0.0, **size["model"])


def _fit(
    name: str, model: GPTDecoder, size: dict[str, Any], plugin: Callback | None, tokens: torch.Tensor, profile: bool = False,
    fsdp: int = 0, compile: bool = False,
) -> dict[str, Any]:
    module = LanguageModelModule(copy.deepcopy(model), compile=compile)
    clock = StepClock(profile)
    sharded = {"strategy": ModelParallelStrategy(data_parallel_size=fsdp, tensor_parallel_size=1)} if fsdp else {}
    trainer = Trainer(
        max_steps=size["steps"],
        accelerator="auto",
        devices=max(1, fsdp),
        **sharded,  # type: ignore[arg-type]
        precision=size["precision"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=([plugin] if plugin is not None else []) + [clock],
    )
    loader = DataLoader(TensorDataset(tokens), batch_size=size["batch"], shuffle=False)
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0  # earlier fits' leftovers
    trainer.fit(module, loader)
    steps = clock.step_seconds(size["warmup"])
    cuda = torch.cuda.is_available()
    row: dict[str, Any] = {  # memory counted from before this fit (what the plugin's setup makes included)
        "run": name,
        "step_ms_mean": 1e3 * statistics.fmean(steps),
        "step_ms_median": 1e3 * statistics.median(steps),
        "peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None,
        "end_allocated_mb": (clock.end_allocated - before) / 2**20 if cuda else None,
    }
    if isinstance(plugin, PruningCallback) and plugin._run is not None:
        updates = plugin.update_seconds
        row["mask_updates"] = len(updates)
        row["mask_update_s_median"] = statistics.median(updates) if updates else None
        row["pruned_weights"] = plugin._run.total
        row["sparsity"] = plugin._run.history[-1]["sparsity"] if plugin._run.history else 0.0
    return {"row": row, "module": module}


def _serve(size: dict[str, Any], dense: torch.nn.Module, others: dict[str, torch.nn.Module], device: torch.device) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    example = torch.randint(0, 256, (size["batch"], size["seq"]), device=device)
    models = {"dense": dense.to(device, dtype).eval(), **{k: m.to(device).eval() for k, m in others.items()}}
    timed = measure_latency(models, example, batch_size=None, repeats=15, warmup=3, num_threads=None, iters=None, device=device)
    base = timed["dense"]["median_ms"]
    return {k: {"median_ms": v["median_ms"], "speedup_vs_dense": base / v["median_ms"]} for k, v in timed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fit (default: the size's)")
    parser.add_argument(
        "--runs", default="dense,prune,prune24,qat",
        help="comma-separated subset of dense,prune,prune24,qat; a run name ending in _compiled (dense_compiled, "
        "qat_compiled...) fits with the network compiled (LanguageModelModule(compile=True)), against dense_compiled",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", default="", help="comma-separated runs to profile (5 steps; prints the top kernels)")
    parser.add_argument("--fsdp", type=int, default=0, help="shard every fit with FSDP2 over this many devices (0: off)")
    args = parser.parse_args()
    size = dict(SIZES[args.size])
    if args.steps:
        size["steps"] = args.steps
    if args.size == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--size gpu needs CUDA; use --size cpu here")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (size["steps"] * size["batch"], size["seq"]))
    model = _model(size)
    params = sum(p.numel() for p in model.parameters())
    runs = args.runs.split(",")
    window = {"start_epoch": 0.2, "end_epoch": 0.8, "update_every_n_steps": max(1, size["steps"] // 12), "verbose": False}
    plugins: dict[str, Any] = {
        "dense": None,
        "prune": lambda: PruningCallback(target_sparsity=0.5, **window),
        "prune24": lambda: PruningCallback(target_sparsity=0.5, structure="2:4", **window),
        "qat": lambda: QuantizeCallback(weight_bits=8, activation_bits=None, convert_on_fit_end=False, latency="none"),
    }
    # an untimed fit first: the process's first fit pays for what later ones find ready (thread pools, the
    # allocator's cache, first-call dispatch), which made the first run's ratio depend on the order of --runs
    _fit("warm-up", model, {**size, "steps": size["warmup"] + 5}, None, tokens, False, args.fsdp, False)
    fits = {}
    for name in runs:
        base = name.removesuffix("_compiled")
        if base not in plugins:
            raise SystemExit(f"unknown run {name!r}; valid: {sorted(plugins)} and each with _compiled")
        make = plugins[base]
        fits[name] = _fit(
            name, model, size, make() if make else None, tokens, name in args.profile.split(","), args.fsdp, name != base
        )
        print(json.dumps(fits[name]["row"]), flush=True)
    if args.fsdp and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return  # rank 0 reports
    rows = [f["row"] for f in fits.values()]
    for r in rows:
        reference = "dense_compiled" if r["run"].endswith("_compiled") else "dense"
        if reference not in fits:
            continue
        d = fits[reference]["row"]
        r["step_time_x_dense"] = r["step_ms_mean"] / d["step_ms_mean"]
        r["median_step_x_dense"] = r["step_ms_median"] / d["step_ms_median"]
        if r["peak_mb"] is not None and r["run"] != reference:
            weights = r.get("pruned_weights") or sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
            weights /= max(1, args.fsdp)  # sharded: the weights each process holds
            r["extra_peak_bytes_per_weight"] = (r["peak_mb"] - d["peak_mb"]) * 2**20 / weights
            r["extra_end_bytes_per_weight"] = (r["end_allocated_mb"] - d["end_allocated_mb"]) * 2**20 / weights
        if r.get("mask_update_s_median") is not None:
            r["mask_update_s_per_100M"] = r["mask_update_s_median"] * 1e8 / r["pruned_weights"]
    serving: dict[str, Any] = {}
    kernels: dict[str, Any] = {}
    kernel_paths: dict[str, Any] = {}
    if "dense" in fits and not args.fsdp:
        dense = fits["dense"]["module"].model
        serve_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # a second copy of the dense model, timed like the others: how far apart two equal models come out
        others: dict[str, torch.nn.Module] = {"dense, a second copy (timing noise)": copy.deepcopy(dense).to(device, serve_dtype)}
        if "prune24" in fits:
            sparse = copy.deepcopy(fits["prune24"]["module"].model).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
            example = torch.randint(0, 256, (size["batch"], size["seq"]), device=device)
            kernels = use_semi_structured(sparse, example, repeats=5)
            others["2:4 (measured layers sparse)"] = sparse
        if "qat" in fits:
            converted = convert_fake_quant(copy.deepcopy(fits["qat"]["module"].model).float())
            # served in the dense model's dtype (bfloat16 on a GPU): its float32 matmuls were timed against bf16 ones
            others["int8 weight-only (converted)"] = converted.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        served = copy.deepcopy(dense).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        example = torch.randint(0, 256, (size["batch"], size["seq"]), device=device)
        kernel_paths = use_fastest_kernels(served, example, repeats=5)
        others["torchao kernels (measured per layer)"] = served
        serving = _serve(size, copy.deepcopy(dense), others, device)
    result = {
        "size": args.size,
        "fsdp_processes": args.fsdp,
        "parameters": params,
        "settings": size,
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "fits": rows,
        "serving": serving,
        "semi_structured_layers": kernels,
        "torchao_layers": kernel_paths,
    }
    out = args.out or RESULTS / f"scale_{args.size}{f'_fsdp{args.fsdp}' if args.fsdp else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    sharding = f", FSDP2 over {args.fsdp} processes" if args.fsdp else ""
    print(f"\n{params / 1e6:.1f}M parameters, {size['batch']}x{size['seq']} tokens per step, {size['precision']}, {result['machine']}{sharding}")
    print("| run | mean step ms | x dense | median step x dense | peak MB | +peak B/weight | +end B/weight | mask updates | s per update per 100M |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r["run"], f"{r['step_ms_mean']:.1f}", f"{r.get('step_time_x_dense', 1):.3f}", f"{r.get('median_step_x_dense', 1):.3f}", r["peak_mb"],
            r.get("extra_peak_bytes_per_weight"), r.get("extra_end_bytes_per_weight"), r.get("mask_updates"), r.get("mask_update_s_per_100M"),
        ]
        print("| " + " | ".join("-" if c is None else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    for k, v in serving.items():
        print(f"serving {k}: {v['median_ms']:.2f} ms, {v['speedup_vs_dense']:.2f}x dense")
    chosen = sum(1 for v in kernels.values() if v["path"] == "2:4 sparse")
    if kernels:
        print(f"2:4 layers on the sparse kernel: {chosen}/{len(kernels)}")
    if kernel_paths:
        counts = {p: sum(1 for v in kernel_paths.values() if v["path"] == p) for p in {v["path"] for v in kernel_paths.values()}}
        print(f"torchao paths per layer (measured): {counts}")
        for layer, v in kernel_paths.items():  # which layer took which path
            print(f"  {layer}: {v['path']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
