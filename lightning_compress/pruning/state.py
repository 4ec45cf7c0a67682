"""``PruningState``: the masks of one pruning run and everything that must survive a checkpoint.

No Trainer here: the callback passes the optimizers it has. Masks are bool tensors on their
parameter's device (``True`` = kept), applied in place; the checkpoint holds them bit-packed.

Weights sharded across processes (FSDP2) get masks for the rows this process holds
(:mod:`~lightning_compress.pruning.shards`); counts are summed over the processes, and the
checkpoint holds every row's bits, gathered on rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_compress.guard_snapshot import GuardSnapshot, forget_optimizer_state, trained_parameters
from lightning_compress.pruning.channel_masks import ChannelGroupSpec, expand_channel_mask, spread_channels
from lightning_compress.pruning.mask_storage import pack_mask, unpack_mask
from lightning_compress.pruning.shards import gather_rows, local_rows
from lightning_compress.sharding import ShardGroup, local

__all__ = ["FAST_MASK_BYTES", "STATE_VERSION", "PruningState"]

#: 1: first layout; 2: the same keys, sparsity counted as masked entries that are exactly zero.
STATE_VERSION = 2

#: Masked weights up to this many bytes get step-time masks in their own dtype (fast, 4 bytes per
#: fp32 weight); above it the step uses the bool masks (1 byte per weight).
FAST_MASK_BYTES = 64 << 20


class PruningState:
    """Masks, channel keeps, schedule level, guard record and rewind copy of the selected weights.

    Args:
        kind: ``"unstructured"``, ``"nm"`` or ``"channel"``.
        params: ``{name: parameter}`` of the pruned weights (names relative to the LightningModule).
        all_params: Every parameter of the module by name (channel followers: biases, BatchNorms; the
            guard's snapshot holds them all).
        targets: Final sparsity per pruned weight.
        groups: Channel groups (``kind="channel"``).
        input_major: ``{name: dim}`` of weights whose inputs are not all the dimensions after the first (0:
            ``Conv1D``, transposed convolutions; 1 or 2: experts stored ``(E, in, out)`` or ``(E, out, in)``): N:M
            groups run along that dimension, and a row is everything else.
        shards: The processes holding the other rows of sharded weights (FSDP2), else ``None``.
    """

    def __init__(
        self,
        kind: str,
        params: Mapping[str, Tensor],
        all_params: Mapping[str, Tensor],
        targets: Mapping[str, float],
        groups: Sequence[ChannelGroupSpec] = (),
        input_major: Mapping[str, int] | None = None,
        shards: ShardGroup | None = None,
    ) -> None:
        self.kind = kind
        self.shards = shards
        self.input_major = dict(input_major or {})
        self.names = list(params)
        self.params = dict(params)
        self.all_params = dict(all_params)
        self.targets = dict(targets)
        self.groups = list(groups)
        self.masks: dict[str, Tensor] = {n: torch.ones_like(local(p), dtype=torch.bool) for n, p in self.params.items()}
        self.follower_masks: dict[str, Tensor] = {}
        self.keep = [torch.ones(g.size, dtype=torch.bool, device=self.group_device(g)) for g in self.groups]
        self.level = 0.0
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        self.frozen = False
        self.baseline: float | None = None
        self.guard_events: list[dict[str, Any]] = []
        self.last_good: dict[str, Any] | None = None
        self.rewind: dict[str, Tensor] | None = None
        self.finished = False
        self.shrunk: dict[str, Any] | None = None
        #: ``(former target, sparsity reached, target asked for)`` when a resume changed the targets
        self.retargeted: tuple[float, float, float] | None = None
        #: masks were updated before an optimizer had its state for them: its second moments are set after its step
        self.moments_pending = False
        #: ``{name: dim}`` of weight_norm directions: every norm keeps a weight (:func:`~lightning_compress.pruning.masks.keep_one_per_norm`)
        self.normalised: dict[str, int] = {}
        self._fast: list[tuple[Tensor, Tensor]] = []

    # ------------------------------------------------------------------ masks
    def group_device(self, g: ChannelGroupSpec) -> torch.device:
        return self.params[f"{g.members[0]}.weight"].device

    def set_channel_keep(self, keep: Sequence[Tensor]) -> None:
        """Channel keeps per group, expanded to the masks of members and followers (on their devices)."""
        self.keep = [k.to(self.group_device(g)) for g, k in zip(self.groups, keep)]
        followers: dict[str, Tensor] = {}
        for g, k in zip(self.groups, self.keep):
            members = [f"{m}.weight" for m in g.members]
            for pn, p, into in [(n, self.params[n], self.masks) for n in members] + [(n, self.all_params[n], followers) for n in g.followers]:
                dim, blocks = g.layout(pn)  # a channel spans rows / size rows of each tensor (a head's rows)
                into[pn] = expand_channel_mask(spread_channels(k, p.shape[dim], blocks).to(p.device), p.shape, dim)
            for pn in g.columns:  # the layers reading the channels: one may read several groups (a concatenation)
                p = self.all_params[pn]
                cols = g.column_mask(pn, k.to(p.device), p.shape)
                followers[pn] = cols if pn not in followers else followers[pn] & cols
        self.follower_masks = followers

    def all_masks(self) -> dict[str, Tensor]:
        """Every mask by parameter; a weight that is both pruned and a reader of pruned channels gets both
        (its rows and its columns)."""
        merged = {**self.masks, **self.follower_masks}
        for n in self.masks.keys() & self.follower_masks.keys():
            merged[n] = self.masks[n] & self.follower_masks[n].to(self.masks[n].device)
        return merged

    def masked_params(self) -> dict[str, Tensor]:
        return {**self.params, **{n: self.all_params[n] for n in self.follower_masks}}

    def local_params(self) -> dict[str, Tensor]:
        """The pruned weights as this process holds them (its rows of sharded weights)."""
        return {n: local(p) for n, p in self.params.items()}

    def _summed(self, values: list[int]) -> list[int]:
        if self.shards is None or not values:
            return values
        return [int(v) for v in self.shards.sum(torch.tensor(values, dtype=torch.int64)).tolist()]

    def apply(self) -> None:
        """Zero every pruned entry (exactly: ``masked_fill``, so a NaN in a pruned place becomes 0) and
        cache ``(parameter, mask)`` pairs for :meth:`apply_fast` (see :data:`FAST_MASK_BYTES`)."""
        params = self.masked_params()
        self.keep = [k.to(self.group_device(g)) for g, k in zip(self.groups, self.keep)]
        for masks in (self.masks, self.follower_masks):
            for n, m in masks.items():
                if m.device != local(params[n]).device:
                    masks[n] = m.to(local(params[n]).device)
        pairs = []
        with torch.no_grad():
            for n, m in self.all_masks().items():
                param = params[n]
                p = local(param)
                if p.shape == m.shape and not bool(m.all()):
                    p.masked_fill_(~m, 0.0)
                    pairs.append((param, m))
            # the per-step multiply: masks in the weight's dtype take torch._foreach_mul_'s fused path (2.5x
            # faster than bool masks on LeNet-300-100 on the CPU), at 4 bytes per weight more; above
            # FAST_MASK_BYTES the bool masks themselves are used (1 byte per weight, a large model on a GPU)
            if sum(p.numel() * p.element_size() for p, _ in pairs) <= FAST_MASK_BYTES:
                pairs = [(p, m.to(p.dtype)) for p, m in pairs]
        self._fast = pairs

    def apply_fast(self, grads: bool = False) -> None:
        """Multiply the weights (or their gradients) by the cached masks: the per-step hot path."""
        if not self._fast:
            return
        with torch.no_grad():
            if grads:
                held = [(local(p.grad), m) for p, m in self._fast if p.grad is not None]
            else:
                held = [(local(p), m) for p, m in self._fast]
            pairs = [(t, m) for t, m in held if t.shape == m.shape]
            if pairs:
                torch._foreach_mul_([t for t, _ in pairs], [m for _, m in pairs])

    def revived(self, over_shards: bool = True) -> int:
        """Pruned entries that are not zero: something other than the optimizer wrote them. ``over_shards``: summed
        over the shards' processes (every process must call this then: a write on one process's rows is seen by all);
        else this process's rows only."""
        with torch.no_grad():
            held = [(local(p), m) for p, m in self._fast]
            counts = [((t != 0) & (m == 0)).sum() for t, m in held if t.shape == m.shape]
            here = int(torch.stack(counts).sum()) if counts else 0  # one host sync, not one per weight
        return self._summed([here])[0] if over_shards else here

    def has_pruned(self) -> bool:
        return sum(self._summed([int(not bool(m.all())) for m in self.masks.values()])) > 0

    def clear(self) -> None:
        """Nothing left to mask (the channels were removed): no guard snapshot or rewind copy either."""
        self.masks, self.follower_masks, self.params, self._fast = {}, {}, {}, []
        self.last_good, self.rewind = None, None

    # ------------------------------------------------------------------ counts
    def layer_zeros(self) -> dict[str, int]:
        """Per pruned weight: entries that are masked *and* exactly zero (a NaN in a pruned place is not).
        One host transfer for all layers."""
        if not self.names or not self.masks:
            return {}
        with torch.no_grad():
            # the mask may be on another device than its weight (Lightning moves the module back to the CPU after fit)
            # the weights' own masks: for channels, the rows the target counts (the columns a weight zeroes
            # because it reads pruned channels are not counted again; the report counts every zero)
            held = self.local_params()
            counts = [((~self.masks[n].to(held[n].device)) & (held[n] == 0)).sum() for n in self.names]
            device = counts[0].device
            values = self._summed(torch.stack([c.to(device) for c in counts]).tolist())
        return dict(zip(self.names, values))

    def layer_kept(self) -> dict[str, int]:
        """Per pruned weight: entries its mask keeps (over every process's rows)."""
        return dict(zip(self.names, self._summed([int(self.masks[n].sum()) for n in self.names])))

    def sparsity_from(self, zeros: dict[str, int]) -> float:
        """:attr:`sparsity` from :meth:`layer_zeros` already computed."""
        if self.shrunk is not None:
            return float(self.shrunk.get("sparsity", 0.0))
        total = self.total
        return 0.0 if total == 0 else sum(zeros.values()) / total

    @property
    def total(self) -> int:
        """Entries of the selected weights (as they were before their channels were removed, once removed)."""
        if self.shrunk is not None:
            return int(self.shrunk.get("total", 0))
        return sum(self.params[n].numel() for n in self.names) if self.masks else 0

    @property
    def sparsity(self) -> float:
        """Fraction of the selected weights that are pruned and exactly zero (of the original weights once shrunk)."""
        return self.sparsity_from({} if self.shrunk is not None else self.layer_zeros())

    @property
    def nonzero(self) -> int:
        """Entries of the selected weights that are not pruned-and-zero (those the masks kept when the channels were
        removed, once removed)."""
        return self.nonzero_from({} if self.shrunk is not None else self.layer_zeros())

    def nonzero_from(self, zeros: dict[str, int]) -> int:
        """:attr:`nonzero` from :meth:`layer_zeros` already computed: the masks' kept count while they hold, and the
        weights' own count once a later fit trains a finished run's weights freely (the masks no longer say it)."""
        if self.shrunk is not None:
            return int(self.shrunk.get("nonzero", 0))
        return self.total - sum(zeros.values()) if self.masks else 0

    def overall_target(self, progress: float, targets: Mapping[str, float] | None = None) -> float:
        """The sparsity over the pruned weights at ``progress`` (a fraction of the run's targets, or of ``targets``)."""
        targets = self.targets if targets is None else targets
        total = sum(p.numel() for p in self.params.values())
        return 0.0 if total == 0 else sum(progress * targets[n] * p.numel() for n, p in self.params.items()) / total

    # ------------------------------------------------------------------ guard snapshot, rewind
    def _trained(self) -> dict[str, Tensor]:
        """The parameters training or pruning changes: trainable, or pruned (a frozen weight's zeros are pruning's,
        and channel pruning zeros the biases and the layers that read a channel too), outside a protected ``teacher``."""
        return trained_parameters(self.all_params, also=self._pruned_names())

    def _pruned_names(self) -> set[str]:
        return set(self.params) | {n for g in self.groups for n in (*g.followers, *(f"{m}.bias" for m in g.members))}

    def save_good(self, buffers: Mapping[str, Tensor]) -> None:
        """Snapshot the model the guard accepted: masks, every parameter training changes and ``buffers``
        (the module's, read now), so a restore gives back exactly the model that was validated, its biases and
        BatchNorm statistics included."""
        self.last_good = {
            "level": self.level,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "keep": [k.clone() for k in self.keep],
            "snapshot": GuardSnapshot.take(self._trained(), buffers),
        }

    def keep_newly_trained(self) -> None:
        """Add to the guard's snapshot the parameters that became trainable after it was taken
        (:meth:`~lightning_compress.guard_snapshot.GuardSnapshot.add_missing`)."""
        if self.last_good is None or self.frozen:  # tripped: the snapshot was restored and is not used again
            return
        self.last_good["snapshot"].add_missing(self.all_params, also=self._pruned_names())

    def refresh_good_weights(self, buffers: Mapping[str, Tensor]) -> None:
        """Another plugin's guard wrote back the weights of an earlier validation: the snapshot takes them as written
        (call it before applying the current masks; the masks of this run's last accepted validation are kept, and a
        restore applies them), so a later restore does not bring back what that guard rejected."""
        if self.last_good is not None and not self.frozen:
            self.last_good["snapshot"] = GuardSnapshot.take(self._trained(), buffers)

    def restore_good(self, optimizers: Sequence[torch.optim.Optimizer], buffers: Mapping[str, Tensor]) -> None:
        """Put back :meth:`save_good`'s snapshot; ``buffers``: the module's, read now."""
        good = self.last_good
        if good is None:
            return
        self.level = float(good["level"])
        if self.kind == "channel":
            self.set_channel_keep([k.clone() for k in good["keep"]])
        else:
            self.masks = {n: m.clone() for n, m in good["masks"].items()}
        good["snapshot"].restore(self.all_params, buffers, optimizers)
        self.moments_pending = True  # the optimizer's next step makes their state afresh: its second moments are set then
        self.apply()

    def take_rewind_copy(self) -> None:
        params = dict(self.params)  # the readers of pruned channels (g.columns) are rewound only if pruned
        for g in self.groups:
            params.update({pn: self.all_params[pn] for pn in g.followers})
        self.rewind = {n: p.detach().clone() for n, p in params.items()}  # a real copy, not shared storage

    def rewind_weights(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Reset the surviving weights to the rewind copy, and start their optimizer state afresh."""
        if self.rewind is None:
            return
        masks, masked = self.all_masks(), self.masked_params()
        with torch.no_grad():
            for n, w0 in self.rewind.items():
                if n in masks:
                    masked[n].copy_(w0.to(masked[n].device) * masks[n])
        forget_optimizer_state(optimizers, [masked[n] for n in self.rewind if n in masks])
        self.moments_pending = True

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self, criterion_state: dict[str, Any]) -> dict[str, Any]:
        good = None
        if self.last_good is not None:
            good = {
                "level": self.last_good["level"],
                "masks": {n: pack_mask(m) for n, m in self.last_good["masks"].items()},
                "keep": [pack_mask(k) for k in self.last_good["keep"]],
                **self.last_good["snapshot"].state(),  # "weights", "buffers"
            }
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "masks": {n: self._pack(n, m) for n, m in self.masks.items()},
            "keep": [pack_mask(k) for k in self.keep],
            "level": self.level,
            "targets": dict(self.targets),
            "updates": self.updates,
            "history": list(self.history),
            "frozen": self.frozen,
            "baseline": self.baseline,
            "guard_events": list(self.guard_events),
            "last_good": good,
            "rewind": None if self.rewind is None else {n: w.cpu() for n, w in self.rewind.items()},
            "criterion": criterion_state,
            "finished": self.finished,
            "shrunk": self.shrunk,
        }

    def _pack(self, name: str, mask: Tensor) -> dict[str, Any]:
        """A mask's bits; for a sharded weight every process's rows, gathered on rank 0 (``None`` elsewhere)."""
        if self.shards is None:
            return pack_mask(mask)
        packed = pack_mask(mask, by_rows=True)
        return {**packed, "shape": list(self.params[name].shape), "bits": gather_rows(self.shards, packed["bits"])}

    def _unpack(self, name: str, packed: Any, like: Tensor, where: str) -> Tensor:
        saved = list(packed.get("shape", [])) if isinstance(packed, Mapping) else None
        if saved != list(like.shape):
            raise ValueError(
                f"the checkpoint's pruning state does not fit the model: {where} {name!r} is {tuple(like.shape)} in "
                f"the model, but its saved mask is {tuple(saved) if saved is not None else type(packed).__name__}. "
                "Resume with the model the checkpoint was written with (same layer sizes)."
            )
        bits = packed.get("bits")
        length = math.prod(like.shape[1:]) if like.dim() else 1
        needed = like.shape[0] * ((length + 7) // 8) if packed.get("by_rows") else (like.numel() + 7) // 8
        if not isinstance(bits, Tensor) or bits.numel() != needed:
            held = bits.numel() if isinstance(bits, Tensor) else type(bits).__name__
            raise ValueError(
                f"the checkpoint's pruning state is damaged: the saved mask of {where} {name!r} holds {held} bytes, its "
                f"shape {tuple(like.shape)} needs {needed}; resume from another checkpoint"
            )
        if self.shards is None or name not in self.params:
            return unpack_mask(packed, like.device)
        param = self.params[name]  # this process's rows of a sharded weight
        if packed.get("by_rows"):
            mine = {**packed, "bits": local_rows(bits, param), "shape": list(local(param).shape)}
            return unpack_mask(mine, local(param).device)
        return local_rows(unpack_mask(packed), param).to(local(param).device)

    def _check_names(self, saved: Mapping[str, Any], known: Mapping[str, Tensor], what: str) -> None:
        unknown = sorted(set(saved) - set(known))
        if unknown:
            raise ValueError(
                f"the checkpoint's pruning state has {what} for {unknown[:5]}, which this model does not have; resume "
                "with the model and include/exclude the checkpoint was written with"
            )
        for n, w in saved.items():
            if isinstance(w, Tensor) and tuple(w.shape) != tuple(known[n].shape):
                raise ValueError(
                    f"the checkpoint's pruning state does not fit the model: its {what} of {n!r} is {tuple(w.shape)}, "
                    f"the model's weight {tuple(known[n].shape)}"
                )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (any earlier version); errors name the layer that does not fit."""
        version = int(state.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(
                f"the checkpoint's pruning state has version {version}, newer than this library reads "
                f"({STATE_VERSION}); upgrade lightning-compress"
            )
        self.retargeted = None
        if state.get("shrunk") is not None:  # the channels were removed: nothing to mask, the record stays
            self.shrunk = state["shrunk"]
            self._restore_record(state)
            self.clear()
            return
        names = list(state.get("names", []))
        if names and names != self.names:
            raise ValueError(
                f"the checkpoint's pruning state prunes {names}, but this callback selects {self.names}; "
                "use the same include/exclude/structure as the run that wrote it"
            )
        if self.kind == "channel" and state.get("keep"):
            if len(state["keep"]) != len(self.groups):
                raise ValueError(
                    f"the checkpoint's pruning state has {len(state['keep'])} channel groups, this model "
                    f"{len(self.groups)}; resume with the model the checkpoint was written with"
                )
            like = [torch.ones(g.size, dtype=torch.bool, device=self.group_device(g)) for g in self.groups]
            self.set_channel_keep(
                [self._unpack("+".join(g.members), k, t, "channel group") for k, g, t in zip(state["keep"], self.groups, like)]
            )
        elif state.get("masks"):
            self._check_names(state["masks"], self.params, "masks")
            self.masks = {n: self._unpack(n, v, self.params[n], "weight") for n, v in state["masks"].items()}
        self._restore_record(state)
        good = state.get("last_good")
        if good is not None:
            self._check_names(good["masks"], self.params, "guard masks")
            self._check_names(good["weights"], self.all_params, "guard weights")
            self.last_good = {
                "level": float(good["level"]),
                "masks": {n: self._unpack(n, v, self.params[n], "weight") for n, v in good["masks"].items()},
                "keep": [
                    self._unpack("+".join(g.members), k, torch.ones(g.size, dtype=torch.bool), "channel group").to(self.group_device(g))
                    for k, g in zip(good["keep"], self.groups)
                ],
                "snapshot": GuardSnapshot.from_state(good, self.all_params),
            }
        rewind = state.get("rewind")
        if rewind is not None:
            self._check_names(rewind, self.all_params, "rewind weights")
        self.rewind = None if rewind is None else {n: w.to(self.all_params[n].device) for n, w in rewind.items()}
        self._retarget(state.get("targets"))
        self.apply()

    def _retarget(self, saved: Mapping[str, float] | None) -> None:
        """A checkpoint's run pruned toward other targets (a resume with a new ``target_sparsity``): its progress
        becomes the least share of its new target any weight reached, so the schedule goes on toward the new targets
        (a run that had finished stopped there); a weight pruned further than its new target keeps what it reached.
        Sets :attr:`retargeted`."""
        if not saved or set(saved) != set(self.targets) or all(abs(saved[n] - self.targets[n]) < 1e-12 for n in saved):
            return

        requested = self.overall_target(1.0)
        self.retargeted = (self.overall_target(1.0, saved), self.overall_target(self.level, saved), requested)
        # a weight pruned further than its new target keeps what it reached (pruned weights are never freed)
        self.targets = {n: max(t, self.level * saved[n]) for n, t in self.targets.items()}

        def rescaled(level: float) -> float:  # the least share any weight reached of its target: each goes on
            return min([1.0] + [level * saved[n] / t for n, t in self.targets.items() if t > 0])

        self.level = rescaled(self.level)
        if self.last_good is not None:
            self.last_good["level"] = rescaled(float(self.last_good["level"]))

    def _restore_record(self, state: Mapping[str, Any]) -> None:
        """The schedule's progress and record: level, updates, history, guard, finished."""
        self.level = float(state.get("level", 0.0))
        self.updates = int(state.get("updates", 0))
        self.history = list(state.get("history", []))
        self.frozen = bool(state.get("frozen", False))
        self.baseline = state.get("baseline")
        self.guard_events = list(state.get("guard_events", []))
        self.finished = bool(state.get("finished", False))
