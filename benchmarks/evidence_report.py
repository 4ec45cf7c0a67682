"""``benchmarks/RESULTS.md`` and ``benchmarks/figures/*.png`` from the JSON the benchmarks wrote.

One section per claim: a table with the paper's number, the peer measured in the same script and
ours, the settings (epochs, seeds) and a plot where one helps; a claim whose JSON is missing says so.
The headline table goes to the top of RESULTS.md and between the evidence markers of ``README.md``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
README = HERE.parent / "README.md"
MARKERS = ("<!-- evidence:start -->", "<!-- evidence:end -->")
Section = tuple[str, list[str], list[str]]  # title, Markdown lines, headline rows


def _load(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    return plt


def _save(fig: Any, name: str) -> str:
    fig.tight_layout()
    fig.savefig(FIGURES / name, dpi=110)
    _plt().close(fig)
    return f"![{name}](figures/{name})"


NO_RESULT = "*No result yet: run"  # how a section without its JSON begins


def _missing(what: str, command: str) -> list[str]:
    return [f"{NO_RESULT} `python benchmarks/evidence.py --only {command}` ({what}).*", ""]


def pruning() -> Section:
    r = _load("prune_mnist.json")
    if not r or "ours" not in r.get("runs", {}):
        return "Unstructured pruning", _missing("MNIST LeNet-300-100 at 92%", "prune"), []
    c, runs = r["config"], r["runs"]
    seeds = runs["ours"]["seeds"]

    def row(name: str, label: str) -> list[Any]:
        x = runs[name]
        per = ", ".join(f"{e:.2f}" for e in x["test_error_pct_per_seed"])
        return [label, f"{x['mean_test_error_pct']:.2f}% ({per})", f"{100 * x['sparsity']:.1f}%",
                f"{x.get('fit_ratio_vs_dense', float('nan')):.2f}×", f"{x.get('state_dict_bytes', 0):,}"]

    rows = [["Han et al. 2015 (paper)", "1.59% (dense 1.64%)", "92%", "–", "–"]]
    rows += [row(n, label) for n, label in (("dense", "dense"), ("modelpruning", "Lightning `ModelPruning`"), ("ours", "ours, `PruningCallback`"))
             if n in runs]
    lines = [f"MNIST LeNet-300-100 (784-300-100-10), {c['epochs']} epochs, SGD lr {c['lr']} momentum 0.9 weight decay "
             f"{c['weight_decay']}, cosine, batch 128, seeds {seeds}; ours prunes on a cubic ramp from epoch {c['prune_start']:g} "
             f"to {c['prune_end']:g}, `ModelPruning` at the end of each of the first {c['mp_epochs']} epochs (global L1). "
             "Test error on the 10,000 official test images (mean over seeds; per seed).", ""]
    lines += _table(["run", "test error", "sparsity", "fit time × dense", "saved state_dict bytes"], rows)
    curve = r.get("curve") or []
    if curve:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot([100 * p["sparsity"] for p in curve], [p["test_error_pct"] for p in curve], "o-", label="ours (seed 0)")
        ax.axhline(runs["dense"]["mean_test_error_pct"], color="grey", ls="--", label="dense (this run)")
        if "modelpruning" in runs:
            ax.plot([100 * runs["modelpruning"]["sparsity"]], [runs["modelpruning"]["mean_test_error_pct"]], "s", color="tab:red",
                    label="ModelPruning (this run)")
        ax.plot([100 * runs["ours"]["sparsity"]], [runs["ours"]["mean_test_error_pct"]], "D", color="tab:blue",
                label=f"ours at the target (mean of {len(seeds)} seeds)")
        ax.plot([92], [1.59], "*", ms=12, color="black", label="Han et al. 2015")
        ax.set_xlabel("weights pruned (%)")
        ax.set_ylabel("test error (%)")
        ax.legend(fontsize=8)
        lines += [_save(fig, "prune_curve.png"), ""]
    ours, mp = runs["ours"]["mean_test_error_pct"], runs.get("modelpruning", {}).get("mean_test_error_pct")
    head = ["Pruning 92%, LeNet-300-100", "1.59% error (Han 2015)", f"{mp:.2f}% (`ModelPruning`)" if mp else "–", f"{ours:.2f}%"]
    return "Unstructured pruning", lines, [head]


def shrink() -> Section:
    r = _load("shrink_cnn.json")
    if not r or "mnist" not in r:
        return "Channel removal", _missing("MNIST ResCNN, 50% of the channels", "shrink"), []
    m, c = r["mnist"], r["config"]
    d = m["dense"]
    rows = [["dense", f"{100 * d['test_acc']:.2f}%", "–", f"{d['params']:,}", "1.00×", "–", "–"]]
    for name, x in m["runs"].items():
        lat = m.get("latency", {}).get("ours" if name != "torch_pruning" else "torch_pruning", {})
        b1 = b64 = "–"
        if name in ("torch_pruning", next(iter(m["runs"]))):
            b1, b64 = (f"{lat[k]['ratio']:.2f}×" if k in lat else "–" for k in ("batch1", "batch64"))
        label = "Torch-Pruning `MagnitudePruner` (peer)" if name == "torch_pruning" else f"ours, `{name}`"
        rows.append([label, f"{100 * x['acc_after_ft']:.2f}%", f"{100 * (x['acc_before_ft'] or 0):.2f}%", f"{x['params']:,}",
                     f"{d['macs'] / x['macs']:.2f}×", b1, b64])
    lines = [f"MNIST ResCNN (BN, residual, width 32): dense {c['epochs']} epochs, then 50% of the channels of every prunable "
             f"group removed and {c['ft_epochs']} fine-tuning epoch(s) at lr {c['ft_lr']}, seed 0. Latency: dense time / shrunk "
             "time, 1 thread, interleaved medians (measured once per method: the shapes decide it). No paper reports this "
             "setting; the peer is Torch-Pruning on the same dense weights, fine-tuned the same way.", ""]
    lines += _table(["run", "test acc after fine-tuning", "right after removal", "parameters", "MACs ÷", "speed b1", "speed b64"], rows)
    first = next(iter(m["runs"]))
    tp = m["runs"].get("torch_pruning")
    head = ["50% channels removed, ResCNN", "–", f"{100 * tp['acc_after_ft']:.2f}% acc (Torch-Pruning)" if tp else "–",
            f"{100 * m['runs'][first]['acc_after_ft']:.2f}% acc ({first})"]
    return "Channel removal", lines, [head]


def quantization() -> Section:
    r = _load("quantize_mnist.json")
    if not r or "mlp" not in r:
        return "Quantisation", _missing("QAT/PTQ against torchao", "quantize"), []
    c = r["config"]
    names = {"float": "float", "int8_qat": "ours, int8 QAT", "int8_ptq": "ours, int8 PTQ", "w4_qat": "ours, 4-bit weights QAT",
             "torchao_int8_qat": "torchao int8 QAT (peer)"}

    def lat(row: dict[str, Any], key: str) -> str:
        x = row.get("latency", {}).get(key, {})
        return f"{x['speedup']:.2f}×" if "speedup" in x else "–"

    lines = [f"MNIST, Adam lr 1e-3, batch 128, {c['epochs']} epochs, fake quantisation in the last {c['qat_epochs']}; PTQ "
             "calibrates the float model on 32 batches; seed 0. Size: float file bytes / the file a user keeps. Speed: float "
             f"time / converted time, {c['threads']} thread(s), eager and as `export_for_cpu` packages. Paper: Krishnamoorthi "
             "2018 reports per-channel int8 PTQ within 2% and QAT within 1% of float, 4× smaller.", ""]
    rows = []
    for kind in ("mlp", "cnn"):
        for name, row in (r.get(kind) or {}).items():
            rows.append([kind, names.get(name, name), f"{100 * row['test_acc']:.2f}%", f"{row['file_ratio']:.2f}×", lat(row, "eager_b1"),
                         lat(row, "eager_b64"), lat(row, "packaged_b64"),
                         f"{row['qat_epoch_time_ratio']:.2f}×" if row.get("qat_epoch_time_ratio") else "–"])
    lines += _table(["model", "run", "test acc", "smaller", "eager b1", "eager b64", "package b64", "QAT epoch / float epoch (time)"], rows)
    mlp = r["mlp"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, row in mlp.items():
        ax.plot(row["file_bytes"] / 1024, 100 * row["test_acc"], "o", label=names.get(name, name))
    ax.set_xscale("log")
    ax.set_xlabel("file (KB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LeNet-300-100")
    ax.legend(fontsize=8)
    lines += [_save(fig, "quantize_size_accuracy.png"), ""]
    peer = mlp.get("torchao_int8_qat")
    head = ["int8 QAT, LeNet-300-100", "within 1% of float (Krishnamoorthi 2018)",
            f"{100 * peer['test_acc']:.2f}% acc, {peer['file_ratio']:.1f}× smaller (torchao)" if peer else "–",
            f"{100 * mlp['int8_qat']['test_acc']:.2f}% acc, {mlp['int8_qat']['file_ratio']:.1f}× smaller "
            f"(float {100 * mlp['float']['test_acc']:.2f}%)"]
    return "Quantisation", lines, [head]


def distillation() -> Section:
    r = _load("distill_mnist.json")
    if not r or "runs" not in r:
        return "Distillation", _missing("students alone and distilled", "distill"), []
    a, runs, t = r["args"], r["runs"], r["teacher"]
    rows = [["Hinton et al. 2015 (paper)", "2×800", "20", "146", "74", "0.51"]]
    for width in (w for w in str(a["students"]).split(",") if f"2x{w}_alone" in runs):
        alone, kd = runs[f"2x{width}_alone"], runs[f"2x{width}_distilled"]
        rows.append([f"ours (teacher {t['model']}, {t['test_errors']} errors)", f"2×{width}", f"{kd['temperature']:g}",
                     alone["test_errors"], kd["test_errors"], f"{runs[f'2x{width}_ratio']:.2f}"])
    lines = [f"MNIST, students trained {a['epochs']} epochs with {a['optimizer']} lr {a['lr']}, batch {a['batch_size']}, alpha "
             f"{a['alpha']}, seed {a['seed']}; alone = cross-entropy only, same recipe. Test errors out of 10,000. The peer is the "
             "same student trained alone in the same script (no distillation library runs beside this torch).", ""]
    lines += _table(["run", "student", "T", "errors alone", "errors distilled", "distilled ÷ alone"], rows)
    w = str(a["students"]).split(",")[0]
    head = [f"Distillation, 2×{w} student", "146 → 74 errors (Hinton 2015)", f"{runs[f'2x{w}_alone']['test_errors']} errors alone",
            f"{runs[f'2x{w}_distilled']['test_errors']} errors distilled"]
    return "Distillation", lines, [head]


def pipeline() -> Section:
    seeds = [x for x in (_load(f"deep_compression_seed{s}.json") for s in range(10)) if x]
    if not seeds:
        return "The whole pipeline", _missing("prune + 4-bit QAT + compact export", "pipeline"), []
    c = seeds[0]["config"]
    mp = (_load("prune_mnist.json") or {}).get("runs", {}).get("modelpruning")
    rows = [["Deep Compression (paper)", "1,070 KB → 27 KB", "40×", "1.58%"]]
    if mp:
        rows.append(["`ModelPruning` 92%, saved state_dict (peer, `prune` stage)", f"{mp['state_dict_bytes']:,} B",
                     f"{seeds[0]['float_state_dict_bytes'] / mp['state_dict_bytes']:.2f}×", f"{mp['mean_test_error_pct']:.2f}%"])
    for x in seeds:
        rows.append([f"ours, seed {x['config']['seed']}", f"{x['float_state_dict_bytes']:,} → {x['artifact_bytes']:,} B",
                     f"{x['ratio']:.1f}×", f"{x['test_error_pct']:.2f}%"])
    ratio, err = statistics.fmean(x["ratio"] for x in seeds), statistics.fmean(x["test_error_pct"] for x in seeds)
    lines = [f"MNIST LeNet-300-100, {c['epochs']} epochs: pruned to {100 * c['target']:.0f}% (cubic, epochs {c['prune_start']:g}-"
             f"{c['prune_end']:g}), {c['bits']}-bit weight QAT from epoch {c['qat_start']:g}, converted, written with "
             "`lightning_compress.export` (compact) and read back with `lightning_compress.load`; the error is that of the "
             "loaded file. Size: float `state_dict` bytes / artifact bytes.", ""]
    lines += _table(["run", "bytes", "smaller", "test error"], rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([x["artifact_bytes"] / 1024 for x in seeds], [x["test_error_pct"] for x in seeds], "o", label="ours (seeds)")
    ax.plot([27], [1.58], "*", ms=12, color="black", label="Deep Compression")
    if mp:
        ax.plot([mp["state_dict_bytes"] / 1024], [mp["mean_test_error_pct"]], "s", color="tab:red", label="ModelPruning state_dict")
    ax.set_xscale("log")
    ax.set_xlabel("file (KB)")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    lines += [_save(fig, "pipeline_size_error.png"), ""]
    head = ["Pipeline, LeNet-300-100", "40× at 1.58% (Deep Compression)", f"{seeds[0]['float_state_dict_bytes'] / mp['state_dict_bytes']:.1f}× "
            f"(`ModelPruning` state_dict)" if mp else "–", f"{ratio:.1f}× at {err:.2f}% (mean of {len(seeds)} seeds)"]
    return "The whole pipeline", lines, [head]


def transformers() -> Section:
    r = _load("lm_stdlib.json")
    if not r:
        return "Transformers", _missing("byte-level GPT on the stdlib sources", "lm"), []
    a = r["args"]
    rows = [["Wanda (paper), LLaMA-7B, 50% unstructured", "3.04× (17.29 / 5.68)", "–", "1.28× (7.26 / 5.68)", "–"]]
    crit: dict[tuple[str, str], dict[str, Any]] = {(x["run"], x["criterion"]): x for x in r["rows"] if "criterion" in x}
    for run in ("unstructured 50%", "2:4"):
        m, w = crit.get((run, "magnitude")), crit.get((run, "wanda"))
        if m and w:
            rows.append([f"ours, {run}", f"{m['ppl_one_shot'] / r['dense_ppl']:.3f}×", f"{m['ratio_recovered']:.3f}×",
                         f"{w['ppl_one_shot'] / r['dense_ppl']:.3f}×", f"{w['ratio_recovered']:.3f}×"])
    lines = [f"A byte-level GPT decoder ({a['layers']} layers, width {a['d_model']}, {a['heads']} heads) trained {a['steps']} steps "
             f"on the Python standard library's own sources, held-out perplexity, seed {a['seed']}. Pruned one-shot, then "
             f"{a['recovery_steps']} recovery steps, against the dense model trained the same extra steps. The paper's ordering "
             "(Wanda far ahead of magnitude one-shot) is the claim under test.", ""]
    lines += _table(["run", "magnitude one-shot × dense", "magnitude recovered", "wanda one-shot × dense", "wanda recovered"], rows)
    other = [[x["run"], f"{x['ratio']:.3f}×", f"{x.get('size_ratio', float('nan')):.2f}× smaller" if "size_ratio" in x else "–"]
             for x in r["rows"] if "criterion" not in x and "ratio" in x]
    units = _load("lm_stdlib_units.json")
    for x in (units or {}).get("rows", []):  # the units run's own row (with its speed) replaces the same row of the full run
        other = [row for row in other if row[0] != x["run"]]
        other.append([x["run"], f"{x['ratio']:.3f}×", f"{x['params_dense'] / x['params_pruned']:.2f}× fewer parameters, "
                      f"{x['speedup']:.2f}× faster on CPU"])
    lines += _table(["other run", "perplexity × reference", "size / speed"], other)
    m = crit.get(("unstructured 50%", "magnitude"))
    w = crit.get(("unstructured 50%", "wanda"))
    head = ["LM 50% unstructured, one-shot ppl × dense", "magnitude 3.04×, Wanda 1.28×", "–",
            f"magnitude {m['ppl_one_shot'] / r['dense_ppl']:.2f}×, Wanda {w['ppl_one_shot'] / r['dense_ppl']:.2f}×" if m and w else "–"]
    return "Transformers", lines, [head]


def tuning() -> Section:
    r = _load("sweep_mnist.json")
    if not r:
        return "Tuning", [f"{NO_RESULT} `python benchmarks/sweep_mnist.py`.*", ""], []
    e, d = r["test_error_pct"], r["paired_difference_pct"]
    c = r["config"]
    lines = [f"A {r['trials']}-trial `lightning-compress sweep` on MNIST LeNet-300-100 ({c['epochs']} epochs per trial) over "
             f"sparsity, pruning window, learning rate and weight decay; its best config at ≥ 92% (trial {r['best_trial']['number']}: "
             f"{r['best_trial']['params']}) set to 92% and run over {r['seeds_done']} seeds against `ModelPruning` at 92%, paired by "
             "seed, test error.", ""]
    lines += _table(["run", "test error (mean ± s.e.)"], [["`ModelPruning`", f"{e['modelpruning']['mean']:.3f}% ± {e['modelpruning']['se']:.3f}"],
                                                          ["ours, swept", f"{e['ours']['mean']:.3f}% ± {e['ours']['se']:.3f}"],
                                                          ["difference (paired)", f"{d['mean']:.3f} ± {d['se']:.3f} points"]])
    src = Path(r["pareto_png"])
    if src.is_file():
        FIGURES.mkdir(parents=True, exist_ok=True)
        (FIGURES / "sweep_pareto.png").write_bytes(src.read_bytes())
        lines += ["![sweep_pareto.png](figures/sweep_pareto.png)", ""]
    head = ["Pruning 92% with swept settings, LeNet-300-100", "1.59% error (Han 2015)", f"{e['modelpruning']['mean']:.2f}% (`ModelPruning`)",
            f"{e['ours']['mean']:.2f}% ({d['mean']:.2f} ± {d['se']:.2f} points lower, paired over {r['seeds_done']} seeds)"]
    return "Tuning", lines, [head]


SECTIONS: list[Callable[[], Section]] = [pruning, shrink, quantization, distillation, pipeline, transformers, tuning]


def _machine(runs: dict[str, Any]) -> str:
    m = runs.get("machine") or {}
    stages = ", ".join(f"{k} {v['seconds'] / 60:.0f} min ({v['finished']})" for k, v in runs.items() if isinstance(v, dict) and "seconds" in v)
    # a stage that failed leaves its last good JSON in place: its section shows that older run, and the report says so
    failed = [f"{k} (exit {v['exit_codes']})" for k, v in runs.items() if isinstance(v, dict) and any(v.get("exit_codes") or [])]
    warning = (f" **Stages that failed in their last run: {', '.join(failed)}; their sections show the results of an "
               "earlier run.**" if failed else "")
    return (f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; Python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
            f"Lightning {m.get('lightning', '?')}. Stage times: {stages or 'not recorded'}.{warning}")


def _written(path: Path) -> tuple[dict[str, list[str]], list[list[str]], str | None]:
    """What an earlier report holds: its sections' lines by title, its headline rows and its machine line."""
    sections: dict[str, list[str]] = {}
    title, machine = None, None
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.startswith("## "):
            title = line[3:]
            sections[title] = []
        elif title is not None:
            sections[title].append(line)
        elif line.startswith("Machine: "):
            machine = line
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in sections.pop("Headline", []) if line.startswith("| ")]
    return sections, rows[1:], machine  # the first row is the header


def write_report(runs: dict[str, Any]) -> Path:
    """Write RESULTS.md (and README.md's headline table). A claim without a JSON here keeps what the report already
    held for it (the JSON are not in the repository: a fresh checkout has none), so nothing measured is lost."""
    path = HERE / "RESULTS.md"
    old_sections, old_rows, old_machine = _written(path)
    sections = []
    for title, lines, rows in (fn() for fn in SECTIONS):
        kept = list(old_sections.get(title, []))
        while kept and not kept[0].strip():
            kept.pop(0)
        if lines and lines[0].startswith(NO_RESULT) and kept and not kept[0].startswith(NO_RESULT):
            lines = kept
        sections.append((title, lines, rows))
    new_rows = [row for _, _, rows in sections for row in rows]
    claims = {row[0] for row in new_rows}
    new_rows += [row for row in old_rows if row[0] not in claims]  # those of the claims kept as they were
    headline = _table(["claim", "paper", "peer (same run)", "ours"], new_rows)
    machine = _machine(runs) if runs.get("machine") or not old_machine else old_machine
    out = ["# Evidence", "", "Written by `python benchmarks/evidence.py` (every stage) or `--report-only` (from the JSON in "
           "`benchmarks/results/`). Each script's docstring states its full recipe.", "", machine,
           "Stages that overlap in time shared the cores: their fit-time ratios (measured between runs) are noisy; "
           "accuracies and sizes are not affected, and latency ratios are interleaved medians within one process.", "", "## Headline", "",
           *headline]
    for title, lines, _ in sections:
        out += [f"## {title}", "", *lines]
    path.write_text("\n".join(out).rstrip("\n") + "\n")
    if README.is_file():
        text = README.read_text()
        start, end = (text.find(m) for m in MARKERS)
        if start >= 0 and end > start:
            README.write_text(text[: start + len(MARKERS[0])] + "\n" + "\n".join(headline) + text[end:])
    return path
