"""LightningCLI configs as data: read one, set a value by key, check the key names a real argument,
write it back as a runnable YAML. Shared by ``sweep`` (one YAML per trial) and ``tune`` (the tuned YAML).

A key is either

- a dotted path into the config as LightningCLI writes it: ``seed_everything``, ``trainer.max_epochs``,
  ``data.init_args.batch_size``, ``model.init_args.optimizer.init_args.lr``; the ``init_args`` steps
  may be left out (``model.optimizer.lr``), and list items are numbered (``trainer.callbacks.0.target_sparsity``);
- ``ClassName.argument``: the init argument of the one class in the config whose ``class_path`` ends
  in ``ClassName`` (``PruningCallback.target_sparsity``, ``SGD.lr``, ``DigitsDataModule.batch_size``).

Every key is checked against the signature of the class it lands in (the Trainer's for ``trainer.*``)
before anything runs, and an unknown one is an error that lists the valid arguments.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "ConfigKey", "load_config", "resolve_key", "set_value", "get_value", "value_or_default", "write_config", "class_of",
    "refuse_resumed_keys", "restored_on_resume", "LR_SETTING_SCHEDULERS", "lr_setting_scheduler", "check_lr_takes_effect",
]

_TOP_LEVEL = ("seed_everything", "trainer", "model", "data", "ckpt_path", "optimizer", "lr_scheduler")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML at ``path`` as a dict; a missing or non-mapping file is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config at {os.fspath(path)!r}")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} is not a LightningCLI config (a YAML mapping), got {type(data).__name__}")
    return data


def write_config(config: Mapping[str, Any], path: str | os.PathLike[str], header: str = "") -> Path:
    """Write ``config`` as YAML (with ``header`` as comment lines) so ``lightning-compress fit --config`` runs it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    p.write_text(comment + yaml.safe_dump(dict(config), sort_keys=False))
    return p


#: Where a short ``class_path`` (no module part, as LightningCLI takes it) is looked up, in order.
_SHORT_NAME_MODULES = (
    "lightning_compress", "lightning.pytorch.callbacks", "lightning.pytorch.loggers", "torch.optim",
    "lightning.pytorch.cli",  # its ReduceLROnPlateau (taking `monitor`) is the one LightningCLI builds for the short name
    "torch.optim.lr_scheduler",
)


def expected_base(path: tuple[str | int, ...]) -> type | None:
    """The base class LightningCLI expects of the class at ``path`` in a config (where a short name is looked up
    among its imported subclasses): the model, the data, a callback, a logger, an optimizer or a scheduler; ``None``
    elsewhere."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    last = path[-1] if path and isinstance(path[-1], str) else (path[-2] if len(path) > 1 else None)
    if path == ("model",):
        return pl.LightningModule
    if path == ("data",):
        return pl.LightningDataModule
    if path[:2] == ("trainer", "callbacks"):
        return pl.Callback
    if path[:2] == ("trainer", "logger"):
        return Logger
    if last == "optimizer":
        return torch.optim.Optimizer
    if last in ("scheduler", "lr_scheduler"):
        return torch.optim.lr_scheduler.LRScheduler
    return None


def class_of(class_path: str, base: type | tuple[type, ...] | None = None) -> type:
    """The class a ``class_path`` names (``lightning_compress.PruningCallback``, ``torch.optim.SGD``); a short name
    (``PruningCallback``, ``SGD``), which LightningCLI resolves among the classes it knows, is looked up in this
    library, Lightning's callbacks and loggers, and ``torch.optim``, then among the classes of the modules already
    imported that are subclasses of ``base`` (a project's own class, as LightningCLI finds it among the subclasses
    imported of the class a config position expects, :func:`expected_base`; :func:`resolve_key` imports the modules of
    a config's full class paths first)."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        for candidate in _SHORT_NAME_MODULES:
            found = getattr(importlib.import_module(candidate), name, None)
            if isinstance(found, type):
                return found
        imported = {
            c for m in list(sys.modules.values())
            if isinstance(c := vars(m).get(name) if hasattr(m, "__dict__") else None, type)
            and c.__name__ == name and c.__module__ == getattr(m, "__name__", None) and (base is None or issubclass(c, base))
        }  # fmt: skip
        if len(imported) == 1:
            return imported.pop()
        if imported:
            where = sorted(f"{c.__module__}.{name}" for c in imported)
            raise ValueError(f"class_path {class_path!r} is ambiguous: classes {where} are imported; write the full path")
        raise ValueError(
            f"class_path {class_path!r} has no module part, and no class of that name is in {list(_SHORT_NAME_MODULES)} "
            "or an imported module; write its full path (package.module.ClassName)"
        )
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {class_path!r} cannot be imported: {err}") from err


def import_config_classes(config: Mapping[str, Any]) -> None:
    """Import the modules of the full class paths in ``config``, as LightningCLI does before it resolves a short
    name among the subclasses imported (one that does not import is left to the caller's own error)."""
    for _, cp in _classes(config):
        if "." in cp and cp.rpartition(".")[0] not in sys.modules:
            with contextlib.suppress(Exception):
                importlib.import_module(cp.rpartition(".")[0])


def builds_class(entry: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a ``trainer.callbacks`` entry (a mapping, or the namespace a parsed config holds) builds one of
    ``kinds`` or a subclass (a short class name as :func:`class_of` reads it)."""
    cp = entry.get("class_path") if isinstance(entry, Mapping) else getattr(entry, "class_path", None)
    if not isinstance(cp, str):
        return False
    try:
        return issubclass(class_of(cp, kinds), kinds)
    except ValueError:
        if "." in cp:  # a full path that does not import: said as it is
            raise
        return False  # a short name of a class it does not know: not one of ``kinds`` it could tell


def _init_arguments(cls: type) -> tuple[list[str], bool]:
    """The init argument names of ``cls`` and whether it also takes ``**kwargs``."""
    params = list(inspect.signature(cls).parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


@dataclass(frozen=True)
class ConfigKey:
    """Where a key lands: ``path`` (the full dotted steps, ``init_args`` included) and the class that
    owns the argument (``None`` for ``seed_everything`` and other top-level values)."""

    key: str
    path: tuple[str | int, ...]
    owner: str | None
    owner_at: tuple[str | int, ...] = ()  # where the owning class sits (what it must be a subclass of)

    def owner_class(self) -> type:
        """The owning class (its short name looked up as :func:`class_of` does at that position)."""
        assert self.owner is not None
        return class_of(self.owner, expected_base(self.owner_at))


def _classes(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Every ``class_path`` in the tree, with where its dict sits."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(node, Mapping):
        if isinstance(node.get("class_path"), str):
            found.append((path, node["class_path"]))
        for k, v in node.items():
            found += _classes(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _classes(v, (*path, i))
    return found


def _walk(config: Mapping[str, Any], steps: list[str], key: str) -> tuple[tuple[str | int, ...], str | None, tuple[str | int, ...]]:
    """The full path of a dotted key, ``init_args`` steps filled in, the class whose argument its last step is
    (the Trainer for ``trainer.*``, ``None`` for plain values such as ``seed_everything``), and where that class sits."""
    node: Any = config
    path: list[str | int] = []
    owner: str | None = None  # the class whose init_args ``node`` is
    owner_at: tuple[str | int, ...] = ()
    for i, step in enumerate(steps):
        if isinstance(node, Mapping) and isinstance(node.get("class_path"), str) and step != "class_path":
            owner, node = node["class_path"], node.get("init_args") or {}
            owner_at = tuple(path)
            path.append("init_args")
            if step == "init_args":
                continue
        if i == len(steps) - 1:
            path.append(int(step) if isinstance(node, list) and step.isdigit() else step)
            break
        if isinstance(node, list):
            if not step.isdigit() or int(step) >= len(node):
                raise ValueError(f"key {key!r}: {'.'.join(map(str, path))} is a list of {len(node)}; {step!r} is not an index in it")
            path.append(int(step))
            node, owner = node[int(step)], None
            continue
        if not isinstance(node, Mapping) or node.get(step) is None:
            raise ValueError(f"key {key!r}: {'.'.join(map(str, path)) or 'the config'} has no {step!r}")
        path.append(step)
        node = node[step]
        owner = "lightning.pytorch.Trainer" if path == ["trainer"] else None
    return tuple(path), owner, owner_at


def resolve_key(config: Mapping[str, Any], key: str) -> ConfigKey:
    """Where ``key`` lands in ``config``, checked against the owning class's init arguments.

    Raises:
        ValueError: the key names no class of the config, a class that appears more than once, or an
            argument the class does not take (the message lists the valid ones).
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"a config key must be a non-empty string, got {key!r}")
    steps = key.split(".")
    if steps[0] in _TOP_LEVEL or steps[0] in config:
        path, owner, owner_at = _walk(config, steps, key)
    else:
        if len(steps) != 2:
            raise ValueError(f"key {key!r} is neither a dotted config path (starting with one of {list(_TOP_LEVEL)}) "
                             "nor ClassName.argument")
        name, arg = steps
        hits = [(p, cp) for p, cp in _classes(config) if cp.rsplit(".", 1)[-1] == name]
        if not hits:
            names = sorted({cp.rsplit(".", 1)[-1] for _, cp in _classes(config)})
            raise ValueError(f"key {key!r}: no class {name!r} in the config; its classes are {names}")
        if len(hits) > 1:
            where = [".".join(map(str, p)) for p, _ in hits]
            raise ValueError(f"key {key!r}: {name!r} appears {len(hits)} times (at {where}); use a dotted path instead")
        owner_at, owner = hits[0]
        path = (*owner_at, "init_args", arg)
    if owner is not None:
        if "." not in owner:
            import_config_classes(config)
        names, open_ended = _init_arguments(class_of(owner, expected_base(owner_at)))
        arg = str(path[-1])
        if arg not in names and not open_ended:
            raise ValueError(f"key {key!r}: {owner.rsplit('.', 1)[-1]} has no argument {arg!r}; valid: {names}")
    return ConfigKey(key, path, owner, owner_at)


def get_value(config: Mapping[str, Any], where: ConfigKey, default: Any = None) -> Any:
    node: Any = config
    for step in where.path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return default
        if node is None:
            return default
    return node


def value_or_default(config: Mapping[str, Any], where: ConfigKey) -> Any:
    """The value at ``where`` in ``config``, else the default of the argument in its owner's signature (what the CLI
    builds when the config leaves it out), else ``None``."""
    parent = get_value(config, ConfigKey(where.key, where.path[:-1], where.owner)) if len(where.path) > 1 else config
    try:
        return parent[where.path[-1]]  # written, as null too: None is what the CLI passes then
    except (KeyError, IndexError, TypeError):
        pass
    if where.owner is None or not isinstance(where.path[-1], str):
        return None
    try:
        parameter = inspect.signature(where.owner_class()).parameters.get(where.path[-1])
    except (TypeError, ValueError, ImportError, AttributeError):  # a class whose signature cannot be read
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def set_value(config: Mapping[str, Any], where: ConfigKey, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``value`` at ``where`` (missing ``init_args`` dicts are created)."""
    out = copy.deepcopy(dict(config))
    node: Any = out
    for step, nxt in zip(where.path[:-1], where.path[1:]):
        if isinstance(node, list):
            node = node[step]  # type: ignore[index]
            continue
        if node.get(step) is None:
            node[step] = [] if isinstance(nxt, int) else {}
        node = node[step]
    node[where.path[-1]] = value
    return out


#: Argument names an optimizer's state holds (a module's own ``lr`` goes to its optimizer too).
_OPTIMIZER_ARGUMENT = re.compile(r"^(lr|learning_rate|\w+_lr|lr_\w+|momentum|weight_decay|betas|eps|nesterov|dampening)$")


def restored_on_resume(key: ConfigKey) -> bool:
    """Whether a fit resumed from a checkpoint puts the value of ``key`` back from it: an argument of the optimizer or
    the scheduler (``model.optimizer.lr``, ``lr_scheduler.gamma``), or an optimizer setting a module takes itself
    (``model.lr``, ``model.weight_decay``), which its ``configure_optimizers`` hands to the restored optimizer."""
    steps = [step for step in key.path if isinstance(step, str)]
    return any(step in ("optimizer", "scheduler", "lr_scheduler") for step in steps) or bool(steps and _OPTIMIZER_ARGUMENT.match(steps[-1]))


def refuse_resumed_keys(config: Mapping[str, Any], keys: Iterable[ConfigKey], what: str, every: bool = False) -> None:
    """Refuse keys a fit resumed from ``ckpt_path`` would not use (:func:`restored_on_resume`): Lightning puts the
    checkpoint's optimizer and scheduler state back, so a value searched for them is discarded (two trials at lr 5.0
    and 1e-6 trained alike at 0.05). ``config`` is the one the fits run (the base config with the fixed overrides);
    ``every``: refuse every key given (a learning rate, under whatever name).

    Raises:
        ValueError: naming the keys, ``what`` asks for them, and the ways out.
    """
    if not config.get("ckpt_path"):
        return
    restored = [k.key for k in keys if every or restored_on_resume(k)]
    if restored:
        raise ValueError(
            f"{what} {restored}, but the config's ckpt_path ({config['ckpt_path']!r}) resumes its fit, and a resumed fit "
            "puts the checkpoint's optimizer and scheduler state back, learning rate included: these values would be "
            "discarded. Drop ckpt_path (ckpt_path: null in the overrides) to search them on a fresh fit, or search "
            "other keys"
        )


#: schedulers that set the learning rate themselves from arguments of their own (the optimizer's ``lr`` is then not
#: used): the arguments, and the one a found rate goes to (``None``: two rates, the user says which)
LR_SETTING_SCHEDULERS: dict[type, tuple[tuple[str, ...], str | None]] = {
    torch.optim.lr_scheduler.OneCycleLR: (("max_lr",), "max_lr"),  # starts at max_lr / div_factor, peaks at max_lr
    torch.optim.lr_scheduler.CyclicLR: (("base_lr", "max_lr"), None),  # cycles between base_lr and max_lr
}


def lr_setting_scheduler(config: Mapping[str, Any]) -> tuple[str, type, tuple[str, ...], str | None] | None:
    """A scheduler under ``model`` or LightningCLI's top-level ``lr_scheduler`` that sets the learning rate itself
    (:data:`LR_SETTING_SCHEDULERS`): its dotted place in the config, its class, the arguments that set the rate and the
    one a found rate goes to; ``None`` when the config has none. A subclass counts only while it takes those arguments
    (one computing them from the optimizer's ``lr`` leaves that ``lr`` in charge)."""
    for path, class_path in _classes({"model": config.get("model", {}), "lr_scheduler": config.get("lr_scheduler", {})}):
        try:
            cls = class_of(class_path, expected_base(path))
        except (ValueError, ImportError, AttributeError):  # a class the config's own fit will report
            continue
        for scheduler, (arguments, target) in LR_SETTING_SCHEDULERS.items():
            if isinstance(cls, type) and issubclass(cls, scheduler):
                try:
                    takes = inspect.signature(cls).parameters
                except (TypeError, ValueError):
                    continue
                if all(a in takes for a in arguments):
                    return ".".join(map(str, path)), cls, arguments, target
    return None


def check_lr_takes_effect(config: Mapping[str, Any], where: ConfigKey, what: str = "lr key") -> None:
    """Refuse a learning-rate key whose value a scheduler of the config replaces: a file with another value there
    (a tuned config, a sweep's trial) would train as before. ``what`` names the key's role in the message."""
    found = lr_setting_scheduler(config)
    if found is None:
        return
    at, cls, arguments, _ = found
    if ".".join(map(str, where.path)).startswith(at + "."):  # one of the scheduler's own arguments
        return
    keys = [f"{at}.init_args.{a}" for a in arguments]
    raise ValueError(
        f"{what} {where.key!r}: the config's {cls.__name__} at {at!r} sets the learning rate from its own "
        f"arguments, so a rate written there would not change the fit; name {' or '.join(keys)} instead"
    )
