"""Two-process DDP (gloo, CPU): every rank ends with the same observer ranges and re-estimated BatchNorm
statistics, and ``save_to`` and the report write their files once (their folder is resolved on every rank:
``trainer.log_dir`` broadcasts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning_compress import ClassifierModule, CompressionReport, DigitsDataModule
    from lightning_compress.models import ResCNN
    from lightning_compress.quantization import QuantizeCallback, fake_quant_layers

    class Gather(Callback):
        def on_train_end(self, trainer, pl_module):
            local = torch.stack([
                torch.stack([m.quantizer.observer.min_val, m.quantizer.observer.max_val])
                for m in fake_quant_layers(pl_module).values()
            ])
            bn = torch.cat([t for m in pl_module.modules() if isinstance(m, torch.nn.BatchNorm2d)
                            for t in (m.running_mean, m.running_var)])
            every = trainer.strategy.all_gather(local)
            every_bn = trainer.strategy.all_gather(bn)
            if trainer.is_global_zero:
                json.dump({"world": trainer.world_size, "ranges": every.tolist(), "bn": every_bn.tolist(),
                           "bn_reestimated": next(c for c in trainer.callbacks if isinstance(c, QuantizeCallback)).compression_summary().get("bn_reestimated")},
                          open(sys.argv[1], "w"))

    seed_everything(0)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[QuantizeCallback(latency="none", bn_reestimate_batches=2, save_to="q.safetensors"), Gather(),
                   CompressionReport(print_table=False, plot=False, repeats=2, warmup=1)],
    )
    trainer.fit(ClassifierModule(ResCNN(width=4)), DigitsDataModule(batch_size=32))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a live gloo group at interpreter exit can abort the process
    """
)


def test_observer_ranges_and_batchnorm_statistics_identical_on_every_rank(tmp_path) -> None:
    script = tmp_path / "ddp_quant.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ranges.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    rank0, rank1 = result["ranges"]
    assert rank0 == rank1  # all-reduced min/max: bit-identical
    assert all(hi > lo for lo, hi in rank0)
    assert result["bn_reestimated"] == {"layers": 4, "batches": 2}
    bn0, bn1 = result["bn"]
    assert bn0 == bn1  # statistics pooled over both ranks' batches
    from lightning_compress.models import ResCNN
    from lightning_compress.quantization import load_quantized

    reloaded = load_quantized(ResCNN(width=4), tmp_path / "q.safetensors")  # default_root_dir: the cwd
    assert {v.get("folded_bn") for v in reloaded.quantization_spec.values()} - {None}
    assert json.loads((tmp_path / "compression_report.json").read_text())["plugins"]["QuantizeCallback"]["saved_to"]
