"""Channel pruning that physically shrinks the model: CPU latency, size and accuracy.

Two settings (both at 50% of the channels of every prunable group, heads untouched):

1. MNIST, the BN/residual ``ResCNN`` (width 32): a dense model is trained, then for each of the five
   criteria (magnitude, random, taylor, entropy, bn_scale) a short fine-tuning run starts from the dense
   weights with ``PruningCallback(structure="channel", shrink=True, schedule="one_shot")``: scores are
   gathered over the first ``--score-frac`` of the epoch, the channels are masked and removed, the rest
   of the run fine-tunes the shrunk model. Test accuracy right after the removal (before fine-tuning)
   and at the end. The peer, Torch-Pruning (``MagnitudePruner``, same 50%, head ignored), is run on the
   same dense weights and fine-tuned the same way.
2. A small ResNet (ResNet-8: 16/32/64 channels, 1×1 projection shortcuts) on a subset of the CIFAR-10
   JPEG copy, magnitude criterion only.

Latency: dense vs shrunk, eval mode, ``inference_mode``, ``torch.set_num_threads(1)``, batch 1 and 64,
measured interleaved in one process; the reported ratio is the median of per-round ratios (spread:
min-max). Sizes: parameter counts and bytes of the saved ``state_dict``. MACs: ``count_macs`` at batch 1.

Usage::

    python benchmarks/shrink_cnn.py                     # full run (MNIST + CIFAR subset)
    python benchmarks/shrink_cnn.py --smoke             # seconds, digits data, for checking the script

Writes ``benchmarks/results/shrink_cnn.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassifierModule, DigitsDataModule, MNISTDataModule
from lightning_compress.models import ResCNN
from lightning_compress.pruning.graph import channel_groups
from lightning_compress.pruning.shrink import count_macs
from lightning_compress.report import serialized_size

from _common import DEFAULT_CIFAR10 as CIFAR_DIR  # noqa: E402
from _common import DEFAULT_MNIST as MNIST_ROOT  # noqa: E402
from _common import RESULTS, mnist_missing  # noqa: E402
CRITERIA = ("magnitude", "random", "taylor", "entropy", "bn_scale")

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


# --------------------------------------------------------------------------------------------------
# models and data


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet8(nn.Module):
    """CIFAR ResNet with one BasicBlock per stage (16, 32, 64 channels)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TensorDataModule(LightningDataModule):
    def __init__(self, train: TensorDataset, val: TensorDataset, test: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.sets, self.batch_size = (train, val, test), batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets[0], self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets[1], 512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets[2], 512)


def cifar_datamodule(train_n: int, test_n: int, batch_size: int) -> TensorDataModule:
    cache = RESULTS / "cifar10_cache.npz"
    import numpy as np

    if cache.exists():
        z = np.load(cache)
        xtr, ytr, xte, yte = z["xtr"], z["ytr"], z["xte"], z["yte"]
    else:
        sys.path.insert(0, str(CIFAR_DIR))
        from load_cifar10_jpeg import load  # type: ignore[import-not-found]

        (xtr, ytr), (xte, yte) = load()
        RESULTS.mkdir(parents=True, exist_ok=True)
        np.savez(cache, xtr=xtr, ytr=ytr, xte=xte, yte=yte)
    gen = np.random.default_rng(0)
    tr = gen.permutation(len(xtr))[: train_n + 2000]
    te = gen.permutation(len(xte))[:test_n]  # the test split is stored grouped by class: sample it

    def tensors(x: Any, y: Any) -> TensorDataset:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
        return TensorDataset((t - mean) / std, torch.from_numpy(y).long())

    return TensorDataModule(
        tensors(xtr[tr[:train_n]], ytr[tr[:train_n]]),
        tensors(xtr[tr[train_n:]], ytr[tr[train_n:]]),
        tensors(xte[te], yte[te]),
        batch_size,
    )


# --------------------------------------------------------------------------------------------------
# training helpers


def trainer(max_epochs: int, callbacks: list | None = None, limit: int | float | None = None) -> Trainer:
    return Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        limit_train_batches=limit,
        num_sanity_val_steps=0,
    )


def make_module(net: nn.Module, lr: float, epochs: int, shape: tuple[int, ...]) -> ClassifierModule:
    return ClassifierModule(
        net,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, epochs)),
        example_input_shape=shape,
    )


@torch.inference_mode()
def accuracy(net: nn.Module, dm: LightningDataModule) -> float:
    was = net.training
    net.eval()
    correct = total = 0
    for x, y in dm.test_dataloader():
        correct += int((net(x).argmax(-1) == y).sum())
        total += len(y)
    net.train(was)
    return correct / total


class AccuracyAtShrink(Callback):
    """Test accuracy the first time the model's parameter count changes (right after the removal)."""

    def __init__(self, dm: LightningDataModule) -> None:
        self.dm, self.n0, self.acc = dm, None, None

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.n0 = sum(p.numel() for p in pl_module.parameters())

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.acc is None and sum(p.numel() for p in pl_module.parameters()) != self.n0:
            self.acc = accuracy(pl_module.model, self.dm)


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.inference_mode()
def latency_ratio(dense: nn.Module, small: nn.Module, shape: tuple[int, ...], batch: int, rounds: int) -> dict[str, Any]:
    dense, small = dense.eval(), small.eval()
    x = torch.randn(batch, *shape)
    reps = max(2, 64 // batch) if batch > 1 else 30
    for _ in range(3):
        dense(x), small(x)

    def timed(m: nn.Module) -> float:
        t = time.perf_counter()
        for _ in range(reps):
            m(x)
        return (time.perf_counter() - t) / reps

    ratios, td, ts = [], [], []
    for _ in range(rounds):
        a, b = timed(dense), timed(small)
        td.append(a), ts.append(b), ratios.append(a / b)
    return {
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "dense_ms": statistics.median(td) * 1e3,
        "shrunk_ms": statistics.median(ts) * 1e3,
    }


# --------------------------------------------------------------------------------------------------
# one pruning run with our callback


def ours(
    dense_state: dict, build: Any, dm: LightningDataModule, criterion: str, shape: tuple[int, ...], args: Any
) -> tuple[nn.Module, dict[str, Any]]:
    from lightning_compress.pruning import PruningCallback

    seed_everything(1)
    net = build()
    net.load_state_dict(dense_state)
    module = make_module(net, args.ft_lr, args.ft_epochs, shape)
    score_steps = max(1, int(args.score_frac * len(dm.train_dataloader())))
    prune = PruningCallback(
        target_sparsity=0.5,
        structure="channel",
        criterion=criterion,
        scope="layer",
        schedule="one_shot",
        start_epoch=args.score_frac,
        update_every_n_steps=score_steps,
        shrink=True,
        shrink_epoch=args.score_frac,
        verbose=False,
    )
    probe = AccuracyAtShrink(dm)
    t0 = time.perf_counter()
    trainer(args.ft_epochs, [prune, probe], args.limit).fit(module, dm)
    fit_s = time.perf_counter() - t0
    acc = accuracy(module.model, dm)
    return module.model, {"acc_before_ft": probe.acc, "acc_after_ft": acc, "fit_s": fit_s, "shrunk": prune.compression_summary().get("shrunk")}


def torch_pruning_peer(
    dense_state: dict, build: Any, dm: LightningDataModule, shape: tuple[int, ...], args: Any
) -> tuple[nn.Module, dict[str, Any]]:
    import torch_pruning as tp

    seed_everything(1)
    net = build()
    net.load_state_dict(dense_state)
    net.eval()
    heads = [m for m in net.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MagnitudePruner(
        net, torch.randn(1, *shape), importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=heads,
    )  # fmt: skip
    pruner.step()
    net.train()
    acc0 = accuracy(net, dm)
    module = make_module(net, args.ft_lr, args.ft_epochs, shape)
    t0 = time.perf_counter()
    trainer(args.ft_epochs, [], args.limit).fit(module, dm)
    return net, {"acc_before_ft": acc0, "acc_after_ft": accuracy(net, dm), "fit_s": time.perf_counter() - t0}


def run_setting(name: str, build: Any, dm: LightningDataModule, shape: tuple[int, ...], criteria: tuple[str, ...], args: Any) -> dict:
    print(f"\n=== {name}: dense training ({args.epochs} epochs) ===", flush=True)
    seed_everything(0)
    dense = build()
    module = make_module(dense, args.lr, args.epochs, shape)
    t0 = time.perf_counter()
    trainer(args.epochs, [], args.limit).fit(module, dm)
    dense_fit_s = time.perf_counter() - t0
    dense_acc = accuracy(dense, dm)
    print(f"dense test acc {dense_acc:.4f} ({dense_fit_s:.0f}s)", flush=True)
    dense_state = copy.deepcopy(dense.state_dict())
    x1 = torch.zeros(1, *shape)
    groups = channel_groups(dense, x1)
    out: dict[str, Any] = {
        "dense": {
            "test_acc": dense_acc,
            "params": params(dense),
            "bytes": serialized_size(dense),
            "macs": count_macs(dense, x1),
            "fit_s": dense_fit_s,
        },
        "groups": [{"members": g.members, "size": g.size} for g in groups],
        "runs": {},
    }
    shrunk_net = None
    for crit in criteria:
        print(f"--- {name}: ours, criterion={crit}", flush=True)
        net, res = ours(dense_state, build, dm, crit, shape, args)
        res.update(params=params(net), bytes=serialized_size(net), macs=count_macs(net, x1))
        res["channels"] = {
            n: [m.weight.shape[0], dict(dense.named_modules())[n].weight.shape[0]]
            for n, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }
        out["runs"][crit] = res
        shrunk_net = shrunk_net or net
        print(f"    acc before ft {res['acc_before_ft']:.4f} after {res['acc_after_ft']:.4f}", flush=True)
    if args.peer:
        print(f"--- {name}: Torch-Pruning peer", flush=True)
        peer, res = torch_pruning_peer(dense_state, build, dm, shape, args)
        res.update(params=params(peer), bytes=serialized_size(peer), macs=count_macs(peer, x1))
        out["runs"]["torch_pruning"] = res
        print(f"    acc before ft {res['acc_before_ft']:.4f} after {res['acc_after_ft']:.4f}", flush=True)
    assert shrunk_net is not None
    torch.set_num_threads(1)
    for tag, net in [("ours", shrunk_net)] + ([("torch_pruning", peer)] if args.peer else []):
        out.setdefault("latency", {})[tag] = {
            f"batch{b}": latency_ratio(dense, net, shape, b, args.rounds) for b in (1, 64)
        }
    torch.set_num_threads(args.threads)
    return out


def print_table(name: str, res: dict) -> None:
    d = res["dense"]
    print(f"\n{name}: dense test acc {d['test_acc'] * 100:.2f}%  params {d['params']:,}  MACs {d['macs']:,}")
    print(f"{'run':<15}{'acc@shrink':>11}{'acc@ft':>9}{'drop pt':>9}{'params x':>9}{'disk x':>8}{'MACs x':>8}")
    for run, r in res["runs"].items():
        print(
            f"{run:<15}{(r['acc_before_ft'] or 0) * 100:>10.2f}%{r['acc_after_ft'] * 100:>8.2f}%"
            f"{(d['test_acc'] - r['acc_after_ft']) * 100:>9.2f}{d['params'] / r['params']:>9.2f}"
            f"{d['bytes'] / r['bytes']:>8.2f}{d['macs'] / r['macs']:>8.2f}"
        )
    for tag, lat in res["latency"].items():
        for b, v in lat.items():
            print(
                f"latency {tag:<14}{b:<8} dense {v['dense_ms']:.2f} ms  shrunk {v['shrunk_ms']:.2f} ms  "
                f"speed-up {v['ratio']:.2f}x (min {v['min']:.2f}, max {v['max']:.2f})"
            )


def latency_only(args: Any) -> dict[str, Any]:
    """Latency, size and MACs of dense vs 50%-shrunk nets (no training: shapes decide the speed)."""
    import torch_pruning as tp

    from lightning_compress.pruning.shrink import shrink_model

    out: dict[str, Any] = {}
    for name, build, shape in (("mnist_rescnn", lambda: ResCNN(width=32), (1, 28, 28)), ("cifar_resnet8", ResNet8, (3, 32, 32))):
        torch.manual_seed(0)
        dense = build().eval()
        x1 = torch.zeros(1, *shape)
        ours_net = copy.deepcopy(dense)
        keep = {}
        modules = dict(ours_net.named_modules())
        for g in channel_groups(ours_net, x1):
            w = modules[g.members[0]].weight.detach().flatten(1).abs().sum(1)
            vec = torch.zeros(g.size, dtype=torch.bool)
            vec[w.topk(g.size - g.size // 2).indices] = True
            keep[g.members[0]] = vec
        shrink_model(ours_net, keep, x1)
        peer = copy.deepcopy(dense)
        tp.pruner.MagnitudePruner(
            peer, torch.randn(1, *shape), importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
            ignored_layers=[m for m in peer.modules() if isinstance(m, nn.Linear)],
        ).step()  # fmt: skip
        torch.set_num_threads(1)
        res: dict[str, Any] = {}
        for tag, net in (("dense", dense), ("ours", ours_net), ("torch_pruning", peer)):
            res[tag] = {"params": params(net), "bytes": serialized_size(net), "macs": count_macs(net, x1)}
            if tag != "dense":
                res[tag]["latency"] = {f"batch{b}": latency_ratio(dense, net, shape, b, args.rounds) for b in (1, 64)}
        out[name] = res
        d = res["dense"]
        for tag in ("ours", "torch_pruning"):
            r = res[tag]
            lat = r["latency"]
            print(
                f"{name:<14}{tag:<14} params {d['params'] / r['params']:.2f}x  disk {d['bytes'] / r['bytes']:.2f}x  "
                f"MACs {d['macs'] / r['macs']:.2f}x  batch1 {lat['batch1']['ratio']:.2f}x "
                f"[{lat['batch1']['min']:.2f}-{lat['batch1']['max']:.2f}]  batch64 {lat['batch64']['ratio']:.2f}x "
                f"[{lat['batch64']['min']:.2f}-{lat['batch64']['max']:.2f}]  ({lat['batch64']['dense_ms']:.1f} -> "
                f"{lat['batch64']['shrunk_ms']:.1f} ms)",
                flush=True,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="digits instead of MNIST/CIFAR, a few batches")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs (MNIST)")
    p.add_argument("--ft-epochs", type=int, default=1, help="epochs of the prune + fine-tune run")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--score-frac", type=float, default=0.1, help="fraction of the first epoch spent scoring")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--no-peer", dest="peer", action="store_false")
    p.add_argument("--no-cifar", dest="cifar", action="store_false")
    p.add_argument("--no-mnist", dest="mnist", action="store_false")
    p.add_argument("--mnist-train-subset", type=int, default=None, help="first N training images (default: all 55,000)")
    p.add_argument("--out", default="shrink_cnn.json", help="file name under benchmarks/results/")
    p.add_argument("--latency-only", action="store_true", help="untrained nets: latency, size and MACs only")
    p.add_argument("--cifar-train", type=int, default=10000)
    p.add_argument("--cifar-test", type=int, default=5000)
    p.add_argument("--cifar-epochs", type=int, default=4)
    p.add_argument("--cifar-ft-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    p.add_argument("--threads", type=int, default=2, help="threads for training (latency always uses 1)")
    p.add_argument("--limit", type=float, default=None, help="limit_train_batches (debugging)")
    args = p.parse_args()
    if (args.peer or args.latency_only) and importlib.util.find_spec("torch_pruning") is None:
        # said before anything trains: the peer runs after every criterion, and the results are written at the end
        raise SystemExit("the Torch-Pruning peer needs torch-pruning: pip install -e '.[bench]'"
                         + ("" if args.latency_only else ", or pass --no-peer"))
    torch.set_num_threads(args.threads)
    criteria = tuple(c for c in args.criteria.split(",") if c)
    results: dict[str, Any] = {"config": vars(args), "torch": torch.__version__}

    if args.latency_only:
        results["latency_only"] = latency_only(args)
    elif args.smoke:
        args.epochs, args.ft_epochs, args.rounds, args.cifar = 1, 1, 3, False
        args.score_frac = 0.25
        dm: LightningDataModule = DigitsDataModule(batch_size=64)
        dm.setup("fit")
        results["mnist"] = run_setting("digits (smoke)", lambda: ResCNN(width=16), dm, (1, 8, 8), criteria, args)
        print_table("digits (smoke)", results["mnist"])
    else:
        if not args.mnist:
            pass
        elif missing := mnist_missing(MNIST_ROOT, None):
            print(f"{missing} the MNIST setting")
        else:
            dm = MNISTDataModule(root=str(MNIST_ROOT), batch_size=64, train_subset=args.mnist_train_subset)
            dm.setup("fit")
            dm.setup("test")
            results["mnist"] = run_setting("MNIST ResCNN", lambda: ResCNN(width=32), dm, (1, 28, 28), criteria, args)
            print_table("MNIST ResCNN", results["mnist"])
        if args.cifar:
            if not (CIFAR_DIR / "load_cifar10_jpeg.py").exists():
                print(f"CIFAR-10 copy not found at {CIFAR_DIR} (set LC_CIFAR10_DIR); skipping the CIFAR setting")
            else:
                cdm = cifar_datamodule(args.cifar_train, args.cifar_test, 64)
                cargs = copy.copy(args)
                cargs.epochs, cargs.ft_epochs, cargs.lr, cargs.ft_lr = args.cifar_epochs, args.cifar_ft_epochs, 0.1, 0.02
                results["cifar10"] = run_setting("CIFAR-10 ResNet-8", ResNet8, cdm, (3, 32, 32), ("magnitude",), cargs)
                results["cifar10"]["subset"] = {"train": args.cifar_train, "test": args.cifar_test}
                print_table(f"CIFAR-10 ResNet-8 ({args.cifar_train} train images)", results["cifar10"])
    if not any(key in results for key in ("mnist", "cifar10")):  # nothing ran: an earlier result file stays as it is
        print("no setting ran; nothing written")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "shrink_cnn_smoke.json" if args.smoke else args.out
    (RESULTS / name).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    main()
