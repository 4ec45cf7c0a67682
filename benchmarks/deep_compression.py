"""MNIST LeNet-300-100 through the whole pipeline, against Deep Compression (Han et al. 2016): 40x at 1.58%.

One fit: LeNet-300-100 (784-300-100-10), SGD lr 0.1 momentum 0.9 weight decay 5e-4, cosine LR over
``--epochs`` (20), batch 128; ``PruningCallback`` to ``--target`` (95%, global magnitude, cubic from epoch
``--prune-start`` 2 to ``--prune-end`` 12, the recipe of ``benchmarks/prune_mnist.py``), then weight-only QAT
at ``--bits`` (4) per output channel from ``--qat-start`` (12), converted at the end and written with
``lightning_compress.export(format="compact")``. Reported: the bytes of that file against the float
model's ``state_dict`` written with ``torch.save`` (Deep Compression's reference, 1,070 KB), and the
error on the official 10,000 test images, of the model loaded back from the file alone.

    python benchmarks/deep_compression.py                      # about 3 minutes on 2 CPU cores
    python benchmarks/deep_compression.py --target 0.92 --qat-start 14   # 37.4x at 1.53%

Measured (2 CPU cores, 4 minutes a run): seed 0 20,808 bytes (51.4x the float state_dict) at 1.58% test
error, seed 1 51.1x at 1.59%, seed 2 51.1x at 1.76% (mean 1.64%). Deep Compression: 40x at 1.58%.

Needs the MNIST IDX files (``../shared/data/mnist`` or ``--data``). Writes
``benchmarks/results/deep_compression.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
from _common import DEFAULT_MNIST, RESULTS, mnist_missing
from lightning.pytorch import Trainer, seed_everything

import lightning_compress as lc
from lightning_compress import ClassifierModule, MNISTDataModule, PruningCallback, QuantizeCallback
from lightning_compress.models import MLP


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--prune-start", type=float, default=2.0)
    p.add_argument("--prune-end", type=float, default=12.0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--qat-start", type=float, default=12.0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "deep_compression.json")
    args = p.parse_args()
    if missing := mnist_missing(args.data):
        print(missing)
        return
    seed_everything(args.seed)
    dm = MNISTDataModule(root=str(args.data), batch_size=128, val_size=args.val_size)
    module = ClassifierModule(
        MLP(784, (300, 100), 10),
        optimizer=lambda ps: torch.optim.SGD(ps, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.epochs),
    )
    buffer = io.BytesIO()
    torch.save(module.model.state_dict(), buffer)
    float_bytes = buffer.tell()
    prune = PruningCallback(args.target, schedule="cubic", start_epoch=args.prune_start, end_epoch=args.prune_end,
                            update_every_n_steps=100, verbose=False)
    quant = QuantizeCallback(weight_bits=args.bits, activation_bits=None, start_epoch=args.qat_start, latency="none")
    t0 = time.perf_counter()
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=[prune, quant], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, deterministic=True)
    trainer.fit(module, dm)
    fit_s = time.perf_counter() - t0
    path = RESULTS / "deep_compression_lenet.safetensors"
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = lc.export(quant.quantized_model, path, torch.zeros(1, 1, 28, 28))
    loaded = lc.load(path)
    dm.setup("test")
    errors = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            errors += int((loaded(x).argmax(1) != y).sum())
            total += len(y)
    result = {
        "config": vars(args) | {"data": str(args.data), "out": str(args.out)},
        "fit_s": round(fit_s, 1),
        "sparsity": prune.sparsity,
        "float_state_dict_bytes": float_bytes,
        "artifact_bytes": info["bytes"],
        "ratio": float_bytes / info["bytes"],
        "graph_bytes": info["graph_bytes"],
        "encodings": info["tensors"],
        "test_error_pct": 100 * errors / total,
        "paper": {"ratio": 40, "test_error_pct": 1.58, "float_kb": 1070},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\n| | float | Deep Compression | ours |\n|---|---|---|---|\n"
          f"| bytes | {float_bytes:,} | 1,070 KB / 40 | {info['bytes']:,} ({result['ratio']:.1f}x) |\n"
          f"| test error | - | 1.58% | {result['test_error_pct']:.2f}% |")


if __name__ == "__main__":
    main()
