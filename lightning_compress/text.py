"""``TextDataModule``: a byte-level language-modelling corpus every Python installation has.

The corpus is the standard library's own ``.py`` sources (about 12 MB without its tests on CPython
3.11): real, varied text that needs no download and no tokenizer. Files are assigned to
train/validation/test by a hash of their path relative to the root, so the split is the same on every
machine and does not move when files are added or removed elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_compress.data import ResumesTraining, _check_common, seeded_loader

__all__ = ["ByteChunks", "TextDataModule", "decode", "encode", "split_of"]

#: Byte written between two files (a document boundary; it never occurs in Python source).
SEPARATOR = 0
#: Folders never read: installed third-party packages, caches and hidden folders (``.venv``, ``.git``).
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Test folders, read only with ``include_tests=True``.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})

_SPLITS = ("train", "val", "test")


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as an ``int64`` tensor of token ids in ``[0, 256)``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor | list[int]) -> str:
    """Token ids back to text (invalid UTF-8 sequences become ``�``)."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return bytes(int(v) for v in values).decode("utf-8", errors="replace")


def _hash_unit(relative_path: str, seed: int) -> float:
    """A number in ``[0, 1)`` fixed by ``(seed, path)``: the same on every machine and Python build."""
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(relative_path: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """``"train"``, ``"val"`` or ``"test"``: the split a file belongs to, from its POSIX relative path.

    Example:
        >>> split_of("json/decoder.py", 0.05, 0.05)
        'train'
    """
    u = _hash_unit(relative_path, seed)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def default_root() -> Path:
    """The standard library's folder (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: str | os.PathLike[str], include_tests: bool = False) -> list[str]:
    """POSIX paths (relative to ``root``) of the ``.py`` files under it, sorted.

    Skips ``site-packages``/``dist-packages``, ``__pycache__``, hidden folders and (unless
    ``include_tests``) folders named ``test``, ``tests`` or ``idle_test``. Symbolic links to folders
    are not followed.
    """
    root = Path(root)
    skipped = SKIPPED_DIRS if include_tests else SKIPPED_DIRS | TEST_DIRS
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skipped and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


class ByteChunks(Dataset):
    """Samples ``{"input_ids": (T,), "labels": (T,)}`` cut from one long byte stream.

    Sample ``i`` covers bytes ``[i*T, i*T + T + 1)``: inputs are its first ``T`` bytes, labels the
    last ``T`` (the inputs shifted by one), so every byte after the first is predicted exactly once.
    A last, shorter chunk is padded: inputs with ``SEPARATOR``, labels with ``ignore_index``.
    """

    def __init__(self, data: Tensor, seq_len: int, ignore_index: int = -100) -> None:
        if data.dim() != 1 or data.numel() < 2:
            raise ValueError(f"ByteChunks needs a 1-D stream of at least 2 bytes, got shape {tuple(data.shape)}")
        self.data = data
        self.seq_len = seq_len
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return -(-(self.data.numel() - 1) // self.seq_len)  # ceil: the padded last chunk counts

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        start = index * self.seq_len
        chunk = self.data[start : start + self.seq_len + 1].long()
        input_ids = torch.full((self.seq_len,), SEPARATOR, dtype=torch.long)
        labels = torch.full((self.seq_len,), self.ignore_index, dtype=torch.long)
        n = chunk.numel() - 1
        input_ids[:n] = chunk[:-1]
        labels[:n] = chunk[1:]
        return {"input_ids": input_ids, "labels": labels}


class TextDataModule(ResumesTraining, LightningDataModule):
    """Byte-level language modelling on the Python standard library's own sources (no download).

    Every ``.py`` file under ``root`` (default: the running interpreter's standard library, found with
    ``sysconfig.get_paths()["stdlib"]``; ``site-packages`` skipped) goes to train, validation or test by
    a hash of ``(seed, relative path)``; no file is split between them. Each split's files, ordered by
    that hash, are joined with a ``0`` byte between files and cut into samples of ``seq_len`` inputs
    and ``seq_len`` labels (the next bytes). Tokens are bytes: ``vocab_size`` is 256.

    ``max_bytes`` caps the corpus for quick runs: each split gets its share (``val_fraction`` of it
    for validation, ...), taken from its files in hash order, the last file cut short.

    Args:
        root: Folder to read ``.py`` files from; ``None``: the standard library.
        seq_len: Tokens per sample (the model's context).
        batch_size: Samples per batch.
        val_fraction: Expected share of the files held out for validation.
        test_fraction: Expected share of the files held out for the final test.
        max_bytes: Cap on the bytes read (all splits together); ``None``: everything.
        seed: Seed of the file split and of the training shuffle.
        num_workers: DataLoader workers.
        include_tests: Also read folders named ``test``/``tests``/``idle_test`` (the standard library's
            test suite roughly triples the corpus).

    Example:
        >>> dm = TextDataModule(seq_len=64, batch_size=4, max_bytes=100_000)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["input_ids"].shape), bool((batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all())
        ((4, 64), True)
    """

    vocab_size = 256

    def __init__(
        self,
        root: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_bytes: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        include_tests: bool = False,
    ) -> None:
        super().__init__()
        _check_common(batch_size, num_workers)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave training data, got {val_fraction} + {test_fraction}"
            )
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
        self.root = default_root() if root is None else Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"TextDataModule: root {str(self.root)!r} is not a folder")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.max_bytes = max_bytes
        self.seed = seed
        self.num_workers = num_workers
        self.include_tests = include_tests
        self.files: dict[str, list[str]] = {}
        self.train_set: ByteChunks | None = None
        self.val_set: ByteChunks | None = None
        self.test_set: ByteChunks | None = None

    def split_files(self) -> dict[str, list[str]]:
        """``{"train": [...], "val": [...], "test": [...]}``: relative paths, each list in hash order."""
        files = source_files(self.root, self.include_tests)
        if not files:
            raise ValueError(f"TextDataModule: no .py files under {str(self.root)!r}")
        splits: dict[str, list[str]] = {name: [] for name in _SPLITS}
        for rel in sorted(files, key=lambda r: (_hash_unit(r, self.seed), r)):
            splits[split_of(rel, self.val_fraction, self.test_fraction, self.seed)].append(rel)
        return splits

    def _read(self, files: list[str], cap: int | None) -> Tensor:
        parts: list[bytes] = []
        total = 0
        for rel in files:
            if cap is not None and total >= cap:
                break
            data = (self.root / rel).read_bytes() + bytes([SEPARATOR])
            if cap is not None:
                data = data[: cap - total]
            parts.append(data)
            total += len(data)
        joined = b"".join(parts)
        return torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.files = self.split_files()
        shares = {
            "train": 1.0 - self.val_fraction - self.test_fraction, "val": self.val_fraction, "test": self.test_fraction
        }
        sets: dict[str, ByteChunks] = {}
        for name in _SPLITS:
            cap = None if self.max_bytes is None else round(self.max_bytes * shares[name])
            data = self._read(self.files[name], cap)
            if data.numel() < 2:
                raise ValueError(
                    f"TextDataModule: the {name} split is empty ({len(self.files[name])} files under "
                    f"{str(self.root)!r}, max_bytes={self.max_bytes!r}, seed={self.seed!r}); raise max_bytes or the "
                    "fractions, use a larger root, or try another seed (files are split by a hash of their name and the "
                    "seed, so a few files may leave a split none)"
                )
            sets[name] = ByteChunks(data, self.seq_len)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]

    def _loader(self, dataset: ByteChunks | None, shuffle: bool) -> DataLoader:
        assert dataset is not None  # setup() ran
        return seeded_loader(dataset, self.batch_size, self.seed, self.num_workers, shuffle)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.resumable_training_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
