"""What an accuracy guard gives back when it trips: :class:`GuardSnapshot`, a copy of the weights and buffers of the
model that the last accepted validation measured. Every plugin's guard takes, extends, checkpoints and restores it
the same way (the pruning guard with its masks, the quantisation guard with its activation ranges).

The copy stays on the weights' devices (one copy of each trained parameter: the price of a guard), and goes to the
checkpoint on the CPU; a restore writes it back in place, so the optimizer keeps its parameters, and drops their
optimizer state, which belongs to the weights that were rejected.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_compress.selection import is_protected

__all__ = ["GuardSnapshot", "forget_optimizer_state", "state_buffers", "trained_parameters"]


def state_buffers(module: torch.nn.Module) -> dict[str, Tensor]:
    """The buffers ``module``'s ``state_dict`` holds (BatchNorm statistics), read now: what a guard snapshots with the
    weights. Non-persistent buffers are left out: caches a forward rebuilds, and other plugins' own state (the
    activation ranges of fake-quantised layers, which their callback keeps and checkpoints)."""
    return {
        f"{prefix}.{name}" if prefix else name: b
        for prefix, m in module.named_modules()
        for name, b in m.named_buffers(recurse=False)
        if b is not None and name not in m._non_persistent_buffers_set
    }


def forget_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[Tensor]) -> None:
    """Drop the optimizer state of ``params`` (momentum, Adam's moments and its step count): their next step is
    an optimizer's first. Zeroing the moments but keeping the step count, the bias correction of a late step
    scales restarted moments by about 1: a step of 3x the learning rate where a fresh Adam takes 1x."""
    ids = {id(p) for p in params}
    for opt in optimizers:
        for p in [p for p in opt.state if id(p) in ids]:
            del opt.state[p]


def trained_parameters(params: Mapping[str, Tensor], also: Collection[str] = ()) -> dict[str, Tensor]:
    """The parameters of ``params`` (by name) that training changes: trainable ones, and those named in ``also`` (a
    frozen weight whose zeros are pruning's), outside a protected ``teacher``, each tensor once (a tied weight under
    its first name).

    Example:
        >>> net = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "teacher": torch.nn.Linear(2, 2)})
        >>> net.a.bias.requires_grad_(False)
        Parameter containing:...
        >>> sorted(trained_parameters(dict(net.named_parameters())))
        ['a.weight']
        >>> sorted(trained_parameters(dict(net.named_parameters()), also={"a.bias"}))
        ['a.bias', 'a.weight']
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for n, p in params.items():
        if (p.requires_grad or n in also) and not is_protected(n.rpartition(".")[0]) and id(p) not in seen:
            seen.add(id(p))
            out[n] = p
    return out


class GuardSnapshot:
    """Copies of ``weights`` and ``buffers`` (``{name: tensor}``, names relative to the LightningModule).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> snap = GuardSnapshot.take(dict(lin.named_parameters()), {})
        >>> with torch.no_grad():
        ...     _ = lin.weight.add_(1.0)
        >>> snap.restore(dict(lin.named_parameters()), {}, [])
        >>> torch.equal(lin.weight, snap.weights["weight"])
        True
    """

    def __init__(self, weights: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        self.weights, self.buffers = weights, buffers
        self._sources: set[int] = set()  # the parameters copied (a tied one is copied once, under its first name)

    @classmethod
    def take(cls, weights: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> GuardSnapshot:
        """A copy of ``weights`` and of ``buffers`` outside a protected ``teacher`` (``buffers``: the module's, read
        now: moving or casting a module replaces its buffer tensors)."""
        snapshot = cls(
            {n: p.detach().clone() for n, p in weights.items()},
            {n: b.detach().clone() for n, b in buffers.items() if not is_protected(n.rpartition(".")[0])},
        )
        snapshot._sources = {id(p) for p in weights.values()}
        return snapshot

    def add_missing(self, params: Mapping[str, Tensor], also: Collection[str] = ()) -> None:
        """Copy the parameters of ``params`` that training changes (:func:`trained_parameters`) and the snapshot lacks:
        those that became trainable after it was taken (a backbone unfrozen mid-fit, as ``BackboneFinetuning`` does).
        Called before each optimizer step, when they still hold the values the guard validated; without them a
        restore put back the head and kept the backbone trained since. Names already copied cost a lookup each."""
        for n, p in params.items():
            if n in self.weights or id(p) in self._sources or not (p.requires_grad or n in also):
                continue
            if not is_protected(n.rpartition(".")[0]):
                self.weights[n] = p.detach().clone()
                self._sources.add(id(p))

    def mismatch(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> str | None:
        """What of the copy ``params`` and ``buffers`` no longer hold as it was taken (a layer removed or resized since,
        a checkpoint of another model), or ``None``."""
        missing = sorted(set(self.weights) - set(params))
        wrong = sorted(n for n in self.weights.keys() & params.keys() if tuple(self.weights[n].shape) != tuple(params[n].shape))
        wrong += sorted(n for n in self.buffers.keys() & buffers.keys() if tuple(self.buffers[n].shape) != tuple(buffers[n].shape))
        if not missing and not wrong:
            return None
        return f"not in the model: {missing[:5]}; another shape: {wrong[:5]}"

    def restore(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Write the copies back into ``params`` and ``buffers`` (the module's, read now) in place, and drop the
        optimizer state of the weights restored."""
        with torch.no_grad():
            for n, w in self.weights.items():
                params[n].copy_(w)
            for n, b in self.buffers.items():
                if n in buffers:
                    buffers[n].copy_(b)
        forget_optimizer_state(optimizers, [params[n] for n in self.weights])

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: the copies on the CPU."""
        return {"weights": {n: w.cpu() for n, w in self.weights.items()}, "buffers": {n: b.cpu() for n, b in self.buffers.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], params: Mapping[str, Tensor] | None = None) -> GuardSnapshot:
        """:meth:`state` read back; the weights on the devices of ``params`` where given (buffers move when restored)."""
        weights = dict(state.get("weights", {}))
        if params is not None:
            weights = {n: w.to(params[n].device) if n in params else w for n, w in weights.items()}
        snapshot = cls(weights, dict(state.get("buffers", {})))
        if params is not None:  # a tied weight copied under its first name is not copied again under its second
            snapshot._sources = {id(params[n]) for n in weights if n in params}
        return snapshot
