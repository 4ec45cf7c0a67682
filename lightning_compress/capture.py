"""Capturing a model for its artifacts: ``torch.export`` of a CPU snapshot in ``eval`` mode, with a batch
dimension of any size, the output made plain, and only the children its forward calls.

What :func:`lightning_compress.export` (``compact``) stores and :func:`lightning_compress.export_for_cpu`
compiles (:func:`capture`); the example-input helpers serve the ``onnx`` format too.
"""

from __future__ import annotations

import copy
import inspect
import keyword
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.guard import check_finite
from lightning_compress.layout import input_batch_dim
from lightning_compress.lookup_bounds import lookup_bounds
from lightning_compress.measure import split_call, tensor_batch_axis
from lightning_compress.module_copy import copy_model, hook_computed_weights
from lightning_compress.outputs import serve_plainly
from lightning_compress.selection import trained_children

__all__ = ["batch_dims", "capture", "example_call_parts", "named_keyword_forward", "traced_inputs"]


def _example_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(
            "example_inputs must be a tensor or a non-empty tuple of tensors (the positional arguments of "
            f"forward); got {type(example_inputs).__name__}"
        )
    return tuple(inputs)


#: Keyword values that are settings, not inputs (``use_cache=False``): fixed in the artifact.
_CONSTANTS = (bool, int, float, str, type(None))


def example_call_parts(example_inputs: Any) -> tuple[tuple[Tensor, ...], dict[str, Tensor], dict[str, Any]]:
    """The positional and keyword tensors of ``forward``, and the keyword settings fixed in the artifact
    (``bool``/``int``/``float``/``str``/``None`` values such as ``use_cache=False``): from a tensor, a tuple
    of tensors, a dict of keyword tensors and settings, or a :class:`~lightning_compress.batches.ForwardCall`."""
    if isinstance(example_inputs, (Tensor, tuple, list)):
        return _example_tuple(example_inputs), {}, {}
    args, kwargs = split_call(example_inputs)
    constants = {k: v for k, v in kwargs.items() if isinstance(v, _CONSTANTS)}
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    others = {f"argument {i}": v for i, v in enumerate(args) if not isinstance(v, Tensor)}
    others.update({repr(k): v for k, v in kwargs.items() if not isinstance(v, Tensor)})
    if not (args or kwargs) or others:
        what = ", ".join(f"{k} is a {type(v).__name__}" for k, v in others.items()) or "it holds no tensor"
        raise TypeError(
            "example_inputs must be a tensor, a tuple of tensors (forward's positional arguments), a dict of tensors "
            f"(its keyword arguments, plus settings such as use_cache=False) or a ForwardCall of those; got a "
            f"{type(example_inputs).__name__} where {what}: an artifact takes tensors (a list or a structure of "
            "them cannot be an input of the exported graph)"
        )
    return tuple(args), dict(kwargs), constants


def batch_dims(
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Tensor] | None = None,
    forward: Callable[..., Any] | None = None,
    dim: int = 0,
    sequence: bool = False,
) -> tuple[tuple[Tensor, ...], dict[str, Tensor], Any]:
    """Inputs to trace with (positional and keyword) and ``dynamic_shapes`` marking dimension ``dim`` of
    each (1 for sequence-first inputs, :func:`~lightning_compress.layout.input_batch_dim`) as one shared
    batch size (by argument name of ``forward`` when there are keyword inputs).

    With ``sequence``, the sequence dimension too (the other of dimensions 0 and 1: 1 for batch-first
    inputs) of every input whose length there is the first input's (token ids and their attention mask),
    its range as ``torch.export`` finds it (``Dim.AUTO``: a model with a position table stays within it)."""
    kwargs = kwargs or {}
    tensors = [*inputs, *kwargs.values()]
    seq_dim = 1 - dim if dim in (0, 1) else None
    if sequence:
        length = tensors[0].shape[seq_dim] if seq_dim is not None and tensors[0].dim() > 1 else None
        if length is None or length < 2:
            raise ValueError(
                f"dynamic_sequence=True needs inputs with a sequence dimension ({seq_dim}, beside the batch dimension {dim}) "
                f"of at least 2 positions in the example; got shapes {[tuple(t.shape) for t in tensors]}"
            )
    own = tensors[0].shape[dim] if tensors and tensors[0].dim() > dim else None
    axes = {id(t): tensor_batch_axis(t, own, dim) for t in tensors}  # a key padding mask beside (S, N, E): 0
    sizes = [t.shape[axes[id(t)]] if axes[id(t)] is not None else None for t in tensors]
    if None in sizes or len(set(sizes)) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(
            f"dynamic_batch=True needs every input to have the same batch size in dimension {dim}; got shapes "
            f"{shapes}. Pass dynamic_batch=False to export for these exact shapes"
        )
    if sizes[0] == 0:
        raise ValueError("example_inputs have batch size 0; give at least one sample")
    if sizes[0] < 2:  # export specialises a size-1 dimension to the constant 1: trace with two samples

        def two(t: Tensor) -> Tensor:
            axis = axes[id(t)]
            doubled = t.expand(*t.shape[:axis], 2, *t.shape[axis + 1 :]).contiguous()
            axes[id(doubled)] = axis  # ``tensors`` keeps the originals alive: their ids are not reused
            return doubled

        inputs = tuple(two(t) for t in inputs)
        kwargs = {k: two(t) for k, t in kwargs.items()}
    batch = torch.export.Dim("batch", min=1)

    def spec(t: Tensor) -> dict[int, Any]:
        axis = axes.get(id(t), dim)
        along = 1 - axis if axis in (0, 1) else None  # the sequence beside this tensor's batch
        if sequence and along is not None and t.dim() > along and t.shape[along] == length:
            return {axis: batch, along: torch.export.Dim.AUTO}
        return {axis: batch}

    parameters = inspect.signature(forward).parameters if forward is not None else {}
    packed = {p.name: p.kind for p in parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if not kwargs and not packed:
        return inputs, kwargs, tuple(spec(t) for t in inputs)
    assert forward is not None
    bound = inspect.signature(forward).bind(*inputs, **kwargs).arguments  # every input under its parameter's name
    shapes: dict[str, Any] = {}
    for name, value in bound.items():  # torch.export wants *args as a tuple of specs and **kwargs as a dict
        kind = packed.get(name)
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(t) for t in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {key: spec(t) for key, t in value.items()}
        else:
            shapes[name] = spec(value)
    return inputs, kwargs, shapes


def named_keyword_forward(
    model: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Any], constants: dict[str, Any] | None = None
) -> nn.Module:
    """``model`` itself, or, when its ``forward`` takes ``**kwargs`` and the example passes keyword inputs (a
    distillation module around a Hugging Face student), a shallow copy whose class's ``forward`` names them:
    ``torch.export`` cannot give inputs that reach ``forward`` through ``**kwargs`` a dynamic shape. The copy
    shares the model's children; its ``forward`` calls the class's own on itself, so a deep copy of it (the
    exporters' float32 or CPU references) runs the copy. ``constants`` (settings fixed in the artifact,
    :func:`~lightning_compress.outputs.serve_plainly`) pass through."""
    if "forward" in model.__dict__:  # an instance's own forward: left as it is
        return model
    parameters = inspect.signature(model.forward).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in parameters) or all(k in named for k in kwargs):
        return model  # no keyword input reaches forward through **kwargs
    if not all(k.isidentifier() and not keyword.iskeyword(k) and not k.startswith("_") for k in kwargs):
        return model
    positional = [f"_input{i}" for i in range(len(inputs))]
    settings = ["**_settings"] if constants else []
    call = ", ".join(["self", *positional, *(f"{k}={k}" for k in kwargs), *settings])
    scope: dict[str, Any] = {"_forward": type(model).forward}
    source = f"def forward({', '.join(['self', *positional, *kwargs, *settings])}):\n    return _forward({call})\n"
    exec(source, scope)  # noqa: S102 - parameter names checked to be identifiers above
    cls = type(model)
    named_cls = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    wrapped = copy.copy(model)
    wrapped.__class__ = named_cls
    return wrapped


def traced_inputs(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Tensor],
    constants: dict[str, Any],
    dynamic_batch: bool,
    dynamic_sequence: bool,
    batch_dim: int | None = None,
) -> tuple[tuple[Tensor, ...], dict[str, Tensor], Any]:
    """What an exporter traces ``model`` with: the inputs and their ``dynamic_shapes``, the batch dimension
    read from the model (1 for sequence-first inputs; ``batch_dim`` when the caller has read it) of any size with
    ``dynamic_batch`` and, with ``dynamic_sequence``, the sequence too (:func:`batch_dims`); the example's own
    shapes (``None``) otherwise."""
    if dynamic_sequence and not dynamic_batch:
        raise ValueError("dynamic_sequence=True needs dynamic_batch=True (the sequence is found beside the batch dimension)")
    if not dynamic_batch:
        return inputs, kwargs, None
    dim = input_batch_dim(model, inputs, {**kwargs, **constants}) if batch_dim is None else batch_dim
    return batch_dims(inputs, kwargs, model.forward, dim, sequence=dynamic_sequence)


def check_forward_defined(model: nn.Module, who: str) -> None:
    """A module whose class defines no ``forward`` (a LightningModule whose ``training_step`` calls ``self.model(**batch)``)
    has nothing to export; say so, naming the child to export instead, before torch's bare "_forward_unimplemented() got
    an unexpected keyword argument".

    Raises:
        TypeError: ``model``'s ``forward`` is ``nn.Module``'s or ``LightningModule``'s own.
    """
    from lightning.pytorch import LightningModule

    # the instance's: a torch.compile wrapper, or a module that sets self.forward = self.net.forward, has one of its own
    if getattr(model.forward, "__func__", None) not in (nn.Module.forward, LightningModule.forward):
        return
    sizes = {n: size for n, size in trained_children(model).items()
             if getattr(model.get_submodule(n).forward, "__func__", None) is not nn.Module.forward}  # fmt: skip
    # the trained network: not a teacher, the most trainable parameters (as batches.forward_call finds it)
    instead = f"e.g. {who.split('(')[0]}(module.{max(sizes, key=sizes.__getitem__)}, ...)" if sizes else "the nn.Module it calls"
    raise TypeError(
        f"{who}: {type(model).__name__} defines no forward (its steps call a network it holds), so there is no call to "
        f"export; export the network the steps call, {instead}, with that network's inputs"
    )


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the CPU, without a second copy on
    the model's own device first."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu" and id(t) not in memo:
            cpu = t.detach().cpu()
            memo[id(t)] = nn.Parameter(cpu, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cpu
    return copy_model(model, memo).cpu()


def bake_parametrizations(model: nn.Module, in_place: bool = False) -> nn.Module:
    """``model`` itself, or an ``eval``-mode copy (``model`` itself with ``in_place``, for a copy of the caller's own)
    whose parametrized weights (``weight_norm``, ``spectral_norm``, ``orthogonal``: :mod:`torch.nn.utils.parametrize`,
    and the older hook-based ``weight_norm``/``spectral_norm``) are plain tensors holding what they compute now.
    Captured as they are, the graph recomputes them at every call and stores their inputs: an orthogonal 512x32 layer
    stored a 512x512 base (0.98 MB, 15x the baked model)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm

    if not any(parametrize.is_parametrized(m) or hook_computed_weights(m) for m in model.modules()):
        return model
    baked = (model if in_place else copy_model(model)).eval()
    for m in baked.modules():
        if parametrize.is_parametrized(m):
            # by hand: torch's remove_parametrizations deletes the weight's property from the module's class, which a
            # deep copy shares with the original (whose weight it took away)
            values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
            del m._modules["parametrizations"]
            m.__class__ = type(m).__bases__[0]  # the class before parametrize made its subclass
            for name, value in values.items():
                setattr(m, name, nn.Parameter(value, requires_grad=False))
        for name in hook_computed_weights(m):
            spectral = any(isinstance(h, SpectralNorm) and h.name == name for h in m._forward_pre_hooks.values())
            (torch.nn.utils.remove_spectral_norm if spectral else torch.nn.utils.remove_weight_norm)(m, name)
    return baked


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
    who: str = "export",
    unpack_lowbit: bool = True,
    bounds: dict[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` of a CPU snapshot of ``model`` in ``eval`` mode (the original is not changed),
    dimension 0 of every input a batch size of any value (unless ``dynamic_batch=False``). What
    :func:`export_for_cpu` compiles and the compact artifact stores.

    ``example_inputs``: a tensor or a tuple of ``forward``'s positional inputs, a dict of its keyword
    inputs, or a :class:`~lightning_compress.batches.ForwardCall` (both).

    ``dynamic_sequence``: the sequence dimension of token inputs too (:func:`batch_dims`).

    ``unpack_lowbit``: packed low-bit layers are unpacked once into float weights held by the graph
    (fast to run, as large as float: the ``.pt2`` package); ``False`` keeps them packed and unpacks in
    the graph at every call (the compact artifact, which is about storage).

    ``bounds``: filled with :func:`~lightning_compress.lookup_bounds.lookup_bounds` of the traced call (the
    values of integer inputs and the sequence length the model's tables take), keyed as the program's inputs.

    Raises:
        TypeError: ``example_inputs`` are not tensors.
        ValueError: a weight or buffer holds NaN or inf; inputs without a shared batch dimension.
        RuntimeError: ``torch.export`` cannot capture the model (the message says why).
    """
    from lightning_compress.quantization.lowbit_attention import read_packed_projections

    inputs, kwargs, constants = example_call_parts(example_inputs)
    snapshot = bake_parametrizations(_cpu_copy(model).eval(), in_place=True)  # the copy is this function's own
    check_finite(snapshot.state_dict().items(), who)
    # contiguous: a strided view as example (x[:, :2] of a sequence-first batch) makes torch.export tie its strides
    # to the other dimensions, which fails the dynamic batch
    inputs = tuple(t.cpu().contiguous() for t in inputs)
    kwargs = {k: t.cpu().contiguous() for k, t in kwargs.items()}
    snapshot = named_keyword_forward(snapshot, inputs, kwargs, constants) if dynamic_batch else snapshot
    # read once: the lookup bounds below need it too, and reading it may run the model up to its first layout layer
    dim = input_batch_dim(snapshot, inputs, {**kwargs, **constants}) if dynamic_batch else 0
    inputs, kwargs, dynamic_shapes = traced_inputs(snapshot, inputs, kwargs, constants, dynamic_batch, dynamic_sequence, dim)
    for module in snapshot.modules():  # packed low-bit layers: unpack once, into the graph; or keep them packed
        prepare = getattr(module, "prepare_export", None)
        if unpack_lowbit and callable(prepare):
            prepare()
        elif not unpack_lowbit:
            read_packed_projections(module)  # a converted attention module holds its projections unpacked too
    serve_plainly(snapshot, inputs, kwargs, constants)
    if bounds is not None:
        bounds.update(lookup_bounds(snapshot, inputs, kwargs, batch_dim=dim, sequence=dynamic_sequence))
    lean = _without_uncalled_children(snapshot, inputs, kwargs)
    try:
        with torch.no_grad():
            if lean is not None:
                try:
                    return torch.export.export(lean, inputs, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes)
                except Exception:  # noqa: BLE001 - forward reads a dropped child without calling it: keep them all
                    pass
            return torch.export.export(snapshot, inputs, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes)
    except Exception as err:
        hint = " or dynamic_batch=False if forward fixes the batch size" if dynamic_batch else ""
        first_line = next(iter(str(err).splitlines()), "")
        raise RuntimeError(
            f"torch.export could not capture {type(model).__name__} ({type(err).__name__}: {first_line}); "
            f"rewrite the failing part{hint}, or run the model with compile_for_cpu, which needs no export"
        ) from err


def _without_uncalled_children(snapshot: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> nn.Module | None:
    """A shallow copy of ``snapshot`` without the direct children holding tensors that its forward never
    calls (a distillation module's teacher and feature projections), or ``None`` when there are none:
    ``torch.export`` keeps every parameter of the module it is given, used or not."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: called.add(name)) for name, m in snapshot.named_modules() if name]
    try:
        with torch.no_grad():
            snapshot(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    unused = [
        name for name, child in snapshot.named_children()
        if not any(c == name or c.startswith(f"{name}.") for c in called) and any(True for _ in (*child.parameters(), *child.buffers()))
    ]  # fmt: skip
    if not unused:
        return None
    lean = copy.copy(snapshot)
    lean._modules = {name: (nn.Module() if name in unused else child) for name, child in snapshot._modules.items()}
    return lean
