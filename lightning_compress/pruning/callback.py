"""``PruningCallback``: absolute-target, scheduled, resumable, DDP-safe pruning inside ``Trainer.fit``."""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress._validation import as_patterns
from lightning_compress.plugin import CompressionCallback
from lightning_compress.pruning.criteria import Criterion, PruningContext, make_criterion
from lightning_compress.pruning.masks import (
    ChannelGroupSpec,
    channel_masks,
    expand_channel_mask,
    find_followers,
    global_sparsity,
    layer_targets,
    nm_masks,
    pack_mask,
    parse_granularity,
    select_parameters,
    sparse_storage_bytes,
    unpack_mask,
    unstructured_masks,
    zero_optimizer_state,
)
from lightning_compress.schedules import Schedule, ScheduleSpec, make_schedule, schedule_state

__all__ = ["PruningCallback"]

_NAMED_RAMPS = ("cubic", "linear", "iterative")
_STATE_VERSION = 1


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_fraction(value: Any, what: str) -> float:
    if not _is_number(value) or not 0.0 <= float(value) < 1.0 or math.isnan(float(value)):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r} (1.0 would remove every weight)")
    return float(value)


#: Optimizers whose update of an entry with zero weight, zero gradient and zero state is exactly zero
#: (momentum, Adam moments, RMS averages and weight decay all multiply zeros). With these, pruned weights
#: stay exactly zero once their gradients are masked, so re-masking the weights after each step is a no-op
#: and is skipped (it is still done at every epoch end). Exact types only: a subclass may change ``step``.
_ZERO_PRESERVING = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


class _Progress:
    """Picklable ``t -> [0, 1]``: the schedule's value divided by its final value."""

    def __init__(self, schedule: Schedule | None, final: float) -> None:
        self.schedule, self.final = schedule, final

    def __call__(self, t: float) -> float:
        if self.schedule is None or self.final == 0.0:
            return 0.0
        return max(0.0, min(1.0, self.schedule(t) / self.final))


class PruningCallback(CompressionCallback):
    r"""Prune a model during ``Trainer.fit`` to an absolute sparsity, following a schedule.

    Every update scores the selected weights with ``criterion``, and masks the least important ones
    so that the fraction of zeros equals the schedule's value at that moment (absolute: ``0.9`` means
    90% of the selected weights are zero, not "90% of what remains"). Masks are bool tensors kept by
    the callback and applied *in place* after every optimizer step; the gradients of pruned entries
    are zeroed before the step, and their optimizer state (momentum, Adam moments) is zeroed when they
    are pruned, so they never grow back. No ``torch.nn.utils.prune`` re-parametrisation: the model keeps
    its own ``state_dict`` keys, ``deepcopy`` and ``torch.compile`` work, and a checkpoint loads into
    the plain model class with strict loading.

    Args:
        target_sparsity: Fraction of the selected weights that are zero when the schedule ends, in
            ``[0, 1)``; or an ordered ``{regex: sparsity}`` map searched in parameter names (first
            match wins; unmatched weights are not pruned; a map implies ``scope="layer"``).
        schedule: ``"cubic"`` (Zhu & Gupta 2017), ``"linear"``, ``"one_shot"`` (all at ``start_epoch``),
            ``"iterative"`` (``schedule_steps`` equal jumps), ``"constant"`` (the target from the
            start), an ``{epoch: sparsity}`` map or a :class:`~lightning_compress.schedules.Schedule`
            (a map or Schedule must end at ``target_sparsity``).
        start_epoch: (Fractional) epoch at which pruning starts.
        end_epoch: (Fractional) epoch at which the target is reached. Default: ``start_epoch`` plus
            75% of the remaining epochs (rounded), leaving the rest to fine-tune.
        criterion: ``"magnitude"``, ``"random"``, ``"taylor"``, ``"entropy"`` (channel only),
            ``"bn_scale"`` (channel only), a :class:`~lightning_compress.pruning.Criterion`, a function
            ``fn(name, weight) -> scores`` or an import path to either.
        granularity: ``"unstructured"`` (single weights), ``"channel"`` (whole output channels /
            neurons, coupled layers and their BatchNorm together) or ``"N:M"`` (e.g. ``"2:4"``: keep N
            of every M consecutive input weights; the target must equal ``1 - N/M``).
        scope: ``"global"`` (one threshold across all layers) or ``"layer"`` (each layer to the target).
        include: Regexes on module names restricting which Linear/Conv weights are pruned (default:
            all). Biases, norm/embedding weights and a ``teacher``'s weights are pruned only if a
            pattern matches their full parameter name exactly.
        exclude: Regexes on module/parameter names never to prune.
        make_permanent: At the end of fit, apply the masks a last time, remove the callback's hooks
            and stop enforcing masks (a later ``fit`` with the same callback trains freely). With
            ``False`` masks stay enforced across later fits.
        monitor: Metric watched by the accuracy guard (e.g. ``"val_acc"``); needs ``max_drop``.
        max_drop: Largest allowed fall of ``monitor`` below its pre-pruning baseline (absolute, in
            the metric's units). When a pruning step makes it fall further, the last good masks and
            weights are restored, sparsity stops rising, and a warning says so.
        mode: ``"max"`` if higher ``monitor`` is better (accuracy), ``"min"`` for losses.
        update_every_n_steps: Update the masks every N optimizer steps (gradient accumulation
            respected: N *optimizer* steps) instead of at the start of every epoch.
        schedule_steps: Number of jumps of the ``"iterative"`` schedule.
        rewind_epoch: Lottery-ticket rewinding (Frankle & Carbin 2019): copy the weights at this
            (fractional) epoch (``0``: at initialisation) and, after every mask update, reset the
            surviving weights to that copy (and their optimizer state to zero). ``None``: off.
        seed: Seed of the ``random`` criterion (the same on every rank).
        shrink: Physically remove the masked channels (``granularity="channel"`` only) at
            ``shrink_epoch``: smaller layers, optimizer remapped, checkpoints record the structure.
        shrink_epoch: When to shrink (default: when the schedule ends).
        round_to: Keep a multiple of this many channels per group (channel granularity).
        log_per_layer: Also log the sparsity of every layer at each update.
        verbose: Print a line at every update.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_compress import ClassifierModule, DigitsDataModule
        >>> from lightning_compress.models import MLP
        >>> prune = PruningCallback(target_sparsity=0.8, schedule="cubic", end_epoch=1, verbose=False)
        >>> trainer = Trainer(max_epochs=2, callbacks=[prune], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
        ...                   limit_val_batches=1)
        >>> trainer.fit(ClassifierModule(MLP(64, (32,), 10)), DigitsDataModule())
        >>> round(prune.compression_state()["sparsity"], 2)
        0.8
    """

    def __init__(
        self,
        target_sparsity: float | dict[str, float] = 0.5,
        schedule: ScheduleSpec = "cubic",
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        criterion: str | Criterion | Callable[[str, Tensor], Tensor] = "magnitude",
        granularity: str = "unstructured",
        scope: str = "global",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        make_permanent: bool = True,
        monitor: str | None = None,
        max_drop: float | None = None,
        mode: str = "max",
        update_every_n_steps: int | None = None,
        schedule_steps: int = 3,
        rewind_epoch: float | None = None,
        seed: int = 0,
        shrink: bool = False,
        shrink_epoch: float | None = None,
        round_to: int | None = None,
        log_per_layer: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        # --- target
        if isinstance(target_sparsity, Mapping):
            if not target_sparsity:
                raise ValueError("target_sparsity map is empty; give {regex: sparsity} entries or a number")
            targets: dict[str, float] = {}
            for pattern, value in target_sparsity.items():
                if not isinstance(pattern, str):
                    raise ValueError(f"target_sparsity map keys must be regex strings, got {pattern!r}")
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"target_sparsity regex {pattern!r} is invalid: {err}") from err
                targets[pattern] = _check_fraction(value, f"target_sparsity[{pattern!r}]")
            self.target_sparsity: float | dict[str, float] = targets
        else:
            self.target_sparsity = _check_fraction(target_sparsity, "target_sparsity")
        # --- granularity / scope / criterion
        self.granularity = granularity
        self._kind, self._nm = parse_granularity(granularity)
        if scope not in ("global", "layer"):
            raise ValueError(f"unknown scope {scope!r}; valid: ['global', 'layer']")
        self.scope = "layer" if isinstance(self.target_sparsity, dict) else scope
        if self._nm is not None:
            n, m = self._nm
            fixed = 1.0 - n / m
            if isinstance(self.target_sparsity, dict) or abs(self.target_sparsity - fixed) > 1e-9:
                raise ValueError(
                    f"granularity {granularity!r} keeps {n} of every {m} weights, i.e. a sparsity of {fixed:g}; "
                    f"set target_sparsity={fixed:g} (got {self.target_sparsity!r})"
                )
        self.criterion = make_criterion(criterion)
        if self._kind not in self.criterion.granularities:
            raise ValueError(
                f"criterion {self.criterion.name!r} does not apply to granularity {granularity!r}; it supports "
                f"{['N:M' if g == 'nm' else g for g in self.criterion.granularities]}"
            )
        # --- schedule
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch), ("rewind_epoch", rewind_epoch)):
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(schedule, str):
            key = schedule.strip().lower().replace("-", "_")
            if end_epoch is not None and key in _NAMED_RAMPS and end_epoch <= start_epoch:
                raise ValueError(
                    f"end_epoch ({end_epoch}) must be after start_epoch ({start_epoch}) for the {key!r} schedule"
                )
        # probe: unknown names, bad maps, map/target mismatch
        probe = self._build_schedule(schedule, float(start_epoch), float(end_epoch if end_epoch is not None else start_epoch + 1), schedule_steps)
        if not isinstance(schedule, str) and isinstance(self.target_sparsity, float):
            if abs(probe[1] - self.target_sparsity) > 1e-9:
                raise ValueError(
                    f"the schedule ends at sparsity {probe[1]:g} but target_sparsity={self.target_sparsity:g}; "
                    "make them agree (the schedule's values are absolute sparsities)"
                )
        if not isinstance(schedule, str) and end_epoch is not None:
            raise ValueError("end_epoch is set by the {epoch: sparsity} map / Schedule object itself; drop end_epoch")
        self.schedule = schedule
        self.start_epoch = float(start_epoch)
        self.end_epoch = None if end_epoch is None else float(end_epoch)
        self.schedule_steps = schedule_steps
        # --- selection
        self.include = include
        self.exclude = exclude
        as_patterns(include, "include")
        as_patterns(exclude, "exclude")
        # --- guard
        if max_drop is not None and monitor is None:
            raise ValueError(f"max_drop={max_drop!r} needs a monitor (e.g. monitor='val_acc')")
        if monitor is not None and max_drop is None:
            raise ValueError(f"monitor={monitor!r} needs max_drop (the largest allowed fall, e.g. 0.01)")
        if max_drop is not None and (not _is_number(max_drop) or max_drop < 0 or not math.isfinite(max_drop)):
            raise ValueError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"unknown mode {mode!r}; valid: ['max', 'min']")
        self.monitor, self.max_drop, self.mode = monitor, None if max_drop is None else float(max_drop), mode
        # --- misc
        if update_every_n_steps is not None and (
            isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int) or update_every_n_steps < 1
        ):
            raise ValueError(f"update_every_n_steps must be a positive integer or None, got {update_every_n_steps!r}")
        self.update_every_n_steps = update_every_n_steps
        self.rewind_epoch = None if rewind_epoch is None else float(rewind_epoch)
        self.seed = int(seed)
        self.make_permanent = make_permanent
        if shrink and self._kind != "channel":
            raise ValueError(
                f"shrink=True physically removes whole channels and needs granularity='channel', got {granularity!r}"
            )
        if shrink_epoch is not None and not shrink:
            raise ValueError("shrink_epoch is set but shrink=False; set shrink=True or drop shrink_epoch")
        if shrink_epoch is not None and (not _is_number(shrink_epoch) or shrink_epoch < self.start_epoch):
            raise ValueError(f"shrink_epoch must be a number >= start_epoch ({self.start_epoch}), got {shrink_epoch!r}")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
        if round_to is not None and self._kind != "channel":
            raise ValueError(f"round_to applies to granularity='channel' only, got {granularity!r}")
        self.shrink, self.shrink_epoch, self.round_to = shrink, shrink_epoch, round_to
        self.log_per_layer, self.verbose = log_per_layer, verbose

        # --- run state (filled in setup / restored from checkpoints)
        self._ready = False
        self._pending: dict[str, Any] | None = None
        self._names: list[str] = []
        self._params: dict[str, Tensor] = {}
        self._targets: dict[str, float] = {}
        self._masks: dict[str, Tensor] = {}
        self._follower_masks: dict[str, Tensor] = {}
        self._groups: list[ChannelGroupSpec] = []
        self._keep: list[Tensor] = []
        self._sched: Callable[[float], float] = _Progress(None, 0.0)
        self._end = self.end_epoch
        self._level = 0.0
        self._updates = 0
        self._history: list[dict[str, Any]] = []
        self._frozen = False
        self._baseline: float | None = None
        self._guard_events: list[dict[str, Any]] = []
        self._last_good: dict[str, Any] | None = None
        self._rewind: dict[str, Tensor] | None = None
        self._last_step = -1
        self._checked_monitor = False
        self._finished = False
        self._shrunk: dict[str, Any] | None = None
        self._numel: dict[str, int] = {}
        self._fast: list[tuple[Tensor, Tensor]] = []
        self._grads_masked_step = -1
        self._example: Tensor | None = None
        self._shrink_at: float | None = None
        self._all_params: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def _build_schedule(
        spec: ScheduleSpec, start: float, end: float, steps: int
    ) -> tuple[Callable[[float], float], float, Schedule]:
        """(progress function t -> [0, 1], final value, underlying schedule)."""
        if isinstance(spec, str):
            s = make_schedule(spec, initial=0.0, final=1.0, start=start, end=end, steps=steps)
            return _Progress(s, 1.0), 1.0, s
        if _is_number(spec):
            raise ValueError(
                f"schedule={spec!r}: a number is not a pruning schedule; give a name ('cubic', 'linear', 'one_shot', "
                "'iterative', 'constant'), an {epoch: sparsity} map or a Schedule"
            )
        s = make_schedule(spec)
        final = s.final
        if not 0.0 <= final < 1.0:
            raise ValueError(f"the schedule must end at a sparsity in [0, 1), got {final!r}")
        return _Progress(s, final), final, s

    def _resolve_end(self, max_epochs: int | None) -> float:
        if self.end_epoch is not None:
            return self.end_epoch
        if not isinstance(self.schedule, str):
            return make_schedule(self.schedule).end
        if max_epochs is None or max_epochs < 0:
            raise ValueError("end_epoch is needed when the Trainer has no max_epochs (pruning must end somewhere)")
        return float(max(self.start_epoch + 1e-9, round(self.start_epoch + 0.75 * (max_epochs - self.start_epoch))))

    # ------------------------------------------------------------------ public read-only views
    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Read-only ``{parameter name (relative to the LightningModule): bool mask}`` of every masked
        parameter (the pruned weights and, for channels, their biases and BatchNorm parameters).
        ``True`` = kept. Do not modify the tensors."""
        return types.MappingProxyType({**self._masks, **self._follower_masks})

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:  # Lightning asks at every hook call: build it once
            key = self._state_key = self._generate_state_key(
                granularity=self.granularity, include=self.include, exclude=self.exclude
            )
        return key

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._finished and self.make_permanent:
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            raise ValueError(f"start_epoch={self.start_epoch} is not before max_epochs={max_epochs}; pruning would never run")
        end = self._resolve_end(max_epochs)
        if isinstance(self.schedule, str) and self.schedule.strip().lower() in _NAMED_RAMPS and end <= self.start_epoch:
            raise ValueError(f"end_epoch ({end}) must be after start_epoch ({self.start_epoch})")
        if max_epochs is not None and max_epochs >= 0 and end > max_epochs:
            raise ValueError(
                f"end_epoch={end} is past max_epochs={max_epochs}: the target would never be reached. Lower "
                "end_epoch or raise max_epochs."
            )
        sched, _, base = self._build_schedule(self.schedule, self.start_epoch, end, self.schedule_steps)
        base.validate(max_epochs if max_epochs is not None and max_epochs >= 0 else None)
        if self.rewind_epoch is not None and max_epochs is not None and 0 <= max_epochs <= self.rewind_epoch:
            raise ValueError(f"rewind_epoch={self.rewind_epoch} is not before max_epochs={max_epochs}")
        shrink_at = None
        if self.shrink:
            shrink_at = self.shrink_epoch if self.shrink_epoch is not None else (
                end if self.update_every_n_steps else float(math.ceil(end))
            )
            if max_epochs is not None and max_epochs >= 0 and shrink_at > max_epochs:
                raise ValueError(f"shrink_epoch={shrink_at} is past max_epochs={max_epochs}")
        if not (self.update_every_n_steps or float(end).is_integer()):
            rank_zero_warn(
                f"PruningCallback: the schedule ends at fractional epoch {end} but masks are updated at epoch "
                "boundaries; set update_every_n_steps to follow it within epochs."
            )

        if self.criterion.needs_data and sched(0.0) > 0:
            raise ValueError(
                f"criterion {self.criterion.name!r} scores channels from training activations, but the schedule "
                "prunes before the first training step; start later (start_epoch > 0)"
            )
        names = select_parameters(pl_module, self.include, self.exclude)
        targets = layer_targets(names, self.target_sparsity)
        all_params = dict(pl_module.named_parameters())
        modules = dict(pl_module.named_modules())
        params = {n: all_params[n] for n in names}
        groups: list[ChannelGroupSpec] = []
        batchnorms: dict[str, str] = {}
        if self._kind == "nm":
            m = self._nm[1]  # type: ignore[index]
            for n, p in params.items():
                if p.dim() < 2 or (p.numel() // p.shape[0]) % m:
                    raise ValueError(
                        f"granularity {self.granularity!r}: {n} of shape {tuple(p.shape)} has {p.numel() // max(1, p.shape[0])} "
                        f"inputs per output, not a multiple of {m}; exclude it (exclude=[{n.rsplit('.', 1)[0]!r}])"
                    )
        if self._kind == "channel":
            groups, batchnorms = self._channel_groups(trainer, pl_module, names, modules)
            if not groups:
                raise ValueError(
                    f"granularity='channel' found no prunable channel group among {names} (output heads are never "
                    "channel-pruned); include more layers"
                )
            in_groups = {f"{m}.weight" for g in groups for m in g.members}
            names = [n for n in names if n in in_groups]
            params = {n: params[n] for n in names}
            targets = {n: targets[n] for n in names}
        ctx = PruningContext(pl_module, params, modules, groups, batchnorms, self.seed)
        self.criterion.setup(ctx, self._kind)  # raises if it does not apply (e.g. bn_scale without BN)

        # --- all checks passed: commit
        self._sched, self._end, self._shrink_at = sched, end, shrink_at
        self._names, self._targets, self._groups = names, targets, groups
        self._all_params = all_params
        self._params = params
        if not self._masks or set(self._masks) != set(names):
            self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
            self._keep = [torch.ones(g.size, dtype=torch.bool, device=self._device(g)) for g in groups]
            self._follower_masks = {}
        self._numel = {n: p.numel() for n, p in params.items()}
        self._ready = True
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._restore(state)

    def _device(self, g: ChannelGroupSpec) -> torch.device:
        return self._params[f"{g.members[0]}.weight"].device

    def _channel_groups(
        self, trainer: Trainer, pl_module: LightningModule, names: list[str], modules: dict[str, nn.Module]
    ) -> tuple[list[ChannelGroupSpec], dict[str, str]]:
        selected = []
        for n in names:
            mod_name, _, p_name = n.rpartition(".")
            mod = modules[mod_name]
            if p_name != "weight" or not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                raise ValueError(f"granularity='channel' prunes output channels of Linear/Conv layers; {n} is not one")
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                raise ValueError(f"granularity='channel' does not support transposed convolutions ({mod_name}); exclude it")
            selected.append(mod_name)
        example = self._example_input(trainer, pl_module)
        self._example = example
        try:
            from lightning_compress.pruning.graph import channel_groups
        except ImportError:  # pragma: no cover - graph.py ships with the package
            channel_groups = None  # type: ignore[assignment]
        followers, heads = find_followers(pl_module, example, selected)
        if channel_groups is not None:
            raw = channel_groups(pl_module, example, prunable=selected)
            batchnorms = {}
            for g in raw:
                batchnorms.update(getattr(g, "norms", {}) or {})
            raw_groups = [(list(g.members), int(g.size)) for g in raw]
        else:
            batchnorms = dict(followers)
            raw_groups = [(
                [m], modules[m].weight.shape[0]) for m in selected if m not in heads]  # type: ignore[union-attr]
        # BatchNorms found by tracing a real forward complete those the graph reports
        for m, bn in followers.items():
            batchnorms.setdefault(m, bn)
        groups = []
        for members, size in raw_groups:
            fol: dict[str, int] = {}
            for m in members:
                mod = modules[m]
                if getattr(mod, "bias", None) is not None:
                    fol[f"{m}.bias"] = 0
                bn = batchnorms.get(m)
                if bn is not None:
                    bn_mod = modules[bn]
                    for pn in ("weight", "bias"):
                        if getattr(bn_mod, pn, None) is not None:
                            fol[f"{bn}.{pn}"] = 0
            groups.append(ChannelGroupSpec(members, size, fol))
        return groups, {m: b for m, b in batchnorms.items() if any(m in g.members for g in groups)}

    @staticmethod
    def _example_input(trainer: Trainer, pl_module: LightningModule) -> Any:
        example = pl_module.example_input_array
        if example is None and trainer.datamodule is not None:
            try:
                batch = next(iter(trainer.datamodule.train_dataloader()))
            except Exception as err:  # noqa: BLE001 - any loader failure means: ask the user
                raise ValueError(
                    f"granularity='channel' needs an example input to trace the model; reading one batch failed ({err}). "
                    "Set `example_input_array` on the LightningModule."
                ) from err
            example = batch[0] if isinstance(batch, (list, tuple)) else batch
            if isinstance(example, Tensor):
                example = example[:2]
        if not isinstance(example, Tensor):
            raise ValueError(
                "granularity='channel' needs an example input tensor to trace the model: set `example_input_array` "
                "on the LightningModule (ClassifierModule: `example_input_shape=`) or use a datamodule"
            )
        try:
            device = next(pl_module.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        return example.to(device)

    # ------------------------------------------------------------------ masks
    def _set_channel_keep(self, keep: list[Tensor]) -> None:
        self._keep = keep
        fmasks: dict[str, Tensor] = {}
        for g, k in zip(self._groups, keep):
            for m in g.members:
                n = f"{m}.weight"
                self._masks[n] = expand_channel_mask(k.to(self._params[n].device), self._params[n].shape, 0)
            for pn, dim in g.followers.items():
                p = self._all_params[pn]
                fmasks[pn] = expand_channel_mask(k.to(p.device), p.shape, dim)
        self._follower_masks = fmasks

    def _all_masked_params(self) -> dict[str, Tensor]:
        return {**self._params, **{n: self._all_params[n] for n in self._follower_masks}}

    def _progress(self, t: float) -> float:
        return float(self._sched(t))

    def _maybe_update(self, trainer: Trainer, pl_module: LightningModule, t: float) -> None:
        if self._frozen or self._finished or self._shrunk is not None:
            return
        p = self._progress(t)
        if p <= self._level + 1e-12:
            return
        self._update(trainer, p, t)

    def _update(self, trainer: Trainer, p: float, t: float) -> None:
        params = self._params
        if self._kind == "unstructured":
            scores = self.criterion.element_scores(params)
            new = unstructured_masks(scores, {n: p * self._targets[n] for n in self._names}, self.scope, self._masks)
            new = self._sync(trainer, new)
            self._masks = new
        elif self._kind == "nm":
            n_, m_ = self._nm  # type: ignore[misc]
            scores = self.criterion.element_scores(params)
            new = nm_masks(scores, n_, m_, {n: p for n in self._names}, self.scope, self._masks)
            self._masks = self._sync(trainer, new)
        else:
            scores_c = self.criterion.channel_scores(params, self._groups)
            gtargets = [p * max(self._targets[f"{m}.weight"] for m in g.members) for g in self._groups]
            keep = channel_masks(scores_c, gtargets, self.scope, self._keep, self.round_to)
            keep = self._sync(trainer, keep)
            self._set_channel_keep([k.to(self._device(g)) for g, k in zip(self._groups, keep)])
        masked = self._all_masked_params()
        all_masks = {**self._masks, **self._follower_masks}
        self._apply()
        zero_optimizer_state(trainer.optimizers, masked, all_masks)
        if self._rewind is not None:
            with torch.no_grad():
                for n, w0 in self._rewind.items():
                    if n in all_masks:
                        masked[n].copy_(w0.to(masked[n].device) * all_masks[n])
            zero_optimizer_state(
                trainer.optimizers, masked, {n: torch.zeros_like(all_masks[n]) for n in self._rewind if n in all_masks}
            )
        self.criterion.reset()
        self._level = p
        self._updates += 1
        record = {"epoch": float(t), "step": int(trainer.global_step), "target": self._overall_target(p), "sparsity": self.sparsity}
        self._history.append(record)
        self._log(trainer)
        if self.verbose:
            rank_zero_info(
                f"PruningCallback: epoch {t:.3g}, step {trainer.global_step}: sparsity {record['sparsity']:.2%} "
                f"(target {record['target']:.2%}, {self.nonzero:,} non-zero weights)"
            )

    def _sync(self, trainer: Trainer, obj: Any) -> Any:
        """Masks computed on rank 0 are the masks of every rank."""
        if trainer.world_size <= 1:
            return obj
        if isinstance(obj, dict):
            cpu = {n: pack_mask(t) for n, t in obj.items()}
            cpu = trainer.strategy.broadcast(cpu, src=0)
            return {n: unpack_mask(v).to(obj[n].device) for n, v in cpu.items()}
        cpu_list = [pack_mask(t) for t in obj]
        cpu_list = trainer.strategy.broadcast(cpu_list, src=0)
        return [unpack_mask(v).to(t.device) for v, t in zip(cpu_list, obj)]

    def _overall_target(self, p: float) -> float:
        total = sum(self._numel.values())
        return 0.0 if total == 0 else sum(p * self._targets[n] * k for n, k in self._numel.items()) / total

    @property
    def sparsity(self) -> float:
        """Current fraction of pruned entries over the selected weights (of the original weights once shrunk)."""
        if self._shrunk is not None:
            return float(self._shrunk.get("sparsity", 0.0))
        return global_sparsity(self._masks, self._names) if self._masks else 0.0

    @property
    def nonzero(self) -> int:
        """Kept entries of the selected weights."""
        return int(sum(int(self._masks[n].sum()) for n in self._names)) if self._masks else 0

    def _log(self, trainer: Trainer) -> None:
        if not trainer.loggers:
            return
        metrics: dict[str, float] = {
            "pruning/sparsity": self.sparsity,
            "pruning/target": self._overall_target(self._level),
            "pruning/nonzero": float(self.nonzero),
        }
        if self.log_per_layer:
            for n in self._names:
                metrics[f"pruning/sparsity/{n}"] = 1.0 - float(self._masks[n].float().mean())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _refresh_fast(self) -> None:
        """Cache (parameter, mask in the parameter's dtype/device) pairs for the per-step hot path."""
        params = self._all_masked_params()
        pairs = []
        for n, m in {**self._masks, **self._follower_masks}.items():
            p = params[n]
            if m.device != p.device:
                m = m.to(p.device)
                if n in self._masks:
                    self._masks[n] = m
                else:
                    self._follower_masks[n] = m
            if not bool(m.all()):
                pairs.append((p, m.to(p.dtype)))
        self._fast = pairs

    def _apply(self) -> None:
        self._refresh_fast()
        self._apply_fast()

    def _apply_fast(self, grads: bool = False) -> None:
        if not self._fast:
            return
        with torch.no_grad():
            if grads:
                pairs = [(p.grad, m) for p, m in self._fast if p.grad is not None and p.grad.shape == m.shape]
            else:
                pairs = [(p, m) for p, m in self._fast if p.shape == m.shape]
            if pairs:
                torch._foreach_mul_([t for t, _ in pairs], [m for _, m in pairs])

    def _has_pruned(self) -> bool:
        return any(not bool(m.all()) for m in self._masks.values())

    def _enforcing(self) -> bool:
        return self._ready and self._shrunk is None and not (self._finished and self.make_permanent)

    # ------------------------------------------------------------------ training hooks
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        if self._enforcing():
            self._apply()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enforcing():
            return
        t = float(trainer.current_epoch)
        self._maybe_snapshot(t)
        if self.update_every_n_steps is None:
            self._maybe_update(trainer, pl_module, t)
        self._maybe_shrink(trainer, pl_module, t)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self._enforcing():
            return
        if not self._frozen and self._level < 1.0:
            self.criterion.on_before_optimizer_step(self._params)
        self._apply_fast(grads=True)
        self._grads_masked_step = trainer.global_step + 1  # the step this optimizer step completes

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enforcing():
            return
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step happened
        self._last_step = step
        if not self._zero_preserving(trainer):
            self._apply_fast()
        if self.update_every_n_steps is not None and step % self.update_every_n_steps == 0:
            nb = trainer.num_training_batches
            frac = (batch_idx + 1) / nb if isinstance(nb, int) and nb > 0 else 0.0
            t = trainer.current_epoch + frac
            self._maybe_snapshot(t)
            self._maybe_update(trainer, pl_module, t)
            self._maybe_shrink(trainer, pl_module, t)

    def _zero_preserving(self, trainer: Trainer) -> bool:
        if self._grads_masked_step != trainer.global_step:
            return False
        return all(type(opt) in _ZERO_PRESERVING for opt in trainer.optimizers)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enforcing():
            self._apply_fast()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enforcing():
            return
        t = float(trainer.current_epoch)
        if self._progress(t) > self._level + 1e-12 and not self._frozen:
            rank_zero_warn(
                f"PruningCallback: the schedule reaches its target only at epoch {self._end}, the end of training; "
                "the last pruning step gets no fine-tuning. Leave epochs after end_epoch."
            )
            self._maybe_update(trainer, pl_module, t)
        self._maybe_shrink(trainer, pl_module, t)
        if self.make_permanent and self._shrunk is None:
            self._apply()
            self.criterion.teardown()
            self._finished = True

    # ------------------------------------------------------------------ rewind
    def _maybe_snapshot(self, t: float) -> None:
        if self.rewind_epoch is None or self._rewind is not None or t + 1e-9 < self.rewind_epoch:
            return
        params = dict(self._params)
        for g in self._groups:
            params.update({pn: self._all_params[pn] for pn in g.followers})
        self._rewind = {n: p.detach().clone() for n, p in params.items()}  # a real copy, not shared storage

    # ------------------------------------------------------------------ shrink
    def _maybe_shrink(self, trainer: Trainer, pl_module: LightningModule, t: float) -> None:
        if not self.shrink or self._shrunk is not None or self._shrink_at is None or t + 1e-9 < self._shrink_at:
            return
        from lightning_compress.pruning.shrink import shrink_in_training

        keep = {m: k for g, k in zip(self._groups, self._keep) for m in g.members}
        sparsity = self.sparsity
        result = shrink_in_training(trainer, pl_module, keep, round_to=self.round_to, example_input=self._example)
        # the parameters were replaced: nothing left to mask
        self.criterion.teardown()
        self._shrunk = {"epoch": float(t), "sparsity": sparsity, "channels": {m: list(v) for m, v in result.items()}}
        self._masks, self._follower_masks = {}, {}
        self._params, self._fast = {}, []
        if self.verbose:
            rank_zero_info(f"PruningCallback: removed masked channels at epoch {t:.3g}: {result}")

    # ------------------------------------------------------------------ accuracy guard
    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking or not self._enforcing():
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(
                f"PruningCallback(monitor={self.monitor!r}): that metric was never logged; logged keys: "
                f"{sorted(metrics)}"
            )
        value = float(metrics[self.monitor])
        if self._level == 0.0 and not self._has_pruned():
            self._baseline = value
            self._save_good()
            return
        if self._frozen:
            return
        assert self._baseline is not None or self._last_good is None
        baseline = self._baseline if self._baseline is not None else value
        drop = (baseline - value) if self.mode == "max" else (value - baseline)
        bad = drop > (self.max_drop or 0.0) + 1e-12
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.broadcast(bad, src=0))
        if not bad:
            self._save_good()
            return
        self._restore_good(trainer)
        event = {
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "monitor": self.monitor,
            "value": value,
            "baseline": baseline,
            "max_drop": float(self.max_drop or 0.0),
            "restored_sparsity": self.sparsity,
        }
        self._guard_events.append(event)
        self._frozen = True
        rank_zero_warn(
            f"PruningCallback accuracy guard: {self.monitor}={value:.4g} fell {drop:.4g} from the pre-pruning "
            f"baseline {baseline:.4g} (max_drop={self.max_drop}); restored the last good masks and weights "
            f"(sparsity {self.sparsity:.2%}) and stopped raising sparsity."
        )
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/guard_tripped": 1.0, "pruning/sparsity": self.sparsity}, step=trainer.global_step)

    def _save_good(self) -> None:
        masked = self._all_masked_params()
        self._last_good = {
            "level": self._level,
            "masks": {n: m.clone() for n, m in self._masks.items()},
            "keep": [k.clone() for k in self._keep],
            "weights": {n: p.detach().clone() for n, p in masked.items()},
        }

    def _restore_good(self, trainer: Trainer) -> None:
        good = self._last_good
        if good is None:
            return
        self._level = float(good["level"])
        if self._kind == "channel":
            self._set_channel_keep([k.clone() for k in good["keep"]])
        else:
            self._masks = {n: m.clone() for n, m in good["masks"].items()}
        with torch.no_grad():
            for n, w in good["weights"].items():
                self._all_params[n].copy_(w)
        masked = self._all_masked_params()
        zero_optimizer_state(trainer.optimizers, masked, {n: torch.zeros_like(p, dtype=torch.bool) for n, p in masked.items()})
        self._apply()

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        good = None
        if self._last_good is not None:
            good = {
                "level": self._last_good["level"],
                "masks": {n: pack_mask(m) for n, m in self._last_good["masks"].items()},
                "keep": [pack_mask(k) for k in self._last_good["keep"]],
                "weights": {n: w.cpu() for n, w in self._last_good["weights"].items()},
            }
        return {
            "version": _STATE_VERSION,
            "names": list(self._names),
            "masks": {n: pack_mask(m) for n, m in self._masks.items()},
            "keep": [pack_mask(k) for k in self._keep],
            "level": self._level,
            "updates": self._updates,
            "history": list(self._history),
            "frozen": self._frozen,
            "baseline": self._baseline,
            "guard_events": list(self._guard_events),
            "last_good": good,
            "rewind": None if self._rewind is None else {n: w.cpu() for n, w in self._rewind.items()},
            "criterion": self.criterion.state_dict(),
            "finished": self._finished,
            "shrunk": self._shrunk,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._ready:
            self._restore(state_dict)
        else:
            self._pending = dict(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        names = list(state.get("names", []))
        if state.get("shrunk") is not None:
            self._shrunk = state["shrunk"]
            self._masks, self._follower_masks, self._params = {}, {}, {}
            self.criterion.teardown()
            return
        if names and names != self._names:
            raise ValueError(
                f"the checkpoint's PruningCallback state prunes {names}, but this callback selects {self._names}; "
                "use the same include/exclude/granularity as the run that wrote it"
            )
        dev = {n: p.device for n, p in self._params.items()}
        if self._kind == "channel" and state.get("keep"):
            self._set_channel_keep([unpack_mask(k).to(self._device(g)) for k, g in zip(state["keep"], self._groups)])
        else:
            self._masks = {n: unpack_mask(v).to(dev[n]) for n, v in state.get("masks", {}).items()} or self._masks
        self._level = float(state.get("level", 0.0))
        self._updates = int(state.get("updates", 0))
        self._history = list(state.get("history", []))
        self._frozen = bool(state.get("frozen", False))
        self._baseline = state.get("baseline")
        self._guard_events = list(state.get("guard_events", []))
        good = state.get("last_good")
        if good is not None:
            self._last_good = {
                "level": float(good["level"]),
                "masks": {n: unpack_mask(v).to(dev.get(n, "cpu")) for n, v in good["masks"].items()},
                "keep": [unpack_mask(k).to(self._device(g)) for k, g in zip(good["keep"], self._groups)],
                "weights": {n: w.to(self._all_params[n].device) for n, w in good["weights"].items()},
            }
        rewind = state.get("rewind")
        self._rewind = None if rewind is None else {n: w.to(self._all_params[n].device) for n, w in rewind.items()}
        self.criterion.load_state_dict(state.get("criterion", {}))
        self._finished = bool(state.get("finished", False))
        self._apply()

    # ------------------------------------------------------------------ report contract
    @override
    def compression_state(self) -> dict[str, float]:
        return {"sparsity": self.sparsity, "target": self._overall_target(self._level) if self._names else 0.0}

    @override
    def compression_summary(self) -> dict[str, Any]:
        layers: dict[str, Any] = {}
        dense = sparse = 0
        for n in self._names if self._masks else []:
            m = self._masks[n]
            entry: dict[str, Any] = {
                "shape": list(m.shape),
                "numel": m.numel(),
                "nonzero": int(m.sum()),
                "sparsity": 1.0 - float(m.float().mean()),
                "target": self._targets.get(n, 0.0),
            }
            if self._kind == "unstructured":
                est = sparse_storage_bytes(m, self._params[n].element_size())
                entry.update(est)
                dense += est["dense_bytes"]
                sparse += est["sparse_bytes"]
            layers[n] = entry
        out: dict[str, Any] = {
            "granularity": self.granularity,
            "criterion": self.criterion.name,
            "scope": self.scope,
            "schedule": schedule_state(make_schedule(self.schedule)) if not isinstance(self.schedule, str) else self.schedule,
            "start_epoch": self.start_epoch,
            "end_epoch": self._end,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "nonzero": self.nonzero,
            "total": sum(self._masks[n].numel() for n in self._names) if self._masks else 0,
            "updates": self._updates,
            "history": list(self._history),
            "layers": layers,
            "guard": {
                "monitor": self.monitor,
                "max_drop": self.max_drop,
                "baseline": self._baseline,
                "stopped": self._frozen,
                "events": list(self._guard_events),
            },
        }
        if self._kind == "unstructured" and layers:
            out["storage"] = {"dense_bytes": dense, "sparse_bytes": sparse, "ratio": dense / max(1, sparse)}
        if self._kind == "channel" and self._keep:
            out["channels"] = {
                "+".join(g.members): {"kept": int(k.sum()), "total": g.size} for g, k in zip(self._groups, self._keep)
            }
        notes = [
            f"accuracy guard at epoch {e['epoch']}: {e['monitor']}={e['value']:.4g} fell more than {e['max_drop']:g} "
            f"below {e['baseline']:.4g}; restored sparsity {e['restored_sparsity']:.2%} and stopped pruning"
            for e in self._guard_events
        ]
        if "storage" in out:
            notes.append(
                f"sparse storage estimate {out['storage']['sparse_bytes']:,} B vs dense {out['storage']['dense_bytes']:,} B "
                f"({out['storage']['ratio']:.2f}x)"
            )
        if self._shrunk is not None:
            out["shrunk"] = self._shrunk
            cuts = ", ".join(f"{name} {a}->{b}" for name, (a, b) in sorted(self._shrunk["channels"].items()))
            notes.append(f"channels removed at epoch {self._shrunk['epoch']:g}: {cuts}")
        if notes:
            out["notes"] = notes
        return out

    @override
    def is_active(self) -> bool:
        return self._shrunk is not None or self._level > 0 or self._has_pruned()
