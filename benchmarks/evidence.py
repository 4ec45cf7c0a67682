"""Every claim in one command: run the benchmarks, then write ``benchmarks/RESULTS.md`` and its plots.

    python benchmarks/evidence.py                    # all stages (about 2 h on 2 busy CPU cores), then the report
    python benchmarks/evidence.py --only prune,lm    # some stages, then the report from every JSON present
    python benchmarks/evidence.py --report-only      # rebuild RESULTS.md and the plots from benchmarks/results/

A claim with no JSON in ``benchmarks/results/`` (not in the repository: a fresh checkout has none) keeps the
section and headline rows RESULTS.md already holds for it.

Each stage is one of the benchmark scripts, run as it is (its own docstring states the recipe), with
the arguments listed in ``STAGES``; its JSON lands in ``benchmarks/results/``. The report
(:mod:`evidence_report`) turns those files into tables that give, for each claim, the paper's number,
the peer measured in the same script, and ours, with the epochs, seeds and machine, and draws the plots
into ``benchmarks/figures/``. It also rewrites the headline table between the markers in ``README.md``.
Stages that need MNIST (``LC_MNIST_DIR``) print that they skip when it is absent, and the report says
which claims have no result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS  # noqa: E402 - benchmarks/ is a folder of scripts, not a package
from evidence_report import write_report  # noqa: E402

SEEDS = (0, 1, 2)

# name -> list of (script, arguments); every command's JSON goes to benchmarks/results/
STAGES: dict[str, list[tuple[str, list[str]]]] = {
    "prune": [("prune_mnist.py", ["--seeds", ",".join(map(str, SEEDS))])],
    # magnitude and taylor on 20,000 MNIST images, no CIFAR: the five criteria and CIFAR-10 are the
    # script's own defaults (python benchmarks/shrink_cnn.py, about an hour on 2 cores)
    "shrink": [("shrink_cnn.py", ["--criteria", "magnitude,taylor", "--no-cifar", "--mnist-train-subset", "20000", "--threads", "1"])],
    # the MLP: torchao's QAT peer covers Linear layers only (the ResCNN rows: python benchmarks/quantize_mnist.py)
    "quantize": [("quantize_mnist.py", ["--models", "mlp"])],
    "distill": [("distill_mnist.py", [])],
    "pipeline": [
        ("deep_compression.py", ["--seed", str(s), "--out", str(RESULTS / f"deep_compression_seed{s}.json")]) for s in SEEDS
    ],
    "lm": [
        ("lm_stdlib.py", ["--steps", "500", "--recovery-steps", "150"]),
        ("lm_stdlib.py", ["--steps", "500", "--recovery-steps", "150", "--parts", "units"]),
    ],
}


def machine() -> dict[str, str]:
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "lightning": lightning.__version__, "os": platform.platform()}


def run_stage(name: str) -> dict[str, object]:
    log = RESULTS / f"evidence_{name}.log"
    t0 = time.perf_counter()
    codes = []
    with log.open("w") as out:
        for script, args in STAGES[name]:
            cmd = [sys.executable, str(HERE / script), *args]
            print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            codes.append(subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent).returncode)
    seconds = time.perf_counter() - t0
    print(f"[{name}] exit {codes}, {seconds / 60:.1f} min, log {log}", flush=True)
    return {"commands": [[script, *args] for script, args in STAGES[name]], "exit_codes": codes,
            "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STAGES), help=f"comma list of stages among {', '.join(STAGES)}")
    p.add_argument("--report-only", action="store_true", help="no runs; rebuild the report from benchmarks/results/")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; valid stages: {', '.join(STAGES)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs_file = RESULTS / "evidence_runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    if not args.report_only:
        runs["machine"] = machine()
        for name in names:
            stage = run_stage(name)
            # re-read: another evidence process may have recorded its stages meanwhile
            runs = {**(json.loads(runs_file.read_text()) if runs_file.exists() else {}), "machine": runs["machine"], name: stage}
            runs_file.write_text(json.dumps(runs, indent=1))
    path = write_report(runs)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
