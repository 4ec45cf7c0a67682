"""Shared fixtures: quiet, deterministic, small."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = Path(os.environ.get("LC_MNIST_DIR", SHARED_DATA / "mnist"))
CIFAR_DIR = Path(os.environ.get("LC_CIFAR10_DIR", SHARED_DATA / "cifar10"))


#: Test files that start processes (DDP, FSDP, sweep workers, the CLI): they run one after another on one
#: pytest worker, so that two of them never share the cores or race for a port.
PROCESS_FILES = frozenset({
    "test_ddp_more.py", "test_distill_ddp.py", "test_fsdp.py", "test_pipeline.py", "test_pruning_ddp.py",
    "test_quant_ddp.py", "test_shrink_ddp.py", "test_sweep.py", "test_teacher_cache.py",
})  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in PROCESS_FILES:
            item.add_marker(pytest.mark.xdist_group("processes"))


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest worker takes its share of the cores for torch's intra-op threads (all of them each: 2 workers on 2
    cores waited on each other's threads)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine a second one mostly waits (tiny convs ran 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR} (set LC_MNIST_DIR to a folder holding them)")
    return MNIST_DIR


def trainer_kwargs(tmp_path: Path, **overrides) -> dict:
    """Quiet CPU Trainer settings for tests."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def fit_quantize_config(tmp_path: Path, quantize_args: dict, hidden: list[int], **trainer: object):
    """``lightning-compress fit`` on a YAML written here: an MLP on digits with one ``QuantizeCallback(**quantize_args)``;
    returns the CLI and its callback."""
    import yaml

    from lightning_compress import QuantizeCallback
    from lightning_compress.cli import cli_main

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_train_batches": 4,
            "limit_val_batches": 2, "default_root_dir": str(tmp_path), **trainer,
            "callbacks": [{"class_path": "lightning_compress.QuantizeCallback", "init_args": quantize_args}],
        },
        "model": {
            "class_path": "lightning_compress.ClassifierModule",
            "init_args": {"model": {"class_path": "lightning_compress.MLP", "init_args": {"in_features": 64, "hidden": hidden}}},
        },
        "data": {"class_path": "lightning_compress.DigitsDataModule"},
    }  # fmt: skip
    path = tmp_path / "bits.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # map order matters: the first match wins
    cli = cli_main(["fit", "--config", str(path)])
    return cli, next(cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizeCallback))


def calibrate(model, x) -> None:
    """Observe the activation ranges of a fake-quantised model on one batch ``x`` (eval mode, no grad)."""
    from lightning_compress.quantization import fake_quant_layers

    layers = fake_quant_layers(model)
    for layer in layers.values():
        layer.quantizer.observing = True
    with torch.no_grad():
        model.eval()(x)
    for layer in layers.values():
        layer.quantizer.observing = False
