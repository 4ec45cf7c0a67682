"""A 2-process CPU DDP run (gloo, ``find_unused_parameters=False``) of DistillationModule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy
    from lightning_compress import CompressionReport, DigitsDataModule
    from lightning_compress.distillation import DistillationModule
    from lightning_compress.models import MLP, LeNet5

    out = sys.argv[1]
    seed_everything(0)
    teacher = LeNet5(image_size=8)
    torch.save(teacher.state_dict(), out + ".teacher.pt")
    module = DistillationModule(
        MLP(64, (16,), 10), LeNet5(image_size=8), teacher_ckpt=out + ".teacher.pt",
        features={"net.2": "classifier.4"}, example_input_shape=(1, 8, 8),
    )
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}

    class Spy(Callback):
        ignored = set()
        def on_train_start(self, trainer, pl_module):
            self.ignored = set(getattr(trainer.strategy.model, "parameters_to_ignore", ()))  # what DDP itself skips
    spy = Spy()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=False, process_group_backend="gloo"),
        max_epochs=2, limit_train_batches=4, limit_val_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out + ".root",
        callbacks=[spy, CompressionReport(batch_size=4, repeats=2, warmup=0, print_table=False, plot=False)],
    )
    trainer.fit(module, DigitsDataModule(batch_size=32))
    rank = trainer.global_rank
    teacher_same = all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    flat = torch.cat([p.detach().flatten() for p in module.student.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    ignored = spy.ignored
    result = {
        "teacher_same": teacher_same,
        "students_in_sync": bool(torch.equal(gathered[0], gathered[1])),
        "teacher_ignored": {f"teacher.{k}" for k in module.teacher.state_dict()} <= ignored,
        "feature_loss": float(trainer.callback_metrics.get("feature_loss", float("nan"))),
        "val_agreement": float(trainer.callback_metrics.get("val_agreement", float("nan"))),
    }
    # a validation after the fit: rank 0 alone holds the report and writes it again (it broadcast the log dir alone)
    trainer.validate(module, DigitsDataModule(batch_size=32), verbose=False)
    # validation where process 1's whole shard is unlabeled (the sampler deals odd samples to it): every
    # process must still log the same keys, and the accuracy is that of process 0's samples
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    xs = torch.stack([dm.val_set[i][0] for i in range(64)])
    ys = torch.tensor([int(dm.val_set[i][1]) for i in range(64)])
    hidden = ys.clone()
    hidden[1::2] = -100
    from torch.utils.data import DataLoader, TensorDataset
    checker = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out + ".validate",
    )
    metrics = checker.validate(module, DataLoader(TensorDataset(xs, hidden), batch_size=16), verbose=False)[0]
    with torch.no_grad():
        module.eval()
        predicted = module.student(xs[0::2]).argmax(-1)
    result["val_acc_half_unlabeled"] = metrics.get("val_acc")
    result["val_acc_by_hand"] = float((predicted == ys[0::2]).float().mean())
    # a NaN input on process 1 alone: every process stops with the same error at the same step
    bad_x = xs[rank * 32 : rank * 32 + 32].clone()
    if rank == 1:
        bad_x[20] = float("nan")  # in its second batch
    stopper = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=4,
        use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=out + ".nan", limit_val_batches=0,
    )
    try:
        stopper.fit(module, DataLoader(TensorDataset(bad_x, ys[:32]), batch_size=16))
        result["nan_stop"] = None
    except FloatingPointError as err:
        result["nan_stop"] = str(err).split(".")[0]
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process
    """
)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    script = tmp_path / "ddp_distill.py"
    script.write_text(SCRIPT)
    out = str(tmp_path / "res")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), out], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert result["teacher_same"], result
        assert result["students_in_sync"], result
        assert result["teacher_ignored"], result
        assert result["feature_loss"] > 0
        assert 0.0 <= result["val_agreement"] <= 1.0
        assert result["val_acc_half_unlabeled"] == pytest.approx(result["val_acc_by_hand"], abs=1e-6), result
        assert result["nan_stop"] == "the distillation training loss became nan at step 1", result
