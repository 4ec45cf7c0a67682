"""The first training step of a QAT fit, watched for selected weights read outside the layers that hold them.

Fake quantisation rounds a weight only inside its layer's ``forward``: where the model reads the weight
itself (a tied decoder's ``F.linear(h, encoder.weight.t())``), training uses the float weight and the
converted model the low-bit one. :class:`FirstStepReadCheck` opens a
:class:`~lightning_compress.weight_reads.WeightReadWatch` on that step's forward (no extra batch) and warns
once about what it saw.
"""

from __future__ import annotations

import re

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_compress.quantization.layers import weight_readers
from lightning_compress.sharding import has_sharded_parameters
from lightning_compress.weight_reads import WeightReadWatch, watch_weight_reads

__all__ = ["FirstStepReadCheck"]


class FirstStepReadCheck:
    """Open on the forward of one step per fit (:meth:`open`), then closed and reported once (:meth:`report`)."""

    def __init__(self) -> None:
        self.watch: WeightReadWatch | None = None  # open during the watched step's forward
        self.done = False  # this fit's step has been watched (or there was nothing to watch)

    def open(self, pl_module: LightningModule, layers: dict[str, nn.Module], network: nn.Module) -> None:
        """Watch ``network``'s forward for reads of ``layers``' weights outside them. Not for sharded weights
        (FSDP2 gathers them into other tensors); recording stops when the network's forward returns."""
        self.done = True
        if not layers or has_sharded_parameters(pl_module):
            return
        self.watch = watch_weight_reads(pl_module, weight_readers(pl_module, list(layers.items())), network)
        self.watch.open()

    def close(self) -> dict[str, str]:
        """Close the watch wherever it may still be open (a skipped step, a failure); what it saw."""
        watch, self.watch = self.watch, None
        return watch.close() if watch is not None else {}

    def report(self) -> None:
        """Close the watch (if open) and warn about the weights it saw read outside their layers."""
        found = self.close()
        if not found:
            return
        layers = sorted({name.rpartition(".")[0] for name in found})
        rank_zero_warn(
            f"QuantizeCallback: the model reads {sorted(found)} outside the layers that hold them (first read by "
            f"{', '.join(sorted(set(found.values())))} in the first training step). Fake quantisation rounds a weight "
            "only inside its layer's forward, so QAT trains and validates with the float weight there while the "
            "converted model holds only the low-bit one, and the two disagree. Where the model computes with that "
            f"read, leave these layers in float with exclude={[re.escape(n) for n in layers]!r}, or compute that use "
            "by calling the layer; a read that is not part of the model's computation (a penalty, a statistic) needs nothing."
        )
