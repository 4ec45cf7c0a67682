"""``lightning-compress tune``: Lightning's ``Tuner`` (learning rate and batch size) on a LightningCLI config.

    lightning-compress tune --config configs/prune.yaml --lr-find --batch-size power [--fit]

Each search runs on its own throwaway instance of the config's model, data and Trainer (without the
compression callbacks unless ``--with-compression``), so nothing of a search (a pruned mask, a
fake-quantised layer, a learning-rate-finder callback, a changed Trainer setting) can reach the real
fit: the found values are written into a copy of the config (``<config>.tuned.yaml`` by default), and
``--fit`` then fits that file as ``lightning-compress fit --config`` would.

The batch size is searched as Lightning does (doubling until out of memory, or a binary search after
it), but never above the training set: Lightning's search stops only once a size reaches the set's
length, and returns that size even when it is larger than the set (2048 for digits' 1,257 training
images). Here the answer is the largest size tried that is at most the set's length (1024).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_compress.cli import command_parser, settings_checked
from lightning_compress.tuning.devices import check_one_device
from lightning_compress.tuning.config import (
    ConfigKey, check_lr_takes_effect, class_of, expected_base, load_config, lr_setting_scheduler,
    refuse_resumed_keys, resolve_key, set_value, value_or_default, write_config,
)

__all__ = ["find_lr_key", "main", "plateau_note", "tune_config"]

BATCH_MODES = ("power", "binsearch")


def find_lr_key(config: Mapping[str, Any]) -> ConfigKey:
    """Where the learning rate lives: the peak argument of a scheduler that sets the rate itself (``OneCycleLR``'s
    ``max_lr``), else the model's own ``lr``/``learning_rate`` argument, else the ``lr`` of the one optimizer class
    under ``model``. An error lists what to pass as ``--lr-key`` otherwise."""
    if (found := lr_setting_scheduler(config)) is not None:
        at, cls, arguments, target = found
        if target is not None:
            return resolve_key(config, f"{at}.init_args.{target}")
        raise ValueError(f"the config's {cls.__name__} at {at!r} sets the learning rate from {' and '.join(arguments)}: "
                         f"pass --lr-key {' or '.join(f'{at}.init_args.{a}' for a in arguments)}")
    for name in ("lr", "learning_rate"):
        with contextlib.suppress(ValueError):
            where = resolve_key(config, f"model.{name}")
            if where.owner is not None and name in inspect.signature(where.owner_class()).parameters:
                return where
    from lightning_compress.tuning.config import _classes

    optimizers = [path for path, cp in _classes({"model": config.get("model", {}), "optimizer": config.get("optimizer", {})})
                  if issubclass(class_of(cp, expected_base(path)), torch.optim.Optimizer)]
    if len(optimizers) == 1:  # under the model, or LightningCLI's own top-level `optimizer:`
        return resolve_key(config, ".".join(map(str, (*optimizers[0], "init_args", "lr"))))
    raise ValueError(f"cannot tell where the learning rate is in the config ({len(optimizers)} optimizer classes under "
                     "'model' and 'optimizer'); pass --lr-key (e.g. model.optimizer.lr or optimizer.lr), or give the "
                     "optimizer in the config (model.init_args.optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}})")


def _check_key_name(where: ConfigKey, kind: str) -> None:
    """The lr key must name a learning rate, the batch key a batch size: a search writes its answer there."""
    name = str(where.path[-1])
    words = set(name.lower().split("_"))
    if kind == "lr" and not ("lr" in words or "learning_rate" in name.lower()):
        raise ValueError(f"lr key {where.key!r} names the argument {name!r}, not a learning rate: expected an argument "
                         "named with lr or learning_rate (e.g. model.optimizer.lr, model.base_lr, model.lr_student)")
    if kind == "batch" and not ("bs" in words or "batch" in name.lower()):
        raise ValueError(f"batch key {where.key!r} names the argument {name!r}, not a batch size: expected an argument "
                         "named with batch or bs (e.g. data.batch_size, data.train_batch_size, data.train_bs)")


#: the search instance's Trainer runs until the Tuner stops it: the config's epoch and step limits are for the fit;
#: it validates at epoch ends, since a step-based val_check_interval exceeds the epoch of a larger batch size
_UNLIMITED = {"max_epochs": -1, "max_steps": -1, "max_time": None, "val_check_interval": 1.0, "check_val_every_n_epoch": 1}


@contextlib.contextmanager
def _instance(config: Mapping[str, Any]) -> Iterator[Any]:
    """A throwaway LightningCLI instance of ``config`` (its Trainer writes under a temporary folder, and has no
    epoch, step or time limit: the searches count their own steps, ``lr_find`` 100 by default)."""
    from lightning_compress.tuning.trial import build_cli, without_checkpoints

    with tempfile.TemporaryDirectory(prefix="lc-tune-") as tmp:
        cfg = set_value(config, resolve_key(config, "trainer.default_root_dir"), tmp)
        cfg = set_value(cfg, resolve_key(cfg, "trainer.logger"), False)
        cfg = without_checkpoints(cfg)
        for key, value in _UNLIMITED.items():
            cfg = set_value(cfg, resolve_key(cfg, f"trainer.{key}"), value)
        cli = build_cli(cfg)
        if config.get("ckpt_path"):  # a fine-tune: the searches start from the checkpoint's weights, as its fit does
            from lightning_compress._files import load_checkpoint

            cli.model.configure_model()  # layers built there must exist to load into (a later call is a no-op)
            cli.model.load_state_dict(load_checkpoint(config["ckpt_path"])["state_dict"])
        yield cli


def _train_length(cli: Any) -> int | None:
    """Samples in the training set: of the datamodule's training loader, else of the module's own (asked after the
    search, whose fit ran the module's ``setup``, where a module builds the dataset its loader serves)."""
    owner = cli.datamodule if cli.datamodule is not None else cli.model
    try:
        if owner is cli.datamodule:
            owner.setup("fit")
        return len(owner.train_dataloader().dataset)
    except Exception:  # noqa: BLE001 - an iterable dataset, no loader yet, a loader without a dataset: no length to cap at
        return None


def plateau_note(lrs: Sequence[float], losses: Sequence[float], index: int) -> str | None:
    """Why the finder's suggestion ``lrs[index]`` is noise, or ``None``: it lies more than two decades of learning rate
    before the smoothed loss starts falling (by a twentieth of its fall: its largest drop from a point to a later one).
    Lightning picks the steepest slope against the learning rate itself, not its logarithm, so on a plateau the tiny
    steps between small rates can turn noise into the steepest slope: a suggestion of 4e-05 where the loss fell only
    from about 0.1, at which 3 epochs reached val_acc 0.16 against 0.83 at the config's 0.01. (The smoothed loss of
    the first steps rises, since Lightning's average starts low: a rise is never the fall.)

    Example:
        >>> lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
        >>> falling = [2.3 - 2.0 / (1 + 10 ** (-1 - math.log10(lr))) for lr in lrs]  # falls around 1e-1
        >>> plateau_note(lrs, falling, 82) is None, plateau_note(lrs, falling, 66) is None  # at 0.1, at 1e-2
        (True, True)
        >>> print(plateau_note(lrs, falling, 20))  # doctest: +ELLIPSIS
        the suggested learning rate 1.63e-05 lies more than two decades before the loss starts falling: ...
    """
    points = [(i, lrs[i], loss) for i, loss in enumerate(losses[: len(lrs)]) if math.isfinite(loss)]
    if len(points) < 2 or not 0 <= index < len(lrs):
        return None
    peak = lowest = top = points[0]  # the fall: the largest drop from a point to a later one
    for point in points[1:]:
        top = point if point[2] > top[2] else top
        if top[2] - point[2] > peak[2] - lowest[2]:
            peak, lowest = top, point
    fall = peak[2] - lowest[2]
    if fall <= 0:
        return None
    begins = next(lr for i, lr, loss in points if i >= peak[0] and peak[2] - loss >= fall / 20)
    if lrs[index] * 100 > begins:
        return None
    return (
        f"the suggested learning rate {lrs[index]:.3g} lies more than two decades before the loss starts falling: the "
        f"smoothed loss is {peak[2]:.4g} at lr {peak[1]:.3g} and falls by a twentieth of its fall only from lr "
        f"{begins:.3g} (to {lowest[2]:.4g} at lr {lowest[1]:.3g}). Lightning's pick (the steepest slope against the "
        f"learning rate itself) is noise on the plateau before; search a range nearer the fall (--min-lr {begins / 100:.3g}; "
        "tune_config's lr_find_kwargs min_lr), or keep the config's learning rate"
    )


def _search_lr(config: Mapping[str, Any], **kwargs: Any) -> float:
    from lightning.pytorch.tuner import Tuner

    with _instance(config) as cli:
        finder = Tuner(cli.trainer).lr_find(cli.model, datamodule=cli.datamodule, update_attr=False, **kwargs)
    if finder is None:
        raise RuntimeError("the learning-rate finder did not run (fast_dev_run skips it)")
    lrs, steps = finder.results.get("lr", []), finder.num_training
    if len(lrs) < steps // 2:  # Lightning stops the search when the loss diverges
        raise RuntimeError(f"the learning-rate finder stopped after {len(lrs)} of its {steps} steps, the loss diverging at "
                           f"lr {lrs[-1] if lrs else float('nan'):.3g}: too few points for a suggestion. Lower min_lr "
                           "(lr_find_kwargs), or check that the model trains at all at the config's batch size")
    suggestion = finder.suggestion()
    if suggestion is None:
        raise RuntimeError("the learning-rate finder found no suggestion (the loss never fell); widen min_lr/max_lr")
    if note := plateau_note(lrs, finder.results.get("loss", []), finder._optimal_idx):
        raise RuntimeError(note)
    return float(suggestion)


def _search_batch_size(config: Mapping[str, Any], where: ConfigKey, mode: str, init_val: int) -> int:
    from lightning.pytorch.tuner import Tuner

    config = set_value(config, where, init_val)
    name = str(where.path[-1])
    with _instance(config) as cli:
        with settings_checked():
            holders = [o for o in (cli.model, cli.datamodule) if o is not None]
            # the Tuner writes each size it tries to that attribute (of either, or of their hparams)
            if not any(hasattr(o, name) or name in (getattr(o, "hparams", None) or {}) for o in holders):
                owner = "datamodule" if where.path[0] == "data" else "module"
                raise ValueError(
                    f"batch key {where.key!r}: Lightning's batch-size search sets the size through an attribute {name!r} "
                    f"of the module or the datamodule (or their hparams), and neither has one; store the argument in "
                    f"the {owner}'s __init__ (self.{name} = {name}, or self.save_hyperparameters()) and read it there"
                )
        found = Tuner(cli.trainer).scale_batch_size(cli.model, datamodule=cli.datamodule, mode=mode, init_val=init_val,
                                                    batch_arg_name=name)
        cap = _train_length(cli)
    if found is None:
        raise RuntimeError("the batch-size search returned nothing (fast_dev_run skips it)")
    if cap is not None and found > cap:
        if mode == "power":  # the largest size tried that the set can fill: init_val doubled
            found = init_val
            while found * 2 <= cap:
                found *= 2
        else:
            found = cap
    return int(found)


def tune_config(
    config: Mapping[str, Any],
    *,
    lr_find: bool = False,
    batch_size: str | None = None,
    lr_key: str | None = None,
    batch_key: str = "data.batch_size",
    init_batch_size: int = 2,
    lr_find_kwargs: Mapping[str, Any] | None = None,
    with_compression: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Search the batch size (first, since the learning rate depends on it), then the learning rate.

    The searches run the config without its compression callbacks unless ``with_compression``: the
    Tuner counts steps, the plugins' schedules count epochs, so a search with them attached would ramp
    sparsity or switch on fake quantisation part-way through its 100 steps and measure that instead of
    the recipe. Either way the real fit starts from the config alone.

    Returns the tuned config and ``{key: value}`` of what was found.

    Raises:
        ValueError: nothing to tune, an unknown batch-size mode, an initial batch size below 1, keys that name no argument, or an lr key that
            names no learning rate and a batch key no batch size (all before any search).
        RuntimeError: the learning-rate finder stopped (diverged) too early for a suggestion.
    """
    with settings_checked():
        if not lr_find and batch_size is None:
            raise ValueError("nothing to tune: ask for lr_find and/or batch_size ('power' or 'binsearch')")
        if batch_size is not None and batch_size not in BATCH_MODES:
            raise ValueError(f"batch_size mode {batch_size!r}; valid: {list(BATCH_MODES)}")
        if isinstance(init_batch_size, bool) or not isinstance(init_batch_size, int) or init_batch_size < 1:
            raise ValueError(f"init_batch_size (--init-batch-size) must be an integer >= 1, got {init_batch_size!r}")
        check_one_device(config.get("trainer") or {}, "tune")  # the searches run in this process
        lr_where = (resolve_key(config, lr_key) if lr_key else find_lr_key(config)) if lr_find else None
        batch_where = resolve_key(config, batch_key) if batch_size is not None else None
        if lr_where is not None:
            _check_key_name(lr_where, "lr")
            check_lr_takes_effect(config, lr_where)
            # whatever the key, the answer goes to the optimizer a resumed fit restores
            refuse_resumed_keys(config, [lr_where], "lr_find tunes", every=True)
        if batch_where is not None:
            _check_key_name(batch_where, "batch")
    from lightning_compress.tuning.trial import without_compression

    found: dict[str, Any] = {}
    out = dict(config)
    search = out if with_compression else without_compression(out)
    if batch_where is not None:
        found[batch_key] = _search_batch_size(search, batch_where, batch_size, init_batch_size)  # type: ignore[arg-type]
        out, search = set_value(out, batch_where, found[batch_key]), set_value(search, batch_where, found[batch_key])
    if lr_where is not None:
        found[lr_where.key] = _search_lr(search, **dict(lr_find_kwargs or {}))
        out = set_value(out, lr_where, found[lr_where.key])
    return out, found


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``lightning-compress tune``."""
    p = command_parser("lightning-compress tune", __doc__)
    p.add_argument("--config", required=True, help="a LightningCLI fit config")
    p.add_argument("--lr-find", action="store_true", help="run Lightning's learning-rate finder")
    p.add_argument("--batch-size", choices=BATCH_MODES, default=None, help="search the batch size this way")
    p.add_argument("--lr-key", default=None, help="config key of the learning rate (default: found, e.g. model.optimizer.lr)")
    p.add_argument("--batch-key", default="data.batch_size", help="config key of the batch size")
    p.add_argument("--init-batch-size", type=int, default=2)
    p.add_argument("--min-lr", type=float, default=None, help="the learning-rate finder's lowest rate (Lightning's default 1e-8)")
    p.add_argument("--max-lr", type=float, default=None, help="the learning-rate finder's highest rate (Lightning's default 1)")
    p.add_argument("--out", default=None, help="the tuned config (default: <config>.tuned.yaml beside it)")
    p.add_argument("--with-compression", action="store_true", help="keep the compression callbacks attached during the searches")
    p.add_argument("--fit", action="store_true", help="then fit the tuned config")
    args = p.parse_args(list(argv) if argv is not None else None)
    with settings_checked():
        if not args.lr_find and args.batch_size is None:
            raise ValueError(f"nothing to tune: pass --lr-find and/or --batch-size {{{','.join(BATCH_MODES)}}}")
        config = load_config(args.config)
    with settings_checked():
        if (args.min_lr is not None or args.max_lr is not None) and not args.lr_find:
            raise ValueError("--min-lr/--max-lr set the learning-rate finder's range: pass --lr-find too")
        bounds = {k: v for k, v in (("min_lr", args.min_lr), ("max_lr", args.max_lr)) if v is not None}
        if any(not (v > 0 and math.isfinite(v)) for v in bounds.values()) or bounds.get("min_lr", 0) >= bounds.get("max_lr", math.inf):
            raise ValueError(f"--min-lr/--max-lr must be finite, above 0 and min below max, got {bounds}")
    tuned, found = tune_config(config, lr_find=args.lr_find, batch_size=args.batch_size, lr_key=args.lr_key,
                               batch_key=args.batch_key, init_batch_size=args.init_batch_size,
                               lr_find_kwargs=bounds, with_compression=args.with_compression)
    out = Path(args.out) if args.out else Path(args.config).with_suffix(".tuned.yaml")
    before = {k: value_or_default(config, resolve_key(config, k)) for k in found}  # the class default when left out
    write_config(tuned, out, header="tuned by lightning-compress tune: " + ", ".join(f"{k}: {before[k]} -> {v:g}" for k, v in found.items()))
    for key, value in found.items():
        print(f"{key}: {before[key]} -> {value:g}")
    print(f"wrote {out}")
    result: dict[str, Any] = {"found": found, "config": out}
    if args.fit:
        from lightning_compress.cli import cli_main

        result["cli"] = cli_main(["fit", "--config", str(out)])
    return result
