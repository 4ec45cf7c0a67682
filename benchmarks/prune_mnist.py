"""MNIST LeNet-300-100: dense vs Lightning ``ModelPruning`` vs our ``PruningCallback``, same recipe, one run.

Recipe, the same for every run: MLP 784-300-100-10, SGD lr 0.1 momentum 0.9 weight decay 5e-4,
cosine LR over the run (stepped per epoch), batch 128, ``--epochs`` epochs (20). GUIDE §5 used lr 0.05
without weight decay; lr and weight decay were chosen on the validation error of a 55k/5k split
(lr 0.05/0.1/0.2 x weight decay 0/1e-4/2e-4/5e-4/1e-3, at 92%). Pruning runs from
``--prune-start`` to ``--prune-end`` (2→12: the lowest mean validation error over seeds 0-4 among
0→10, 0→15, 2→12, 4→14 and ModelPruning's geometric trajectory; earlier, over seeds 0-2, among 0→6,
0→10, 0→14, 2→8), the remaining epochs fine-tune. ``--val-size 0`` trains on all 60k images (the protocol of Han et al.);
``--seeds 0,1,2`` repeats dense/ModelPruning/ours per seed and reports the mean. ``ModelPruning``
(GUIDE §5 setting): global L1 unstructured on the three weights, an amount per epoch
``1 - (1 - target) ** (1 / mp_epochs)`` applied at the end of the first ``--mp-epochs`` (15) epochs (its ``amount`` compounds on what remains), no lottery-ticket rewind.
Ours: ``PruningCallback(target, "cubic", start_epoch=--prune-start, end_epoch=--prune-end,
update_every_n_steps=--update-every)``. Plus our accuracy-vs-sparsity curve.

Reported: test error on the official 10,000 test images; fit time of each run over the dense run;
and the time spent inside our callback's hooks as a share of its fit time (robust to the noise of a
shared machine). Writes ``benchmarks/results/prune_mnist.json`` and ``prune_mnist_curve.png``.

    python benchmarks/prune_mnist.py                    # full: 20 epochs, curve 50/80/90/95/98%
    python benchmarks/prune_mnist.py --epochs 4 --prune-start 0 --prune-end 3 --mp-epochs 3 --levels 0.5,0.9 --train-subset 10000
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import ClassifierModule, MNISTDataModule
from lightning_compress.models import MLP
from lightning_compress.pruning import PruningCallback
from _common import DEFAULT_MNIST, EpochTimer, RESULTS  # noqa: E402 - benchmarks/ is on sys.path when run as a script



class TimedPruning(PruningCallback):
    """Our callback, with the time spent in its hooks accumulated (the overhead we add to a fit)."""

    hook_seconds = 0.0

    def _timed(name: str):  # type: ignore[misc]  # noqa: N805 - a decorator factory in the class body
        def wrapper(self: TimedPruning, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return getattr(PruningCallback, name)(self, *args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - t0

        return wrapper

    setup = _timed("setup")
    on_train_start = _timed("on_train_start")
    on_train_epoch_start = _timed("on_train_epoch_start")
    on_before_optimizer_step = _timed("on_before_optimizer_step")
    on_train_batch_end = _timed("on_train_batch_end")
    on_train_end = _timed("on_train_end")


def make_module(lr: float, epochs: int, weight_decay: float = 0.0) -> ClassifierModule:
    return ClassifierModule(
        MLP(784, (300, 100), 10),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=weight_decay),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
    )


def weight_sparsity(module: ClassifierModule) -> float:
    ws = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def run(name: str, args: argparse.Namespace, callbacks: list, dm: MNISTDataModule, epochs: int) -> dict[str, Any]:
    seed_everything(args.seed)
    module = make_module(args.lr, epochs, args.weight_decay)
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    fit_s = time.perf_counter() - t0
    val_acc = float(trainer.callback_metrics.get("val_acc", float("nan")))
    test = trainer.test(module, dm, verbose=False)[0]
    buffer = io.BytesIO()
    torch.save(module.model.state_dict(), buffer)  # what a user keeps: ModelPruning's zeros are stored dense
    out = {
        "name": name,
        "epochs": epochs,
        "val_error_pct": round(100 * (1 - val_acc), 3),
        "test_error_pct": round(100 * (1 - test["test_acc"]), 3),
        "test_errors": round((1 - test["test_acc"]) * 10000),
        "sparsity": round(weight_sparsity(module), 5),
        "state_dict_bytes": buffer.tell(),
        "fit_s": round(fit_s, 2),
        "epoch_s_median": round(statistics.median(timer.times), 3),
        "epoch_s": [round(t, 3) for t in timer.times],
    }
    for cb in callbacks:
        if isinstance(cb, TimedPruning):
            out["hook_s"] = round(cb.hook_seconds, 3)
            out["hook_share"] = round(cb.hook_seconds / fit_s, 4)
    print(f"[{name}] {json.dumps({k: v for k, v in out.items() if k != 'epoch_s'})}", flush=True)
    return out


def interleaved_timing(args: argparse.Namespace, dm: MNISTDataModule) -> dict[str, Any]:
    """Steady-state cost of our callback: one-epoch fits (``--timing-batches`` steps) of the dense model and of
    the model held at the target sparsity (masks on every step, an update check every ``--update-every``
    steps), alternated ``--timing-repeats`` times; the median of the per-pair ratios."""

    hook_s: list[float] = []

    def one(pruned: bool) -> float:
        seed_everything(args.seed)
        cbs = [TimedPruning(args.target, schedule="constant", update_every_n_steps=args.update_every or None, verbose=False)] if pruned else []
        trainer = Trainer(max_epochs=1, limit_train_batches=args.timing_batches, limit_val_batches=0, accelerator="cpu",
                          devices=1, callbacks=cbs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0)
        t0 = time.perf_counter()
        trainer.fit(make_module(args.lr, 1, args.weight_decay), dm)
        elapsed = time.perf_counter() - t0
        if cbs:
            hook_s.append(cbs[0].hook_seconds)
        return elapsed

    ratios, dense_s, pruned_s = [], [], []
    for i in range(args.timing_repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {flag: one(flag) for flag in order}
        dense_s.append(times[False])
        pruned_s.append(times[True])
        ratios.append(times[True] / times[False])
    out = {
        "ratio_median": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
        "dense_s": [round(t, 3) for t in dense_s],
        "pruned_s": [round(t, 3) for t in pruned_s],
        "hook_s": [round(t, 3) for t in hook_s],
        "batches": args.timing_batches,
    }
    print(f"[timing] {json.dumps(out)}", flush=True)
    return out


def ours(args: argparse.Namespace, target: float) -> TimedPruning:
    if getattr(args, "layer_targets", None) and abs(target - args.target) < 1e-9:
        target = {k: float(v) for k, v in (kv.split("=") for kv in args.layer_targets.split(","))}  # type: ignore[assignment]
    schedule: Any = args.schedule
    if schedule == "geometric":  # ModelPruning's trajectory: the same fraction of the remaining weights each epoch
        final = max(target.values()) if isinstance(target, dict) else target
        n = max(1, round(args.prune_end - args.prune_start))
        schedule = {round(args.prune_start) + k: 1 - (1 - final) ** (k / n) for k in range(1, n + 1)}
    window = {} if isinstance(schedule, dict) else {"start_epoch": args.prune_start, "end_epoch": args.prune_end}
    return TimedPruning(
        target,
        schedule=schedule,
        **window,
        update_every_n_steps=args.update_every or None,
        scope=args.scope,
        verbose=False,
    )


def model_pruning(args: argparse.Namespace, target: float) -> ModelPruning:
    n = int(args.mp_epochs)
    per_epoch = 1 - (1 - target) ** (1 / n)
    return ModelPruning(
        "l1_unstructured",
        amount=lambda epoch: per_epoch if epoch < n else 0.0,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
        make_pruning_permanent=True,
        verbose=0,
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy-vs-sparsity curve (ours), with the dense error and the ModelPruning and ours runs at the target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no PNG")
        return
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [100 * c["sparsity"] for c in result["curve"]]
    ax.plot(xs, [c["test_error_pct"] for c in result["curve"]], "o-", label="PruningCallback (cubic)")
    if "ours" in runs:
        ax.plot([100 * runs["ours"]["sparsity"]], [runs["ours"]["test_error_pct"]], "b*", ms=11, label="PruningCallback, main run")
    if "dense" in runs:
        ax.axhline(runs["dense"]["test_error_pct"], color="grey", ls="--", label="dense")
    if "modelpruning" in runs:
        mp = runs["modelpruning"]
        ax.plot([100 * mp["sparsity"]], [mp["test_error_pct"]], "rx", ms=9, label="Lightning ModelPruning")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("MNIST test error (%)")
    epochs = result["config"].get("curve_epochs") or result["config"].get("epochs")
    ax.set_title(f"LeNet-300-100, {epochs} epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--prune-start", type=float, default=2.0, help="our window start (chosen on the 55k/5k validation split)")
    p.add_argument("--prune-end", type=float, default=12.0)
    p.add_argument("--mp-epochs", type=int, default=15, help="ModelPruning: prune at the end of this many epochs (GUIDE: 15)")
    p.add_argument("--update-every", type=int, default=100, help="optimizer steps between mask updates (0: per epoch)")
    p.add_argument("--target", type=float, default=0.92)
    p.add_argument("--levels", default="0.5,0.8,0.9,0.95,0.98", help="curve sparsities ('' to skip the curve)")
    p.add_argument("--curve-epochs", type=int, default=None, help="epochs of each curve run (default --epochs)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--scope", default="global", choices=("global", "layer"))
    p.add_argument("--layer-targets", default=None, help="ours at --target: per-layer sparsities instead, 'regex=s,...'")
    p.add_argument("--schedule", default="cubic", help="our schedule (any name of lightning_compress.schedules)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for validation (0: train on all 60k)")
    p.add_argument("--timing-repeats", type=int, default=5, help="interleaved dense/pruned timing fits (0: skip)")
    p.add_argument("--timing-batches", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, help="comma list of seeds for dense/modelpruning/ours (default: --seed)")
    p.add_argument("--skip", default="", help="comma list of runs to skip: dense,modelpruning,ours")
    p.add_argument("--out", type=Path, default=RESULTS / "prune_mnist.json")
    p.add_argument("--plot-only", type=Path, default=None, help="redraw the PNG from a results JSON and exit")
    args = p.parse_args(argv)
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_name(args.plot_only.stem + "_curve.png"))
        return 0
    if not (args.data / "train-images-idx3-ubyte.gz").is_file():
        print(f"MNIST IDX files not found in {args.data}; pass --data or set LC_MNIST_DIR. Skipping.")
        return 0
    torch.set_num_threads(args.threads)
    dm = MNISTDataModule(
        root=str(args.data), batch_size=args.batch_size, train_subset=args.train_subset, seed=args.seed, val_size=args.val_size
    )
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    # warm-up (first-fit costs: imports, allocator, data loading) so the dense run is not penalised
    warm = Trainer(max_epochs=1, limit_train_batches=50, limit_val_batches=5, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    warm.fit(make_module(args.lr, 1, args.weight_decay), dm)

    # the three main runs, one after the other in this process, per seed
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    result["seeds"] = {}
    for seed in seeds:
        sargs = argparse.Namespace(**{**vars(args), "seed": seed})
        for name in ("dense", "modelpruning", "ours"):
            if name in skip:
                continue
            cbs = [] if name == "dense" else [model_pruning(sargs, args.target) if name == "modelpruning" else ours(sargs, args.target)]
            r = run(name if len(seeds) == 1 else f"{name}/seed{seed}", sargs, cbs, dm, args.epochs)
            result["seeds"].setdefault(name, []).append(r)
            save()
    for name, rs in result["seeds"].items():
        # the first seed's run stands for the name; the mean over seeds is added to it
        result["runs"][name] = {**rs[0], "name": name, "seeds": seeds,
                                "mean_test_error_pct": round(statistics.mean(r["test_error_pct"] for r in rs), 3),
                                "test_error_pct_per_seed": [r["test_error_pct"] for r in rs]}
    dense = result["runs"].get("dense")
    if dense:
        for name, r in result["runs"].items():
            r["fit_ratio_vs_dense"] = round(statistics.median(a["fit_s"] / b["fit_s"] for a, b in zip(result["seeds"][name], result["seeds"]["dense"])), 3)
            r["epoch_ratio_vs_dense"] = round(r["epoch_s_median"] / dense["epoch_s_median"], 3)

    if args.timing_repeats:
        result["timing"] = interleaved_timing(args, dm)
        save()

    curve_epochs = args.curve_epochs or args.epochs
    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    result["curve"] = []
    for level in levels:
        if curve_epochs == args.epochs and abs(level - args.target) < 1e-9 and "ours" in result["runs"]:
            r = result["runs"]["ours"]
        else:
            cargs = argparse.Namespace(**{**vars(args), "prune_end": min(args.prune_end, curve_epochs * 0.75)})
            r = run(f"ours@{level:g}", cargs, [ours(cargs, level)], dm, curve_epochs)
        result["curve"].append({"target": level, "sparsity": r["sparsity"], "test_error_pct": r["test_error_pct"]})
        save()

    print("\nrun            test error (mean over seeds; per seed)   sparsity   fit time / dense   median epoch / dense   hook share")
    for r in result["runs"].values():
        per_seed = ", ".join(f"{e:.2f}" for e in r["test_error_pct_per_seed"])
        print(
            f"{r['name']:<14} {r['mean_test_error_pct']:>8.2f}% ({per_seed})   {100 * r['sparsity']:>7.2f}%   "
            f"{r.get('fit_ratio_vs_dense', float('nan')):>16.3f}   {r.get('epoch_ratio_vs_dense', float('nan')):>20.3f}"
            + (f"   {100 * r['hook_share']:>9.2f}%" if "hook_share" in r else f"   {'-':>10}")  # ours only: the peer's hooks are not timed
        )
    if "timing" in result:
        t = result["timing"]
        print(f"\ninterleaved steady-state fit time, pruned {args.target:.0%} / dense: median {t['ratio_median']:.3f} (ratios {t['ratios']})")
    if result["curve"]:
        print("\ncurve (ours): " + ", ".join(f"{c['sparsity']:.0%}: {c['test_error_pct']:.2f}%" for c in result["curve"]))
        plot(result, args.out.with_name(args.out.stem + "_curve.png"))
    save()
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
