from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_compress import MLP, DigitsDataModule, LeNet5, MNISTDataModule, ResCNN
from lightning_compress.data import MNIST_FILES, read_idx


def test_digits_shapes_and_split_sizes() -> None:
    dm = DigitsDataModule(batch_size=16, val_fraction=0.2, test_fraction=0.1)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes[1] == round(1797 * 0.2) and sizes[2] == round(1797 * 0.1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(dm.train_set.tensors[1].tolist()) == set(range(10))
    # normalised with the training split's statistics
    assert abs(dm.train_set.tensors[0].mean().item()) < 1e-4
    assert dm.train_set.tensors[0].std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_split_is_deterministic_by_seed() -> None:
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    # no sample is in two splits: compare raw rows
    tr = {tuple(r) for r in a.train_set.tensors[0].flatten(1).tolist()}
    te = [tuple(r) for r in a.test_set.tensors[0].flatten(1).tolist()]
    assert sum(r in tr for r in te) <= 5  # digits has a few exact duplicate images, not whole overlaps


def test_digits_shuffle_order_is_seeded() -> None:
    first = [next(iter(DigitsDataModule(seed=1).train_dataloader()))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])


@pytest.mark.parametrize("kwargs", [{"batch_size": -1}, {"batch_size": 0}, {"num_workers": -2}, {"val_fraction": 1.5}])
def test_digits_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DigitsDataModule(**kwargs)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / MNIST_FILES[0], rng.integers(0, 256, (50, 28, 28)))
    _write_idx(tmp_path / MNIST_FILES[1], rng.integers(0, 10, (50,)))
    _write_idx(tmp_path / MNIST_FILES[2], rng.integers(0, 256, (20, 28, 28)))
    _write_idx(tmp_path / MNIST_FILES[3], rng.integers(0, 10, (20,)))
    return tmp_path


def test_idx_reader_round_trip(fake_mnist: Path) -> None:
    images = read_idx(fake_mnist / MNIST_FILES[0])
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8


def test_mnist_module_on_idx_files(fake_mnist: Path) -> None:
    dm = MNISTDataModule(root=str(fake_mnist), batch_size=8, val_size=10)
    dm.setup("fit")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)


def test_mnist_missing_files_named(tmp_path: Path, fake_mnist: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train-images-idx3-ubyte.gz.*t10k-labels"):
        MNISTDataModule(root=str(tmp_path / "nowhere"))
    (fake_mnist / MNIST_FILES[3]).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing in folder .*\['t10k-labels-idx1-ubyte.gz'\]"):
        MNISTDataModule(root=str(fake_mnist))


def test_idx_reader_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)


def test_real_mnist(mnist_dir: Path) -> None:
    dm = MNISTDataModule(root=str(mnist_dir), batch_size=32)
    dm.setup("fit")
    assert len(dm.train_set) == 55000 and len(dm.val_set) == 5000 and len(dm.test_set) == 10000
    counts = torch.bincount(dm.test_set.tensors[1], minlength=10)
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize(
    ("model", "shape", "expected"),
    [
        (MLP(784, (300, 100), 10), (3, 1, 28, 28), (3, 10)),
        (MLP(64, (32,), 10), (3, 64), (3, 10)),
        (MLP(64, (32,), 4), (5, 1, 8, 8), (5, 4)),
        (LeNet5(1, 10, 28), (3, 1, 28, 28), (3, 10)),
        (LeNet5(1, 10, 8), (2, 1, 8, 8), (2, 10)),
        (ResCNN(1, 10, 8), (3, 1, 8, 8), (3, 10)),
        (ResCNN(3, 7, 8), (4, 3, 32, 32), (4, 7)),
    ],
)
def test_model_forward_shapes(model: torch.nn.Module, shape: tuple[int, ...], expected: tuple[int, int]) -> None:
    out = model(torch.randn(shape))
    assert tuple(out.shape) == expected
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (MLP(64, (32,), 10), (2, 1, 4, 4), r"shapes cannot be multiplied \(2x16 and 64x32\)"),
        (LeNet5(1, 10, 8), (2, 3, 8, 8), r"expected input\[2, 3, 8, 8\] to have 1 channels"),
        (ResCNN(1, 10, 8), (2, 3, 8, 8), r"expected input\[2, 3, 8, 8\] to have 1 channels"),
    ],
)
def test_model_rejects_wrong_input_shape(model: torch.nn.Module, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        model(torch.randn(shape))


def test_lenet_300_100_parameter_count() -> None:
    assert sum(p.numel() for p in MLP(784, (300, 100), 10).parameters()) == 266_610


def test_bad_model_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        MLP(0)
    with pytest.raises(ValueError, match="dropout"):
        MLP(dropout=1.0)


def test_shuffle_depends_on_seed_and_epoch_only() -> None:
    from lightning_compress.data import EpochShuffleSampler

    a, b = EpochShuffleSampler(100, seed=1), EpochShuffleSampler(100, seed=1)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == list(range(100)) and first != second
    b.set_epoch(1)  # a "resumed" sampler jumps straight to epoch 1
    assert list(b) == second
    b.set_epoch(0)
    assert list(b) == first


def test_resumed_fit_sees_the_same_batches(tmp_path: Path) -> None:
    """Lightning calls set_epoch, so epoch 2 of a resumed run has epoch 2's order."""
    import lightning as L

    from conftest import trainer_kwargs

    class Record(L.Callback):
        def __init__(self) -> None:
            self.seen: dict[int, list[int]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.setdefault(trainer.current_epoch, []).extend(batch[1].tolist())

    from lightning_compress import ClassifierModule

    straight, resumed = Record(), Record()
    kw = trainer_kwargs(tmp_path, limit_val_batches=0, enable_checkpointing=True)
    t = L.Trainer(max_epochs=3, callbacks=[straight], **kw)
    t.fit(ClassifierModule(MLP(64, (8,), 10)), DigitsDataModule(batch_size=128))
    t1 = L.Trainer(max_epochs=2, callbacks=[Record()], **kw)
    t1.fit(ClassifierModule(MLP(64, (8,), 10)), DigitsDataModule(batch_size=128))
    t1.save_checkpoint(tmp_path / "e2.ckpt")
    t2 = L.Trainer(max_epochs=3, callbacks=[resumed], **kw)
    t2.fit(ClassifierModule(MLP(64, (8,), 10)), DigitsDataModule(batch_size=128), ckpt_path=tmp_path / "e2.ckpt")
    assert list(resumed.seen) == [2]
    assert resumed.seen[2] == straight.seen[2]
    assert straight.seen[1] != straight.seen[2]
