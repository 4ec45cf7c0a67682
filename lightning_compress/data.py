"""Data modules that need no network: scikit-learn's digits (embedded) and MNIST-format IDX files."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = ["DigitsDataModule", "EpochShuffleSampler", "MNISTDataModule", "ResumableLoader", "ResumesTraining", "TrainingProgress", "read_idx"]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every training epoch, so the order of epoch ``e`` is the same
    whether the run went straight through or resumed from a checkpoint at epoch ``e``.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch: its state (in the checkpoint) is its sampler's epoch and the
    batches it has yielded in that epoch, and the first epoch it iterates after loading that state skips those
    batches if it is the same epoch. With a sampler whose order depends only on the epoch
    (:class:`EpochShuffleSampler`, also inside Lightning's distributed sampler), a run resumed from a checkpoint taken
    in the middle of an epoch trains on the batches the uninterrupted run trained on (without this, Lightning starts
    the epoch's batches again from the first one).

    The skipped batches are loaded and dropped (workers, distributed samplers and batch samplers stay as they are).
    Iterating starts when the first batch is asked for, after Lightning's ``set_epoch`` (Lightning makes the
    iterator of a resumed epoch before it sets the epoch, and workers draw their indices as their iterator starts).

    The state also holds the random generators (torch's, CUDA's, ``random``'s, numpy's) as the checkpoint found
    them, put back as the resumed iteration reaches the point the checkpoint was taken at: dropout and any other
    draw in the steps after it repeat the uninterrupted run's (Lightning restores no random state). Lightning gives
    a loader its state only from a mid-epoch checkpoint; ``progress``, shared with the data module that made the
    loader (:class:`ResumesTraining`), carries it from an epoch-end one."""

    #: The attributes of the iteration a checkpoint holds (set on the instance as it iterates).
    STATE = ("_yielded", "_epoch", "_resume")
    _yielded = 0
    _epoch: int | None = None
    _resume: dict[str, Any] | None = None

    def __init__(self, *args: Any, progress: TrainingProgress | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: shared with the data module that made it (:class:`ResumesTraining`), which checkpoints and resumes it
        self.progress = progress

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        self._epoch, self._yielded = getattr(self.sampler, "epoch", None), 0
        resume, self._resume = self._resume, None
        if self.progress is not None:
            self.progress.loader = self
            kept, self.progress.resume = self.progress.resume, None
            # the data module's copy serves a checkpoint at an epoch's end (Lightning gives the loader none): the epoch
            # after it, the resumed fit's first; any other iteration (a batch peeked at before that epoch) drops it
            if resume is None and kept is not None and kept.get("epoch") is not None and self._epoch == kept["epoch"] + 1:
                resume = kept
        same_epoch = resume is not None and resume.get("epoch") is not None and resume.get("epoch") == self._epoch
        # a new iterator draws its seed from torch's generator: at every epoch's start, or with persistent workers at
        # the fit's first only; the generators are put back where the uninterrupted run had them
        if resume is not None and not same_epoch and not self.persistent_workers:
            set_random_state(resume.get("random"))  # a checkpoint at an epoch's end: this epoch's draw comes after
        batches = super().__iter__()
        if same_epoch:
            for _ in range(int(resume.get("yielded", 0))):  # type: ignore[union-attr]
                next(batches, None)
                self._yielded += 1
        if resume is not None and (same_epoch or self.persistent_workers):
            set_random_state(resume.get("random"))  # as after the checkpoint's batch
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "yielded": self._yielded, "random": random_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
        if self.progress is not None:  # Lightning's own (a mid-epoch checkpoint): the data module's copy is not needed
            self.progress.resume = None


class TrainingProgress:
    """What a data module shares with its training :class:`ResumableLoader` and with every copy Lightning makes of
    that loader (it builds a new one from the same arguments to put its distributed sampler in): the copy that
    iterates last, whose state the data module's checkpoint entry holds, and the state a resumed fit gives back."""

    def __init__(self) -> None:
        self.loader: ResumableLoader | None = None
        self.resume: dict[str, Any] | None = None
        self.resume_from: Any = None  # the checkpoint ``resume`` came from

    def __getstate__(self) -> dict[str, Any]:  # a copy of the data module (pickled to spawned processes) gets no loader
        return {"loader": None, "resume": self.resume, "resume_from": self.resume_from}


class ResumesTraining:
    """What a data module of this library adds to Lightning's: its training loader's :class:`ResumableLoader` state
    in the data module's own checkpoint entry, given back to the training loader of a fit resumed from it.

    Lightning hands a loader its state only when the checkpoint was taken in the middle of an epoch; from a checkpoint
    written at an epoch's end (``ModelCheckpoint``'s default, after validation) the loader would never get the random
    generators, and dropout in the next epoch would draw differently from the uninterrupted run's. Lightning restores
    the data module's state in every fit, before it asks for the loaders."""

    trainer: Any

    @property
    def training_progress(self) -> TrainingProgress:
        progress = self.__dict__.get("_training_progress")
        if progress is None:
            progress = self._training_progress = TrainingProgress()
        return progress

    def state_dict(self) -> dict[str, Any]:
        loader = self.training_progress.loader
        return {"train_loader": loader.state_dict()} if loader is not None else {}  # none: not iterated yet

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        progress = self.training_progress
        progress.resume = state_dict.get("train_loader") if self._resuming_fit() else None
        progress.resume_from = self.trainer.ckpt_path if progress.resume is not None else None

    def _resuming_fit(self) -> bool:
        trainer = getattr(self, "trainer", None)  # a fit resumed from a checkpoint: not trainer.validate(ckpt_path=...)
        return trainer is not None and trainer.state.fn == "fit" and bool(trainer.ckpt_path)

    def resumable_training_loader(self, dataset: Any, batch_size: int, seed: int, num_workers: int) -> DataLoader:
        """The training loader: a new fit's starts afresh (a state left by an evaluation's checkpoint, or by a
        resumed fit that trained no batch, is dropped)."""
        progress = self.training_progress
        if not self._resuming_fit() or self.trainer.ckpt_path != progress.resume_from:  # left by another fit
            progress.resume = None
        return seeded_loader(dataset, batch_size, seed, num_workers, shuffle=True, progress=progress)


def random_state() -> dict[str, Any]:
    """The global random generators' states (torch's on the CPU and on this process's CUDA device, ``random``'s,
    numpy's) as tensors, numbers and lists: what a checkpoint loaded with ``weights_only=True`` can hold."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss), float(cached)],
    }


def set_random_state(state: Any) -> None:
    """Put back what :func:`random_state` gave (nothing for ``None``: a state written before it was kept)."""
    if not isinstance(state, dict):
        return
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def seeded_loader(dataset: Any, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = False,
                  progress: TrainingProgress | None = None) -> DataLoader:
    """A DataLoader whose shuffling is a ``(seed, epoch)`` permutation and that resumes mid-epoch
    (:class:`ResumableLoader`), so a resumed run sees the same batches. An unshuffled (evaluation) loader seeds its
    iterators from a generator of its own, not torch's: a validation between a checkpoint and the next training batch
    then draws nothing a resumed run would have to replay."""
    sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    generator = None if shuffle else torch.Generator().manual_seed(seed)
    return ResumableLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=generator, progress=progress,
    )


def _check_common(batch_size: int, num_workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")


class _TensorDataModule(ResumesTraining, LightningDataModule):
    """Shared loader plumbing: subclasses fill ``self.train_set``/``val_set``/``test_set`` in ``setup``."""

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        _check_common(batch_size, num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return seeded_loader(dataset, self.batch_size, self.seed, self.num_workers, shuffle)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self.resumable_training_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("fit")
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self._loader(TensorDataset(self.test_set.tensors[0]), shuffle=False)


def _split(n: int, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic permutation split into train / val / test index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * fractions[0]), round(n * fractions[1])
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's ``load_digits``: 1,797 real 8×8 grey images of the digits 0–9, shipped in the wheel.

    Images come as ``(1, 8, 8)`` float tensors, standardised with the training split's mean and std
    (``normalize=True``), labels as ``int64``. The split is a seeded permutation, the same on every
    machine and every call.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_fraction: Share of the samples held out for validation.
        test_fraction: Share held out for the final test.
        seed: Seed of the split (and of the training shuffle).
        normalize: Standardise pixels with the training split's mean/std.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((32, 1, 8, 8), torch.int64)
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave training data, got {val_fraction} + {test_fraction}"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.normalize = normalize

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        tr, va, te = _split(len(y), (self.val_fraction, self.test_fraction), self.seed)
        if self.normalize:
            mean, std = x[tr].mean(), x[tr].std()
            x = (x - mean) / std
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(x[te], y[te])


MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: header promises {shape} ({expected} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


class MNISTDataModule(_TensorDataModule):
    """MNIST (or Fashion-MNIST) from the four official IDX ``.gz`` files in ``root``.

    Images come as ``(1, 28, 28)`` floats normalised with the training set's mean/std; the last
    ``val_size`` images of the (seed-permuted) training set are held out for validation; the test
    split is the official 10,000 images.

    Args:
        root: Folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_size: Training images held out for validation.
        seed: Seed of the validation split and of the training shuffle.
        train_subset: Use only this many training images (``None``: all), for quick runs.
    """

    num_classes = 10
    image_shape = (1, 28, 28)

    def __init__(
        self,
        root: str = "data/mnist",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        train_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if train_subset is not None and train_subset <= 0:
            raise ValueError(f"train_subset must be positive or None, got {train_subset}")
        self.root = Path(root)
        self.val_size = val_size
        self.train_subset = train_subset
        self.check_files()

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming the folder and the expected files if any is missing."""
        missing = [f for f in MNIST_FILES if not (self.root / f).is_file()]
        if missing:
            where = f"folder {str(self.root)!r}" + ("" if self.root.is_dir() else " (which does not exist)")
            raise FileNotFoundError(
                f"MNIST files missing in {where}: {missing}. The folder must hold the four IDX files "
                f"{list(MNIST_FILES)} (MNIST or Fashion-MNIST format)."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_train = torch.from_numpy(read_idx(self.root / MNIST_FILES[0]).copy()).float().div_(255.0)
        y_train = torch.from_numpy(read_idx(self.root / MNIST_FILES[1]).astype(np.int64))
        x_test = torch.from_numpy(read_idx(self.root / MNIST_FILES[2]).copy()).float().div_(255.0)
        y_test = torch.from_numpy(read_idx(self.root / MNIST_FILES[3]).astype(np.int64))
        if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
            raise ValueError(f"MNIST images and labels disagree in count in {self.root}")
        perm = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(y_train)))
        va, tr = perm[: self.val_size], perm[self.val_size :]
        if self.train_subset is not None:
            tr = tr[: self.train_subset]
        mean, std = x_train[tr].mean(), x_train[tr].std()
        norm = lambda t: ((t - mean) / std).unsqueeze(1)  # noqa: E731
        self.train_set = TensorDataset(norm(x_train[tr]), y_train[tr])
        self.val_set = TensorDataset(norm(x_train[va]), y_train[va]) if self.val_size else None
        self.test_set = TensorDataset(norm(x_test), y_test)

    def val_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self.val_set is None:
            return DataLoader([])
        return self._loader(self.val_set, shuffle=False)
