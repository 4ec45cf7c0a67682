"""``python -m lightning_compress``: the ``lightning-compress`` command (every subcommand), for environments
without the console script on ``PATH``."""

from lightning_compress.cli import console_main

if __name__ == "__main__":  # pragma: no cover - run as a process by the tests
    console_main()
