"""A stand-in accelerator for CPU-only tests of device placement.

On a GPU, an op that mixes a CUDA tensor with a (non-scalar) CPU tensor fails: ``expected self and
mask to be on the same device, but got mask on cpu and self on cuda:0``. On a CPU-only machine every
tensor is on the CPU and such bugs go unseen. Under :class:`FakeAccelerator`, tensors made with
:func:`to_accelerator` report ``device.type == "meta"`` (so code that branches on "is this the CPU?"
takes its accelerator path) but hold real CPU data, so the arithmetic runs and gives real results:

- an op mixing an accelerator tensor with a CPU tensor of one or more dimensions raises, as CUDA does
  (0-dimensional CPU tensors are allowed, as CUDA allows them as scalars; ``copy_`` and ``.to`` may
  cross devices);
- factory calls given the accelerator device (``torch.zeros(..., device=t.device)``) and ops on
  accelerator tensors return accelerator tensors; factory calls without a device return CPU tensors,
  and ``torch.from_numpy`` gives a CPU tensor, so a tensor created on the wrong device is caught as
  soon as it meets the accelerator's tensors;
- ``.numpy()`` fails on accelerator tensors, as on CUDA.

Example:
    >>> with FakeAccelerator():
    ...     x = to_accelerator(torch.tensor([1.0, -2.0]))
    ...     y = x.masked_fill(x < 0, 0.0)
    ...     y.device.type, to_cpu(y).tolist()
    ('meta', [1.0, 0.0])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

ACCELERATOR = torch.device("meta")
CPU = torch.device("cpu")
_aten = torch.ops.aten
_CROSS_DEVICE = {_aten._to_copy.default, _aten.copy_.default, _aten.lift_fresh.default, _aten.lift_fresh_copy.default}


class OnAccelerator(Tensor):
    """A CPU tensor (``elem``) that says it lives on the stand-in accelerator."""

    elem: Tensor

    @staticmethod
    def __new__(cls, elem: Tensor) -> OnAccelerator:
        r = Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=ACCELERATOR,
            requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnAccelerator({self.elem!r})"

    def data_ptr(self) -> int:  # type: ignore[override]
        return self.elem.data_ptr()  # a wrapper has no storage of its own: its data's address

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run(func, args, kwargs or {})


def _is_accelerator_device(device: Any) -> bool:
    return device is not None and torch.device(device) == ACCELERATOR


def _run(func: Any, args: tuple, kwargs: dict) -> Any:
    leaves = tree_leaves((args, kwargs))
    wrapped = [t for t in leaves if isinstance(t, OnAccelerator)]
    on_accelerator = bool(wrapped)
    if func not in _CROSS_DEVICE:
        host = [t for t in leaves if isinstance(t, Tensor) and not isinstance(t, OnAccelerator) and t.dim() > 0]
        if on_accelerator and host:
            raise RuntimeError(
                f"{func}: expected all tensors to be on the same device, but found tensors on the accelerator and on "
                f"cpu (cpu tensors of shape {[tuple(t.shape) for t in host]})"
            )
    if "device" in kwargs:
        on_accelerator = _is_accelerator_device(kwargs["device"]) if func in _CROSS_DEVICE else (
            on_accelerator or _is_accelerator_device(kwargs["device"])
        )
        if _is_accelerator_device(kwargs["device"]):
            kwargs = {**kwargs, "device": CPU}
    if func is _aten.copy_.default:
        on_accelerator = isinstance(args[0], OnAccelerator)
    by_elem = {id(t.elem): t for t in wrapped}
    out = func(*tree_map(lambda t: t.elem if isinstance(t, OnAccelerator) else t, args), **tree_map(
        lambda t: t.elem if isinstance(t, OnAccelerator) else t, kwargs
    ))

    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if id(t) in by_elem:  # an in-place op returns its input: the same wrapper
            return by_elem[id(t)]
        return OnAccelerator(t) if on_accelerator else t

    return tree_map(wrap, out)


class FakeAccelerator(TorchDispatchMode):
    """Within this mode, factory calls given ``device="meta"`` make accelerator tensors with real data."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run(func, args, kwargs or {})


def to_accelerator(t: Tensor) -> Tensor:
    """``t`` (a CPU tensor) moved to the stand-in accelerator."""
    return OnAccelerator(t.detach().cpu())


def to_cpu(t: Tensor) -> Tensor:
    """The data of an accelerator tensor (a CPU tensor as is)."""
    return t.elem if isinstance(t, OnAccelerator) else t


def on_accelerator(t: Any) -> bool:
    return isinstance(t, OnAccelerator)
