"""The ``lightning-compress`` command: a LightningCLI over any LightningModule and LightningDataModule."""

from __future__ import annotations

import argparse
import contextlib
import linecache
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI, instantiate_class

__all__ = [
    "EXTRA_SUBCOMMANDS", "CommandError", "CompressCLI", "check_command", "cli_main", "config_error", "console_main", "main",
    "quiet_third_party_warnings", "settings_checked",
]

_PACKAGE = Path(__file__).resolve().parent


def quiet_third_party_warnings() -> None:
    # (torchao's notices about CUDA-only extensions are log records, filtered where torchao is imported)
    # Lightning 2.6 calls APIs its own dependencies deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*skip_none parameter was deprecated.*")
    # the pipeline, sweep and tune pass their stages' command lines as `args`, which is what the notice is about
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python.*")


class CompressCLI(LightningCLI):
    """LightningCLI with subcommands ``fit``, ``validate``, ``test``, ``predict``.

    The model and the data are given by class path (``--model lightning_compress.ClassifierModule``
    or in the YAML), callbacks by class path under ``trainer.callbacks``. An option is taken by its whole name
    only: argparse's prefix matching read ``--trainer.max_step`` as ``--trainer.max_steps``.
    """

    def init_parser(self, **kwargs: Any) -> Any:  # the main parser and each subcommand's
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of one of this library's own commands (``pipeline``, ``sweep``, ``tune``, ``sensitivity``):
    options by their whole name only, as in the LightningCLI subcommands (``--spe`` is not ``--spec``)."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


class CommandError(ValueError):
    """A command line the CLI refuses, with a one-line message (the ``lightning-compress`` command prints it alone)."""


@contextlib.contextmanager
def settings_checked() -> Iterator[None]:
    """A command's checks of its own settings (a missing file, a bad count, a key that names nothing): a
    ``ValueError``, ``TypeError`` or ``FileNotFoundError`` that this library raises inside becomes a
    :class:`CommandError` with the same message, which the ``lightning-compress`` command prints as one line.
    Raised anywhere else (a user's module imported to check a key, a fit) it keeps its traceback."""
    try:
        yield
    except CommandError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as err:
        if not raised_by_this_library(err):
            raise
        raise CommandError(str(err)) from err


def raised_by_this_library(err: BaseException) -> bool:
    """Whether ``err`` was raised by this library's own code (a check of a setting), not a user's module or torch."""
    frames = _frames(err.__traceback__)
    return bool(frames) and _in_package(frames[-1])


class _ParseOnly(CompressCLI):
    """Parse a command line and build its callbacks; build nothing else (the model may need a file an earlier
    stage writes), run nothing."""

    def instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        callbacks = config.get("trainer.callbacks") or []
        for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
            spec = entry.as_dict() if hasattr(entry, "as_dict") else entry
            try:
                _built(spec)
            except (ValueError, TypeError) as err:
                name = str(spec.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(spec, dict) else type(entry).__name__
                raise CommandError(f"{name}: {err}") from err

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _built(spec: Any) -> Any:
    """``spec`` with every ``{class_path, init_args}`` built, innermost first, as the parser builds a callback's
    arguments (``criterion: {class_path: ...Wanda, init_args: {...}}``)."""
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        init_args = {k: _built(v) for k, v in (spec.get("init_args") or {}).items()}
        return instantiate_class((), {"class_path": spec["class_path"], "init_args": init_args})
    if isinstance(spec, dict):
        return {k: _built(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_built(v) for v in spec]
    return spec


def check_command(args: Sequence[str]) -> Any:
    """Parse ``args`` (e.g. ``["fit", "--config", "x.yaml"]``) as the CLI would, without building the model, the
    data or the Trainer, or running anything: an unknown key, a value of the wrong type or a callback option its
    class refuses fails here, before an earlier stage spends its time (the pipeline's teacher). Returns the
    subcommand's parsed config (a jsonargparse ``Namespace``)."""
    quiet_third_party_warnings()
    cli = _ParseOnly(
        LightningModule, None, subclass_mode_model=True, subclass_mode_data=True, args=list(args), auto_configure_optimizers=True
    )
    return cli.config.get(cli.subcommand) if cli.subcommand else cli.config


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> CompressCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, e.g. ``["fit", "--config", "x.yaml"]``
    (with ``run=False`` no subcommand: ``["--config", "x.yaml"]`` instantiates the model, data and Trainer).
    Given ``args`` and ``run=False``, the process's own command line (``lightning-compress sweep ...``) is
    not read. A run keeps it: Lightning's DDP launcher starts the other ranks with this process's command."""
    quiet_third_party_warnings()
    own_argv = sys.argv
    if args is not None and not run:
        sys.argv = sys.argv[:1]
    try:
        return _build(args, run)
    finally:
        sys.argv = own_argv


def _build(args: Sequence[str] | None, run: bool) -> CompressCLI:
    return CompressCLI(
        LightningModule,
        None,  # ``data`` is any LightningDataModule by class path, and optional: a module may bring its own dataloaders
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        auto_configure_optimizers=True,
        run=run,
    )


def _frames(tb: TracebackType | None) -> list[TracebackType]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


def _in_package(tb: TracebackType) -> bool:
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def config_error(err: BaseException) -> str | None:
    """The message of a bad value that one of this library's classes refused while the CLI built it from
    the config, prefixed by the class's name (``"PruningCallback: target_sparsity must be ..."``); ``None``
    for any other error.

    jsonargparse builds the callbacks while it parses, and re-raises what their constructor raised
    inside a union-type error with both tracebacks: kilobytes of output around one line. The
    ``lightning-compress`` command prints this line instead (and exits with status 2, as for a bad
    option; with ``JSONARGPARSE_DEBUG`` set it raises as it is). So does a setting this library's
    code refuses in ``setup``, ``configure_model`` or the sanity check, before any training batch
    (an ``include`` matching nothing, a misspelt guard metric); errors raised anywhere else, in
    training included, keep their traceback."""
    if isinstance(err, CommandError):
        return str(err)
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and not any(seen is e for e in chain):
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    outer = _frames(err.__traceback__)
    if any(tb.tb_frame.f_code.co_name in _BEFORE_TRAINING for tb in outer):
        # a check in setup or the sanity check (nothing trained yet): a refusal this library raised itself, not an
        # error of the user's code (or Python's) that it met or passed on, whose traceback says where to look
        if err.__cause__ is not None or not _raised_here(outer[-1]):
            return None
        return _refusal(err, outer, in_init=False)
    if not any("jsonargparse" in tb.tb_frame.f_code.co_filename for tb in outer):
        return None
    for cause in chain[1:]:
        if (message := _refusal(cause, _frames(cause.__traceback__), in_init=True)) is not None:
            return message
    return None


#: Lightning's steps of a run before its first training batch (and the hooks of them a plugin checks in): what a
#: check raises there is a bad setting.
_BEFORE_TRAINING = ("_call_setup_hook", "_call_configure_model", "on_fit_start", "_run_sanity_check", "on_train_start")


def _raised_here(tb: TracebackType) -> bool:
    """Whether the frame raised by a ``raise`` statement of its own (not an operation that failed in it)."""
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    return line.startswith("raise ")


def _refusal(err: BaseException, frames: list[TracebackType], in_init: bool) -> str | None:
    """``err``'s message prefixed by the name of this library's class that refused (the outermost of its methods in
    ``frames``, an ``__init__`` with ``in_init``), when ``err`` is a refusal raised by this library's code."""
    if not isinstance(err, (ValueError, TypeError, FileNotFoundError)) or not frames or not _in_package(frames[-1]):
        return None
    owner = next(
        (type(tb.tb_frame.f_locals["self"]).__name__ for tb in frames
         if (tb.tb_frame.f_code.co_name == "__init__" or not in_init) and "self" in tb.tb_frame.f_locals and _in_package(tb)),
        None,
    )  # fmt: skip
    message = str(err)
    return f"{owner}: {message}" if owner and not message.startswith(owner) else message


def main() -> None:
    """LightningCLI's subcommands (``fit``, ``validate``, ``test``, ``predict``) from ``sys.argv``."""
    cli_main()


#: LightningCLI's subcommands, as :class:`CompressCLI` runs them
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# subcommands that are not LightningCLI's: name -> module whose ``main(argv)`` runs it
EXTRA_SUBCOMMANDS = {
    "pipeline": "lightning_compress.pipeline",
    "sweep": "lightning_compress.tuning.sweep",
    "tune": "lightning_compress.tuning.tune",
    "sensitivity": "lightning_compress.tuning.sensitivity",
}


def console_main() -> None:
    """Entry point of the ``lightning-compress`` console script: the subcommands of
    ``EXTRA_SUBCOMMANDS``, else LightningCLI's; a setup-time refusal of this library's is one line, exit 2."""
    if len(sys.argv) == 1 or sys.argv[1] in ("-h", "--help"):  # LightningCLI's help lists its own subcommands only
        print(f"lightning-compress {{{','.join(EXTRA_SUBCOMMANDS)}}} --help: this library's commands; LightningCLI's follow.\n")
    try:
        if len(sys.argv) > 1 and sys.argv[1] in EXTRA_SUBCOMMANDS:
            import importlib

            quiet_third_party_warnings()
            importlib.import_module(EXTRA_SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:])
            return
        if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and sys.argv[1] not in LIGHTNING_SUBCOMMANDS:
            # LightningCLI's own error lists its four subcommands only
            valid = ", ".join(repr(c) for c in (*LIGHTNING_SUBCOMMANDS, *EXTRA_SUBCOMMANDS))
            sys.stderr.write(f"lightning-compress: error: unknown subcommand {sys.argv[1]!r}; valid choices: {valid}\n")
            raise SystemExit(2)
        cli_main()
    except (ValueError, TypeError) as err:
        debugging = os.environ.get("JSONARGPARSE_DEBUG", "").strip().lower() in ("true", "1", "yes", "on")
        message = None if debugging else config_error(err)
        if message is None:
            raise
        sys.stderr.write(f"lightning-compress: error: {message}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover - `python -m lightning_compress.cli`: the whole command, as the script's
    # the imported module's, not this __main__ copy's: its CommandError is the one the subcommands raise
    from lightning_compress.cli import console_main as imported_console_main

    imported_console_main()
