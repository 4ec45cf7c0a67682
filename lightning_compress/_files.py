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
import types
import warnings
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "RESAVE_HINT",
    "UnsafePickleError",
    "Unresolved",
    "check_crc32_hex",
    "crc32_hex",
    "load_checkpoint",
    "load_checkpoint_tensors",
    "load_safetensors_file",
    "load_torch_file",
    "sniff",
    "tensor_crc32",
    "unresolved_names",
]

FileKind = Literal["zip", "pickle", "safetensors"]

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save(..., _use_new_zipfile_serialization=False): pickle protocol 2, then torch's magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_AGAIN = "copy it again (or save it again) and retry"


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
    p = Path(name)
    if p.is_dir():
        inside = sorted(str(f.name) for f in p.iterdir() if f.suffix in (".ckpt", ".pt", ".pth", ".safetensors"))[:5]
        hint = f" (it holds {inside})" if inside else ""
        raise IsADirectoryError(f"{what} {name!r} is a folder, not a file{hint}; give the path of the file itself")
    if not p.is_file():
        where = "" if p.parent.is_dir() else f" (folder {str(p.parent)!r} does not exist either)"
        raise FileNotFoundError(f"{what} {name!r} not found{where}")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{what} {name!r} is empty (0 bytes): whatever wrote or copied it did not finish; {_AGAIN}")
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
                raise ValueError(
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


# ----------------------------------------------------------------------------- placeholder unpickler
class Unresolved:
    """Stands for a pickled object whose class or function is not on torch's weights-only allowlist.

    Nothing of the original is imported or called: the placeholder keeps the dotted name only. Building it,
    setting its state, adding items to it and pickling it do nothing else.

    Example:
        >>> Unresolved("argparse.Namespace")
        <not loaded: argparse.Namespace>
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<not loaded: {self.name}>"

    def __setstate__(self, state: Any) -> None:
        """Ignore ``state``."""

    def __reduce__(self) -> tuple[type[Unresolved], tuple[str]]:
        return Unresolved, (self.name,)


# Modules never resolved, even when allow-listed by the user (torch's weights-only loader blocks the first four).
_BLOCKED_MODULES = ("sys", "os", "posix", "nt", "subprocess")


def _allowed_globals() -> dict[str, Any]:
    """torch's weights-only allowlist: its defaults plus what the user allow-listed
    (``torch.serialization.add_safe_globals``; torchao registers its tensor subclasses there)."""
    from torch import _weights_only_unpickler as wo

    try:
        return {**wo._get_allowed_globals(), **wo._get_user_allowed_globals()}
    except AttributeError as err:  # pragma: no cover - a torch without these helpers
        raise pickle.UnpicklingError(f"this torch has no weights-only allowlist to follow ({err})") from None


def _compat_names() -> tuple[dict[tuple[str, str], tuple[str, str]], dict[str, str]]:
    import torch._utils as tu

    return tu.NAME_MAPPING, tu.IMPORT_MAPPING


def _holds_unresolved(obj: Any) -> bool:
    """Whether ``obj`` or a tuple/list/dict/set inside it holds an :class:`Unresolved`."""
    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        if isinstance(item, Unresolved):
            return True
        if id(item) in seen or type(item) not in (tuple, list, dict, OrderedDict, Counter, set, frozenset):
            continue
        seen.add(id(item))
        todo.extend(item.items() if isinstance(item, dict) else item)
    return False


def _pickle_ops() -> dict[bytes, str]:
    return {getattr(pickle, n): n for n in dir(pickle) if n.isupper() and isinstance(getattr(pickle, n), bytes) and len(getattr(pickle, n)) == 1}


class _PlaceholderUnpickler:
    """A pickle interpreter with the rules of torch's weights-only unpickler, except that a global outside
    the allowlist becomes an :class:`Unresolved` placeholder instead of an error.

    Allow-listed callables are called exactly where torch's weights-only loader calls them (``REDUCE``,
    ``NEWOBJ``, ``BUILD`` on allow-listed types), and never with an unresolved object among their arguments
    (the result is then a placeholder too). ``BUILD``, ``APPEND(S)``, ``SETITEM(S)`` and ``ADDITEMS`` act only
    on placeholders (ignored) and on the types torch allows; nothing sets attributes on a class or function.
    ``torch.load`` subclasses it and sets ``persistent_load`` (storages) and ``find_class``.
    """

    def __init__(self, file: Any, *, encoding: str = "ASCII") -> None:
        self.read = file.read
        self.readline = file.readline
        self.encoding = encoding
        self.memo: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are only understood inside torch.load")

    def find_class(self, module: str, name: str) -> Any:
        name_mapping, import_mapping = _compat_names()
        if (module, name) in name_mapping:
            module, name = name_mapping[(module, name)]
        elif module in import_mapping:
            module = import_mapping[module]
        full = f"{module}.{name}"
        if module.split(".")[0] in _BLOCKED_MODULES:
            return Unresolved(full)
        allowed = _allowed_globals()
        return allowed[full] if full in allowed else Unresolved(full)

    def _decode(self, data: bytes) -> Any:
        return data if self.encoding == "bytes" else data.decode(self.encoding, "strict")

    def load(self) -> Any:
        allowed = _allowed_globals()
        allowed_ids = {id(v) for v in allowed.values()}
        parameter, stack, metastack = torch.nn.Parameter, [], []
        read, memo = self.read, self.memo
        try:
            from torch._utils import _sparse_tensors_to_validate as sparse
        except ImportError:  # pragma: no cover - older torch
            sparse = []

        def pop_mark() -> list[Any]:
            nonlocal stack
            items, stack = stack, metastack.pop()
            return items

        def mark_sparse(cls: Any, result: Any) -> None:
            if cls in torch._tensor_classes and "sparse" in cls.__module__:
                sparse.append(result)

        def take(n: int) -> bytes:
            data = read(n)
            if len(data) != n:
                raise pickle.UnpicklingError("pickle data was truncated")
            return data

        while True:
            key = read(1)
            if not key:
                raise EOFError("pickle data ended without STOP")
            op = key[0]
            if op == pickle.PROTO[0]:
                proto = take(1)[0]
                if not 2 <= proto <= 5:
                    raise pickle.UnpicklingError(f"unsupported pickle protocol {proto}")
            elif op == pickle.FRAME[0]:
                take(8)  # frames only group opcodes; reading straight through them is the same
            elif op == pickle.STOP[0]:
                return stack.pop()
            # ---- globals: allow-listed object or placeholder, never an import
            elif op == pickle.GLOBAL[0]:
                module = self.readline()[:-1].decode("utf-8")
                name = self.readline()[:-1].decode("utf-8")
                stack.append(self.find_class(module, name))
            elif op == pickle.STACK_GLOBAL[0]:
                name, module = stack.pop(), stack.pop()
                if type(name) is not str or type(module) is not str:
                    raise pickle.UnpicklingError("STACK_GLOBAL needs two strings")
                stack.append(self.find_class(module, name))
            elif op in (pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0]):
                code = int.from_bytes(take({pickle.EXT1[0]: 1, pickle.EXT2[0]: 2, pickle.EXT4[0]: 4}[op]), "little")
                import copyreg

                ref = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
                stack.append(self.find_class(*ref) if ref else Unresolved(f"<extension {code}>"))
            # ---- calls: only allow-listed callables, as torch's weights-only loader does
            elif op == pickle.REDUCE[0]:
                args = stack.pop()
                func = stack[-1]
                if isinstance(func, Unresolved) or _holds_unresolved(args):
                    stack[-1] = Unresolved(f"{_label(func)}(...)")
                elif id(func) in allowed_ids and type(args) is tuple:
                    stack[-1] = func(*args)
                    mark_sparse(func, stack[-1])
                else:
                    raise pickle.UnpicklingError(f"refusing to call {_label(func)}, which is not an allow-listed function")
            elif op in (pickle.NEWOBJ[0], pickle.NEWOBJ_EX[0]):
                kwargs = stack.pop() if op == pickle.NEWOBJ_EX[0] else {}
                args = stack.pop()
                cls = stack.pop()
                if isinstance(cls, Unresolved) or _holds_unresolved((args, kwargs)):
                    stack.append(Unresolved(_label(cls)))
                elif cls is parameter and not kwargs:
                    stack.append(parameter(*args))
                elif id(cls) in allowed_ids and isinstance(cls, type) and type(args) is tuple and type(kwargs) is dict:
                    result = cls.__new__(cls, *args, **kwargs)
                    mark_sparse(cls, result)
                    stack.append(result)
                else:
                    raise pickle.UnpicklingError(f"refusing to create {_label(cls)}, which is not an allow-listed class")
            elif op == pickle.BUILD[0]:
                state = stack.pop()
                inst = stack[-1]
                if isinstance(inst, Unresolved) or _holds_unresolved(state):
                    continue  # a placeholder's state, or state that could not be loaded: dropped
                if type(inst) is Tensor:
                    inst.set_(*state)
                elif type(inst) is parameter:
                    inst.__setstate__(state)
                elif type(inst) is OrderedDict:
                    inst.__dict__.update(state)
                elif id(type(inst)) in allowed_ids:
                    if hasattr(inst, "__setstate__"):
                        inst.__setstate__(state)
                    else:
                        slots = None
                        if isinstance(state, tuple) and len(state) == 2:
                            state, slots = state
                        if state:
                            inst.__dict__.update(state)
                        for k, v in (slots or {}).items():
                            setattr(inst, k, v)
                else:
                    raise pickle.UnpicklingError(f"refusing to set the state of a {type(inst).__name__}")
            # ---- containers
            elif op in (pickle.APPEND[0], pickle.APPENDS[0], pickle.ADDITEMS[0]):
                items = [stack.pop()] if op == pickle.APPEND[0] else pop_mark()
                target = stack[-1]
                if isinstance(target, Unresolved):
                    continue
                if op == pickle.ADDITEMS[0] and type(target) is set:
                    target.update(items)
                elif op != pickle.ADDITEMS[0] and type(target) is list:
                    target.extend(items)
                else:
                    raise pickle.UnpicklingError(f"refusing to add items to a {type(target).__name__}")
            elif op in (pickle.SETITEM[0], pickle.SETITEMS[0]):
                if op == pickle.SETITEM[0]:
                    value = stack.pop()
                    items = [stack.pop(), value]
                else:
                    items = pop_mark()
                target = stack[-1]
                if isinstance(target, Unresolved):
                    continue
                if type(target) not in (dict, OrderedDict, Counter):
                    raise pickle.UnpicklingError(f"refusing to set items of a {type(target).__name__}")
                for i in range(0, len(items) - 1, 2):
                    target[items[i]] = items[i + 1]
            elif op == pickle.MARK[0]:
                metastack.append(stack)
                stack = []
            elif op == pickle.POP[0]:
                stack.pop() if stack else pop_mark()
            elif op == pickle.POP_MARK[0]:
                pop_mark()
            elif op == pickle.DUP[0]:
                stack.append(stack[-1])
            elif op == pickle.TUPLE[0]:
                items = pop_mark()  # before naming ``stack``: pop_mark rebinds it
                stack.append(tuple(items))
            elif op == pickle.TUPLE1[0]:
                stack[-1] = (stack[-1],)
            elif op == pickle.TUPLE2[0]:
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == pickle.TUPLE3[0]:
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == pickle.LIST[0]:
                items = pop_mark()
                stack.append(items)
            elif op == pickle.DICT[0]:
                items = pop_mark()
                stack.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})
            elif op == pickle.FROZENSET[0]:
                items = pop_mark()
                stack.append(frozenset(items))
            elif op == pickle.EMPTY_TUPLE[0]:
                stack.append(())
            elif op == pickle.EMPTY_LIST[0]:
                stack.append([])
            elif op == pickle.EMPTY_DICT[0]:
                stack.append({})
            elif op == pickle.EMPTY_SET[0]:
                stack.append(set())
            # ---- scalars and strings
            elif op == pickle.NONE[0]:
                stack.append(None)
            elif op in (pickle.NEWTRUE[0], pickle.NEWFALSE[0]):
                stack.append(op == pickle.NEWTRUE[0])
            elif op == pickle.BININT[0]:
                stack.append(struct.unpack("<i", take(4))[0])
            elif op == pickle.BININT1[0]:
                stack.append(take(1)[0])
            elif op == pickle.BININT2[0]:
                stack.append(struct.unpack("<H", take(2))[0])
            elif op in (pickle.LONG1[0], pickle.LONG4[0]):
                n = take(1)[0] if op == pickle.LONG1[0] else struct.unpack("<i", take(4))[0]
                if n < 0:
                    raise pickle.UnpicklingError("negative LONG4 byte count")
                stack.append(pickle.decode_long(take(n)))
            elif op == pickle.BINFLOAT[0]:
                stack.append(struct.unpack(">d", take(8))[0])
            elif op in (pickle.SHORT_BINUNICODE[0], pickle.BINUNICODE[0], pickle.BINUNICODE8[0]):
                size = {pickle.SHORT_BINUNICODE[0]: "<B", pickle.BINUNICODE[0]: "<I", pickle.BINUNICODE8[0]: "<Q"}[op]
                (n,) = struct.unpack(size, take(struct.calcsize(size)))
                stack.append(str(take(n), "utf-8", "surrogatepass"))
            elif op in (pickle.SHORT_BINSTRING[0], pickle.BINSTRING[0]):
                n = take(1)[0] if op == pickle.SHORT_BINSTRING[0] else struct.unpack("<i", take(4))[0]
                if n < 0:
                    raise pickle.UnpicklingError("negative BINSTRING length")
                stack.append(self._decode(take(n)))
            elif op in (pickle.SHORT_BINBYTES[0], pickle.BINBYTES[0], pickle.BINBYTES8[0], pickle.BYTEARRAY8[0]):
                size = {pickle.SHORT_BINBYTES[0]: "<B", pickle.BINBYTES[0]: "<I"}.get(op, "<Q")
                (n,) = struct.unpack(size, take(struct.calcsize(size)))
                data = take(n)
                stack.append(bytearray(data) if op == pickle.BYTEARRAY8[0] else data)
            # ---- memo
            elif op in (pickle.BINGET[0], pickle.LONG_BINGET[0]):
                idx = take(1)[0] if op == pickle.BINGET[0] else struct.unpack("<I", take(4))[0]
                if idx not in memo:
                    raise pickle.UnpicklingError(f"memo entry {idx} not found")
                stack.append(memo[idx])
            elif op in (pickle.BINPUT[0], pickle.LONG_BINPUT[0]):
                idx = take(1)[0] if op == pickle.BINPUT[0] else struct.unpack("<I", take(4))[0]
                memo[idx] = stack[-1]
            elif op == pickle.MEMOIZE[0]:
                memo[len(memo)] = stack[-1]
            # ---- tensor storages, handed to torch.load's reader
            elif op == pickle.BINPERSID[0]:
                pid = stack.pop()
                if type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
                    raise pickle.UnpicklingError(f"only tensor storages may be persistent ids, got {type(pid).__name__}")
                stack.append(self.persistent_load(pid))
            else:
                raise pickle.UnpicklingError(f"unsupported pickle opcode {_pickle_ops().get(key, key)!r}")


def _label(obj: Any) -> str:
    if isinstance(obj, Unresolved):
        return obj.name
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _placeholder_pickle_module() -> types.ModuleType:
    module = types.ModuleType("lightning_compress._placeholder_pickle")
    module.Unpickler = _PlaceholderUnpickler  # type: ignore[attr-defined]

    def load(file: Any, **kwargs: Any) -> Any:
        return _PlaceholderUnpickler(file, **kwargs).load()

    module.load = load  # type: ignore[attr-defined]
    return module


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
            return torch.load(f, map_location=map_location, weights_only=False, pickle_module=_placeholder_pickle_module(), mmap=False)
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

