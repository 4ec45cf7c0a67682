"""Byte-level language model on the standard library's sources: every compression side by side.

Held-out (test split) perplexity of a GPT-style decoder (``lightning_compress.GPTDecoder``, packed
``nn.MultiheadAttention``) trained on ``TextDataModule``, one run each, CPU-sized:

- dense;
- 50% unstructured, magnitude vs wanda, one-shot and after a short recovery;
- 2:4 on every matmul weight, magnitude vs wanda, one-shot and after recovery;
- int8 and int4 (group 128) weight-only PTQ of every matmul weight, attention included;
- a 2-layer student distilled from a 6-layer teacher vs the same student alone, the same steps;
- half of every layer's attention heads and feed-forward neurons removed (``structure="heads+neurons"``,
  ``shrink=True``, separate q/k/v/o projections) after a short recovery, with the CPU latency of the
  smaller model against the dense one (``--parts units`` runs this row alone).

Wanda (Sun et al. 2023, LLaMA-7B, WikiText-2): dense 5.68, 50% wanda 7.26, 50% magnitude 17.29; the
ordering magnitude > wanda > dense is what should reproduce at this scale.

    python benchmarks/lm_stdlib.py                      # defaults: ~20 minutes on 2 CPU cores
    python benchmarks/lm_stdlib.py --steps 200 --quick  # a smoke run

Pruned models are compared after recovery with the dense model trained for the same extra steps at
the same learning rate ("dense + N steps"); quantised models with the dense model they came from.
Writes ``benchmarks/results/lm_stdlib.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from _common import RESULTS
from lightning.pytorch import Trainer, seed_everything

from lightning_compress import DistillationModule, GPTDecoder, LanguageModelModule, PruningCallback, QuantizeCallback, TextDataModule
from lightning_compress.measure import measure_latency
from lightning_compress.pruning import Wanda


def _trainer(steps: int, callbacks: list[Any] | None = None, **kw: Any) -> Trainer:
    return Trainer(
        max_steps=steps, max_epochs=-1 if steps > 0 else 1, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
        limit_val_batches=0, **kw,
    )


def _ppl(module: Any, dm: TextDataModule) -> float:
    result = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").test(
        module, dm, verbose=False
    )[0]
    return float(result["test_ppl"])


def _lm(args: argparse.Namespace, layers: int, lr: float | None = None, attention: str = "mha") -> LanguageModelModule:
    model = GPTDecoder(d_model=args.d_model, n_layers=layers, n_heads=args.heads, max_len=args.seq_len, attention=attention)  # type: ignore[arg-type]
    rate = args.lr if lr is None else lr  # 0.0: the one-shot rows, which must not train
    return LanguageModelModule(model, optimizer=lambda p: torch.optim.AdamW(p, lr=rate, weight_decay=0.01))


def _matmul_zeros(module: LanguageModelModule) -> float:
    """Fraction of zeros over every matmul weight (attention in-projections included), from the model."""
    zeros = total = 0
    for name, p in module.named_parameters():
        if p.dim() == 2 and not name.endswith("emb.weight") and "pos" not in name:
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / max(1, total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4, help="dense model and pruning/quantisation runs")
    p.add_argument("--teacher-layers", type=int, default=6)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--steps", type=int, default=800, help="training steps of the dense, teacher and student runs")
    p.add_argument("--recovery-steps", type=int, default=200, help="fine-tuning steps after one-shot pruning")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (default 3 x --steps: a teacher "
                   "clearly better than the student alone is the honest setting; a 6-layer model trained as long as the "
                   "2-layer student is not)")
    p.add_argument("--parts", choices=["all", "compression", "distillation", "units"], default="all")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="T=1, alpha=0.9: 0.886x the student alone; T=2, alpha=0.5: 0.996x")
    p.add_argument("--kd-alpha", type=float, default=0.9, help="weight of the distillation term")
    p.add_argument("--teacher-weights", default=None, help="a teacher state_dict to load instead of training one "
                   "(the distillation part saves its teacher to results/lm_teacher.pt)")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="skip the distillation rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    dm = TextDataModule(seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes, seed=args.seed)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    if args.parts == "distillation":
        _distillation(args, dm, rows)
        _write(args, rows, None, None, t0)
        return
    if args.parts == "units":
        _units(args, dm, rows)
        _write(args, rows, None, None, t0)
        return
    # dense
    dense = _lm(args, args.layers)
    _trainer(args.steps).fit(dense, dm)
    dense_ppl = _ppl(dense, dm)
    rows.append({"run": "dense", "ppl": dense_ppl, "zeros": _matmul_zeros(dense)})
    print(f"dense: ppl {dense_ppl:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    weights = copy.deepcopy(dense.state_dict())
    # the fair reference for "after recovery": the dense model trained for the same extra steps
    continued = _lm(args, args.layers, lr=args.lr / 3)
    continued.load_state_dict(weights)
    _trainer(args.recovery_steps).fit(continued, dm)
    continued_ppl = _ppl(continued, dm)
    rows.append({"run": f"dense + {args.recovery_steps} steps", "ppl": continued_ppl, "zeros": _matmul_zeros(continued)})
    print(f"dense continued: ppl {continued_ppl:.3f}", flush=True)

    # pruning: one-shot from the dense weights, then a short recovery at a lower learning rate
    for structure, target in (("unstructured", 0.5), ("2:4", 0.5)):
        for criterion in ("magnitude", "wanda"):
            row: dict[str, Any] = {"run": f"{structure} {target:.0%}" if structure == "unstructured" else structure, "criterion": criterion}
            for phase, steps in (("one_shot", 1), ("recovered", args.recovery_steps)):
                module = _lm(args, args.layers, lr=0.0 if phase == "one_shot" else args.lr / 3)
                module.load_state_dict(weights)
                scorer = Wanda(calibration_batches=args.calibration_batches) if criterion == "wanda" else criterion
                prune = PruningCallback(target, structure=structure, criterion=scorer, schedule="one_shot", start_epoch=0, verbose=False)
                _trainer(steps, [prune]).fit(module, dm)
                row[f"ppl_{phase}"] = _ppl(module, dm)
                row[f"zeros_{phase}"] = _matmul_zeros(module)
            row["ratio_recovered"] = row["ppl_recovered"] / continued_ppl  # the same number of training steps
            rows.append(row)
            print(row, flush=True)

    # weight-only PTQ of every matmul weight
    for bits, group in ((8, "per_channel"), (4, 128)):
        module = _lm(args, args.layers)
        module.load_state_dict(weights)
        quant = QuantizeCallback(method="ptq", weight_bits=bits, activation_bits=None, granularity=group,
                                 calibration_batches=args.calibration_batches, latency="none")
        _trainer(args.calibration_batches, [quant]).fit(module, dm)
        converted = LanguageModelModule(quant.quantized_model)
        row = {"run": f"int{bits} weight-only" + (f" (group {group})" if isinstance(group, int) else ""),
               "ppl": _ppl(converted, dm), "layers": quant.compression_summary()["layers_quantized"],
               "size_ratio": quant.compression_summary().get("size_ratio")}
        row["ratio"] = row["ppl"] / dense_ppl
        rows.append(row)
        print(row, flush=True)

    _units(args, dm, rows)
    if not args.quick and args.parts == "all":
        _distillation(args, dm, rows)
    _write(args, rows, dense_ppl, continued_ppl, t0)


def _units(args: argparse.Namespace, dm: TextDataModule, rows: list[dict[str, Any]]) -> None:
    """Half the heads and feed-forward neurons of every layer removed, against the dense model trained as long."""
    seed_everything(args.seed)
    dense = _lm(args, args.layers, attention="sdpa")
    _trainer(args.steps).fit(dense, dm)
    weights = copy.deepcopy(dense.state_dict())
    continued = _lm(args, args.layers, lr=args.lr / 3, attention="sdpa")
    continued.load_state_dict(weights)
    _trainer(args.recovery_steps).fit(continued, dm)
    pruned = _lm(args, args.layers, lr=args.lr / 3, attention="sdpa")
    pruned.load_state_dict(weights)
    prune = PruningCallback(0.5, structure="heads+neurons", scope="layer", schedule="one_shot", start_epoch=0,
                            shrink=True, shrink_epoch=0, verbose=False)
    _trainer(args.recovery_steps, [prune]).fit(pruned, dm)
    example = torch.randint(0, 256, (1, args.seq_len))
    timed = measure_latency({"dense": continued.model, "pruned": pruned.model}, example, batch_size=args.batch_size,
                            num_threads=args.threads, repeats=30, iters=None)
    params = [sum(p.numel() for p in m.parameters()) for m in (continued.model, pruned.model)]
    row = {"run": "heads+neurons 50% removed", "ppl_dense_same_steps": _ppl(continued, dm), "ppl": _ppl(pruned, dm),
           "heads": [b.attn.n_heads for b in pruned.model.blocks], "d_ff": [b.fc1.out_features for b in pruned.model.blocks],
           "params_dense": params[0], "params_pruned": params[1],
           "latency_ms_dense": timed["dense"]["median_ms"], "latency_ms_pruned": timed["pruned"]["median_ms"]}
    row["ratio"] = row["ppl"] / row["ppl_dense_same_steps"]
    row["speedup"] = row["latency_ms_dense"] / row["latency_ms_pruned"]
    rows.append(row)
    print(row, flush=True)


def _distillation(args: argparse.Namespace, dm: TextDataModule, rows: list[dict[str, Any]]) -> None:
    """A 2-layer student distilled from a 6-layer teacher vs the same student alone, the same steps."""
    seed_everything(args.seed)
    teacher = _lm(args, args.teacher_layers)
    if args.teacher_weights:
        teacher.load_state_dict(torch.load(args.teacher_weights, weights_only=True))
    else:
        _trainer(args.teacher_steps or 3 * args.steps).fit(teacher, dm)
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), RESULTS / "lm_teacher.pt")
    teacher_ppl = _ppl(teacher, dm)
    seed_everything(args.seed)
    alone = _lm(args, args.student_layers)
    _trainer(args.steps).fit(alone, dm)
    alone_ppl = _ppl(alone, dm)
    seed_everything(args.seed)
    student = GPTDecoder(d_model=args.d_model, n_layers=args.student_layers, n_heads=args.heads, max_len=args.seq_len)
    kd = DistillationModule(student, teacher.model, temperature=args.kd_temperature, alpha=args.kd_alpha, num_classes=256,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.01))
    _trainer(args.steps).fit(kd, dm)
    distilled_ppl = _ppl(LanguageModelModule(kd.student), dm)
    rows.append({"run": f"student {args.student_layers} layers (T={args.kd_temperature:g}, alpha={args.kd_alpha:g})",
                 "teacher_layers": args.teacher_layers,
                 "teacher_steps": args.teacher_steps or 3 * args.steps, "teacher_ppl": teacher_ppl,
                 "alone_ppl": alone_ppl, "distilled_ppl": distilled_ppl, "ratio": distilled_ppl / alone_ppl})
    print(rows[-1], flush=True)


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], dense_ppl: float | None, continued_ppl: float | None, t0: float) -> None:
    out = {"args": vars(args), "dense_ppl": dense_ppl, "dense_continued_ppl": continued_ppl, "rows": rows,
           "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "lm_stdlib.json" if args.parts == "all" else f"lm_stdlib_{args.parts}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2, default=str))
    print("\n| run | criterion | ppl one-shot | ppl after recovery | × dense (same steps) |\n|---|---|---|---|---|")
    if dense_ppl is not None:
        print(f"| dense | - | - | {dense_ppl:.3f} | 1.00 |")
    for r in rows if dense_ppl is None else rows[1:]:
        if "criterion" in r:
            print(f"| {r['run']} | {r['criterion']} | {r['ppl_one_shot']:.3f} | {r['ppl_recovered']:.3f} | {r['ratio_recovered']:.3f} |")
        elif "speedup" in r:
            print(f"| {r['run']} ({r['params_pruned']:,} of {r['params_dense']:,} parameters, {r['speedup']:.2f}x faster on CPU) "
                  f"| magnitude | - | {r['ppl']:.3f} | {r['ratio']:.3f} |")
        elif "distilled_ppl" in r:
            print(f"| {r['run']}: alone {r['alone_ppl']:.3f}, distilled {r['distilled_ppl']:.3f} (teacher {r['teacher_ppl']:.3f}) | | | | {r['ratio']:.3f} |")
        elif "ratio" in r:
            print(f"| {r['run']} | - | - | {r['ppl']:.3f} | {r['ratio']:.3f} |")
        else:
            print(f"| {r['run']} | - | - | {r['ppl']:.3f} | {r['ppl'] / dense_ppl:.3f} |")
    print(f"total {out['seconds']:.0f} s; ppl = exp(mean test-token NLL)")


if __name__ == "__main__":
    main()
