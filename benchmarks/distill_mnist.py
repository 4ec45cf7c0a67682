"""MNIST distillation benchmark (Hinton et al. 2015, Table 1 setting, CPU budget).

Teacher: a BN + residual conv net, trained here with ``ClassifierModule`` (or loaded from
``--teacher-ckpt`` if that file exists). An MLP teacher trained in a CPU budget is barely better than
an MLP student (GUIDE §5), so a conv net is the honest teacher here. Default ``--teacher poolres``
(``PoolResCNN`` below: conv-BN-ReLU, max-pool, residual block, strided conv-BN-ReLU, flatten, linear).
``--teacher rescnn`` uses ``lightning_compress.ResCNN`` as is; measured here it is a weak MNIST
teacher (223 test errors after 4 epochs, worse than the 2x800 MLP alone): its receptive field is
9x9 pixels before global average pooling, so it sees a bag of local patches.

Students, each trained with the same epochs, optimizer and LR schedule, alone (cross-entropy) and
distilled with :class:`lightning_compress.DistillationModule` (KL at temperature T, alpha):

- 2×800 MLP, T=20 (Hinton's setting);
- 2×30 MLP, T=3.

T=20 and the guard: the T²-scaled KL behaves like logit matching for large T, with gradients that
grow with the teacher's logit range; with SGD at lr 0.05 it diverged on this machine (9,020 errors).
This script uses Adam for every run by default (same optimizer for alone and distilled), which is
insensitive to the scale of the loss; with ``--optimizer sgd`` the distilled runs' learning rate is
divided by ``--kd-lr-div`` (default T/2) and the difference is stated in the JSON. The module's
divergence guard (``divergence_factor``) warns if the loss still blows up.

The distilled runs use the teacher-output cache on the same ordinary shuffled ``DataLoader`` of
``(x, y)`` tuples as the runs alone (no sample indices): epoch 0 runs the teacher and stores its
logits under a hash of each input, later epochs find them again. ``--no-cache-epochs N`` also times N
distilled epochs with the teacher run every step.

Fit time: each distilled run follows its student-alone run in the same process (same epochs, data,
optimizer and threads); ``fit_time_ratio`` is the distilled fit's wall time divided by the alone fit's
(``trainer.fit`` only, testing excluded). ``--timing-repeats N`` repeats the 2x800 pair N times and
reports the median ratio and its spread. The cost of the input hash is timed on one training batch.

Writes ``benchmarks/results/distill_mnist.json`` and prints a table.

    python benchmarks/distill_mnist.py --epochs 12 --teacher-epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_compress import ClassifierModule, MNISTDataModule
from lightning_compress.distillation import DistillationModule
from lightning_compress.distillation.cache import input_keys
from lightning_compress.models import MLP, ResCNN, ResidualBlock
from _common import DEFAULT_MNIST, EpochTimer, RESULTS, mnist_missing  # noqa: E402 - benchmarks/ is on sys.path when run as a script



class PoolResCNN(torch.nn.Module):
    """``ResCNN``'s parts (BN, residual block) with spatial information kept: max-pool and a flattening head."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.block = ResidualBlock(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.down(self.block(self.stem(x))))


def make_teacher(args: argparse.Namespace) -> torch.nn.Module:
    return ResCNN(width=args.teacher_width) if args.teacher == "rescnn" else PoolResCNN(width=args.teacher_width)


def trainer(epochs: int, root: Path, timer: EpochTimer | None = None) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        accelerator="cpu",
        deterministic=True,
        callbacks=[timer] if timer else [],
    )


def make_optimizer(args: argparse.Namespace, lr_div: float = 1.0):
    def factory(params: Any) -> torch.optim.Optimizer:
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=args.lr / lr_div)
        return torch.optim.SGD(params, lr=args.lr / lr_div, momentum=0.9, nesterov=True)

    return factory


def make_scheduler(epochs: int):
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


def test_errors(tr: Trainer, module: Any, loader: DataLoader) -> int:
    metrics = tr.test(module, loader, verbose=False)[0]
    return round((1.0 - metrics["test_acc"]) * len(loader.dataset))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--root",
        default=str(DEFAULT_MNIST),
    )
    p.add_argument("--epochs", type=int, default=12, help="epochs of every student run")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher", choices=["poolres", "rescnn"], default="poolres")
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--teacher-ckpt", default=None,
                   help="default: results/distill_teacher_<teacher>_w<width>_e<epochs>_b<batch>_n<train images>_s<seed>.ckpt")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kd-lr-div", type=float, default=None, help="SGD only: distilled lr = lr / this (default T/2)")
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cache-epochs", type=int, default=1, help="distilled 2x800 epochs timed without the cache")
    p.add_argument("--timing-repeats", type=int, default=1, help="alone/distilled 2x800 pairs timed (median ratio)")
    p.add_argument("--students", default="800,30", help="comma-separated hidden widths (two layers each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if missing := mnist_missing(args.root, "--root"):
        print(missing)
        sys.exit(0)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / "distill_runs"
    dm = MNISTDataModule(root=args.root, batch_size=args.batch_size, train_subset=args.train_subset, seed=args.seed)
    dm.setup("fit")
    assert dm.train_set is not None and dm.test_set is not None
    train_plain = DataLoader(dm.train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(dm.test_set, batch_size=1000)
    results: dict[str, Any] = {"args": vars(args), "n_train": len(dm.train_set), "n_test": len(dm.test_set), "runs": {}}

    # --- teacher ---------------------------------------------------------------------------------------
    # the settings the teacher was trained with name its file: a smoke run's weak teacher is not reused by a full run
    made = f"{args.teacher}_w{args.teacher_width}_e{args.teacher_epochs}_b{args.batch_size}_n{len(dm.train_set)}_s{args.seed}"
    ckpt = Path(args.teacher_ckpt or RESULTS / f"distill_teacher_{made}.ckpt")
    teacher_name = f"{'ResCNN' if args.teacher == 'rescnn' else 'PoolResCNN'}(width={args.teacher_width})"
    if ckpt.is_file():
        teacher_source = f"loaded from {ckpt}"
        t_time = None
    else:
        seed_everything(args.seed)
        timer = EpochTimer()
        tr = trainer(args.teacher_epochs, work, timer)
        teacher_module = ClassifierModule(
            make_teacher(args),
            optimizer=lambda ps: torch.optim.Adam(ps, lr=2e-3),
            scheduler=make_scheduler(args.teacher_epochs),
        )
        tr.fit(teacher_module, train_plain)
        tr.save_checkpoint(str(ckpt))
        teacher_source = f"trained here ({args.teacher_epochs} epochs, Adam 2e-3, cosine) and saved to {ckpt}"
        t_time = timer.times
    tr = trainer(1, work)
    teacher_errors = None
    t_eval = ClassifierModule(make_teacher(args))
    t_eval.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    teacher_errors = test_errors(tr, t_eval, test_loader)
    results["teacher"] = {"model": teacher_name, "source": teacher_source,
                          "test_errors": teacher_errors, "epoch_times_s": t_time,
                          "params": sum(q.numel() for q in t_eval.parameters())}
    print(f"teacher {teacher_name}: {teacher_errors} test errors ({teacher_source})", flush=True)

    # --- students ----------------------------------------------------------------------------------------
    temps = {800: 20.0, 30: 3.0}
    for width in [int(w) for w in args.students.split(",")]:
        temperature = temps.get(width, 4.0)
        lr_div = 1.0
        if args.optimizer == "sgd":
            lr_div = args.kd_lr_div if args.kd_lr_div is not None else max(1.0, temperature / 2)
        fit_ratios = []
        for repeat in range(args.timing_repeats if width == 800 else 1):
            # alone
            seed_everything(args.seed)
            timer = EpochTimer()
            tr = trainer(args.epochs, work, timer)
            alone = ClassifierModule(MLP(784, (width, width), 10), optimizer=make_optimizer(args), scheduler=make_scheduler(args.epochs))
            t0 = time.perf_counter()
            tr.fit(alone, train_plain)
            alone_fit = time.perf_counter() - t0
            alone_err = test_errors(tr, alone, test_loader)
            alone_times = timer.times
            # distilled, cache on, the same shuffled DataLoader
            seed_everything(args.seed)
            timer = EpochTimer()
            tr = trainer(args.epochs, work, timer)
            kd = DistillationModule(
                MLP(784, (width, width), 10), make_teacher(args), teacher_ckpt=str(ckpt), distill_loss="kl",
                temperature=temperature, alpha=args.alpha, optimizer=make_optimizer(args, lr_div),
                scheduler=make_scheduler(args.epochs), cache_teacher_outputs=True,
            )
            t0 = time.perf_counter()
            tr.fit(kd, train_plain)
            kd_fit = time.perf_counter() - t0
            fit_ratios.append(kd_fit / alone_fit)
            print(f"2x{width} fit time [s]: alone {alone_fit:.1f}, distilled (cache) {kd_fit:.1f}, "
                  f"ratio {kd_fit / alone_fit:.2f} (repeat {repeat})", flush=True)
        kd_err = test_errors(tr, kd, test_loader)
        cache = kd.teacher_cache
        results["runs"][f"2x{width}_alone"] = {"test_errors": alone_err, "epoch_times_s": alone_times, "fit_time_s": alone_fit}
        print(f"2x{width} alone: {alone_err} errors; epochs {[round(t, 1) for t in alone_times]}", flush=True)
        results["runs"][f"2x{width}_distilled"] = {
            "test_errors": kd_err, "temperature": temperature, "alpha": args.alpha, "lr_div": lr_div,
            "epoch_times_s": timer.times, "fit_time_s": kd_fit, "fit_time_ratio": statistics.median(fit_ratios),
            "fit_time_ratios": fit_ratios, "cache_hits": cache.hits, "cache_misses": cache.misses,
            "cache_entries": len(cache), "cache_on": cache.enabled,
            "agreement": float(tr.callback_metrics.get("test_agreement", float("nan"))),
        }
        results["runs"][f"2x{width}_ratio"] = kd_err / alone_err if alone_err else None
        print(f"2x{width} distilled T={temperature:g}: {kd_err} errors (ratio {kd_err / max(alone_err, 1):.2f}); "
              f"epochs {[round(t, 1) for t in timer.times]}; cache {cache.hits} hits, {cache.misses} misses", flush=True)
        if width == 800 and args.no_cache_epochs > 0:
            seed_everything(args.seed)
            timer = EpochTimer()
            tr = trainer(args.no_cache_epochs, work, timer)
            kd_nc = DistillationModule(
                MLP(784, (width, width), 10), make_teacher(args), teacher_ckpt=str(ckpt),
                temperature=temperature, alpha=args.alpha, optimizer=make_optimizer(args, lr_div),
            )
            tr.fit(kd_nc, train_plain)
            results["runs"]["2x800_distilled_nocache_epoch_times_s"] = timer.times

    # --- the cost of the input hash, on one training batch -------------------------------------------------
    x = next(iter(train_plain))[0]
    for _ in range(5):
        input_keys(x)
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(20):
            input_keys(x)
        samples.append((time.perf_counter() - t0) / 20)
    results["hash_ms_per_batch"] = {"batch": list(x.shape), "median": 1e3 * statistics.median(samples),
                                    "min": 1e3 * min(samples), "max": 1e3 * max(samples)}

    # --- table ---------------------------------------------------------------------------------------------
    runs = results["runs"]
    lines = [f"teacher {teacher_name}: {teacher_errors} errors / {len(dm.test_set)}  [{teacher_source}]",
             f"{'student':<10}{'T':>5}{'alone':>8}{'distilled':>11}{'ratio':>8}"]
    for width in [int(w) for w in args.students.split(",")]:
        a, d = runs[f"2x{width}_alone"], runs[f"2x{width}_distilled"]
        lines.append(f"{'2x' + str(width):<10}{d['temperature']:>5g}{a['test_errors']:>8}{d['test_errors']:>11}"
                     f"{runs[f'2x{width}_ratio']:>8.2f}")
    if "2x800_distilled" in runs:
        d = runs["2x800_distilled"]
        a = runs["2x800_alone"]
        cached = statistics.median(d["epoch_times_s"][1:]) if len(d["epoch_times_s"]) > 1 else float("nan")
        nocache = runs.get("2x800_distilled_nocache_epoch_times_s") or [float("nan")]
        results["epoch_time_s"] = {
            "alone_median": statistics.median(a["epoch_times_s"]),
            "distilled_cache_fill_epoch0": d["epoch_times_s"][0],
            "distilled_cached_median": cached,
            "distilled_no_cache_median": statistics.median(nocache),
        }
        e = results["epoch_time_s"]
        lines.append(
            f"2x800 epoch time [s]: alone {e['alone_median']:.1f} | distilled no cache {e['distilled_no_cache_median']:.1f} | "
            f"cache fill (epoch 0) {e['distilled_cache_fill_epoch0']:.1f} | cached {e['distilled_cached_median']:.1f}"
        )
        ratios = d["fit_time_ratios"]
        lines.append(
            f"2x800 fit time distilled/alone (cache on, shuffled DataLoader, {args.epochs} epochs): "
            f"{d['fit_time_ratio']:.2f}" + (f" (median of {len(ratios)}, {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")
        )
        if len(d["epoch_times_s"]) > 1:
            projected = (e["distilled_cache_fill_epoch0"] + 11 * cached) / (12 * e["alone_median"])
            results["fit_time_ratio_12_epochs_from_epoch_medians"] = projected
            lines.append(f"  from these epoch times, 12 epochs would give {projected:.2f} (fill epoch + 11 cached, / 12 alone)")
    h = results["hash_ms_per_batch"]
    lines.append(f"input hash: {h['median']:.2f} ms per batch {tuple(h['batch'])} (range {h['min']:.2f}-{h['max']:.2f})")
    lines.append(f"epochs {args.epochs}, optimizer {args.optimizer} lr {args.lr} cosine, batch {args.batch_size}, "
                 f"alpha {args.alpha}, train images {len(dm.train_set)}, threads {args.threads}")
    print("\n".join(lines))
    results["table"] = lines
    (RESULTS / "distill_mnist.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
