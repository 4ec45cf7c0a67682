"""The removal, within a fit, of what a structured pruning run has masked: channels
(:func:`~lightning_compress.pruning.shrink.shrink_in_training`), or attention heads and feed-forward neurons
(:func:`~lightning_compress.pruning.units.remove_units_in_training`, then the Hugging Face configs made to
match). The run records what was removed and lets its masks go."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_compress.pruning.hf_configs import sync_hf_configs
from lightning_compress.pruning.options import PruningOptions
from lightning_compress.pruning.shrink import shrink_in_training
from lightning_compress.pruning.state import PruningState
from lightning_compress.pruning.units import remove_units_in_training

__all__ = ["remove_pruned"]


def remove_pruned(
    trainer: Trainer, pl_module: LightningModule, run: PruningState, options: PruningOptions, example: Any,
    network: str, epoch: float,
) -> dict[str, list[int]]:
    """Remove the units ``run`` masks from ``pl_module`` at (fractional) ``epoch`` (the optimizer is remapped), record
    it in ``run.shrunk`` and clear the masks. ``example`` and ``network`` are what the channel graph was traced with.
    Returns the kept indices per layer."""
    zeros = run.layer_zeros()  # one count of the weights for both figures
    sparsity, nonzero = run.sparsity_from(zeros), run.nonzero_from(zeros)
    target, total = run.overall_target(run.level), run.total
    if options.units:
        result = remove_units_in_training(trainer, pl_module, run.groups, run.keep)
        for note in sync_hf_configs(pl_module):  # save_pretrained writes the config from_pretrained builds from
            rank_zero_warn(f"PruningCallback: {note}")
    else:
        keep = {m: k for g, k in zip(run.groups, run.keep) for m in g.members}
        result = shrink_in_training(trainer, pl_module, keep, round_to=options.round_to, example_input=example, network=network)
    run.shrunk = {
        "epoch": float(epoch), "sparsity": sparsity, "target": target, "nonzero": nonzero, "total": total,
        "channels": {m: list(v) for m, v in result.items()},
    }
    run.clear()
    return result
