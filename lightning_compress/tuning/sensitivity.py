"""Per-layer sensitivity: how far a metric falls when one layer (or group) alone is pruned or quantised.

    lightning-compress sensitivity --config configs/sensitivity.yaml --budget-sparsity 0.8 --budget-bits 4

For each layer, alone and without retraining, the weights are magnitude-pruned at each ``--sparsities``
level, then fake-quantised at each ``--bits`` width, the ``--monitor`` metric is evaluated, and the
weights are put back exactly. The outputs (under ``--out``): ``sensitivity.csv`` (one row per probe),
``sensitivity.md`` (tables), ``sensitivity.png`` (a heat-map of the drops) and ``suggested.yaml``:
per-layer ``target_sparsity`` and ``weight_bits`` maps meeting the budgets with the least summed drop,
which ``PruningCallback`` and ``QuantizeCallback`` take as they are. Arguments it does not know go to
the config's LightningCLI (``--trainer.max_epochs=2``). See docs/sensitivity.md.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress._validation import as_patterns
from lightning_compress.batches import random_state_kept
from lightning_compress.guard import MODES, evaluate_drop, read_monitor
from lightning_compress.pruning.criteria import Magnitude
from lightning_compress.pruning.masks import apply_masks, select_parameters, unstructured_masks
from lightning_compress.pruning.reload import resize_to_state_dict
from lightning_compress.quantization.fake_quant import fake_quantize_weight
from lightning_compress.quantization.layer_selection import check_group_size, select_layers
from lightning_compress.quantization.layers import quantised_weights
from lightning_compress.quantization.options import WEIGHT_BITS
from lightning_compress.selection import is_conv1d, preview
from lightning_compress.tuning.devices import check_one_device
from lightning_compress.tuning.space import metric_direction, warn_if_direction_contradicts

__all__ = [
    "SensitivityTable", "Suggestion", "Unit", "build_units", "check_structure", "main", "scan_sensitivity", "suggest_bits",
    "suggest_sparsity",
]

#: Resolution of the budget search: states closer than 1/RESOLUTION of the weights are merged.
RESOLUTION = 4096


@dataclass
class Unit:
    """What one probe changes: a layer (its module name) or a group of layers (the group's regex)."""

    name: str
    layers: list[str]
    prune: list[str] = field(default_factory=list)  # parameter names pruned
    quant: list[str] = field(default_factory=list)  # layer names quantised
    weights: int = 0  # prunable weights
    qweights: int = 0  # quantised weights


@dataclass
class SensitivityTable:
    """The measured metric after each probe: ``sparsity[unit][s]`` and ``bits[unit][b]``."""

    monitor: str
    mode: str
    baseline: float
    units: list[Unit]
    sparsity: dict[str, dict[float, float]]
    bits: dict[str, dict[int, float]]

    def drop(self, value: float) -> float:
        """How much worse than the baseline (positive: worse; a non-finite metric: ``inf``)."""
        return evaluate_drop(value, self.baseline, math.inf, self.mode)[1]

    def rows(self) -> list[dict[str, Any]]:
        """One row per probe, as written to ``sensitivity.csv``."""
        out = []
        for u in self.units:
            for kind, probes, count in (("sparsity", self.sparsity, u.weights), ("bits", self.bits, u.qweights)):
                for setting, value in probes.get(u.name, {}).items():
                    out.append({"unit": u.name, "layers": ";".join(u.layers), "weights": count, "kind": kind,
                                "setting": setting, self.monitor: value, "drop": self.drop(value)})
        return out


@dataclass
class Suggestion:
    """A per-layer choice meeting a budget: the map for the callback, its weighted mean and summed drop."""

    kind: str
    choice: dict[str, float]
    map: dict[str, float]
    mean: float
    drop: float


def _pattern(names: Sequence[str]) -> str:
    escaped = [re.escape(n) for n in names]
    return f"^{escaped[0]}$" if len(escaped) == 1 else f"^(?:{'|'.join(escaped)})$"


def build_units(
    model: nn.Module,
    groups: Sequence[str] | None = None,
    prune_names: Sequence[str] | None = None,
    quant_names: Sequence[str] | None = None,
) -> list[Unit]:
    """The rows of a scan: one per layer holding a prunable or quantisable weight, or one per ``groups``
    regex (searched in module names, the first match wins; unmatched layers keep rows of their own). Layers
    sharing a weight (a head tied to the embedding) are one row, ``"tok_emb+head"``, whose weight counts once.

    ``prune_names``/``quant_names``: the parameters and layers the callbacks would select (default:
    their default selections, :func:`~lightning_compress.pruning.masks.select_parameters` and
    :func:`~lightning_compress.quantization.layer_selection.select_layers`).

    Raises:
        ValueError: a group regex is invalid or matches no layer (the message names the layers).
    """
    prune = list(select_parameters(model) if prune_names is None else prune_names)
    modules = dict(model.named_modules())
    quant = list(quant_names) if quant_names is not None else [n for n, _ in select_layers(model)]
    owner = {p: p.rpartition(".")[0] for p in prune}
    layers = [n for n in modules if n in quant or n in owner.values()]
    patterns = as_patterns(groups, "groups") or []
    group_of: dict[str, str] = {}
    for pattern in patterns:
        hits = [n for n in layers if re.search(pattern, n)]
        if not hits:
            raise ValueError(f"groups regex {pattern!r} matches none of the layers: {preview(layers)}")
        group_of.update({n: pattern for n in hits if n not in group_of})
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head keeps its name
    # layers sharing a weight (an embedding tied to the head) are one row: the weight is stored once, at one width
    first_holder: dict[int, str] = {}
    tie_named: set[str] = set()  # rows made by a tie alone, named after all their layers
    for name in layers:
        held = [params[p] for p in prune if owner[p] == name] + list(quantised_weights(modules[name]).values())
        tied = next((first_holder[id(w)] for w in held if id(w) in first_holder), name)
        for w in held:
            first_holder.setdefault(id(w), tied)
        if tied != name:  # one row for both: a group either is in (the first's), else a row of the tie
            key = group_of.get(tied) or group_of.get(name) or tied
            group_of[name] = group_of[tied] = key
            if key == tied:
                tie_named.add(key)
    units: dict[str, Unit] = {}
    for name in layers:
        unit = units.setdefault(group_of.get(name, name), Unit(group_of.get(name, name), []))
        unit.layers.append(name)
        unit.prune += [p for p in prune if owner[p] == name]
        if name in quant:
            unit.quant.append(name)
    for key in tie_named & set(units):
        units[key].name = "+".join(units[key].layers)
    for u in units.values():  # a shared weight counted once
        u.weights = sum({id(params[p]): params[p].numel() for p in u.prune}.values())
        u.qweights = sum({id(w): w.numel() for n in u.quant for w in quantised_weights(modules[n]).values()}.values())
    return list(units.values())


def _prune(weights: Mapping[str, Tensor], sparsity: float) -> None:
    """Magnitude pruning of each weight alone to ``sparsity`` (the scope of a ``{regex: sparsity}`` map)."""
    apply_masks(weights, unstructured_masks(Magnitude().element_scores(weights), dict.fromkeys(weights, sparsity), scope="layer"))


def _quantise(weights: Mapping[str, Tensor], bits: int, granularity: str | int, transposed: Collection[str] = ()) -> None:
    """Symmetric fake quantisation of each weight in place, on the grid ``QuantizeCallback`` trains on: per output
    channel, so a GPT-2 ``Conv1D`` weight (``transposed``: stored (in, out)) is quantised per column."""
    for n, w in weights.items():
        w.copy_(fake_quantize_weight(w.t(), int(bits), granularity).t() if n in transposed else fake_quantize_weight(w, int(bits), granularity))


@torch.no_grad()
def _probe(tensors: Mapping[str, Tensor], change: Callable[[], None], evaluate: Callable[[], float]) -> float:
    """``evaluate()`` after ``change()``, with ``tensors`` put back exactly afterwards."""
    saved = {n: t.detach().clone() for n, t in tensors.items()}
    try:
        change()
        return float(evaluate())
    finally:
        for n, t in tensors.items():
            t.copy_(saved[n])


def scan_sensitivity(
    model: nn.Module,
    evaluate: Callable[[], float],
    sparsities: Sequence[float] = (0.5, 0.7, 0.9),
    bits: Sequence[int] = (8, 4, 3, 2),
    groups: Sequence[str] | None = None,
    *,
    monitor: str = "metric",
    mode: str = "max",
    granularity: str | int = "per_channel",
    units: Sequence[Unit] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SensitivityTable:
    """Evaluate ``model`` after pruning, then quantising, each unit alone (no retraining).

    Pruning is magnitude-based within each weight (the layer scope of ``PruningCallback`` with a
    ``{regex: sparsity}`` map); quantisation is symmetric fake quantisation of the weights (inputs stay
    float) at ``granularity``. Every probe restores the weights it changed, bit for bit.

    Args:
        model: The module; ``evaluate`` measures it in place.
        evaluate: ``() -> metric`` (e.g. a validation run reading ``val_acc``).
        sparsities: Fractions in (0, 1).
        bits: Widths from 2 to 8.
        groups: Regexes grouping layers (see :func:`build_units`); ``units`` instead gives the rows.
        monitor, mode: The metric's name and direction (``"max"``: higher is better).
        progress: Called with a line per probe.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(16, 4)
        >>> ref = net(x).detach()
        >>> table = scan_sensitivity(net, lambda: -float((net(x) - ref).abs().mean()), [0.5], [2], mode="max")
        >>> [u.name for u in table.units], table.baseline
        (['0', '2'], -0.0)
        >>> torch.equal(net(x), ref) and all(table.drop(v) > 0 for v in table.sparsity["0"].values())
        True
    """
    check_settings(sparsities, bits)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {list(MODES)}")
    warn_if_direction_contradicts(monitor, "maximize" if mode == "max" else "minimize", f"mode={mode!r}")
    units = list(units) if units is not None else build_units(model, groups)
    params, modules = dict(model.named_parameters(remove_duplicate=False)), dict(model.named_modules())
    if bits:  # the quantisation probes' groups must fit every layer they quantise: said before any evaluation
        check_group_size([(n, modules[n]) for u in units for n in u.quant], granularity)
    with torch.no_grad():
        table = SensitivityTable(monitor, mode, float(evaluate()), units, {}, {})
    if not math.isfinite(table.baseline):  # every probe would read as infinitely worse, and any suggestion as equal
        raise ValueError(
            f"the unchanged model's {monitor} is {table.baseline}: the scan measures falls from it, so it must be finite "
            "(a diverged fit, or a metric undefined on this data)"
        )
    for u in units:
        weights = {p: params[p] for p in u.prune}
        qweights = {f"{n}.{p}": w for n in u.quant for p, w in quantised_weights(modules[n]).items()}
        transposed = frozenset(f"{n}.weight" for n in u.quant if is_conv1d(modules[n]))
        probes = [(table.sparsity, float(s), weights, partial(_prune, weights, s)) for s in sparsities if weights]
        probes += [(table.bits, int(b), qweights, partial(_quantise, qweights, b, granularity, transposed)) for b in bits if qweights]
        for measured, setting, tensors, change in probes:
            measured.setdefault(u.name, {})[setting] = value = _probe(tensors, change, evaluate)
            if progress:
                what = f"sparsity {setting:g}" if measured is table.sparsity else f"{setting} bits"
                progress(f"{u.name}: {what} -> {monitor} {value:.4f}")
    return table


def check_settings(sparsities: Sequence[float], bits: Sequence[int]) -> None:
    """Sparsities in (0, 1) and widths from :data:`~lightning_compress.quantization.options.WEIGHT_BITS`."""
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise ValueError(f"sparsity {s!r} is not in (0, 1); give fractions such as 0.5,0.7,0.9")
    for b in bits:
        if isinstance(b, bool) or b not in WEIGHT_BITS:
            raise ValueError(f"bits {b!r} is not a valid weight width; valid choices: {list(WEIGHT_BITS)}")


def check_budgets(sparsities: Sequence[float], bits: Sequence[int], budget_sparsity: float | None, budget_bits: float | None) -> None:
    """A budget must be reachable with the measured settings (every layer at the extreme)."""
    if budget_sparsity is not None:
        top = max(sparsities, default=0.0)
        if not 0.0 < budget_sparsity < 1.0 or budget_sparsity > top + 1e-12:
            raise ValueError(
                f"--budget-sparsity {budget_sparsity:g} cannot be met: it must be in (0, 1) and at most the largest "
                f"measured sparsity ({top:g}); add a higher level to --sparsities"
            )
    if budget_bits is not None:
        low = min(bits, default=math.inf)
        if not budget_bits >= low:
            raise ValueError(
                f"--budget-bits {budget_bits:g} cannot be met: the narrowest measured width is {low:g}; add a lower "
                f"one to --bits (valid widths: {list(WEIGHT_BITS)})"
            )


def _cheapest(options: Sequence[Sequence[tuple[float, float]]], need: float, total: float) -> list[int] | None:
    """One option per unit, ``(resource, cost)`` each, whose resources sum to at least ``need`` at the
    least summed cost; ``None`` when no choice reaches ``need``.

    A dynamic programme over the Pareto frontier of (resource, cost): partial choices with more
    resource and no more cost dominate; states within ``total / RESOLUTION`` of each other are merged.
    """
    states: list[tuple[float, float, Any]] = [(0.0, 0.0, None)]  # picks as a linked list (i, previous)
    for opts in options:
        merged: dict[tuple[int, bool], tuple[float, float, Any]] = {}
        for gain, cost, picks in states:
            for i, (g, c) in enumerate(opts):
                state = (gain + g, cost + c, (i, picks))
                key = (int(state[0] / max(total, 1e-12) * RESOLUTION), state[0] >= need)
                if key not in merged or (state[1], -state[0]) < (merged[key][1], -merged[key][0]):
                    merged[key] = state
        states, floor = [], math.inf
        for state in sorted(merged.values(), key=lambda s: (-s[0], s[1])):
            if state[1] < floor or not states:
                states.append(state)
                floor = min(floor, state[1])
    tolerance = 1e-9 * max(total, 1.0)
    feasible = [s for s in states if s[0] >= need - tolerance]
    if not feasible:  # merged away at the boundary: every unit at its largest resource, if that is enough
        best = [max(range(len(o)), key=lambda i, o=o: (o[i][0], -o[i][1])) for o in options]
        return best if sum(o[i][0] for o, i in zip(options, best)) >= need - tolerance else None
    out, node = [], min(feasible, key=lambda s: (s[1], -s[0]))[2]
    while node is not None:
        out.append(node[0])
        node = node[1]
    return out[::-1]


def _suggest(table: SensitivityTable, kind: str, budget: float) -> Suggestion:
    sparsity = kind == "sparsity"
    probes, top = (table.sparsity if sparsity else table.bits), max(WEIGHT_BITS)
    units = [u for u in table.units if u.name in probes]
    count = {u.name: u.weights if sparsity else u.qweights for u in units}
    total = sum(count.values())
    levels = [[0.0, *sorted(probes[u.name])] if sparsity else sorted(probes[u.name]) for u in units]
    # the resource: pruned weights, or bits saved below 8, summed over the weights
    options = [
        [(count[u.name] * (v if sparsity else top - v), table.drop(probes[u.name][v]) if v else 0.0) for v in lv]
        for u, lv in zip(units, levels)
    ]
    picks = _cheapest(options, total * (budget if sparsity else top - budget), total * (1 if sparsity else top))
    if picks is None:
        raise ValueError(f"{kind} budget {budget:g} cannot be met with the measured settings {sorted({v for lv in levels for v in lv if v})}")
    choice = {u.name: lv[i] for u, lv, i in zip(units, levels, picks)}
    mapping = {_pattern(u.prune if sparsity else u.quant): choice[u.name] for u in units if choice[u.name] or not sparsity}
    mean = sum(choice[n] * c for n, c in count.items()) / max(total, 1)
    return Suggestion(kind, choice, mapping, mean, sum(o[i][1] for o, i in zip(options, picks)))


def suggest_sparsity(table: SensitivityTable, budget: float) -> Suggestion:
    """Per-unit sparsities (0 or a measured level) whose weight-weighted mean is at least ``budget``,
    with the least summed drop; the ``target_sparsity`` map (exact parameter names; units left dense are
    not in it) for ``PruningCallback``.

    Raises:
        ValueError: the budget cannot be met with the measured levels.
    """
    return _suggest(table, "sparsity", budget)


def suggest_bits(table: SensitivityTable, budget: float) -> Suggestion:
    """Per-unit widths (measured ones) whose weight-weighted mean is at most ``budget``, with the least
    summed drop; the ``weight_bits`` map (exact layer names, every layer) for ``QuantizeCallback``.

    Raises:
        ValueError: the budget cannot be met with the measured widths.
    """
    return _suggest(table, "bits", budget)


# ---------------------------------------------------------------------------------------------- outputs
def _numbers(text: str, cast: Callable[[str], Any], what: str) -> list[Any]:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be comma-separated {'integers' if cast is int else 'numbers'}, got {text!r}") from err


def monitor_mode(monitor: str, mode: str | None) -> str:
    """``--mode``, or the one ``monitor``'s name tells (``min`` for a loss, ``max`` for an accuracy).

    Raises:
        ValueError: no mode given, and the name does not tell it.
    """
    if mode is not None:
        return mode
    direction = metric_direction(monitor)
    if direction is None:
        raise ValueError(f"--monitor {monitor!r}: its name does not tell whether higher is better; pass --mode max or --mode min")
    return "max" if direction == "maximize" else "min"


def _parser() -> argparse.ArgumentParser:
    from lightning_compress.cli import command_parser

    p = command_parser("lightning-compress sensitivity", __doc__)
    p.add_argument("--config", required=True, help="LightningCLI fit config of this project")
    p.add_argument("--ckpt_path", default=None, help="trained weights (default: fit the config first, without compression)")
    p.add_argument("--monitor", default="val_acc", help="logged validation metric")
    p.add_argument("--mode", default=None, choices=list(MODES),
                   help="max: higher is better (default: told by the monitor's name, e.g. max for val_acc, min for val_loss)")
    p.add_argument("--sparsities", default="0.5,0.7,0.9", help="comma-separated fractions in (0, 1)")
    p.add_argument("--bits", default="8,4,3,2", help=f"comma-separated widths from {list(WEIGHT_BITS)}")
    p.add_argument("--groups", nargs="+", default=None, help="regexes grouping layers (default: one row per layer)")
    p.add_argument("--budget-sparsity", type=float, default=None, help="weighted mean sparsity to reach")
    p.add_argument("--budget-bits", type=float, default=None, help="weighted mean weight bits not to exceed")
    p.add_argument("--out", default="runs/sensitivity", help="output folder")
    return p


def _selections(callbacks: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The selections of the config's pruning and quantisation callbacks, so that the suggested maps
    name what those callbacks select."""
    from lightning_compress.pruning.callback import PruningCallback
    from lightning_compress.quantization.callback import QuantizeCallback

    prune: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    structures = [cb.options.structure for cb in callbacks if isinstance(cb, PruningCallback) and cb.options.kind != "unstructured"]
    for cb in callbacks:
        if isinstance(cb, PruningCallback):
            prune = {"include": cb.options.include, "exclude": cb.options.exclude, "structure": structures[0] if structures else "unstructured"}
        elif isinstance(cb, QuantizeCallback):
            quant = {k: getattr(cb.options, k) for k in ("include", "exclude", "quantize_teacher", "granularity")}
    return prune, quant


def check_structure(structure: str, sparsities: Sequence[float]) -> None:
    """The pruning probes are unstructured (single weights): refused beside a config that prunes whole channels, heads,
    neurons or N:M groups, whose drops they would not measure and whose callback could not follow their map.

    Example:
        >>> check_structure("unstructured", [0.5]), check_structure("channel", [])
        (None, None)
        >>> check_structure("channel", [0.5])
        Traceback (most recent call last):
        ...
        ValueError: sensitivity probes unstructured magnitude pruning (single weights, one layer at a time), but the config's PruningCallback has structure='channel': the drops would not be that callback's (removing 90% of a layer's neurons costs far more than zeroing 90% of its smallest weights), and its suggested target_sparsity map could name weights the callback never prunes. Pass --sparsities '' to scan weight bits only, or scan a config whose PruningCallback is unstructured
    """
    if structure != "unstructured" and sparsities:
        raise ValueError(
            "sensitivity probes unstructured magnitude pruning (single weights, one layer at a time), but the config's "
            f"PruningCallback has structure={structure!r}: the drops would not be that callback's (removing 90% of a "
            "layer's neurons costs far more than zeroing 90% of its smallest weights), and its suggested target_sparsity "
            "map could name weights the callback never prunes. Pass --sparsities '' to scan weight bits only, or scan a "
            "config whose PruningCallback is unstructured"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``lightning-compress sensitivity``; returns ``{"table", "suggestions", "paths"}``.

    Raises:
        ValueError: bad settings, an unreachable budget, a group that matches nothing or a monitor that is
            not logged, all before any training; a monitor that is not finite on the trained model.
    """
    from lightning.pytorch.callbacks import ProgressBar

    from lightning_compress._files import load_checkpoint
    from lightning_compress.cli import cli_main, settings_checked
    from lightning_compress.plugin import CompressionCallback
    from lightning_compress.report import CompressionReport

    args, overrides = _parser().parse_known_args(list(argv) if argv is not None else None)
    with settings_checked():
        sparsities = _numbers(args.sparsities, float, "--sparsities")
        widths = _numbers(args.bits, int, "--bits")
        check_settings(sparsities, widths)
        check_budgets(sparsities, widths, args.budget_sparsity, args.budget_bits)
        mode = monitor_mode(args.monitor, args.mode)
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"no config at {args.config!r}")
        if args.ckpt_path and not Path(args.ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {args.ckpt_path!r}: no checkpoint there")
    cli = cli_main(["--config", args.config, *overrides], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    with settings_checked():
        check_one_device(trainer, "sensitivity")  # the fit and the probes run in this process, before anything trains
    model.trainer = trainer  # the hook may read self.trainer, as it does when the Trainer calls it
    model.configure_model()  # layers a module builds there are scanned too (Lightning asks the hook to be idempotent)
    if args.ckpt_path:  # first: a checkpoint written after channel removal holds smaller layers, which the units follow
        state = load_checkpoint(args.ckpt_path)["state_dict"]
        resize_to_state_dict(model, state)
        model.load_state_dict(state)
    with settings_checked():
        prune_sel, quant_sel = _selections(trainer.callbacks)
        check_structure(prune_sel.pop("structure", "unstructured"), sparsities)
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (CompressionCallback, CompressionReport))]
        granularity = quant_sel.pop("granularity", "per_channel")
        quant_layers = select_layers(model, **quant_sel)
        if widths:  # the callback's group size must fit the layers it quantises: said before the fit, not after it
            check_group_size(quant_layers, granularity)
        units = build_units(model, args.groups, select_parameters(model, **prune_sel), [n for n, _ in quant_layers])

    def evaluate() -> float:
        trainer.validate(model, datamodule=data, verbose=False)
        return read_monitor(trainer, args.monitor, "sensitivity --monitor")

    with random_state_kept():  # checked before training, without moving the seeded draws the fit would make
        trainer.validate(model, datamodule=data, verbose=False)
    with settings_checked():
        read_monitor(trainer, args.monitor, "sensitivity --monitor")
    if not args.ckpt_path:
        trainer.fit(model, datamodule=data)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ProgressBar)]
    start = time.perf_counter()
    table = scan_sensitivity(model, evaluate, sparsities, widths, monitor=args.monitor, mode=mode,
                             granularity=granularity, units=units, progress=print)
    suggestions = []
    if args.budget_sparsity is not None:
        suggestions.append(suggest_sparsity(table, args.budget_sparsity))
    if args.budget_bits is not None:
        suggestions.append(suggest_bits(table, args.budget_bits))
    from lightning_compress.tuning.sensitivity_files import markdown, write_outputs

    paths = write_outputs(table, suggestions, args.out)
    print(markdown(table, suggestions))
    print(f"{len(table.rows())} probes in {time.perf_counter() - start:.1f} s; written: {', '.join(str(p) for p in paths.values())}")
    return {"table": table, "suggestions": suggestions, "paths": paths}
