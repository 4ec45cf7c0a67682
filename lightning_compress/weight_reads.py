"""Which weights a model reads outside the forward of the layers that hold them, seen on a training step.

A plugin that changes what a layer computes with its weight (fake quantisation rounds it inside the
layer's ``forward``) changes nothing where the model reads that weight itself: a tied autoencoder's
decoder computing ``F.linear(h, encoder.weight.t())``, or ``F.linear(x, layer.weight)`` without calling
the layer. Such reads cannot be seen in the module tree; :class:`WeightReadWatch`, open around the
forward of one real training step (no extra batch), records every torch operation that takes a
watched weight while none of the layers allowed to read it is running.

Only operations whose result holds a tensor count as reads: ``weight.dtype``, ``weight.shape`` or
``weight.device`` return none and are not reads of the values.

Example:
    >>> import torch
    >>> from torch import nn
    >>> enc = nn.Linear(4, 2)
    >>> def forward(x):  # a tied decoder
    ...     return nn.functional.linear(enc(x), enc.weight.t())
    >>> read_outside_during(lambda: forward(torch.randn(3, 4)), {"weight": enc.weight}, {"weight": [enc]})
    {'weight': 'Tensor.t'}
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["WeightReadWatch", "read_outside_during", "watch_weight_reads"]


def _op_name(func: Any) -> str:
    """``"linear"``, ``"Tensor.t"``; for a property read (``weight.T``) the property's name, ``"Tensor.T"``."""
    if getattr(func, "__name__", None) == "__get__":
        func = getattr(func, "__self__", func)  # the property's descriptor
        return f"Tensor.{getattr(func, '__name__', '?')}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return name.replace("TensorBase.", "Tensor.")


class _WatchReads(TorchFunctionMode):
    """Records ``{weight name: op}`` for the first op that takes a watched weight outside its readers."""

    def __init__(self, watched: Mapping[int, str], readers: Mapping[int, Sequence[nn.Module]], running: Counter[int]) -> None:
        super().__init__()
        self.watched, self.readers, self.running = watched, readers, running
        self.found: dict[str, str] = {}
        self.recording = True

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.recording or not any(isinstance(x, Tensor) for x in tree_leaves(out)):
            return out  # dtype, shape, device, a flag: no values read
        for x in tree_leaves((args, kwargs)):
            name = self.watched.get(id(x)) if isinstance(x, Tensor) else None
            if name is not None and name not in self.found and not any(self.running[id(m)] for m in self.readers[id(x)]):
                self.found[name] = _op_name(func)
        return out


class WeightReadWatch:
    """While open (``with``, or :meth:`open`/:meth:`close` from two callback hooks), records in
    :attr:`found` ``{weight name: the first op that read it}`` for the ``weights`` read by an operation
    outside the forward of every module in ``readers[name]`` (hooks included: a forward pre-hook of such
    a module counts as inside it). Weights that are one tensor under several names (tied) are watched
    once, under the first name, with the readers of all of its names. A compiled network runs eagerly
    while the watch is open: a compiled graph calls its ops outside the layers' hooks. With
    ``stop_after``, recording stops when that module's forward returns (what runs after it, a loss
    term or another callback reading the weights, is not the model's computation)."""

    def __init__(
        self, weights: Mapping[str, Tensor], readers: Mapping[str, Sequence[nn.Module]], stop_after: nn.Module | None = None
    ) -> None:
        self._stop_after = stop_after
        self._watched: dict[int, str] = {}
        self._allowed: dict[int, list[nn.Module]] = {}
        for name, weight in weights.items():
            self._watched.setdefault(id(weight), name)
            self._allowed.setdefault(id(weight), []).extend(readers[name])
        self._running: Counter[int] = Counter()
        self._mode = _WatchReads(self._watched, self._allowed, self._running)
        self._stack: contextlib.ExitStack | None = None
        self.found: dict[str, str] = {}

    def open(self) -> None:
        if self._stack is not None:
            return
        running = self._running

        def enter(module: nn.Module, args: Any) -> None:
            running[id(module)] += 1

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            running[id(module)] -= 1

        stack = contextlib.ExitStack()
        for module in {id(m): m for ms in self._allowed.values() for m in ms}.values():
            stack.callback(module.register_forward_pre_hook(enter, prepend=True).remove)  # before the other pre-hooks
            stack.callback(module.register_forward_hook(leave, always_call=True).remove)  # after the others, even on error
        if self._stop_after is not None:
            stack.callback(self._stop_after.register_forward_hook(lambda *args: self.stop(), always_call=True).remove)
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(self._mode)
        self._stack = stack

    def stop(self) -> None:
        """Stop recording and leave the rest to :meth:`close` (which may be called from outside the frame
        where the reads happen: a forward hook inside a compiled module's call must not leave the stance)."""
        self._mode.recording = False

    def close(self) -> dict[str, str]:
        """Stop watching (a second call does nothing); returns :attr:`found`."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
            self.found = dict(self._mode.found)
        return self.found

    @property
    def is_open(self) -> bool:
        return self._stack is not None

    def __enter__(self) -> WeightReadWatch:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_outside_during(
    run: Callable[[], Any], weights: Mapping[str, Tensor], readers: Mapping[str, Sequence[nn.Module]]
) -> dict[str, str]:
    """``{weight name: the first op that read it}`` for the ``weights`` read while ``run()`` runs outside
    the forward of every module in ``readers[name]`` (:class:`WeightReadWatch`)."""
    with WeightReadWatch(weights, readers) as watch:
        run()
    return watch.found


def watch_weight_reads(
    pl_module: nn.Module, readers: Mapping[str, Sequence[str]], stop_after: nn.Module | None = None
) -> WeightReadWatch:
    """A :class:`WeightReadWatch` of ``pl_module``'s parameters named in ``readers``, each allowed to be read
    in the modules named in ``readers[parameter name]``, recording until ``stop_after``'s forward returns
    (not open yet)."""
    modules = dict(pl_module.named_modules())
    weights = {name: pl_module.get_parameter(name) for name in readers}
    return WeightReadWatch(weights, {name: [modules[m] for m in names] for name, names in readers.items()}, stop_after)
