"""The ``lightning-compress`` command: a LightningCLI over any LightningModule and LightningDataModule."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

__all__ = ["CompressCLI", "cli_main", "main", "quiet_third_party_warnings"]


def quiet_third_party_warnings() -> None:
    # (torchao's notices about CUDA-only extensions are log records, filtered where torchao is imported)
    # Lightning 2.6 calls APIs its own dependencies deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*skip_none parameter was deprecated.*")


class CompressCLI(LightningCLI):
    """LightningCLI with subcommands ``fit``, ``validate``, ``test``, ``predict``.

    The model and the data are given by class path (``--model lightning_compress.ClassifierModule``
    or in the YAML), callbacks by class path under ``trainer.callbacks``.
    """


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
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        auto_configure_optimizers=True,
        run=run,
    )


def main() -> None:
    """LightningCLI's subcommands (``fit``, ``validate``, ``test``, ``predict``) from ``sys.argv``."""
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
