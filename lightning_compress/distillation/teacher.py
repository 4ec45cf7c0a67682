"""Loading a teacher's weights from whatever checkpoint trained it.

``IndexedDataset`` and ``TeacherCache`` live in :mod:`lightning_compress.distillation.cache`; they are
imported here too, where they used to be.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch  # noqa: F401 - the docstring examples use it
from torch import Tensor, nn

from lightning_compress._files import UnsafePickleError, Unresolved, load_checkpoint, unresolved_names
from lightning_compress.distillation.cache import IndexedDataset, TeacherCache

__all__ = ["IndexedDataset", "TeacherCache", "closest_names", "find_prefix", "load_teacher_weights", "read_state_dict"]


def read_state_dict(path: str | os.PathLike[str], trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read the tensors of a Lightning checkpoint (its ``state_dict``), a ``state_dict`` file or a ``.safetensors``
    file, without running code from it.

    A pickle that holds Python objects besides tensors (a Lightning checkpoint whose hyper-parameters hold a
    ``Namespace``, a config class or a module) is read with inert placeholders for those objects: nothing of
    them is imported or called (:func:`lightning_compress._files.load_checkpoint_tensors`).

    Args:
        path: The file.
        trust_pickle: **Unsafe.** Load pickled objects with ``torch.load(weights_only=False)``, which runs
            whatever code the file names (needed only for a whole pickled ``nn.Module``). Only for files you
            made yourself or trust.

    Raises:
        FileNotFoundError: the path does not exist.
        IsADirectoryError: the path is a folder.
        ValueError: not a checkpoint (a text file, another tool's file), truncated or damaged, or no tensors.
        UnsafePickleError: pickled objects the file cannot be read around safely (without ``trust_pickle``).
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        where = "" if path.parent.is_dir() else f" (folder {str(path.parent)!r} does not exist either)"
        raise FileNotFoundError(
            f"teacher_ckpt {name!r} not found{where}. Train the teacher first (see configs/teacher.yaml) "
            "or give the path of its checkpoint / state_dict file. Loading a DistillationModule checkpoint written "
            "with save_teacher=True, which holds the teacher: pass teacher_ckpt=None to load_from_checkpoint."
        )
    obj: Any = load_checkpoint(path, "teacher_ckpt", trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Unresolved):
        raise UnsafePickleError(
            f"teacher_ckpt {name!r} holds a pickled {obj.name} object, not a checkpoint or state_dict: its weights "
            "cannot be read without running code named in the file. Save the teacher's state_dict instead "
            "(torch.save(model.state_dict(), path)), or pass trust_pickle=True only if you made or trust the file",
            name,
            obj.name,
        )
    if not isinstance(obj, Mapping):
        raise ValueError(f"teacher_ckpt {name!r} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        skipped = unresolved_names(obj)
        note = f"; objects not loaded because loading them would run code: {skipped}" if skipped else ""
        raise ValueError(f"teacher_ckpt {name!r} holds no tensors (keys: {list(obj)[:10]}{note})")
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


def load_teacher_weights(
    teacher: nn.Module, path: str | os.PathLike[str], prefix: str | None = None, trust_pickle: bool = False
) -> str:
    """Load ``teacher``'s weights from ``path`` whatever the key prefix; return the prefix used.

    The file is read by :func:`read_state_dict` (``trust_pickle`` is passed on: unsafe, see there).

    Example:
        >>> import tempfile
        >>> net = nn.Linear(3, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, f"{d}/t.ckpt")
        ...     load_teacher_weights(nn.Linear(3, 2), f"{d}/t.ckpt")
        'model.'
    """
    available = read_state_dict(path, trust_pickle=trust_pickle)
    aliases = _tied_aliases(teacher, available)
    expected = {k: v for k, v in teacher.state_dict().items() if k not in aliases}
    try:
        found = find_prefix(expected, available, prefix)
    except ValueError as err:
        raise ValueError(f"teacher_ckpt {os.fspath(path)!r}: {err}") from None
    missing, unexpected = teacher.load_state_dict({k: available[found + k] for k in expected}, strict=False)
    if set(missing) - aliases or unexpected:  # only a tied weight's other names may be left: it is loaded through one
        raise RuntimeError(f"teacher_ckpt {os.fspath(path)!r}: missing {sorted(set(missing) - aliases)}, unexpected {unexpected}")
    return found


def _tied_aliases(teacher: nn.Module, available: Mapping[str, Tensor]) -> set[str]:
    """The names of tied weights (one Parameter under several names, a head tied to the embedding) that need not
    be in a checkpoint: all but one per weight, the one the checkpoint holds (``save_pretrained`` writes one)."""
    names: dict[int, list[str]] = {}
    for name, p in teacher.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out: set[str] = set()
    for group in (g for g in names.values() if len(g) > 1):
        held = [n for n in group if any(k == n or k.endswith("." + n) for k in available)]
        out |= set(group) - {held[0] if held else group[0]}
    return out


def closest_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """The ``n`` names closest to ``name`` (difflib), falling back to the first few names.

    Example:
        >>> closest_names("net.11", ["net.0", "net.1", "fc", "stem.0"])[:2]
        ['net.1', 'net.0']
    """
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.3)
    return close or names[:n]
