"""Reading weight files without running code from them, and checking that their tensors arrived intact.

Every load path of the package goes through these helpers:

- :func:`sniff` looks at a path before anything parses it: a missing file, a folder, an empty file, or
  content that is not a torch archive, a legacy torch file or a safetensors file (a text file, say) is
  refused with a message that names the file. Nothing else reaches an unpickler.
- :func:`load_torch_file` is ``torch.load(weights_only=True)`` whose failures name the file and say what
  to do: a truncated or damaged archive, or pickled Python objects that ``weights_only`` refuses
  (:class:`UnsafePickleError`; ``trust_pickle=True`` loads them anyway, for files one trusts).
- :func:`load_checkpoint_tensors` reads a torch archive whose pickle names classes or functions outside
  torch's weights-only allowlist (a Lightning checkpoint whose hyper-parameters hold arbitrary objects)
  without importing or calling any of them: each such object becomes an inert :class:`Unresolved`
  placeholder, everything else (tensors, containers, numbers, strings) loads as usual.
- :func:`load_checkpoint` chains the two (and reads safetensors files): what every checkpoint path uses.
- :func:`tensor_crc32` is the per-tensor digest of the package's own file formats.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_compress._placeholder_unpickler import Unresolved, placeholder_pickle_module
from lightning_compress._validation import as_flag

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_HEADER",
    "IncompleteFileError",
    "QUANTIZED_FORMAT",
    "QUANTIZED_HEADER",
    "RESAVE_HINT",
    "UnsafePickleError",
    "Unresolved",
    "check_crc32_hex",
    "check_writable",
    "crc32_hex",
    "load_checkpoint",
    "load_checkpoint_tensors",
    "load_safetensors_file",
    "save_safetensors",
    "load_torch_file",
    "other_loader_hint",
    "sniff",
    "tensor_crc32",
    "unresolved_names",
]

FileKind = Literal["zip", "pickle", "safetensors"]

#: How this library's own safetensors files say what they are: a compact artifact's metadata holds its header
#: under ``COMPACT_HEADER`` (format ``COMPACT_FORMAT``), a ``save_quantized`` file's under ``QUANTIZED_HEADER``
#: (format ``QUANTIZED_FORMAT``; files of earlier releases: ``format`` and ``quantization_spec`` keys). One key
#: each: safetensors writes several keys in a per-process order, so two writes of a model would differ in bytes.
COMPACT_FORMAT = "lightning-compress/compact"
COMPACT_HEADER = "lightning_compress"
QUANTIZED_FORMAT = "lightning-compress/quantized"
QUANTIZED_HEADER = "lightning_compress_quantized"
#: The tensor holding a compact artifact's graph (its name says what the file is without its metadata).
COMPACT_PROGRAM = "__program__"


def other_loader_hint(metadata: Mapping[str, Any] | None = None, tensors: Iterable[str] = (), own: str = "") -> str | None:
    """Which loader reads a file of this library that another loader was given, from its safetensors
    ``metadata`` or its tensor names; ``None`` for any other file, and for the asking loader's ``own`` kind
    (``"compact"`` or ``"quantized"``: such a file is damaged, not another kind)."""
    metadata = metadata or {}
    if own != "compact" and (COMPACT_HEADER in metadata or COMPACT_PROGRAM in set(tensors)):
        return "it is a compact artifact written by lightning_compress.export; load it with lightning_compress.load(path)"
    if own != "quantized" and (QUANTIZED_HEADER in metadata or metadata.get("format") == QUANTIZED_FORMAT):
        return ("it is a quantised model file written by save_quantized; load it into the float model with "
                "lightning_compress.load_quantized(model, path)")
    return None

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save(..., _use_new_zipfile_serialization=False): pickle protocol 2, then torch's magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_AGAIN = "copy it again (or save it again) and retry"


class IncompleteFileError(ValueError):
    """A file that is empty or shorter than its own header says: a copy or a write that did not finish."""


class UnsafePickleError(pickle.UnpicklingError):
    """A torch file holds pickled Python objects that ``torch.load(weights_only=True)`` refuses.

    Attributes:
        path: The file.
        global_name: The class or function the file names that is not on torch's allowlist, if known.
    """

    def __init__(self, message: str, path: str, global_name: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.global_name = global_name


# ------------------------------------------------------------------------------------------ sniffing
def _describe_bytes(head: bytes) -> str:
    """``it looks like text: '...'`` or ``it starts with bytes 12 34 ...``."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end of the sample is still text
        text = head[: err.start].decode("utf-8") if err.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0] if text.strip() else text
        return f"it looks like text: {first[:40]!r}"
    return "it starts with bytes " + " ".join(f"{b:02x}" for b in head[:8])


def check_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path`, once it names a file that exists.

    Raises:
        IsADirectoryError: ``path`` is a folder (what it holds of checkpoints and weights is named).
        FileNotFoundError: no such file (and whether its folder is missing too).
    """
    name = os.fspath(path)
    p = Path(name)
    if p.is_dir():
        inside = sorted(str(f.name) for f in p.iterdir() if f.suffix in (".ckpt", ".pt", ".pth", ".safetensors"))[:5]
        hint = f" (it holds {inside})" if inside else ""
        raise IsADirectoryError(f"{what} {name!r} is a folder, not a file{hint}; give the path of the file itself")
    if not p.is_file():
        where = "" if p.parent.is_dir() else f" (folder {str(p.parent)!r} does not exist either)"
        raise FileNotFoundError(f"{what} {name!r} not found{where}")
    return p


def sniff(path: str | os.PathLike[str], what: str = "file") -> FileKind:
    """What ``path`` holds, from its first bytes: ``"zip"`` (a ``torch.save`` archive), ``"pickle"`` (a
    legacy ``torch.save`` file) or ``"safetensors"``.

    Args:
        path: The file.
        what: What the file is to the caller (``"teacher_ckpt"``, ``"quantised model file"``), for messages.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder.
        ValueError: an empty file, a truncated safetensors header, or anything else: a text file, a plain
            Python pickle, a file of another tool.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> d = tmp.name
        >>> torch.save({"w": torch.zeros(2)}, f"{d}/w.pt")
        >>> sniff(f"{d}/w.pt")
        'zip'
        >>> _ = Path(f"{d}/notes.ckpt").write_text("epoch=3 val_acc=0.98")
        >>> sniff(f"{d}/notes.ckpt", "teacher_ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: teacher_ckpt '.../notes.ckpt' is not a checkpoint, torch or safetensors file (it looks like text: 'epoch=3 val_acc=0.98'); give ...
    """
    name = os.fspath(path)
    p = check_file(path, what)
    size = p.stat().st_size
    if size == 0:
        raise IncompleteFileError(f"{what} {name!r} is empty (0 bytes): whatever wrote or copied it did not finish; {_AGAIN}")
    with open(p, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _MAX_SAFETENSORS_HEADER:
            if 8 + n > size:
                raise IncompleteFileError(
                    f"{what} {name!r} is truncated: its safetensors header says {n} bytes, the file has only "
                    f"{size - 8} after the length field; {_AGAIN}"
                )
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:
        raise ValueError(
            f"{what} {name!r} is a plain Python pickle, not written by torch.save: reading it would run whatever "
            "code it names. Re-save the weights with torch.save(model.state_dict(), ...) or safetensors"
        )
    raise ValueError(
        f"{what} {name!r} is not a checkpoint, torch or safetensors file ({_describe_bytes(head)}); "
        "give the path of a .ckpt, .pt or .safetensors file"
    )


def _archive_check(f: Any, name: str, what: str) -> None:
    """Refuse a zip that is truncated, not a torch archive, or a TorchScript archive (which
    ``torch.load(weights_only=False)`` hands to ``torch.jit.load``), before ``torch.load`` sees it."""
    try:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{what} {name!r} is truncated or damaged (its zip directory cannot be read: {err}); {_AGAIN}") from None
    finally:
        f.seek(0)
    last = [n.rsplit("/", 1)[-1] for n in names]
    if "constants.pkl" in last:
        raise ValueError(
            f"{what} {name!r} is a TorchScript archive, not a checkpoint: loading it would run its code. "
            "Load it with torch.jit.load only if you trust it, and save its state_dict instead"
        )
    if "data.pkl" not in last:
        raise ValueError(f"{what} {name!r} is a zip archive, but not one written by torch.save (it has no data.pkl)")


# ------------------------------------------------------------------------------------- torch.load
# what torch's weights-only unpickler says when it refuses an object (not when the data is garbage)
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|unrecognized function (\S+)|(Can only (?:build|create new object))")


def _unsafe_message(name: str, what: str, global_name: str | None, hint: str) -> str:
    holds = f" (for example {global_name})" if global_name else ""
    return (
        f"{what} {name!r} holds pickled Python objects{holds} besides tensors. Loading them would import and call "
        f"code named in the file, so they are not loaded. {hint}"
    )


RESAVE_HINT = "Re-save the weights as a state_dict (torch.save(model.state_dict(), path)) or as .safetensors"
_TRUST_HINT = f"{RESAVE_HINT}; or pass trust_pickle=True, only for a file you made yourself or trust: it runs whatever the file names"


def _damaged(name: str, what: str, err: BaseException) -> ValueError:
    return ValueError(f"{what} {name!r} is truncated or damaged ({type(err).__name__}: {str(err).splitlines()[0][:160]}); {_AGAIN}")


def load_torch_file(
    path: str | os.PathLike[str],
    what: str = "file",
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    hint: str = _TRUST_HINT,
) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name the file and say what to do.

    Args:
        path: A ``torch.save`` file (checked with :func:`sniff` first).
        what: What the file is to the caller, for messages.
        trust_pickle: **Unsafe.** When ``weights_only`` refuses the file, load it with
            ``weights_only=False`` (with a warning), which imports and calls whatever the file names:
            only for a file you made yourself or trust.
        map_location: Where to put the tensors.
        hint: What the :class:`UnsafePickleError` message advises.

    Raises:
        UnsafePickleError: the file holds pickled Python objects other than tensors and plain containers
            (and ``trust_pickle`` is off).
        ValueError: a truncated or damaged file, or one that is not a torch file (see :func:`sniff`).
    """
    trust_pickle = as_flag(trust_pickle, "trust_pickle")  # "false" is a true string: never unpickle on one
    name = os.fspath(path)
    kind = sniff(path, what)
    if kind == "safetensors":
        raise ValueError(f"{what} {name!r} is a safetensors file, not a torch.save file")
    if kind == "zip":
        with open(name, "rb") as f:
            _archive_check(f, name, what)
    try:
        return torch.load(name, map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        match = _GLOBAL_RE.search(str(err))
        if match is None:
            raise _damaged(name, what, err) from None
        global_name = match.group(1) or match.group(2)
        if not trust_pickle:
            raise UnsafePickleError(_unsafe_message(name, what, global_name, hint), name, global_name) from None
    except Exception as err:  # noqa: BLE001 - weights_only ran only allow-listed code: the data is at fault
        raise _damaged(name, what, err) from err
    warnings.warn(
        f"{what} {name!r}: trust_pickle=True loads its pickled Python objects with torch.load(weights_only=False), "
        "which runs whatever code the file names; do this only for files you made yourself or trust",
        UserWarning,
        stacklevel=2,
    )
    # the archive was read up to the refused object, so what fails now is the file's own code: not mapped
    return torch.load(name, map_location=map_location, weights_only=False, mmap=False)


def _torchscript_check(f: Any, name: str, what: str) -> None:
    """torch's own test for a TorchScript archive (which ``weights_only=False`` would run), on torch's reader."""
    opener = getattr(torch.serialization, "_open_zipfile_reader", None)
    is_script = getattr(torch.serialization, "_is_torchscript_zip", None)
    if opener is None or is_script is None:  # pragma: no cover - the zipfile check already ran
        return
    try:
        with opener(f) as reader:
            script = is_script(reader)
    except RuntimeError as err:
        raise _damaged(name, what, err) from err
    finally:
        f.seek(0)
    if script:
        raise ValueError(f"{what} {name!r} is a TorchScript archive, not a checkpoint: loading it would run its code")


def load_checkpoint_tensors(path: str | os.PathLike[str], what: str = "file", map_location: str | torch.device = "cpu") -> Any:
    """Load a ``torch.save`` archive without importing or calling anything outside torch's weights-only
    allowlist: each object of another class becomes an :class:`Unresolved` placeholder.

    For Lightning checkpoints whose hyper-parameters hold arbitrary objects (a ``Namespace``, an
    ``nn.Module``, a config class): the ``state_dict`` loads as it was saved, the hyper-parameters come back
    as placeholders. Legacy (non-zip) torch files are not read this way.

    Raises:
        ValueError: not a zip torch archive, a TorchScript archive, or a truncated/damaged file.
        pickle.UnpicklingError: pickle content this reader refuses (a call of something that is not allow-listed).
    """
    name = os.fspath(path)
    kind = sniff(path, what)
    if kind != "zip":
        raise ValueError(f"{what} {name!r} is a {'legacy torch' if kind == 'pickle' else kind} file; only torch.save zip archives are read with placeholders")
    with open(name, "rb") as f:
        _archive_check(f, name, what)
        _torchscript_check(f, name, what)
        try:
            return torch.load(f, map_location=map_location, weights_only=False, pickle_module=placeholder_pickle_module(), mmap=False)
        except pickle.UnpicklingError:
            raise
        except RuntimeError as err:
            if "explicit pickle_module" in str(err):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 forbids this reader
                raise pickle.UnpicklingError(f"placeholders are not allowed here: {err}") from None
            raise _damaged(name, what, err) from err
        except Exception as err:  # noqa: BLE001 - only allow-listed code ran: any other failure is the data's
            raise _damaged(name, what, err) from err


def load_checkpoint(
    path: str | os.PathLike[str],
    what: str = "checkpoint",
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    hint: str = _TRUST_HINT,
) -> Any:
    """A checkpoint's content, loaded safely: ``weights_only=True``; when that refuses pickled objects, the
    same with placeholders for them (:func:`load_checkpoint_tensors`); with ``trust_pickle`` (unsafe), the
    objects themselves. Safetensors files come back as ``{"state_dict": tensors, "metadata": {...}}``.

    Raises:
        UnsafePickleError: pickled objects that even the placeholder reader cannot step over (a legacy
            file, or calls it refuses), without ``trust_pickle``.
        ValueError, FileNotFoundError, IsADirectoryError: see :func:`sniff` and :func:`load_torch_file`.
    """
    if sniff(path, what) == "safetensors":
        tensors, metadata = load_safetensors_file(path, what, map_location)
        return {"state_dict": tensors, "metadata": metadata}
    try:
        return load_torch_file(path, what, trust_pickle=trust_pickle, map_location=map_location, hint=hint)
    except UnsafePickleError as refused:
        try:
            return load_checkpoint_tensors(path, what, map_location)
        except (pickle.UnpicklingError, ValueError) as err:
            message = f"{refused} (Reading it with placeholders for those objects failed too: {err}.)"
            raise UnsafePickleError(message, refused.path, refused.global_name) from err


def unresolved_names(obj: Any, limit: int = 5) -> list[str]:
    """Names of the first ``limit`` placeholders inside ``obj`` (for messages)."""
    found: list[str] = []
    for item in _walk(obj):
        if isinstance(item, Unresolved) and item.name not in found:
            found.append(item.name)
            if len(found) == limit:
                break
    return found


def _walk(obj: Any) -> Iterator[Any]:
    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        yield item
        if id(item) in seen or not isinstance(item, (tuple, list, dict, set, frozenset)):
            continue
        seen.add(id(item))
        todo.extend(item.values() if isinstance(item, dict) else item)


# ------------------------------------------------------------------------------------- safetensors
def load_safetensors_file(
    path: str | os.PathLike[str], what: str = "file", map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, with errors that name the file.

    Raises:
        ValueError: not a safetensors file, or a truncated/damaged one.
    """
    from safetensors import safe_open

    name = os.fspath(path)
    if sniff(path, what) != "safetensors":
        raise ValueError(f"{what} {name!r} is a torch.save file, not a safetensors file")
    try:
        with safe_open(name, framework="pt", device=str(torch.device(map_location))) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as err:  # noqa: BLE001 - SafetensorError is not importable under a stable name
        if type(err).__name__ != "SafetensorError" and not isinstance(err, (OSError, ValueError, RuntimeError)):
            raise
        raise _damaged(name, what, err) from err
    return tensors, metadata


# ------------------------------------------------------------------------------------------ digests
def tensor_crc32(t: Tensor) -> int:
    """CRC-32 of the bytes of ``t`` (row-major; a tensor subclass: of its inner tensors in order).

    Detects any flipped byte or cut-off run up to 32 bits with certainty, and other corruption except with
    probability 2^-32: a check against damage in storage or transfer, not a signature.

    Example:
        >>> tensor_crc32(torch.arange(4, dtype=torch.int8)) == zlib.crc32(bytes([0, 1, 2, 3]))
        True
    """
    return _crc(t, 0)


def _crc(t: Tensor, value: int) -> int:
    if type(t) not in (Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            value = _crc(getattr(t, n), value)
        return value
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:  # no bytes (and maybe a zero stride, which no view takes)
        return zlib.crc32(b"", value)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return zlib.crc32(flat.contiguous().view(torch.uint8).numpy(), value)


def crc32_hex(tensors: dict[str, Tensor]) -> str:
    """The CRC-32 of each tensor, 8 hex digits each, concatenated in sorted name order."""
    return "".join(f"{tensor_crc32(tensors[k]):08x}" for k in sorted(tensors))


def check_crc32_hex(tensors: dict[str, Tensor], stored: Any, path: str | os.PathLike[str], what: str = "file") -> None:
    """Compare ``tensors`` with the digests :func:`crc32_hex` gave when the file was written.

    Raises:
        ValueError: a tensor whose bytes changed (named), or digests that do not fit the tensors.
    """
    name = os.fspath(path)
    names = sorted(tensors)
    if not isinstance(stored, str) or len(stored) != 8 * len(names) or not re.fullmatch(r"[0-9a-f]*", stored):
        raise ValueError(
            f"{what} {name!r}: its tensor digests do not fit its {len(names)} tensors, so its metadata was damaged "
            f"or edited; {_AGAIN}"
        )
    for i, key in enumerate(names):
        now = f"{tensor_crc32(tensors[key]):08x}"
        if stored[8 * i : 8 * i + 8] != now:
            raise ValueError(
                f"{what} {name!r}: the data of tensor {key!r} is damaged (CRC-32 {now}, written as "
                f"{stored[8 * i : 8 * i + 8]}): the file changed after it was saved (disk, copy or download); {_AGAIN}"
            )


def check_writable(path: str | os.PathLike[str], what: str, folder: bool = False, make: bool = True) -> None:
    """A ``ValueError`` naming ``what`` when a file cannot be written at ``path`` (or into it, with ``folder``):
    checked by creating its folder and a temporary file there, before the run that writes it at its end.
    Where nothing stands yet, only the folder is made (left empty); a file there is not touched. A file's
    ``path`` that is a folder is refused: writing there fails only at the end. With ``make=False`` no folder is
    made: the temporary file goes into the nearest folder that stands (a check made long before the write)."""
    import tempfile

    where = Path(path).expanduser() if folder else Path(path).expanduser().parent
    try:
        if not folder and Path(path).expanduser().is_dir():
            raise ValueError(f"{what} {str(path)!r} is a folder; give a file's path (a new name, inside it or elsewhere)")
        # the nearest part that stands (a broken link too: nothing can be made there)
        standing = next((p for p in (where, *where.parents) if os.path.lexists(p)), None)
        if standing is not None and not standing.is_dir():
            whose = "it" if standing == where and folder else f"{str(standing)!r}"
            kind = "a link to nothing" if standing.is_symlink() and not standing.exists() else "a file"
            raise ValueError(f"{what} {str(path)!r} cannot be written: {whose} is {kind}, not a folder")
        if not make:
            where = standing if standing is not None else Path.cwd()
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be written: {err.strerror or err} ({err.filename or where})") from None


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Write a ``.safetensors`` file through a temporary file beside it (no half-written file at ``path``), readable
    as any file the process creates (``0o666`` less the umask): safetensors' own ``save_file`` leaves it readable by
    its owner only (``0o600``), which a server running as another user cannot load."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, os.fspath(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting it to read it back would give a
    file another thread creates meanwhile the wrong mode)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask
