"""Loading a checkpoint written after removal into a freshly built model of the original class.

The state dict's shapes are the structure: :func:`resize_to_state_dict` resizes the Conv/Linear/BatchNorm
layers (and GPT-2 ``Conv1D``) to the stored shapes and sets the head counts of attention modules whose
heads were removed (:mod:`.units`), so a strict ``load_state_dict`` follows. :func:`allow_shrunk_checkpoints`
makes every ``load_state_dict`` of a module do that first; :func:`load_pruned` loads a file or dict.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_compress._files import QUANTIZED_FORMAT, other_loader_hint
from lightning_compress.module_copy import copy_model
from lightning_compress.pruning.channel_masks import ChannelGroupSpec
from lightning_compress.pruning.hf_configs import sync_hf_configs
from lightning_compress.pruning.shrink import REMOVED_MARK
from lightning_compress.pruning.units import find_units, set_unit_counts
from lightning_compress.selection import is_conv1d

__all__ = ["allow_shrunk_checkpoints", "load_pruned", "resize_on_load", "resize_to_state_dict", "resizes_on_load"]


def _removed_heads(module: nn.Module, state_dict: Mapping[str, Any]) -> list[tuple[ChannelGroupSpec, int]]:
    """``(attention heads group, key/value heads the stored weights keep)`` where ``state_dict`` holds fewer."""
    resized = [
        n for n, m in module.named_modules()
        if (isinstance(m, nn.Linear) or is_conv1d(m))
        and isinstance(state_dict.get(f"{n}.weight" if n else "weight"), torch.Tensor)
        and tuple(state_dict[f"{n}.weight" if n else "weight"].shape) != tuple(m.weight.shape)
    ]  # fmt: skip
    if not resized:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what find_units says about modules it leaves whole is for pruning
        packed = [n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]  # keeps its heads
        names = [n for n, _ in module.named_parameters() if not any(n.startswith(f"{a}.") for a in packed)]
        try:
            groups = find_units(module, ("heads",), names)
        except ValueError:
            return []
    params = dict(module.named_parameters())
    out = []
    for g in groups:
        name = f"{g.members[0]}.weight"
        stored = state_dict.get(name)
        dim, blocks = g.layout(name)
        rows = params[name].shape[dim]
        if isinstance(stored, torch.Tensor) and stored.shape[dim] != rows:
            out.append((g, stored.shape[dim] // (rows // g.size)))
    return out


def _new_sizes(name: str, mod: nn.Module, w: Any, state_dict: Mapping[str, Any], prefix: str) -> dict[str, int] | None:
    """The size attributes ``mod`` takes for the shapes ``state_dict`` stores (``None``: a layer of no resizable
    kind, or one whose shapes match)."""
    if isinstance(mod, nn.modules.conv._ConvNd) and isinstance(w, torch.Tensor):
        if tuple(w.shape) == tuple(mod.weight.shape):
            return None
        out_ch = w.shape[0]
        if mod.groups == 1:
            in_ch, groups = w.shape[1], 1
        elif mod.groups == mod.in_channels and w.shape[1] == 1:
            mult = mod.out_channels // mod.in_channels
            in_ch = groups = out_ch // mult
        else:
            raise ValueError(f"cannot resize grouped convolution {name!r} (groups={mod.groups}) to {tuple(w.shape)}")
        return {"in_channels": in_ch, "out_channels": out_ch, "groups": groups}
    if isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor):
        return None if tuple(w.shape) == tuple(mod.weight.shape) else {"out_features": w.shape[0], "in_features": w.shape[1]}
    if is_conv1d(mod) and isinstance(w, torch.Tensor):  # GPT-2's: weight (in, out)
        if tuple(w.shape) == tuple(mod.weight.shape):
            return None
        return {"nf": w.shape[1], **({"nx": w.shape[0]} if hasattr(mod, "nx") else {})}
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = state_dict.get(f"{prefix}running_mean", w)
        return None if not isinstance(ref, torch.Tensor) or ref.shape[0] == mod.num_features else {"num_features": ref.shape[0]}
    return None


def _rows(mod: nn.Module, sizes: Mapping[str, int]) -> int:
    """The output rows (channels, features) ``mod`` has at ``sizes``: the length of its bias and of a norm's vectors."""
    return sizes.get("out_channels", sizes.get("out_features", sizes.get("nf", sizes.get("num_features", -1))))


def resize_to_state_dict(module: nn.Module, state_dict: Mapping[str, Any], grow: bool = True) -> list[str]:
    """Resize Conv/Linear/BatchNorm layers (and GPT-2 ``Conv1D``) of ``module`` to the shapes stored in
    ``state_dict``, and set the head counts of attention modules that hold fewer heads there.

    The shrunk structure is fully described by the tensor shapes of the checkpoint, so this is all a
    plain model class needs before a strict ``load_state_dict``: call it in ``on_load_checkpoint``
    (``ClassifierModule`` does). Layers whose shapes already match are untouched. Every layer is checked
    before any changes: a bias or norm vector whose length is not its layer's output rows, a grouped
    convolution that cannot take the shape, or (``grow=False``, a model built at its full size) a size larger
    than the model's is an error, and the model is left as it was.

    Returns:
        The names of the resized layers.

    Example:
        >>> from lightning_compress.models import MLP
        >>> small, big = MLP(4, (2,), 3), MLP(4, (8,), 3)
        >>> resize_to_state_dict(big, small.state_dict())
        ['net.1', 'net.3']
        >>> big.load_state_dict(small.state_dict())
        <All keys matched successfully>
    """
    heads = _removed_heads(module, state_dict)  # read from the full-size model, before any layer changes
    plan: list[tuple[str, nn.Module, dict[str, int]]] = []
    for name, mod in module.named_modules():
        prefix = f"{name}." if name else ""
        sizes = _new_sizes(name, mod, state_dict.get(f"{prefix}weight"), state_dict, prefix)
        if sizes is None:
            continue
        grown = [k for k, v in sizes.items() if k != "groups" and v > getattr(mod, k)]
        if grown and not grow:
            raise ValueError(
                f"{name!r} is stored larger than the model builds it ({', '.join(f'{k} {sizes[k]} > {getattr(mod, k)}' for k in grown)}): "
                "removing channels only shrinks layers, so the checkpoint is of another architecture"
            )
        rows = _rows(mod, sizes)
        for vector in ("bias", "running_mean", "running_var") + (("weight",) if "num_features" in sizes else ()):
            stored = state_dict.get(f"{prefix}{vector}")
            if getattr(mod, vector, None) is not None and isinstance(stored, torch.Tensor) and tuple(stored.shape) != (rows,):
                raise ValueError(f"{prefix}{vector} is stored with shape {tuple(stored.shape)}, but its layer has {rows} output rows there")
        plan.append((name, mod, sizes))
    for name, mod, sizes in plan:
        prefix = f"{name}." if name else ""
        for attr, value in sizes.items():
            setattr(mod, attr, value)
        for pname, tensor in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            stored = state_dict.get(f"{prefix}{pname}")
            if tensor is None or not isinstance(stored, torch.Tensor) or stored.shape == tensor.shape:
                continue
            fresh = torch.zeros(stored.shape, dtype=tensor.dtype, device=tensor.device)
            setattr(mod, REMOVED_MARK, True)
            if isinstance(tensor, nn.Parameter):
                setattr(mod, pname, nn.Parameter(fresh, requires_grad=tensor.requires_grad))
            else:
                mod._buffers[pname] = fresh
    resized = [name for name, _, _ in plan]
    modules = dict(module.named_modules())
    for group, kept in heads:
        set_unit_counts(modules, group, kept)
    if resized:  # a Hugging Face model's config follows, so its save_pretrained loads again
        for note in sync_hf_configs(module):
            rank_zero_warn(note)
    return resized


def _meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the ``meta`` device (no memory for them; other tensor
    attributes are copied): resizing and loading it first shows whether a checkpoint fits, before ``model`` changes."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy_model(model, memo)


def _resize_pre_hook(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    resize_to_state_dict(module, state_dict)


def allow_shrunk_checkpoints(module: nn.Module) -> nn.Module:
    """Make ``module.load_state_dict`` resize layers to the shapes it is given, then load strictly.

    Registers a ``load_state_dict`` pre-hook calling :func:`resize_to_state_dict`. Every loading path
    goes through ``load_state_dict`` (``load_from_checkpoint``, ``Trainer.test(ckpt_path=...)``,
    resuming a fit, ``ddp_spawn`` handing the trained weights back to the main process), so one call
    in a LightningModule's ``__init__`` is all a shrunk checkpoint needs. ``ClassifierModule`` does it.

    Example:
        >>> from lightning_compress.models import MLP
        >>> small, big = MLP(4, (2,), 3), allow_shrunk_checkpoints(MLP(4, (8,), 3))
        >>> big.load_state_dict(small.state_dict())
        <All keys matched successfully>
        >>> big.net[1].out_features
        2
    """
    resize_on_load(module)
    return module


def resize_on_load(module: nn.Module) -> Any:
    """Register :func:`allow_shrunk_checkpoints`'s hook on ``module`` and return its handle (``.remove()`` undoes it)."""
    return module.register_load_state_dict_pre_hook(_resize_pre_hook)


def resizes_on_load(module: nn.Module) -> bool:
    """Whether ``module`` (or a module inside it) resizes its layers to a checkpoint's shapes on load
    (:func:`allow_shrunk_checkpoints`)."""
    return any(
        getattr(hook, "hook", hook) is _resize_pre_hook for m in module.modules() for hook in m._load_state_dict_pre_hooks.values()
    )


def _load_or_put_back(model: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Resize and load ``model`` itself (no copy of it could be made), restoring its layers and values on failure
    (the values are copied first: this path only)."""
    from lightning_compress.plugin import ModelSnapshot

    layers, values = ModelSnapshot(model), {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        resize_to_state_dict(model, state, grow=False)
        model.load_state_dict(state, strict=strict)
    except BaseException:
        layers.restore()
        model.load_state_dict(values)
        raise


#: The prefixes under which this library's modules hold the network: ClassifierModule's, DistillationModule's.
NETWORK_PREFIXES = ("model.", "student.", "student.model.")


def _network_keys(state: Mapping[str, Any], own: set[str]) -> Mapping[str, Any]:
    """``state`` as it is when it has any of the model's keys, else the keys under the first of
    :data:`NETWORK_PREFIXES` that gives some of them, else under the prefix that gives the most of them (a
    LightningModule of your own holding the network as ``self.net`` or ``self.backbone.model``), with the prefix
    stripped."""
    if own & set(state):
        return state
    for prefix in NETWORK_PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if own & set(stripped):
            return stripped
    found: Counter[str] = Counter()
    for key in state:
        for i, char in enumerate(key):
            if char == "." and key[i + 1 :] in own:
                found[key[: i + 1]] += 1
    if found:
        (prefix, most), *others = found.most_common()
        tied = [prefix, *(p for p, n in others if n == most)]
        if len(tied) > 1:  # a teacher's or an EMA copy of the same network beside it: which one is not for us to guess
            raise ValueError(
                f"the checkpoint holds the model's keys under several prefixes ({', '.join(map(repr, tied))}); give "
                f"load_pruned the state dict of the one to load, e.g. {{k[len({tied[-1]!r}):]: v for k, v in "
                f"state_dict.items() if k.startswith({tied[-1]!r})}}"
            )
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_pruned(
    model: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any], *, strict: bool = True
) -> nn.Module:
    """Load a (possibly channel-shrunk) checkpoint into a freshly built model of the original class.

    Accepts a Lightning checkpoint (path or dict with ``"state_dict"``), a plain state dict, or the path of
    a ``.safetensors`` file. When ``model`` is the bare network and the keys carry the ``model.`` prefix of
    ``ClassifierModule`` or the ``student.`` prefix of ``DistillationModule`` (or the prefix under which a module of
    your own holds it, ``net.``), the network's keys are taken. The model is resized (:func:`resize_to_state_dict`),
    then loaded strictly. A path is read without running code from it
    (:func:`lightning_compress._files.load_checkpoint`: pickled hyper-parameter objects are skipped).

    Raises:
        FileNotFoundError, IsADirectoryError: no such file, or a folder.
        ValueError: not a checkpoint, truncated or damaged, or weights that do not fit ``model`` (the
            message names the file and the layer).

    Example:
        >>> from lightning_compress.models import ResCNN
        >>> from lightning_compress.pruning.shrink import shrink_model
        >>> net = ResCNN(width=8)
        >>> _ = shrink_model(net, {"block.conv1": torch.arange(8) < 3}, torch.zeros(1, 1, 8, 8))
        >>> fresh = load_pruned(ResCNN(width=8), {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}})
        >>> fresh.block.conv1.out_channels
        3
    """
    source = "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        from lightning_compress._files import RESAVE_HINT, load_checkpoint

        source = f"pruned checkpoint {os.fspath(checkpoint)!r}"
        checkpoint = load_checkpoint(checkpoint, "pruned checkpoint", hint=RESAVE_HINT)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} holds {state!r:.80}, not a state dict or a checkpoint with one; give the .ckpt or state dict file")
    metadata = checkpoint.get("metadata") if isinstance(checkpoint, Mapping) else None
    metadata = dict(metadata) if isinstance(metadata, Mapping) else {}
    if isinstance(checkpoint, Mapping) and "quantization_spec" in checkpoint:  # save_quantized's torch.save file
        metadata["format"] = QUANTIZED_FORMAT
    hint = other_loader_hint(metadata, tensors=state)
    if hint is not None:
        raise ValueError(f"{source} is not a checkpoint: {hint}")
    state = _network_keys(state, set(model.state_dict()))
    try:
        twin: nn.Module | None = _meta_twin(model)
    except Exception:  # noqa: BLE001 - a model deepcopy refuses (a lock, a non-leaf tensor attribute): loaded directly
        twin = None
    try:
        if twin is not None:  # the dry run: what the real load says is said once, below
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resize_to_state_dict(twin, state, grow=False)
                twin.load_state_dict(state, strict=strict)
        else:  # loaded directly, put back as it was if the file does not fit
            _load_or_put_back(model, state, strict)
    except (RuntimeError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: {detail}; build the model with the class and arguments "
            "the checkpoint was trained with"
        ) from None
    if twin is not None:  # it fits: the model changes only now
        resize_to_state_dict(model, state, grow=False)
        model.load_state_dict(state, strict=strict)
    return model
