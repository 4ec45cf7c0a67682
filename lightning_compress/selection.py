"""One rule for which weights a plugin acts on: ``include``, ``exclude`` and the protected teacher.

Pruning and quantisation both call :func:`select_weights`, so a pattern means the same thing in
both, at any depth, and a pattern that matches nothing is an error in both.

The rule:

- **By default** a plugin takes the weights its ``kind`` predicate accepts (``nn.Linear``/``Conv``
  weights, say), except anything under an attribute called ``teacher`` at any depth (a distillation
  teacher) and anything under a module flagged training-only (:data:`TRAINING_ONLY_FLAG`: a
  distillation module's feature projections, which the trained model does not keep).
- **include** patterns are regular expressions searched (``re.search``) in *module* names; a
  matching module's weights of the plugin's kind are taken. A teacher's weights are taken only when
  the pattern itself says ``teacher``. Any other parameter (a bias, a norm or embedding weight) is
  taken only when a pattern matches its full *parameter* name (``re.fullmatch``) and spells out its
  kind (``weight``/``bias``...), e.g. ``"model\\.emb\\.weight"``, so ``".*"`` never drags them in.
- **exclude** patterns are searched in module and parameter names; their matches are dropped.
- Every pattern must match something, and something must be left.

A plugin that takes nothing but its kind (quantisation: a parameter named in full still has to be a
weight of a layer type it supports) says so with ``only_kind``, and its errors then point to what it
takes rather than to full parameter names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress._validation import as_patterns

__all__ = [
    "PROTECTED_ATTRIBUTES", "TRAINING_ONLY_FLAG", "check_teacher_cache", "is_conv1d", "is_protected", "preview", "select_weights",
    "shared_with_protected", "training_only_modules", "weights_by_module",
]

#: Attribute names whose subtree no plugin touches unless a pattern names it.
PROTECTED_ATTRIBUTES = ("teacher",)

#: An attribute a module sets to ``True`` to be left alone as a teacher is: a part only training uses.
TRAINING_ONLY_FLAG = "compression_training_only"

#: ``(module, parameter leaf name) -> bool``: whether a plugin takes this parameter by default.
WeightKind = Callable[[nn.Module, str], bool]


def is_conv1d(module: nn.Module) -> bool:
    """A GPT-2 style ``Conv1D`` (weight ``(in, out)``, ``forward = x @ weight + bias``), by duck typing:
    a class named ``Conv1D`` (or made from one: its fake-quant form), an ``nf`` attribute and a 2-D
    ``weight`` (``transformers`` is not imported). Pruning and quantisation both take its weight."""
    weight = getattr(module, "weight", None)
    named = any(c.__name__ == "Conv1D" for c in type(module).__mro__) and not isinstance(module, nn.modules.conv._ConvNd)
    return named and hasattr(module, "nf") and isinstance(weight, Tensor) and weight.dim() == 2


def training_only_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules of ``model`` flagged training-only (:data:`TRAINING_ONLY_FLAG`)."""
    return tuple(name for name, m in model.named_modules() if name and getattr(m, TRAINING_ONLY_FLAG, False) is True)


def shared_with_protected(model: nn.Module, training_only: Sequence[str] = ()) -> list[str]:
    """Names (as ``named_parameters`` lists them) of the parameters outside the protected modules that a protected
    module holds too: a frozen head a student shares with its teacher (``student.lm_head = teacher.lm_head``, or the
    weight alone) comes first under the student's name, and pruning or quantising it there would change the teacher.

    Example:
        >>> head = nn.Linear(2, 2)
        >>> pair = nn.ModuleDict({"student": nn.Sequential(nn.Linear(2, 2), head), "teacher": nn.Sequential(head)})
        >>> shared_with_protected(pair)
        ['student.1.weight', 'student.1.bias']
    """
    held = _protected_tensors(model, training_only)
    return [n for n, p in model.named_parameters() if id(p) in held and not is_protected(n.rpartition(".")[0], training_only)]


def _protected_tensors(model: nn.Module, training_only: Sequence[str]) -> set[int]:
    """The ids of the parameters a protected module holds (under any of their names)."""
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False) if is_protected(n.rpartition(".")[0], training_only)}


def check_teacher_cache(model: nn.Module, weights: Mapping[str, Tensor], who: str) -> None:
    """Refuse to change a teacher whose training outputs the module caches (``DistillationModule(
    cache_teacher_outputs=True)`` serves each sample's first outputs in every later epoch: those of the teacher
    before the change). ``weights``: ``{name: tensor}`` that ``who`` changes; a tensor the teacher holds counts
    under any name (a head the student shares with it).

    Raises:
        ValueError: naming the teacher's weights and the two ways out.
    """
    if not getattr(model, "cache_teacher_outputs", False):
        return
    held = _protected_tensors(model, ())
    teacher = [n for n, w in weights.items() if id(w) in held or is_protected(n.rpartition(".")[0])]
    if teacher:
        raise ValueError(
            f"{who} changes the teacher's {preview(teacher)}, but cache_teacher_outputs=True serves each sample's "
            "first teacher outputs in every later epoch: they would stay those of the unchanged teacher (and, under "
            "DDP, only the ranks that miss the cache would run it). Set cache_teacher_outputs=False, or leave the "
            "teacher alone"
        )


def is_protected(module_name: str, training_only: Sequence[str] = ()) -> bool:
    """Whether ``module_name`` is, or is inside, a protected attribute (``teacher`` at any depth) or one of the
    ``training_only`` modules (:func:`training_only_modules`).

    >>> is_protected("teacher.fc"), is_protected("model.teacher"), is_protected("model.teachers")
    (True, True, False)
    >>> is_protected("projections.a", ("projections",)), is_protected("projections_b", ("projections",))
    (True, False)
    """
    if any(part in PROTECTED_ATTRIBUTES for part in module_name.split(".")):
        return True
    return any(module_name == name or module_name.startswith(f"{name}.") for name in training_only)


def trained_children(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (trainable parameters, parameters)}`` of ``module``'s direct children that hold parameters and are not
    protected (a teacher, the training-only modules): the candidates for the network a module's steps train.

    >>> pair = nn.Module()
    >>> pair.student, pair.teacher, pair.act = nn.Linear(2, 2), nn.Linear(8, 8), nn.ReLU()
    >>> trained_children(pair)
    {'student': (6, 6)}
    """
    training_only = training_only_modules(module)
    sizes = {
        name: (sum(p.numel() for p in child.parameters() if p.requires_grad), sum(p.numel() for p in child.parameters()))
        for name, child in module.named_children()
        if not is_protected(name, training_only)
    }
    return {name: n for name, n in sizes.items() if n[1]}


def preview(names: Sequence[str], k: int = 8) -> str:
    """A short list of names for error messages: the first ``k`` and the count."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:k])
    return f"[{shown}{', ...' if len(names) > k else ''}] ({len(names)} in all)"


def weights_by_module(model: nn.Module, teacher: bool = False) -> dict[str, dict[str, Tensor]]:
    """``{module name: {parameter name: tensor}}`` of the weights each module holds itself: parameters
    of two or more dimensions (matrices, kernels, tables), each ``Parameter`` once (under its first
    holder), outside a ``teacher`` unless ``teacher``. The tensors behind a parametrised weight
    (``weight_norm``'s ``parametrizations.weight.original0/1``) count as the parametrised module's.

    Example:
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> net = nn.Sequential(nn.LSTM(2, 3), weight_norm(nn.Linear(3, 4)), nn.LayerNorm(4))
        >>> {m: sorted(ws) for m, ws in weights_by_module(net).items()}
        {'0': ['0.weight_hh_l0', '0.weight_ih_l0'], '1': ['1.parametrizations.weight.original0', '1.parametrizations.weight.original1']}
    """
    inside_parametrisations = {
        id(m) for module in model.modules() if parametrize.is_parametrized(module) for m in module.parametrizations.modules()
    }
    seen: set[int] = set()
    out: dict[str, dict[str, Tensor]] = {}
    training_only = training_only_modules(model)
    if not teacher:  # a tensor the teacher holds too is the teacher's
        seen = _protected_tensors(model, training_only)
    for mod_name, module in model.named_modules():
        if id(module) in inside_parametrisations or (is_protected(mod_name, training_only) and not teacher):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        own = module.named_parameters(recurse=False)
        if parametrize.is_parametrized(module):
            own = (*own, *((f"parametrizations.{n}", p) for n, p in module.parametrizations.named_parameters()))
        for leaf, p in own:
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                out.setdefault(mod_name, {})[prefix + leaf] = p
    return out


def _names_protected(pattern: str, training_only: Sequence[str] = ()) -> bool:
    return any(word in pattern for word in (*PROTECTED_ATTRIBUTES, *training_only))


def _explicit(pattern: str, name: str, module_name: str, training_only: Sequence[str] = ()) -> bool:
    """Whether ``pattern`` asks for a non-default parameter by its full name, spelling out its kind: its leaf name,
    or the ``weight``/``bias`` that name starts with (``lstm\\.weight_.*`` takes an LSTM's ``weight_ih_l0``...)."""
    leaf = name.rsplit(".", 1)[-1]
    kind = next((k for k in ("weight", "bias") if leaf.startswith(k)), leaf)
    if not re.fullmatch(pattern, name) or (leaf not in pattern and kind not in pattern):
        return False
    return not is_protected(module_name, training_only) or _names_protected(pattern, training_only)


def select_weights(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    kind: WeightKind,
    what: str,
    only_kind: str | None = None,
) -> list[str]:
    """Names of the parameters a plugin acts on, in ``named_parameters`` order (see the module doc).

    Args:
        model: The module; names are relative to it.
        include: Regexes (module names, or full parameter names for non-default parameters).
        exclude: Regexes searched in module and parameter names.
        kind: Which parameters the plugin takes by default (and by module-name ``include``).
        what: The plugin's verb for messages (``"prune"``, ``"quantise"``).
        only_kind: For a plugin that acts on ``kind`` parameters only, what they are (for messages, e.g.
            ``"the weights of Linear and Conv layers"``); ``None``: other parameters named in full are taken.

    Raises:
        ValueError: a pattern matches nothing it could act on, or nothing is left.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> linear = lambda module, leaf: isinstance(module, nn.Linear) and leaf == "weight"
        >>> select_weights(net, None, None, linear, "prune")
        ['0.weight', '2.weight']
        >>> select_weights(net, None, [r"^2$"], linear, "prune")
        ['0.weight']
        >>> select_weights(net, None, ["nothing"], linear, "prune")
        Traceback (most recent call last):
        ...
        ValueError: exclude pattern 'nothing' matches none of the weights selected to prune: ['0.weight', '2.weight'] (2 in all)
    """
    inc = as_patterns(include, "include")
    exc = as_patterns(exclude, "exclude")
    module_of: dict[str, str] = {}
    of_kind: list[str] = []
    others: list[str] = []
    for mod_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            module_of[full] = mod_name
            (of_kind if kind(module, leaf) else others).append(full)
    training_only = training_only_modules(model)
    default = [n for n in of_kind if not is_protected(module_of[n], training_only)]
    if inc is None:
        if not default and only_kind is not None:
            where = " outside a teacher" if of_kind else ""
            raise ValueError(
                f"{type(model).__name__} has no weight to {what}{where}: this plugin takes only {only_kind}, "
                f"and the model's parameters are {preview(others, 3)}"
            )
        if not default:
            raise ValueError(
                f"{type(model).__name__} has no weight this plugin can {what} by default; name the parameters with "
                f"include (e.g. full parameter names such as {preview(others, 3)})"
            )
        chosen = list(default)
    else:
        chosen = []
        for pattern in inc:
            hits = [
                n
                for n in of_kind
                if re.search(pattern, module_of[n])
                and (not is_protected(module_of[n], training_only) or _names_protected(pattern, training_only))
            ]
            hits += [n for n in (*of_kind, *others) if n not in hits and _explicit(pattern, n, module_of[n], training_only)]
            if not hits:
                unnamed = [n for n in others if re.fullmatch(pattern, n)]  # matched in full, without the parameter's own name
                others_rule = (
                    f"this plugin takes only {only_kind}" if only_kind is not None
                    else f"other parameters need a full-name match that spells out the parameter's own name (its last part, "
                    f"or 'weight'/'bias'), so that a module pattern never takes one by accident: {pattern!r} matches "
                    f"{preview(unnamed, 3)} in full but does not; write each in full, e.g. include={[re.escape(n) for n in unnamed[:3]]!r}"
                    if unnamed
                    else f"other parameters need a full-name match, e.g. {preview(others, 3)}"
                )
                raise ValueError(
                    f"include pattern {pattern!r} matches no weight to {what}. Module names of the default layers: "
                    f"{preview([module_of[n] for n in default])}; {others_rule}"
                )
            chosen += [n for n in hits if n not in chosen]
    for pattern in exc or ():
        hits = [n for n in chosen if re.search(pattern, n) or re.search(pattern, module_of[n])]
        if not hits:
            raise ValueError(f"exclude pattern {pattern!r} matches none of the weights selected to {what}: {preview(chosen)}")
        chosen = [n for n in chosen if n not in hits]
    if not any(_names_protected(p) for p in inc or ()):  # the teacher is left alone, and so is what it shares
        shared = [n for n in shared_with_protected(model, training_only) if n in chosen]
        if shared:
            rank_zero_warn(
                f"left alone: {preview(shared)}, which the teacher holds too (a module or weight the student shares with "
                f"it); to {what} them in the student would change the teacher"
            )
            chosen = [n for n in chosen if n not in shared]
            if not chosen:
                raise ValueError(f"include={inc!r} / exclude={exc!r} leave no weight to {what} but {preview(shared)}, which the teacher holds too")
    if not chosen:
        raise ValueError(f"include={inc!r} / exclude={exc!r} leave no weight to {what}")
    order = {n: i for i, n in enumerate(module_of)}
    return sorted(chosen, key=order.__getitem__)
