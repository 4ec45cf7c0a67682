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
