"""A pruning fit under ``ModelParallelStrategy`` (FSDP2 ``fully_shard``) on 2 CPU processes, for the tests.

Lightning's strategy relaunches this script for rank 1, so it runs as a script (``python tests/fsdp_worker.py``),
never inside pytest. Each rank writes ``rank<r>.pt`` to ``--out``: its rows' masks, the rows it holds, every
weight gathered whole, and the callback's figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Dataset

from lightning_compress.lm import GPTDecoder, token_nll
from lightning_compress.pruning import PruningCallback
from lightning_compress.pruning.shards import row_range
from lightning_compress.sharding import is_sharded, local, reshard


class Tokens(Dataset):
    """Dict batches of random token ids (a fixed generator: the same data in every run)."""

    def __init__(self, n: int = 32, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


class ShardedLM(LightningModule):
    """A small decoder built and sharded in ``configure_model`` (FSDP2 per block, then the root)."""

    def __init__(self, one_row_head: bool = False, root_only: bool = False) -> None:
        super().__init__()
        self.net: GPTDecoder | None = None
        self.one_row_head = one_row_head
        self.root_only = root_only  # one FSDP2 unit: the module
        self.gate: torch.nn.Linear | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        self.net = GPTDecoder(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=16, tie_weights=False, attention="mha")
        if self.one_row_head:  # a weight of one row: FSDP2 leaves the second process none of it
            self.gate = torch.nn.Linear(64, 1)
        mesh = self.device_mesh["data_parallel"]
        for block in [] if self.root_only else self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.net(input_ids)  # type: ignore[misc]
        return logits if self.gate is None else logits * torch.sigmoid(self.gate(logits))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, count = token_nll(self(batch["input_ids"]), batch["labels"])
        loss = nll / count
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, count = token_nll(self(batch["input_ids"]), batch["labels"])
        self.log("val_loss", nll / count, sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class Dump(Callback):
    def __init__(self, folder: Path, pruning: PruningCallback) -> None:
        self.folder, self.pruning = folder, pruning

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        state = self.pruning.compression_state()
        torch.save(
            {
                "masks": {n: m.cpu() for n, m in self.pruning.masks.items()},
                "rows": {n: row_range(params[n]) for n in self.pruning.masks},
                "weights": {n: p.full_tensor().detach().cpu() for n, p in params.items()},
                "local_weights": {n: local(p).detach().cpu() for n, p in params.items()},
                "sparsity": state["sparsity"],
                "target": state["target"],
                "summary": self.pruning.compression_summary(),
                "history": list(self.pruning._run.history),  # type: ignore[union-attr]
                "mask_bytes": sum(m.numel() * m.element_size() for m in self.pruning.masks.values()),
                "local_weights_count": sum(local(params[n]).numel() for n in self.pruning.masks),
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


class WriteRowsOfRankOne(Callback):
    """Writes 1.0 into the pruned entries of rank 1's rows of the first pruned weight, once, in the last epoch: a
    write the optimizer did not make, on one process's shard only."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank != 1 or trainer.current_epoch != trainer.max_epochs - 1 or batch_idx != 0:
            return
        name, mask = next(iter(self.pruning.masks.items()))
        with torch.no_grad():
            local(dict(pl_module.named_parameters())[name])[~mask] = 1.0


class QuantDump(Callback):
    """The sharded, fake-quantised model's logits on a fixed input and its whole weights, before conversion."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def probe() -> torch.Tensor:
        return Tokens(4).ids[:, :-1]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(self.probe().to(pl_module.device)).cpu()  # a collective forward: FSDP2 gathers each block's weights
        reshard(pl_module)  # a root unit keeps its gathered weights after a forward without backward
        torch.save(
            {"logits": logits, "weights": {n: p.full_tensor().detach().cpu() for n, p in pl_module.named_parameters()}},
            self.folder / f"quant{trainer.global_rank}.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--scope", default="global")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=2, help="update_every_n_steps")
    parser.add_argument("--quantize", default=None, choices=["qat", "ptq"], help="add a QuantizeCallback")
    parser.add_argument("--latency", default="none", help="QuantizeCallback(latency=...) (measured on rank 0 at fit end)")
    parser.add_argument("--no-prune", action="store_true")
    parser.add_argument("--distill", action="store_true", help="a DistillationModule: a 2-block student, a 3-block teacher")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--report", action="store_true", help="add a CompressionReport (refused under FSDP2)")
    parser.add_argument("--one-row-head", action="store_true", help="add a Linear(64, 1) gate: one process holds no row of it")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--save-checkpoints", action="store_true")
    parser.add_argument("--full-checkpoint", action="store_true", help="one file instead of a sharded checkpoint")
    parser.add_argument("--root-only", action="store_true", help="fully_shard the module only (no unit per block)")
    parser.add_argument("--write-rank1", action="store_true", help="write pruned entries of rank 1's rows in the last epoch")
    parser.add_argument("--validate-after", action="store_true", help="trainer.validate after the fit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    pruning = PruningCallback(
        args.sparsity, criterion=args.criterion, structure=args.structure, scope=args.scope, start_epoch=0,
        end_epoch=2, update_every_n_steps=args.every, verbose=False,
    )
    callbacks: list[Callback] = [] if args.no_prune else [pruning, Dump(out, pruning)]
    if args.write_rank1:
        callbacks.append(WriteRowsOfRankOne(pruning))
    quantize = None
    if args.quantize:
        from lightning_compress.quantization import QuantizeCallback

        quantize = QuantizeCallback(method=args.quantize, weight_bits=8, activation_bits=8, start_epoch=1, latency=args.latency,
                                    calibration_batches=2, save_to="model_int8.pt")
        callbacks += [quantize, QuantDump(out)]
    if args.report:
        from lightning_compress import CompressionReport

        callbacks.append(CompressionReport())
    if args.save_checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, every_n_epochs=1, save_last=False))
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1,
                                       save_distributed_checkpoint=not args.full_checkpoint),
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.save_checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(Tokens(), batch_size=4)
    module: LightningModule = ShardedLM(one_row_head=args.one_row_head, root_only=args.root_only)
    if args.distill:
        from lightning_compress import DistillationModule

        torch.manual_seed(0)
        sizes = {"vocab_size": 64, "d_model": 32, "n_heads": 4, "max_len": 16, "tie_weights": False, "attention": "mha"}
        module = DistillationModule(
            GPTDecoder(n_layers=2, **sizes), GPTDecoder(n_layers=3, **sizes), input_key="input_ids", target_key="labels",
            num_classes=64, temperature=1.0, alpha=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        )
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.filterwarnings("always", message="PruningCallback")
            trainer.fit(module, train_dataloaders=loader, ckpt_path=args.resume)
    except Exception as error:  # the test reads the error from this file
        (out / f"error{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(f"{type(error).__name__}: {error}")
        raise
    (out / f"warnings{trainer.global_rank}.txt").write_text("\n".join(str(w.message) for w in said))
    if args.validate_after:  # the module is handed back sharded on every process: a validate after the fit runs
        whole = [n for n, p in module.named_parameters() if not is_sharded(p)]
        trainer.limit_val_batches = 2
        (result,) = trainer.validate(module, DataLoader(Tokens(8), batch_size=4), verbose=False)
        torch.save({"not_sharded": whole, "val_loss": result["val_loss"]}, out / f"validated{trainer.global_rank}.pt")
    if quantize is not None:
        converted = quantize.quantized_model
        saved = {"converted": converted is not None}
        if converted is not None:
            with torch.no_grad():
                saved["converted_logits"] = converted.eval()(QuantDump.probe())
            saved["summary"] = quantize.compression_summary()
        torch.save(saved, out / f"converted{trainer.global_rank}.pt")


def finish() -> None:
    """Wait until every rank has written its files, close the process group, and leave without the
    interpreter's shutdown: gloo's threads can abort a finished process there ("terminate called without
    an active exception", exit code -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    finish()
