"""A pickle interpreter for checkpoints whose pickle names objects outside torch's weights-only allowlist.

It follows the rules of torch's own weights-only unpickler (the same allowlist, the same places where
allow-listed callables run) but turns every other class or function into an inert :class:`Unresolved`
placeholder instead of refusing the file: a Lightning checkpoint whose hyper-parameters pickle
arbitrary objects still yields its tensors, and nothing it names is imported or called. A restricted
``find_class`` on Python's own unpickler is not enough: its ``BUILD`` sets attributes on allow-listed
classes (a 60-byte pickle can replace ``collections.Counter.__len__`` for the whole process).
Used by :func:`lightning_compress._files.load_checkpoint_tensors`.
"""

from __future__ import annotations

import pickle
import struct
import types
from collections import Counter, OrderedDict
from typing import Any

import torch
from torch import Tensor

__all__ = ["Unresolved", "placeholder_pickle_module"]


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


def placeholder_pickle_module() -> types.ModuleType:
    module = types.ModuleType("lightning_compress._placeholder_pickle")
    module.Unpickler = _PlaceholderUnpickler  # type: ignore[attr-defined]

    def load(file: Any, **kwargs: Any) -> Any:
        return _PlaceholderUnpickler(file, **kwargs).load()

    module.load = load  # type: ignore[attr-defined]
    return module
