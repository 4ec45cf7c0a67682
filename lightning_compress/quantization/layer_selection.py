"""Which layers quantisation takes, swapping them in, and what stays in float.

:func:`select_layers` chooses the layers to fake-quantise (the shared weight selection of
:mod:`lightning_compress.selection`, then the checks: supported kinds, tied weights, attention's
``out_proj``); :func:`skipped_layers` names those the default selection leaves in float, and why.
:func:`prepare_fake_quant` runs that selection and swaps the chosen layers to the fake-quant classes
of :mod:`~lightning_compress.quantization.layers` (it lives here, not there, so that the layer
classes do not depend on the selection), then warns, in one message, about every layer left in
float: the skipped ones and the modules whose kind of weight quantisation does not take
(:func:`float_weight_holders`). :func:`quantised_fraction` is the share of the model's weights that
the fake-quant layers cover.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.nn.utils import parametrize

from lightning_compress.module_copy import hook_computed_weights
from lightning_compress.selection import is_conv1d, preview, select_weights, weights_by_module
from lightning_compress.quantization.layers import (
    _QAT_TYPES,
    SUPPORTED_TYPES,
    QuantSettings,
    Quantizer,
    _qat_class,
    is_supported_type,
    _weight_leaves,
    disable_fast_paths,
    quantised_weights,
)

__all__ = [
    "check_group_size",
    "check_tied_bits",
    "float_weight_holders",
    "prepare_fake_quant",
    "quantised_fraction",
    "select_layers",
    "skipped_layers",
]


def _supported() -> str:
    """What quantisation takes, for messages."""
    return (
        f"the weights of {[t.__name__ for t in SUPPORTED_TYPES]}, of GPT-2 style Conv1D and of their subclasses "
        "that do not override forward, unless a parametrisation computes them (weight_norm, spectral_norm: remove it "
        "first, torch.nn.utils.parametrize.remove_parametrizations)"
    )


def _quantisable_weight(module: nn.Module, leaf: str) -> bool:
    return leaf in _weight_leaves(module)


def _cannot(pname: str, module: nn.Module, name: str, why: str) -> ValueError:
    return ValueError(
        f"cannot quantise {pname!r} ({type(module).__name__}): {why}; add a pattern matching it to exclude, "
        f"e.g. exclude=[{re.escape(name)!r}]"
    )


def _weight_holders(root: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [names of the layers holding it as a quantisable weight]}``."""
    holders: dict[int, list[str]] = {}
    for name, module in root.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if leaf in _weight_leaves(module):
                holders.setdefault(id(p), []).append(name)
    return holders


def _check_ties(root: nn.Module, chosen: dict[str, nn.Module]) -> dict[int, list[str]]:
    """Tied weights (one ``Parameter`` held by several layers, as an LM head and its embedding):
    ``{id(parameter): [layer names]}`` for those among ``chosen``, after checking that every layer
    holding one is chosen and that they can share one stored table (Linear without bias, Embedding)."""
    ties: dict[int, list[str]] = {}
    for name, group, left_out, bad in _tied_groups(root, chosen):
        if left_out:
            raise ValueError(
                f"the weight of {name!r} is the same Parameter as that of {left_out}: quantise all of "
                f"{group} (the weight is then stored once) or exclude all of them, e.g. exclude={[re.escape(n) for n in group]!r}"
            )
        if bad:
            raise ValueError(
                f"the layers {group} share one weight Parameter, which is quantised once and stored once only for "
                f"Linear layers without bias and Embeddings; {bad!r} is not one: exclude all of them, e.g. "
                f"exclude={[re.escape(n) for n in group]!r}"
            )
        ties[id(chosen[name].weight)] = group
    return ties


def _tied_groups(root: nn.Module, chosen: dict[str, nn.Module]) -> Iterator[tuple[str, list[str], list[str], str | None]]:
    """For each chosen layer whose weight other layers hold too: its name, the layers holding the weight, those of
    them not chosen, and (when all are) the first that cannot be stored once with the others (:func:`_untieable`)."""
    holders = _weight_holders(root)
    for name, module in chosen.items():
        group = [] if isinstance(module, nn.MultiheadAttention) else holders[id(module.weight)]
        if len(group) > 1:
            left_out = [n for n in group if n not in chosen]
            yield name, group, left_out, None if left_out else _untieable(group, chosen)


def _untieable(group: list[str], modules: dict[str, nn.Module]) -> str | None:
    """The first layer of a tied ``group`` whose weight cannot be stored once with the others' (not a Linear
    without bias or an Embedding: a masked-LM decoder tied to the embedding has a bias), else ``None``."""
    return next(
        (n for n in group if not isinstance(modules[n], (nn.Linear, nn.Embedding)) or getattr(modules[n], "bias", None) is not None),
        None,
    )


def _untieable_groups(root: nn.Module, chosen: dict[str, nn.Module]) -> dict[str, str]:
    """``{layer: why}`` of the chosen layers that share their weight with a layer it cannot be stored once with
    (:func:`_untieable`): the default selection leaves the whole group in float."""
    out = {}
    for name, _, _, bad in _tied_groups(root, chosen):
        if bad is not None:
            what = "has a bias" if isinstance(chosen[bad], nn.Linear) else f"is a {type(chosen[bad]).__name__}"
            out[name] = (
                f"tied weights (one Parameter) are stored once only for Linear layers without bias and Embeddings, and "
                f"{bad!r} {what}"
            )
    return out


def check_tied_bits(root: nn.Module, chosen: dict[str, nn.Module], bits: dict[str, int]) -> None:
    """Refuse per-layer ``bits`` that give layers holding one tied weight different widths: the weight is stored
    once, at one width (a tied embedding and LM head would otherwise be stored twice, untied)."""
    for group in _check_ties(root, chosen).values():
        widths = {n: bits[n] for n in group if n in bits}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"the layers {group} share one weight Parameter, stored once at one width, but the weight_bits map gives "
                f"them {widths}; give them one width, e.g. a pattern for all of them first: "
                f"{{{'|'.join(re.escape(n) for n in group)!r}: {max(widths.values())}, ...}}"
            )


def select_layers(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to quantise, or a ``ValueError`` naming what cannot be.

    The weights are chosen by :func:`lightning_compress.selection.select_weights` (the rule pruning
    uses too): by default every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` weight and every
    ``nn.MultiheadAttention`` projection weight (``in_proj_weight``, or ``q/k/v_proj_weight``) outside a
    ``teacher``; ``include``/``exclude`` are regexes on module names, and each must match something.
    ``quantize_teacher=True`` adds the teacher's layers to the default. Subclasses of the supported
    types with their own ``forward`` (OPT's positional embedding, Gemma 3's scaled embedding) cannot be
    swapped safely: the default selection leaves them in float (:func:`prepare_fake_quant` warns,
    :func:`skipped_layers` says which and why), and a layer named by ``include`` raises, with a hint
    to exclude it. An attention module's ``out_proj`` is computed by the attention module, so it is
    quantised only with it; one weight ``Parameter`` shared by several layers (tied weights) is
    quantised in all of them or in none.

    Raises:
        ValueError: a pattern matches nothing, a chosen layer cannot be quantised, or nothing is left.
    """
    return _selection(root, include, exclude, quantize_teacher)[0]


def skipped_layers(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
) -> dict[str, str]:
    """``{layer name: why}`` of the layers the default selection finds but leaves in float, because they
    cannot be fake-quantised faithfully (empty when ``include`` is given: those raise instead).

    Example:
        >>> class Scaled(nn.Embedding):  # an embedding that computes more than a lookup
        ...     def forward(self, ids):
        ...         return super().forward(ids) * 2.0
        >>> net = nn.Sequential(Scaled(10, 4), nn.Linear(4, 2))
        >>> [name for name, _ in select_layers(net)], skipped_layers(net)
        (['1'], {'0': 'Scaled: a subclass of Embedding with its own forward, which fake quantisation would replace'})
    """
    return _selection(root, include, exclude, quantize_teacher)[1]


def _own_forward(module: nn.Module) -> str:
    base = next((b for b in SUPPORTED_TYPES if isinstance(module, b)), type(module))
    return f"{type(module).__name__}: a subclass of {base.__name__} with its own forward, which fake quantisation would replace"


def _selection(
    root: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None, quantize_teacher: bool
) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """:func:`select_layers` and :func:`skipped_layers` in one pass: the chosen layers, and ``{name: why}``
    of those the default selection leaves in float (with ``include`` given, those raise)."""
    by_default = include is None
    if quantize_teacher and include is None:
        include = [".*", "teacher"]
    names = select_weights(root, include, exclude, _quantisable_weight, "quantise", only_kind=_supported())
    modules = dict(root.named_modules())
    picked: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for pname in names:
        name, _, leaf = pname.rpartition(".")
        module = modules[name]
        unsupported = leaf not in _weight_leaves(module) or _qat_class(type(module)) is None
        if unsupported and by_default:  # the default takes supported kinds only: a subclass with its own forward
            skipped[name] = _own_forward(module)
            continue
        if leaf not in _weight_leaves(module):  # named in full by include: a parameter of a type we do not take
            raise ValueError(
                f"cannot quantise {pname!r} ({type(module).__name__}): quantisation takes {_supported()}; "
                "drop the include pattern that names it"
            )
        if unsupported:
            raise _cannot(
                pname, module, name,
                f"supported are the weights of {[t.__name__ for t in SUPPORTED_TYPES]} and of their subclasses that do "
                "not override forward (a subclass with its own forward would lose it)",
            )
        picked.setdefault(name, []).append(leaf)
    if skipped:
        holders = _weight_holders(root)
        for name in list(picked):
            why = _goes_with_skipped(name, modules, holders, skipped)
            if why is not None:
                skipped[name] = why
                del picked[name]
        if not picked:
            raise _nothing_left(root, skipped)
    for name, leaves in picked.items():
        module = modules[name]
        parent_name, _, child = name.rpartition(".")
        if len(leaves) < len(_weight_leaves(module)):
            rest = [leaf for leaf in _weight_leaves(module) if leaf not in leaves]
            raise _cannot(f"{name}.{rest[0]}", module, name, f"its projection weights {_weight_leaves(module)} are quantised together")
        if child == "out_proj" and isinstance(modules.get(parent_name), nn.MultiheadAttention) and parent_name not in picked:
            raise _cannot(
                f"{name}.weight", module, name,
                f"the attention module {parent_name!r} computes it with its own functional op, so it is "
                "quantised only together with that module's projection weights",
            )
    chosen = {name: modules[name] for name in picked}
    if by_default:  # a tied group stored once is not possible for every layout: the group stays in float
        untied = _untieable_groups(root, chosen)
        skipped.update(untied)
        chosen = {name: module for name, module in chosen.items() if name not in untied}
        if not chosen:
            raise _nothing_left(root, skipped)
    _check_ties(root, chosen)
    return list(chosen.items()), skipped


def _goes_with_skipped(name: str, modules: dict[str, nn.Module], holders: dict[int, list[str]], skipped: dict[str, str]) -> str | None:
    """Why layer ``name`` stays in float with a ``skipped`` one (its weight is tied to it, or it is the
    ``out_proj`` of a skipped attention module), or ``None``."""
    module = modules[name]
    parent, _, child = name.rpartition(".")
    if not isinstance(module, nn.MultiheadAttention):
        tied_to = [n for n in holders[id(module.weight)] if n in skipped]
        if tied_to:
            return f"its weight is the same Parameter as that of {tied_to[0]!r}, which stays in float"
    if child == "out_proj" and parent in skipped and isinstance(modules[parent], nn.MultiheadAttention):
        return f"the attention module {parent!r} that computes it stays in float"
    return None


def _nothing_left(root: nn.Module, skipped: dict[str, str]) -> ValueError:
    return ValueError(
        f"no layer of {type(root).__name__} can be fake-quantised: {_describe_skipped(skipped)}; it has no "
        f"other weight to quantise (quantisation takes {_supported()})"
    )


def _describe_skipped(skipped: dict[str, str]) -> str:
    """The skipped layers grouped by reason: ``why: [names]`` for each reason."""
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{why}: {preview(names)}" for why, names in by_reason.items())


def check_group_size(layers: Iterable[tuple[str, nn.Module]], granularity: str | int) -> None:
    """An integer ``granularity`` (weights per quantisation group) must divide every output channel's weights.

    Raises:
        ValueError: naming the first layer and weight it does not divide, and the ways out.
    """
    if not isinstance(granularity, int):
        return
    for name, module in layers:
        for pname, w in quantised_weights(module).items():
            per_row = w.shape[0] if is_conv1d(module) else w[0].numel()  # Conv1D: (in, out)
            if per_row % granularity:
                raise ValueError(
                    f"group size {granularity} does not divide the {per_row} weights per output "
                    f"channel of {pname!r} in layer {name!r}; choose a divisor, 'per_channel', or exclude the layer"
                )


def prepare_fake_quant(
    root: nn.Module,
    settings: QuantSettings,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    quantize_teacher: bool = False,
    notes: list[str] | None = None,
) -> dict[str, nn.Module]:
    """Swap the selected layers to their QAT classes in place; return ``{name: layer}``.

    All checks run before the first layer changes. Already prepared layers are kept as they are when they
    were prepared with these settings; otherwise it is an error (strip them first). Layers
    the default selection leaves in float (:func:`skipped_layers`) and modules whose weights quantisation
    does not take (:func:`float_weight_holders`: an ``nn.LSTM``, a ``weight_norm`` layer ..., with their
    share of the model's weights) are named in one warning, or appended to ``notes`` when it is given (a callback
    keeps them for its summary).
    Weight-only (no input quantisation): embeddings, attention modules and their ``out_proj``, and
    layers whose weight is tied to another's (stored once after conversion, shared by all of them).
    Transformer encoder layers holding a chosen layer take their general path from then on (see
    :func:`disable_fast_paths`).
    """
    chosen, skipped = _selection(root, include, exclude, quantize_teacher)
    check_group_size(chosen, settings.granularity)
    tied = {n for group in _check_ties(root, dict(chosen)).values() for n in group}
    modules = dict(root.named_modules())

    def weight_only(name: str, module: nn.Module) -> bool:
        in_attention = isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention)
        return isinstance(module, (nn.Embedding, nn.MultiheadAttention)) or in_attention or name in tied

    _check_prepared_alike(root, chosen, settings, weight_only)
    out: dict[str, nn.Module] = {}
    for name, module in chosen:
        if type(module) not in _QAT_TYPES:
            module.__class__ = _qat_class(type(module))
            module.add_module("quantizer", Quantizer(settings, weight_only=weight_only(name, module)))
            module.quantizer.to(next(iter(quantised_weights(module).values())).device)
        out[name] = module
    disable_fast_paths(root, out.values())
    said = []
    if skipped:
        said.append(
            f"{len(skipped)} layers of the default selection stay in float, as they cannot be fake-quantised faithfully. "
            f"{_describe_skipped(skipped)}. To quantise the others without this note, exclude them "
            f"(e.g. exclude={[re.escape(n) for n in list(skipped)[:2]]!r}); naming one in include is an error."
        )
    other_types = float_weight_holders(root, out, quantize_teacher)
    if other_types:
        said.append(_float_types_note(root, other_types, quantize_teacher))
    if said and notes is not None:
        notes.append(" ".join(said))
    elif said:
        rank_zero_warn(" ".join(said))
    return out


def _check_prepared_alike(
    root: nn.Module,
    chosen: Sequence[tuple[str, nn.Module]],
    settings: QuantSettings,
    weight_only: Callable[[str, nn.Module], bool],
) -> None:
    """Refuse to keep chosen layers that an earlier preparation (another ``QuantizeCallback``, an earlier fit) made
    with other settings: they were kept as they were, so a second callback asking for weight-only 4-bit trained and
    converted int8 inputs. (Layers prepared earlier outside ``chosen``, another region's, are left to the caller.)"""
    said = []
    for name, module in chosen:
        q = module.quantizer if type(module) in _QAT_TYPES else None
        if q is None:
            continue
        wanted = {"activation_bits": None if weight_only(name, module) else settings.activation_bits,
                  "granularity": settings.granularity, "rounding": settings.rounding}  # fmt: skip
        said += [f"{name} has {k}={getattr(q, k)!r} (asked {v!r})" for k, v in wanted.items() if getattr(q, k) != v]
    if said:
        raise ValueError(
            f"the model's layers were fake-quantised earlier with other settings: {'; '.join(said[:4])}"
            f"{f' (and {len(said) - 4} more)' if len(said) > 4 else ''}. To quantise it "
            "with these settings, strip the earlier ones first (lightning_compress.quantization.strip_fake_quant(model)); "
            "to go on with them, give the same settings"
        )


def float_weight_holders(
    root: nn.Module, layers: Iterable[str], quantize_teacher: bool = False
) -> dict[str, tuple[str, int]]:
    """``{module name: (type name, number of weights)}`` of the modules outside ``layers`` (the quantised
    layers' names) that hold weights of their own (parameters of 2+ dimensions, see
    :func:`~lightning_compress.selection.weights_by_module`) of a kind quantisation does not take: a
    module of another type (``nn.LSTM``, ``nn.ConvTranspose2d``, a custom layer's ``nn.Parameter``), or
    a parametrised weight (``weight_norm``). They stay in float. Layers of supported types left out by
    ``include``/``exclude`` or :func:`skipped_layers` are not listed.

    Example:
        >>> net = nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 2))
        >>> float_weight_holders(net, ["1"])
        {'0': ('LSTM', 384)}
    """
    modules = dict(root.named_modules())
    chosen = set(layers)
    taken = {id(w) for n in chosen for w in quantised_weights(modules[n]).values()}
    out: dict[str, tuple[str, int]] = {}
    for name, weights in weights_by_module(root, teacher=quantize_teacher).items():
        module = modules[name]
        computed = parametrize.is_parametrized(module) or hook_computed_weights(module)
        supported = is_supported_type(module) and not computed
        count = sum(w.numel() for w in weights.values() if id(w) not in taken)
        if name not in chosen and not supported and count:
            out[name] = (type(module).__name__, count)
    return out


def quantised_fraction(root: nn.Module, layers: Iterable[nn.Module], quantize_teacher: bool = False) -> float:
    """The share of ``root``'s weights (parameters of 2+ dimensions, each counted once, outside a teacher
    unless ``quantize_teacher``) that the fake-quant ``layers`` quantise: weights left in float, of
    supported layers or of other types (:func:`float_weight_holders`), count against it.

    Example:
        >>> net = nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 2))  # 384 LSTM weights, 16 Linear ones
        >>> quantised_fraction(net, [net[1]])
        0.04
    """
    taken = {id(w) for layer in layers for w in quantised_weights(layer).values()}
    weights = _all_weights(root, quantize_teacher)
    total = sum(w.numel() for w in weights)
    return sum(w.numel() for w in weights if id(w) in taken) / total if total else 0.0


def _all_weights(root: nn.Module, quantize_teacher: bool) -> list[nn.Parameter]:
    """Every weight the shares count: parameters of 2+ dimensions, once each, outside a teacher unless asked."""
    return [w for ws in weights_by_module(root, teacher=quantize_teacher).values() for w in ws.values()]


def _float_types_note(root: nn.Module, holders: dict[str, tuple[str, int]], quantize_teacher: bool) -> str:
    share = sum(n for _, n in holders.values()) / max(1, sum(w.numel() for w in _all_weights(root, quantize_teacher)))
    listed = ", ".join(f"{name!r} ({kind}, {n} weights)" for name, (kind, n) in list(holders.items())[:8])
    more = f", ... ({len(holders)} in all)" if len(holders) > 8 else ""
    parametrised = [n for n in holders if parametrize.is_parametrized(root.get_submodule(n))]
    hooked = [n for n in holders if hook_computed_weights(root.get_submodule(n))]
    hint = (
        f" A parametrised weight (weight_norm, spectral_norm: {parametrised[:2]!r}) is quantised once its parametrisation "
        "is removed (torch.nn.utils.parametrize.remove_parametrizations)."
        if parametrised else ""
    ) + (
        f" A weight the older hook-based torch.nn.utils.weight_norm/spectral_norm recomputes ({hooked[:2]!r}) is quantised "
        "once the hook is removed (torch.nn.utils.remove_weight_norm, remove_spectral_norm)."
        if hooked else ""
    )
    return (
        f"{len(holders)} modules holding {share:.1%} of the model's weights stay in float, as quantisation does not take "
        f"their kind of weight: {listed}{more}. Quantisation takes {_supported()}.{hint}"
    )
