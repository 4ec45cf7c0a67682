"""What a pruning run acts on, found and checked in ``setup`` before anything changes.

:func:`plan_run` resolves the schedule against the Trainer, selects the weights, finds their channel groups
or units, finds the processes sharing their rows, and sets the criterion up: every check
:class:`~lightning_compress.PruningCallback` makes before it touches the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_compress.batches import example_call
from lightning_compress.plugin import fast_dev_run_note, quantisation_group_sizes, weight_averaging
from lightning_compress.pruning.channel_masks import ChannelGroupSpec, check_channel_targets, coarse_targets_note
from lightning_compress.pruning.channels import channel_group_specs, channel_trace_input
from lightning_compress.pruning.criterion_base import PruningContext
from lightning_compress.pruning.masks import check_nm_shapes, layer_targets, select_parameters
from lightning_compress.pruning.options import PruningOptions
from lightning_compress.pruning.shards import check_sharded_blocks, find_shard_group
from lightning_compress.pruning.state import PruningState
from lightning_compress.pruning.units import find_units
from lightning_compress.pruning.weights import adapter_note, input_major, normalised_directions, parametrized_weights_note, unknown_weights_note
from lightning_compress.selection import check_teacher_cache
from lightning_compress.sharding import ShardGroup, data_parallel_group

__all__ = ["RunPlan", "plan_run"]


@dataclass
class RunPlan:
    """The schedule as resolved for this fit and the weights it prunes.

    Attributes:
        progress: ``epoch -> [0, 1]``, the schedule's fraction of the target.
        end: The epoch the target is reached.
        shrink_at: The epoch masked channels are removed (``shrink=True``), else ``None``.
        params: ``{name: parameter}`` of the pruned weights.
        all_params: Every parameter of the module by name, tied ones under each of their names.
        targets: Final sparsity per pruned weight.
        groups: Channel groups (channel structure, units).
        layout: ``{name: input dimension}`` of weights whose inputs are not the dimensions after the first.
        shards: The processes holding the other rows of sharded weights (FSDP2), else ``None``.
        network: The child the training step calls, whose channel graph was traced (``""``: the module).
        example: That child's example input (channel structure), else ``None``.
        normalised: ``{name: dim}`` of weight_norm directions among the pruned weights (every norm keeps a weight).
    """

    progress: Callable[[float], float]
    end: float
    shrink_at: float | None
    params: dict[str, Tensor]
    all_params: dict[str, Tensor]
    targets: dict[str, float]
    groups: list[ChannelGroupSpec] = field(default_factory=list)
    layout: dict[str, int] = field(default_factory=dict)
    shards: ShardGroup | None = None
    network: str = ""
    example: Tensor | None = None
    normalised: dict[str, int] = field(default_factory=dict)

    def new_state(self, kind: str) -> PruningState:
        """An empty run (no weight masked yet) over these weights."""
        state = PruningState(kind, self.params, self.all_params, self.targets, self.groups, self.layout, self.shards)
        state.normalised = dict(self.normalised)
        return state


def _refuse_weight_averaging(trainer: Trainer) -> None:
    """A weight-averaging callback validates with, and at the end of fit puts into the model, an average of
    the weights over many steps, dense ones included: the model returned would not be pruned."""
    averaging = weight_averaging(trainer.callbacks)  # type: ignore[attr-defined]
    if averaging:
        raise ValueError(
            f"PruningCallback cannot run with {averaging[0]}: it validates with an average of the weights over past steps "
            "and copies that average into the model when training ends, and the average of weights pruned at different "
            "steps (or not yet pruned) is dense: the model fit returns would not be pruned, and the guard would measure "
            f"the average. Remove {averaging[0]} from the callbacks"
        )


def _check_head_widths(trainer: Trainer, pl_module: LightningModule, groups: list[ChannelGroupSpec], params: dict[str, Tensor]) -> None:
    """Removing heads leaves each output projection a multiple of its width per head (a key/value head's
    query heads, with grouped-query attention): a quantisation group size must divide that width, or the
    quantised layer fails in the epoch after the removal."""
    for quantiser, size in quantisation_group_sizes(getattr(trainer, "callbacks", [])):
        layers = getattr(quantiser, "quantised_layers", None)
        selected = layers(pl_module) if callable(layers) else None  # None: any layer may be
        if callable(layers) and selected is None:
            continue  # its selection fails: its own setup says why
        for g in groups:
            for name in g.followers:  # the output projection: cut along its inputs
                module = name.rpartition(".")[0]
                if module in g.members or not name.endswith(".weight") or (selected is not None and module not in selected):
                    continue
                dim, _ = g.layout(name)
                width = params[name].shape[dim] // g.size
                if width % size:
                    raise ValueError(
                        f"{type(quantiser).__name__}(granularity={size}) needs a multiple of {size} weights per output "
                        f"channel, but removing heads of {module!r} leaves it a multiple of {width} "
                        f"({width} per removable head), which {size} does not divide: use a group size dividing {width}, "
                        "or keep the heads masked (shrink=False)"
                    )


def plan_run(
    trainer: Trainer,
    pl_module: LightningModule,
    opts: PruningOptions,
    traced: tuple[str, Tensor | None] = ("", None),
    schedule: bool = True,
    fitting: bool | None = None,
) -> RunPlan:
    """Check ``opts`` against this fit and model and return what the run prunes; the model is not changed.
    ``traced``: the network and input a channel graph is traced with (a plan's ``network`` and ``example``), else
    found in a training batch. ``schedule=False`` (an evaluation, whose Trainer's epochs are not the fit's): the
    schedule is neither resolved nor checked, and the plan's ``progress``/``end``/``shrink_at`` are placeholders.
    ``fitting`` (default: ``schedule``): the plan is for a fit, whose Trainer must have no weight-averaging callback.

    Raises:
        ValueError: a weight-averaging callback; a schedule that cannot run in this fit; weights that do not fit
            the structure, the sharding or the criterion (each names the weight or value and the valid choices).
    """
    if schedule if fitting is None else fitting:
        _refuse_weight_averaging(trainer)
    if schedule:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        try:
            progress, end, shrink_at = opts.plan(max_epochs)
        except ValueError as err:
            raise ValueError(f"{err}{fast_dev_run_note(trainer)}") from None
    else:
        progress, end, shrink_at = (lambda t: 0.0), 0.0, None
    fractional = [f"{name}={value:g}" for name, value in (("start_epoch", opts.start_epoch), ("end_epoch", end),
                                                            ("rewind_epoch", opts.rewind_epoch)) if value is not None and not float(value).is_integer()]
    if schedule and fractional and not opts.update_every_n_steps:
        rank_zero_warn(
            f"PruningCallback: {', '.join(fractional)} fall within epochs, but masks are updated (and the rewind copy "
            "taken) at epoch boundaries, so each takes effect at the next one; set update_every_n_steps to follow them "
            "within epochs."
        )
    names = select_parameters(pl_module, opts.include, opts.exclude)
    all_params = dict(pl_module.named_parameters(remove_duplicate=False))  # a tied head keeps its name
    targets = layer_targets(names, opts.target_sparsity, all_params)
    params, layout = {n: all_params[n] for n in names}, input_major(pl_module, names)
    check_teacher_cache(pl_module, params, "PruningCallback")
    shards = find_shard_group(params, "PruningCallback")
    if shards is not None:
        opts.check_sharded()
        check_sharded_blocks(params, layout, opts.nm)
    groups, batchnorms, network, example = [], {}, "", None
    if opts.kind == "nm":
        check_nm_shapes(params, opts.nm[1], opts.structure, layout)  # type: ignore[index]
    if opts.units:
        groups = find_units(pl_module, opts.units, names)
    elif opts.kind == "channel":
        network, example = traced
        if example is None:
            call = example_call(trainer, pl_module, "PruningCallback(structure='channel')")
            network, example = channel_trace_input(call, pl_module)
        groups, batchnorms = channel_group_specs(pl_module, example, names, network)
    if groups:
        in_groups = {f"{m}.weight" for g in groups for m in g.members}
        params = {n: p for n, p in params.items() if n in in_groups}
        targets = {n: targets[n] for n in params}
        if opts.shrink and opts.units == ("heads",):
            _check_head_widths(trainer, pl_module, groups, all_params)
        if schedule:  # the group's target, as the mask updates take it
            group_targets = [max(targets[f"{m}.weight"] for m in g.members) for g in groups]
            unit = "units" if opts.units else "channels"
            check_channel_targets(groups, group_targets, opts.scope, unit, opts.round_to)
            whole = "units (a key/value head with its query heads, or a neuron)" if opts.units else unit
            if note := coarse_targets_note(groups, group_targets, opts.scope, whole, opts.round_to):
                rank_zero_warn(note)
    data_group = data_parallel_group(trainer) if shards is None else None
    ctx = PruningContext(pl_module, params, dict(pl_module.named_modules()), groups, batchnorms, opts.seed, shards, data_group)
    opts.criterion.setup(ctx, opts.kind)  # raises if it does not apply (e.g. bn_scale without BN)
    notes = (unknown_weights_note(pl_module, names), parametrized_weights_note(pl_module, names), adapter_note(params))
    for note in notes:
        if note:
            rank_zero_warn(note)
    normalised = normalised_directions(pl_module, params)
    return RunPlan(progress, end, shrink_at, params, all_params, targets, groups, layout, shards, network, example, normalised)
