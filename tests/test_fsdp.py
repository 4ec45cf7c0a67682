"""Pruning weights sharded by FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on 2 CPU processes (gloo).

The mask functions on shards must give exactly the masks of one process on the whole tensors; a fit under
the strategy must reach its target, hold 1 byte per local weight, and resume bit-identically from a sharded
or a single-file checkpoint; what does not work on shards is refused before training.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_compress.pruning.masks import nm_masks, unstructured_masks
from lightning_compress.sharding import ShardGroup
from lightning_compress.pruning.threshold import lowest_k_masks

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.flaky(reruns=1, only_rerun=["terminated with signal SIGABRT"]),
]

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _scores() -> dict[str, torch.Tensor]:
    """Uneven row counts (a process may hold no row of a one-row weight) and many ties (rounded scores)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 12), "b": (1, 8), "c": (10, 3, 4), "d": (5, 16)}
    return {n: (torch.rand(s, generator=g) * 20).round() / 20 for n, s in shapes.items()}


def _cases() -> list[tuple[str, Any]]:
    return [
        ("global", lambda s, sh: unstructured_masks(s, {n: 0.6 for n in s}, "global", shards=sh)),
        ("layer", lambda s, sh: unstructured_masks(s, {n: 0.35 for n in s}, "layer", shards=sh)),
        ("row", lambda s, sh: unstructured_masks(s, {n: 0.45 for n in s}, "row", shards=sh)),
        ("nm-global", lambda s, sh: nm_masks({n: s[n] for n in ("a", "d")}, 2, 4, {"a": 0.5, "d": 0.5}, shards=sh)),
        ("nm-layer", lambda s, sh: nm_masks({n: s[n] for n in ("a", "d")}, 2, 4, {"a": 0.5, "d": 0.5}, "layer", shards=sh)),
        ("lowest-k", lambda s, sh: dict(zip(s, lowest_k_masks(list(s.values()), 150, gather_limit=4, shards=sh)))),
    ]


def _sharded_block_checks() -> list[str]:
    """``check_sharded_blocks`` on (in, out) weights sharded by rows over the 2 processes: 8 input rows split
    4 + 4 hold whole 2:4 blocks; 6 rows split 3 + 3 do not."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_compress.pruning.shards import check_sharded_blocks

    from lightning_compress.sharding import check_row_sharded

    mesh = init_device_mesh("cpu", (2,))
    said = []
    for rows in (8, 6):
        weight = distribute_tensor(torch.zeros(rows, 4), mesh, [Shard(0)])
        try:
            check_sharded_blocks({"attn.c_attn.weight": weight}, frozenset({"attn.c_attn.weight"}), (2, 4))
            said.append("ok")
        except ValueError as err:
            said.append(str(err))
    by_columns = distribute_tensor(torch.zeros(4, 8), mesh, [Shard(1)])  # tensor parallelism, row-wise
    try:
        check_row_sharded({"fc.weight": by_columns}, "QuantizeCallback")
    except ValueError as err:
        said.append(str(err))
    # export of a sharded network (it failed in deepcopy with "FSDP does not support deepcopy"); whole_copy gathers it
    from torch.distributed.fsdp import fully_shard

    from lightning_compress import export
    from lightning_compress.sharding import whole_copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fully_shard(net, mesh=mesh)
    folder = Path(tempfile.mkdtemp())
    try:
        export(net, folder / "net.lcz", torch.randn(2, 4))
    except ValueError as err:
        said.append(str(err))
    whole = whole_copy(net)
    if whole is not None:
        said.append(str(export(whole, folder / "net.lcz", torch.randn(2, 4))["bytes"] > 0))
    return said


def _shard_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shards = ShardGroup(dist.group.WORLD, torch.device("cpu"))
        mine = {}
        for n, t in _scores().items():
            per = -(-t.shape[0] // world)  # torch.chunk's rows per process, as FSDP2 shards them
            mine[n] = t[min(rank * per, t.shape[0]) : min((rank + 1) * per, t.shape[0])]
        out: dict[str, Any] = {name: make(mine, shards) for name, make in _cases()}
        out["blocks"] = _sharded_block_checks()
        torch.save(out, Path(folder) / f"masks{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masks_made_on_shards_are_those_of_one_process(tmp_path: Path) -> None:
    """Global, per-layer, per-row and N:M masks, and the threshold with a small gather limit, on 2 processes
    holding uneven rows (one holds none of a one-row weight), with ties: equal to one process on whole tensors."""
    port = 29_500 + os.getpid() % 1000
    mp.spawn(_shard_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"masks{r}.pt", weights_only=True) for r in range(2)]
    whole = _scores()
    for name, make in _cases():
        expected = make(whole, None)
        for n, mask in expected.items():
            got = torch.cat([parts[0][name][n], parts[1][name][n]])
            assert torch.equal(got, mask), (name, n)
        assert any(not bool(m.all()) for m in expected.values()), name
    fits, splits, columns = parts[0]["blocks"][:3]
    assert fits == "ok" and "holds its input rows 0..3, which split blocks of 4" in splits
    assert "QuantizeCallback: fc.weight is placed (Shard(dim=1),) on a 1-D mesh" in columns and "not tensor parallelism" in columns
    assert "export: its parameters are sharded over processes by FSDP2 ('0.weight' is a DTensor)" in parts[0]["blocks"][3]
    assert "whole_copy(model), called on every process" in parts[1]["blocks"][3]
    assert parts[0]["blocks"][4:] == ["True"] and parts[1]["blocks"][4:] == []  # rank 0 exports the gathered network
    assert "input rows 3..6" in parts[1]["blocks"][1]


def _fit(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=600
    )


def _why(run: subprocess.CompletedProcess[str]) -> str:
    """The failure to report; an abort (SIGABRT) is named as such, and the module's rerun marker retries it
    once, as for the DDP tests (gloo's threads can abort a process that has finished its work)."""
    aborted = "terminated with signal SIGABRT; " if run.returncode == -signal.SIGABRT else ""
    return aborted + run.stderr[-3000:]


def _ranks(folder: Path, processes: int = 2) -> list[dict[str, Any]]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def _check_run(ranks: list[dict[str, Any]], target: float) -> None:
    """The ranks agree; each holds masks for its rows only; pruned weights are zero; the target is reached."""
    r0 = ranks[0]
    pruned = total = 0
    for n in r0["masks"]:
        row = 0
        for r in ranks:  # each holds the rows after the previous one's
            first, held, _ = r["rows"][n]
            assert (first, held) == (row, r["masks"][n].shape[0]), n
            row += held
            assert torch.equal(r["weights"][n], r0["weights"][n]), n
        whole = torch.cat([r["masks"][n] for r in ranks])
        weight = r0["weights"][n]
        assert whole.shape == weight.shape and row == weight.shape[0], n
        assert bool((weight[~whole] == 0).all()), n
        pruned, total = pruned + int((~whole).sum()), total + whole.numel()
    assert abs(pruned / total - target) < 1e-3
    assert all(r["sparsity"] == pytest.approx(pruned / total, abs=1e-12) for r in ranks)
    layers = r0["summary"]["layers"]
    assert sum(v["numel"] for v in layers.values()) == total  # the report counts whole weights
    assert r0["mask_bytes"] == r0["local_weights_count"]  # 1 byte per weight this process holds


def _same_run(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    for ra, rb in zip(a, b):
        assert ra["history"] == rb["history"]
        for n in ra["masks"]:
            assert torch.equal(ra["masks"][n], rb["masks"][n]), n
        for n in ra["weights"]:
            assert torch.equal(ra["weights"][n], rb["weights"][n]), n


def test_fsdp2_fit_prunes_shards_to_target_and_resumes_exactly_from_a_sharded_checkpoint(tmp_path: Path) -> None:
    """Magnitude, one global threshold over every shard, dict batches, loaders passed to fit, attention weights, and
    a one-row weight of which the second process holds no row (its empty mask checkpointed and resumed)."""
    whole = _fit(tmp_path / "whole", "--save-checkpoints", "--one-row-head")
    assert whole.returncode == 0, _why(whole)
    ranks = _ranks(tmp_path / "whole")
    _check_run(ranks, 0.7)
    assert any("in_proj_weight" in n for n in ranks[0]["masks"])
    assert [tuple(r["masks"]["gate.weight"].shape) for r in ranks] == [(1, 64), (0, 64)]
    checkpoint = tmp_path / "whole" / "checkpoints" / "epoch=0-step=4.ckpt"
    assert checkpoint.is_dir()  # sharded: one file per rank and the metadata
    resumed = _fit(tmp_path / "resumed", "--resume", str(checkpoint), "--one-row-head")
    assert resumed.returncode == 0, _why(resumed)
    _same_run(ranks, _ranks(tmp_path / "resumed"))


@pytest.mark.slow  # 20-35 s of two processes or many fits: run with -m slow
def test_fsdp2_wanda_resumes_exactly_mid_calibration_from_one_file(tmp_path: Path) -> None:
    """Wanda on shards: inputs summed over the processes, rows of MultiheadAttention's packed projection matched
    to their query/key/value norms; every row loses the same share; a checkpoint taken while inputs are being
    collected (updates every 3 steps, checkpoint at step 4) resumes bit-identically."""
    common = ["--criterion", "wanda", "--every", "3", "--full-checkpoint"]
    whole = _fit(tmp_path / "whole", *common, "--save-checkpoints")
    assert whole.returncode == 0, _why(whole)
    ranks = _ranks(tmp_path / "whole")
    _check_run(ranks, 0.7)
    for n in ranks[0]["masks"]:
        lost = (~torch.cat([ranks[0]["masks"][n], ranks[1]["masks"][n]])).sum(1)
        assert int(lost.max() - lost.min()) <= 1, n
    checkpoint = tmp_path / "whole" / "checkpoints" / "epoch=0-step=4.ckpt"
    assert checkpoint.is_file()
    resumed = _fit(tmp_path / "resumed", *common, "--resume", str(checkpoint))
    assert resumed.returncode == 0, _why(resumed)
    _same_run(ranks, _ranks(tmp_path / "resumed"))


def test_fsdp2_two_four_sparsity_on_shards(tmp_path: Path) -> None:
    run = _fit(tmp_path, "--structure", "2:4", "--sparsity", "0.5", "--scope", "layer")
    assert run.returncode == 0, _why(run)
    ranks = _ranks(tmp_path)
    _check_run(ranks, 0.5)
    for n in ranks[0]["masks"]:
        whole = torch.cat([ranks[0]["masks"][n], ranks[1]["masks"][n]])
        assert bool((whole.reshape(-1, 4).sum(1) == 2).all()), n


def _converted(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0's converted model's logits and summary, and the sharded fake-quantised model's logits."""
    ranks = [torch.load(folder / f"converted{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["converted"] and not ranks[1]["converted"]  # rank 0 gathers and converts; rank 1 holds no copy
    sharded = [torch.load(folder / f"quant{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(sharded[0]["logits"], sharded[1]["logits"])
    return ranks[0], sharded[0]


def _check_validated_after(folder: Path) -> None:
    """The fit handed the module back sharded on every process (the conversion's forward left the root unit's
    gathered weights registered on rank 1, and a validate after the fit failed there), and a validate ran."""
    done = [torch.load(folder / f"validated{r}.pt", weights_only=False) for r in range(2)]
    assert [d["not_sharded"] for d in done] == [[], []]
    assert done[0]["val_loss"] == done[1]["val_loss"] and math.isfinite(done[0]["val_loss"])


def test_fsdp2_one_unit_converts_on_rank_zero_and_sees_writes_on_any_shard(tmp_path: Path) -> None:
    """fully_shard on the module only (one FSDP2 unit): the QAT model is converted on rank 0 at the end of the fit
    (the conversion's forward left the unit's weights gathered, so it was taken for an unsharded model and deep-copied:
    "FSDP does not support deepcopy"); pruned entries written on rank 1's rows only are counted over both processes and
    said on rank 0 (its own count was 0, so nothing was said); a validate after the fit runs."""
    run = _fit(tmp_path, "--quantize", "qat", "--root-only", "--write-rank1", "--validate-after")
    assert run.returncode == 0, _why(run)
    _check_run(_ranks(tmp_path), 0.7)
    converted, sharded = _converted(tmp_path)
    # the writes moved the activation ranges: a few activations (28 of 4,096 logits) round one step apart where the int8
    # and the fake-quantised sums differ in their last bit, as on one process
    gap = (converted["converted_logits"] - sharded["logits"]).abs()
    assert float(gap.max()) < 0.01 and float((gap > 1e-5).float().mean()) < 0.02
    said = (tmp_path / "warnings0.txt").read_text()
    assert "pruned weights were non-zero at the end of this epoch" in said, said
    _check_validated_after(tmp_path)


def test_fsdp2_prune_and_qat_convert_on_rank_zero_and_resume_exactly(tmp_path: Path) -> None:
    """Pruning and int8 QAT (weights and activations) on shards: the fake-quantised layers round the whole
    weights FSDP2 gathers, the observers agree across processes, rank 0 gathers the network and converts it;
    the int8 model agrees with the sharded fake-quantised one and its file is smaller; a sharded checkpoint
    resumes bit-identically, down to the converted model."""
    whole = _fit(tmp_path / "whole", "--quantize", "qat", "--save-checkpoints", "--validate-after")
    assert whole.returncode == 0, _why(whole)
    ranks = _ranks(tmp_path / "whole")
    _check_run(ranks, 0.7)
    converted, sharded = _converted(tmp_path / "whole")
    torch.testing.assert_close(converted["converted_logits"], sharded["logits"], atol=1e-5, rtol=0)
    _check_validated_after(tmp_path / "whole")
    assert converted["summary"]["size_ratio"] > 2.5 and (tmp_path / "whole" / "model_int8.pt").is_file()
    assert "int8_linear" in set(converted["summary"]["formats"].values())
    checkpoint = tmp_path / "whole" / "checkpoints" / "epoch=1-step=8.ckpt"
    resumed = _fit(tmp_path / "resumed", "--quantize", "qat", "--resume", str(checkpoint))
    assert resumed.returncode == 0, _why(resumed)
    _same_run(ranks, _ranks(tmp_path / "resumed"))
    again, _ = _converted(tmp_path / "resumed")
    assert torch.equal(again["converted_logits"], converted["converted_logits"])


@pytest.mark.slow  # 20-35 s of two processes or many fits: run with -m slow
def test_fsdp2_distillation_student_pruned_and_quantised_teacher_untouched(tmp_path: Path) -> None:
    """DistillationModule shards student and teacher itself; pruning and QAT act on the student only, the
    teacher's weights end bit-identical, rank 0 converts the student, and a resume is exact."""
    from lightning_compress.lm import GPTDecoder

    args = ["--distill", "--quantize", "qat"]
    whole = _fit(tmp_path / "whole", *args, "--save-checkpoints")
    assert whole.returncode == 0, _why(whole)
    ranks = _ranks(tmp_path / "whole")
    _check_run(ranks, 0.7)
    assert all(n.startswith("student.") for n in ranks[0]["masks"])
    torch.manual_seed(0)
    sizes = {"vocab_size": 64, "d_model": 32, "n_heads": 4, "max_len": 16, "tie_weights": False, "attention": "mha"}
    GPTDecoder(n_layers=2, **sizes)  # the student, built first
    teacher = GPTDecoder(n_layers=3, **sizes).state_dict()
    assert teacher and all(torch.equal(ranks[0]["weights"][f"teacher.{k}"], v) for k, v in teacher.items())
    converted, sharded = _converted(tmp_path / "whole")
    torch.testing.assert_close(converted["converted_logits"], sharded["logits"], atol=1e-5, rtol=0)
    resumed = _fit(tmp_path / "resumed", *args, "--resume", str(tmp_path / "whole" / "checkpoints" / "epoch=1-step=8.ckpt"))
    assert resumed.returncode == 0, _why(resumed)
    _same_run(ranks, _ranks(tmp_path / "resumed"))


def test_fsdp2_ptq_calibrates_on_shards(tmp_path: Path) -> None:
    """With the latency check on: finding the step's call at fit end runs the sharded forward on every rank (rank 0
    alone waited for the others' gathers until killed)."""
    run = _fit(tmp_path, "--quantize", "ptq", "--no-prune", "--latency", "eager")
    assert run.returncode == 0, _why(run)
    converted, sharded = _converted(tmp_path)
    torch.testing.assert_close(converted["converted_logits"], sharded["logits"], atol=1e-5, rtol=0)
    assert converted["summary"]["observer_ranges"] and converted["summary"]["latency"]["eager"]["float_ms"] > 0


def test_fsdp1_is_refused_naming_fsdp2() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_compress.plugin import check_strategy

    with pytest.raises(ValueError, match=r"FSDPStrategy.*ModelParallelStrategy\(\), with fully_shard"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()), "PruningCallback", fsdp2=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--criterion", "taylor"], "does not support: criterion='taylor'"),
        pytest.param(  # 10 s of two processes; test_the_report_refuses_a_sharded_run checks it in-process: run with -m slow
            ["--report"], "CompressionReport does not support strategy ModelParallelStrategy", marks=pytest.mark.slow
        ),
    ],
)
def test_what_shards_cannot_do_is_refused_before_training(tmp_path: Path, args: list[str], message: str) -> None:
    run = _fit(tmp_path, *args)
    assert run.returncode != 0
    error = (tmp_path / "error0.txt").read_text()
    assert message in error, error
    assert not (tmp_path / "rank0.pt").exists()  # no training step ran


def _config(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [str(Path(sys.executable).with_name("lightning-compress")), "fit", "--config", str(root / "configs" / name),
         f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false", *overrides],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )


def test_the_fsdp_config_runs_on_two_processes(tmp_path: Path) -> None:
    """``configs/lm_fsdp.yaml`` as the README gives it: LanguageModelModule shards itself, the text data module
    feeds both processes, pruning reaches its 50% on the shards, and rank 0 saves the 4-bit model."""
    run = _config(tmp_path, "lm_fsdp.yaml")
    assert run.returncode == 0, _why(run)
    assert "sparsity 50.00% (target 50.00%" in run.stdout + run.stderr
    saved = list(tmp_path.rglob("lm_fsdp_int4.safetensors"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0


@pytest.mark.slow  # 20-35 s of two processes or many fits: run with -m slow
def test_the_fsdp_distillation_config_runs_on_two_processes(tmp_path: Path) -> None:
    """``configs/lm_distill_fsdp.yaml``, shortened, with a teacher of random weights (the config's own comes
    from ``configs/lm_dense.yaml``): DistillationModule shards student and teacher and validates."""
    run = _config(tmp_path, "lm_distill_fsdp.yaml", "--model.init_args.teacher_ckpt=null", "--trainer.max_steps=10",
                  "--trainer.val_check_interval=10", "--trainer.limit_val_batches=2", "--data.init_args.max_bytes=200000")
    assert run.returncode == 0, _why(run)
    assert "`Trainer.fit` stopped: `max_steps=10` reached" in run.stdout + run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_fsdp2_prune_and_qat_on_cuda(tmp_path: Path) -> None:
    """The same fit on GPUs (NCCL; one GPU is a one-process mesh): masks, reductions and the gathered
    conversion on the device, bf16-mixed, and an exact resume from a sharded checkpoint."""
    processes = min(2, torch.cuda.device_count())
    gpu = ["--accelerator", "cuda", "--devices", str(processes), "--precision", "bf16-mixed", "--quantize", "qat"]
    whole = _fit(tmp_path / "whole", *gpu, "--save-checkpoints")
    assert whole.returncode == 0, _why(whole)
    ranks = _ranks(tmp_path / "whole", processes)
    _check_run(ranks, 0.7)
    converted = torch.load(tmp_path / "whole" / "converted0.pt", weights_only=False)
    assert converted["converted"] and converted["summary"]["size_ratio"] > 2.5
    resumed = _fit(tmp_path / "resumed", *gpu, "--resume", str(tmp_path / "whole" / "checkpoints" / "epoch=1-step=8.ckpt"))
    assert resumed.returncode == 0, _why(resumed)
    _same_run(ranks, _ranks(tmp_path / "resumed", processes))


def test_the_report_refuses_a_sharded_run() -> None:
    """CompressionReport copies and measures the whole model on one device: under ModelParallelStrategy it says so
    in setup, before any plugin changes the model (the two-process run of this is in -m slow)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_compress import CompressionReport

    with pytest.raises(ValueError, match=r"CompressionReport does not support strategy ModelParallelStrategy"):
        CompressionReport().check_trainer(SimpleNamespace(strategy=ModelParallelStrategy()))  # type: ignore[arg-type]
