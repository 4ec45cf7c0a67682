"""Loading a teacher's weights from whatever checkpoint trained it, and the teacher-output cache."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = ["IndexedDataset", "TeacherCache", "closest_names", "find_prefix", "load_teacher_weights", "read_state_dict"]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read the tensors of a Lightning checkpoint (its ``state_dict``), a ``state_dict`` file or a ``.safetensors`` file.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (folder {str(path.parent)!r} does not exist either)"
        raise FileNotFoundError(
            f"teacher_ckpt {str(path)!r} not found{where}. Train the teacher first (see configs/teacher.yaml) "
            "or give the path of its checkpoint / state_dict file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning checkpoints may pickle hyperparameter objects
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"teacher_ckpt {str(path)!r} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"teacher_ckpt {str(path)!r} holds no tensors (keys: {list(obj)[:10]})")
    return tensors


def find_prefix(expected: Mapping[str, Tensor], available: Mapping[str, Tensor], prefix: str | None = None) -> str:
    """The key prefix under which ``available`` holds every key of ``expected`` with the same shape.

    A Lightning module that wrapped the teacher as ``self.model`` saved its weights as ``model.*``;
    one that wrapped it as ``self.net.backbone`` as ``net.backbone.*``; a plain state_dict has no
    prefix. Candidates are the prefixes of keys of ``available`` that end with an expected key; the
    one that covers all expected keys wins, ``"teacher."`` and then the shortest when several do.

    Raises:
        ValueError: no prefix matches every key (the message shows the best candidate, what it
            lacks, and sample keys of both sides).

    Example:
        >>> exp = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
        >>> find_prefix(exp, {"model.fc.weight": torch.ones(2, 3), "model.fc.bias": torch.ones(2)})
        'model.'
        >>> find_prefix(exp, dict(exp))
        ''
    """
    if prefix is not None:
        candidates = {prefix: 0}
    else:
        candidates = {}
        for key in available:
            for name in expected:
                if key == name or key.endswith("." + name):
                    p = key[: len(key) - len(name)]
                    candidates[p] = candidates.get(p, 0) + 1
    scored: list[tuple[int, str, list[str]]] = []
    for p in candidates:
        missing = [n for n in expected if p + n not in available]
        bad_shape = [
            f"{n}: checkpoint {tuple(available[p + n].shape)} vs teacher {tuple(expected[n].shape)}"
            for n in expected
            if p + n in available and available[p + n].shape != expected[n].shape
        ]
        scored.append((len(missing) + len(bad_shape), p, missing + bad_shape))
    complete = [p for n_bad, p, _ in scored if n_bad == 0]
    if complete:
        if "teacher." in complete:
            return "teacher."
        return min(complete, key=lambda p: (len(p), p))
    sample_ckpt = list(available)[:6]
    sample_exp = list(expected)[:6]
    if not scored or prefix is None and not any(n_bad < len(expected) for n_bad, _, _ in scored):
        raise ValueError(
            f"no key of the teacher checkpoint matches the teacher: it expects keys like {sample_exp}, the "
            f"checkpoint has keys like {sample_ckpt}. Is it the checkpoint of this teacher architecture?"
        )
    n_bad, best, problems = min(scored, key=lambda s: s[0])
    raise ValueError(
        f"the teacher checkpoint does not hold all teacher weights: best key prefix {best!r} lacks or mismatches "
        f"{n_bad} of {len(expected)} entries, e.g. {problems[:5]}. Checkpoint keys look like {sample_ckpt}."
    )


def load_teacher_weights(teacher: nn.Module, path: str | os.PathLike[str], prefix: str | None = None) -> str:
    """Load ``teacher``'s weights from ``path`` whatever the key prefix; return the prefix used.

    Example:
        >>> import tempfile
        >>> net = nn.Linear(3, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, f"{d}/t.ckpt")
        ...     load_teacher_weights(nn.Linear(3, 2), f"{d}/t.ckpt")
        'model.'
    """
    available = read_state_dict(path)
    expected = teacher.state_dict()
    found = find_prefix(expected, available, prefix)
    teacher.load_state_dict({k: available[found + k] for k in expected}, strict=True)
    return found


def closest_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """The ``n`` names closest to ``name`` (difflib), falling back to the first few names.

    Example:
        >>> closest_names("net.11", ["net.0", "net.1", "fc", "stem.0"])[:2]
        ['net.1', 'net.0']
    """
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.3)
    return close or names[:n]


class IndexedDataset(Dataset):
    """Wrap a dataset so each sample carries its index: ``{"x": x, "y": y, "index": i}``.

    The :class:`~lightning_compress.DistillationModule`'s teacher cache keys cached teacher outputs
    by this index, so the training data may be shuffled. Samples that are tuples ``(x, y)`` or
    ``(x,)`` (unlabeled) or single tensors are understood.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.arange(4.0), torch.arange(4)))
        >>> ds[2]
        {'x': tensor(2.), 'y': tensor(2), 'index': 2}
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            out = {"x": item[0]}
            if len(item) > 1:
                out["y"] = item[1]
        else:
            out = {"x": item}
        out["index"] = index
        return out


def _fingerprint(x: Tensor) -> Tensor:
    """Two numbers per sample that change when the input changes (sum and a position-weighted sum)."""
    flat = x.detach().flatten(1).double()
    weights = torch.linspace(1.0, 2.0, flat.shape[1], dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(1), (flat * weights).sum(1)], 1).cpu()


class TeacherCache:
    """Teacher logits kept on CPU, keyed by sample index (or by batch index for unshuffled data).

    Each entry also keeps a fingerprint of its input; a lookup whose input differs raises an error,
    so random augmentation is detected instead of silently training on stale targets.
    """

    def __init__(self) -> None:
        self.logits: Tensor | None = None
        self.prints: Tensor | None = None
        self.filled: Tensor | None = None
        self.by_batch: dict[int, tuple[Tensor, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.by_batch) if self.by_batch else (0 if self.filled is None else int(self.filled.sum()))

    def _grow(self, size: int, num_logits: tuple[int, ...], dtype: torch.dtype) -> None:
        if self.logits is not None and self.logits.shape[0] >= size:
            return
        new = max(size, 2 * (0 if self.logits is None else self.logits.shape[0]), 1024)
        logits = torch.zeros(new, *num_logits, dtype=dtype)
        prints = torch.zeros(new, 2, dtype=torch.float64)
        filled = torch.zeros(new, dtype=torch.bool)
        if self.logits is not None:
            n = self.logits.shape[0]
            logits[:n], prints[:n], filled[:n] = self.logits, self.prints, self.filled
        self.logits, self.prints, self.filled = logits, prints, filled

    @staticmethod
    def _check(old: Tensor, new: Tensor, where: str) -> None:
        if not torch.allclose(old, new, rtol=1e-4, atol=1e-3):
            raise RuntimeError(
                f"teacher cache: the input of {where} changed since its teacher output was cached, so the "
                "training data is not deterministic (random augmentation? shuffled data without sample "
                "indices?). Cached teacher outputs would be stale: set cache_teacher_outputs=False, or make the "
                "training data deterministic."
            )

    def lookup(self, x: Tensor, index: Tensor | None, batch_idx: int) -> Tensor | None:
        """Cached logits for this batch (on ``x``'s device), or ``None`` if any sample is missing."""
        prints = _fingerprint(x)
        if index is None:
            entry = self.by_batch.get(batch_idx)
            if entry is None or entry[0].shape[0] != x.shape[0]:
                self.misses += 1
                return None
            self._check(entry[1], prints, f"batch {batch_idx}")
            self.hits += 1
            return entry[0].to(x.device)
        idx = index.detach().long().cpu()
        if self.filled is None or int(idx.max()) >= self.filled.shape[0] or not bool(self.filled[idx].all()):
            self.misses += 1
            return None
        assert self.prints is not None and self.logits is not None
        self._check(self.prints[idx], prints, f"samples {idx[:5].tolist()}...")
        self.hits += 1
        return self.logits[idx].to(x.device)

    def store(self, x: Tensor, index: Tensor | None, batch_idx: int, logits: Tensor) -> None:
        prints = _fingerprint(x)
        logits = logits.detach().cpu()
        if index is None:
            self.by_batch[batch_idx] = (logits, prints)
            return
        idx = index.detach().long().cpu()
        self._grow(int(idx.max()) + 1, tuple(logits.shape[1:]), logits.dtype)
        assert self.logits is not None and self.prints is not None and self.filled is not None
        self.logits[idx], self.prints[idx], self.filled[idx] = logits, prints, True
