"""MNIST LeNet-300-100: a ``lightning-compress sweep`` over sparsity, pruning window, learning rate and
weight decay, then its best config at 92% against Lightning's ``ModelPruning`` at 92% over ten seeds.

1. The sweep: ``--trials`` (40) ordinary fits, each on ``--trial-subset`` (20,000) training images, of a LightningCLI config (written to
   ``results/sweep_mnist/base.yaml``: MLP 784-300-100-10, SGD momentum 0.9, cosine LR over ``--epochs``,
   batch 128, ``PruningCallback`` cubic, mask updates every 100 steps), searching
   ``target_sparsity`` in [0.92, 0.97], ``start_epoch`` 0-4, ``end_epoch`` 5 to ``epochs - 2``, ``lr``
   0.02-0.3 (log) and ``weight_decay`` 1e-5-2e-3 (log); objectives: validation accuracy (5,000 training
   images held out) up, compact artifact bytes down. The Pareto plot is ``pareto.png`` beside the study.
2. The best: the trial with the highest validation accuracy among those at ≥ 92%, its sparsity set to 0.92.
3. Ten seeds (``--seeds``): that config and ``ModelPruning`` (global L1 unstructured, the per-epoch amount
   that compounds to 92% over the first three quarters of the epochs; lr 0.1 and weight decay 5e-4, the
   values chosen for it on the same validation split in ``prune_mnist.py``), the same harness
   (``prune_mnist.run``), the same epochs, all 55,000 training images, paired by seed; test error on the
   official 10,000 images. One thread per process (``--threads``).
   Reported: each mean ± s.e. and the paired difference ModelPruning − ours, mean ± s.e.

    python benchmarks/sweep_mnist.py                        # 40 trials of 10 epochs, then 2 x 10 seeds
    python benchmarks/sweep_mnist.py --trials 4 --epochs 3 --seeds 2 --trial-subset 3000 --train-subset 5000 \
        --out-dir benchmarks/results/sweep_mnist_quick    # minutes; its own study folder (another search)

The study is resumable (SQLite in ``results/sweep_mnist/``): run it again to continue. Writes
``results/sweep_mnist.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_compress import MNISTDataModule
from lightning_compress.tuning.config import write_config
from lightning_compress.tuning.space import load_spec
from lightning_compress.tuning.sweep import run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_mnist  # noqa: E402 - the shared harness of the pruning benchmark
from _common import DEFAULT_MNIST, RESULTS, mnist_missing  # noqa: E402


def _update_every(args: argparse.Namespace) -> int:
    """Mask updates every 100 steps, or 4 times an epoch when an epoch is shorter (small --trial-subset runs)."""
    steps = math.ceil((args.trial_subset or 55_000) / 128)  # batches of 128 an epoch
    return 100 if steps >= 100 else max(1, steps // 4)


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": args.epochs, "accelerator": "cpu", "devices": 1, "deterministic": True, "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "callbacks": [{"class_path": "lightning_compress.PruningCallback", "init_args": {
                "target_sparsity": 0.92, "schedule": "cubic", "start_epoch": 2, "end_epoch": max(3, args.epochs - 4),
                "update_every_n_steps": _update_every(args), "verbose": False}}],
        },
        "model": {"class_path": "lightning_compress.ClassifierModule", "init_args": {
            "model": {"class_path": "lightning_compress.MLP", "init_args": {"in_features": 784, "hidden": [300, 100], "num_classes": 10}},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}},
            "scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": args.epochs}},
            "example_input_shape": [1, 28, 28]}},
        "data": {"class_path": "lightning_compress.MNISTDataModule", "init_args": {
            "root": str(args.data), "batch_size": 128, "train_subset": args.trial_subset, "val_size": 5000}},
    }


def sweep_spec(args: argparse.Namespace, config_path: Path) -> dict[str, Any]:
    return {
        "config": str(config_path), "study": "lenet_92", "out": str(args.out_dir), "trials": args.trials,
        "objectives": {"val_acc": "maximize", "artifact_bytes": "minimize"},
        "space": {
            "PruningCallback.target_sparsity": {"low": 0.92, "high": 0.97},
            "PruningCallback.start_epoch": {"low": 0, "high": min(4, args.epochs - 2)},
            "PruningCallback.end_epoch": {"low": min(5, args.epochs - 1), "high": max(min(5, args.epochs - 1) + 1, args.epochs - 2)},
            "SGD.lr": {"low": 0.02, "high": 0.3, "log": True},
            "SGD.weight_decay": {"low": 1e-5, "high": 2e-3, "log": True},
        },
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--trial-subset", type=int, default=20000, help="training images of each sweep trial (0: all 55,000)")
    p.add_argument("--train-subset", type=int, default=None, help="training images of the seed runs (default: all 55,000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS / "sweep_mnist")
    args = p.parse_args(argv)
    args.trial_subset = args.trial_subset or None
    torch.set_num_threads(args.threads)
    if missing := mnist_missing(args.data):
        print(missing)
        return 0
    config_path = write_config(base_config(args), args.out_dir / "base.yaml", header="LeNet-300-100 on MNIST, the sweep's base")
    sweep = run_sweep(load_spec(sweep_spec(args, config_path)))
    trials = [t for t in sweep["study"].get_trials(deepcopy=False) if "metrics" in t.user_attrs and t.state.name == "COMPLETE"]
    eligible = [t for t in trials if t.params["PruningCallback.target_sparsity"] >= 0.92]
    best = max(eligible, key=lambda t: t.user_attrs["metrics"]["val_acc"])
    print(f"best at >= 92%: trial {best.number} {best.params} val_acc {best.user_attrs['metrics']['val_acc']:.4f}", flush=True)

    prune_mnist.RESULTS = RESULTS
    harness = argparse.Namespace(
        seed=0, lr=best.params["SGD.lr"], weight_decay=best.params["SGD.weight_decay"], schedule="cubic", scope="global",
        prune_start=float(best.params["PruningCallback.start_epoch"]), prune_end=float(best.params["PruningCallback.end_epoch"]),
        update_every=100, layer_targets=None, target=0.92, mp_epochs=max(1, round(0.75 * args.epochs)),
    )
    mp_args = argparse.Namespace(**{**vars(harness), "lr": 0.1, "weight_decay": 5e-4})
    dm = MNISTDataModule(root=str(args.data), batch_size=128, train_subset=args.train_subset, seed=0, val_size=5000)
    runs: dict[str, list[dict[str, Any]]] = {"modelpruning": [], "ours": []}
    out = RESULTS / "sweep_mnist.json"
    for seed in range(args.seeds):
        for name, a in (("modelpruning", mp_args), ("ours", harness)):
            a = argparse.Namespace(**{**vars(a), "seed": seed})
            cb = prune_mnist.model_pruning(a, 0.92) if name == "modelpruning" else prune_mnist.ours(a, 0.92)
            runs[name].append(prune_mnist.run(f"{name}/seed{seed}", a, [cb], dm, args.epochs))
        diffs = [m["test_error_pct"] - o["test_error_pct"] for m, o in zip(runs["modelpruning"], runs["ours"])]
        summary = {name: mean_se([r["test_error_pct"] for r in rs]) for name, rs in runs.items()}
        result = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "best_trial": {"number": best.number, "params": best.params, "metrics": best.user_attrs["metrics"]},
            "trials": len(trials), "pareto_png": str(args.out_dir / "pareto.png"),
            "runs": runs, "test_error_pct": {k: {"mean": m, "se": s} for k, (m, s) in summary.items()},
            "paired_difference_pct": dict(zip(("mean", "se"), mean_se(diffs))), "seeds_done": seed + 1,
        }
        out.write_text(json.dumps(result, indent=1))
    d = result["paired_difference_pct"]
    print(f"\n| run (92% sparse, {args.epochs} epochs, {args.seeds} seeds) | test error % (mean ± s.e.) |\n|---|---|")
    for name, (m, s) in summary.items():
        print(f"| {name} | {m:.3f} ± {s:.3f} |")
    print(f"| ModelPruning − ours (paired) | {d['mean']:.3f} ± {d['se']:.3f} ({d['mean'] / d['se'] if d['se'] else float('inf'):.1f} s.e.) |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
