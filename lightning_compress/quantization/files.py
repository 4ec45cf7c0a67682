"""Files of converted models: :func:`save_quantized` and :func:`load_quantized`.

Two formats: ``torch.save`` (``.pt``, loadable with ``weights_only=True``; plain tensors stored as views
into one storage per dtype) and ``.safetensors`` (raw tensors, the quantisation spec as JSON metadata,
no pickle). Both carry the spec (per layer only what the float model does not tell, with a digest per
layer) and a CRC-32 of every tensor, checked at load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress._files import (
    QUANTIZED_FORMAT,
    QUANTIZED_HEADER,
    check_crc32_hex,
    check_writable,
    crc32_hex,
    load_safetensors_file,
    load_torch_file,
    other_loader_hint,
    sniff,
)
from lightning_compress.module_copy import copy_model
from lightning_compress.quantization.convert import _folds_batchnorm, _set_submodule, batchnorm_pairs
from lightning_compress.selection import is_conv1d
from lightning_compress.quantization.layers import disable_fast_paths, layer_kind
from lightning_compress.quantization.int8_linear import Int8Linear
from lightning_compress.quantization.lowbit import LowBitLayer, _PackedLayer, import_torchao
from lightning_compress.quantization.lowbit_attention import attention_shell, attention_spec

__all__ = ["load_quantized", "save_quantized"]

_FILE_VERSION = 3
_READABLE_VERSIONS = (2, 3)  # 2: one digest of the whole spec instead of one per layer
_FILE_KEYS = ("format", "bits", "granularity", "activation_bits", "rows_renormalised")


def _is_safetensors(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(".safetensors")


_DIGEST_CHARS = 6  # per layer: a consistency check against the float model, not a signature


def _digests(spec: dict[str, dict[str, Any]]) -> str:
    """One short hash per layer of its full entry (shapes, op arguments, folded BatchNorm), concatenated
    in layer order: small enough for a file, specific enough to name the layer that differs."""
    return "".join(
        hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:_DIGEST_CHARS]
        for entry in spec.values()
    )


def _whole_digest(spec: dict[str, dict[str, Any]]) -> str:
    """The single digest of version-2 files."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _file_spec(model: nn.Module) -> dict[str, Any]:
    """What a file stores of ``model.quantization_spec``: per layer only what the float model does not
    tell (format, bits, granularity, input bits), the most common values once under ``"default"``,
    and a short digest per layer of the whole entry (shapes, op arguments, folded BatchNorm) to check
    the float model against at load."""
    spec: dict[str, dict[str, Any]] = model.quantization_spec
    entries = {}
    for name, entry in spec.items():
        inner = entry.get("spec", {})
        entries[name] = {"format": entry["format"], "bits": entry["bits"]} | {k: inner[k] for k in _FILE_KEYS[2:] if k in inner}
    default: dict[str, Any] = {}
    for key in _FILE_KEYS:
        values = Counter(json.dumps(e[key]) for e in entries.values() if key in e)
        if values:
            default[key] = json.loads(values.most_common(1)[0][0])
    out: dict[str, Any] = {
        "version": _FILE_VERSION,
        "default": default,
        "layers": {n: {k: v for k, v in e.items() if k not in default or default[k] != v} for n, e in entries.items()},
        "digests": _digests(spec),
    }
    if not getattr(model, "quantization_fold_bn", True):
        out["fold_bn"] = False
    return out


def _expand_file_spec(file_spec: dict[str, Any], model: nn.Module, path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The full ``quantization_spec`` of a file, rebuilt from the float ``model``'s layers."""
    first_layout = (
        isinstance(file_spec, dict)
        and "version" not in file_spec
        and bool(file_spec)
        and all(isinstance(e, dict) and "format" in e for e in file_spec.values())
    )
    if not first_layout and (not isinstance(file_spec, dict) or file_spec.get("version") not in _READABLE_VERSIONS):
        found = file_spec.get("version") if isinstance(file_spec, dict) else None
        raise ValueError(
            f"{os.fspath(path)}: quantisation spec version {found!r} is not one this release reads "
            f"({list(_READABLE_VERSIONS)}, or the first layout without a version), so the file is damaged or was "
            "written by another tool; save the model again with save_quantized"
        )
    layers = file_spec if first_layout else {n: {**file_spec["default"], **e} for n, e in file_spec["layers"].items()}
    missing = [n for n in layers if not _has_submodule(model, n)]
    if missing:
        raise ValueError(f"{os.fspath(path)}: the float model has no layer {missing[0]!r}; {_SAME_MODEL}")
    if first_layout:
        return file_spec  # the full spec, stored as it was built
    foldable = {n for n, e in layers.items() if _folds_batchnorm(e["format"], e.get("granularity"))}
    pairs = dict(batchnorm_pairs(model, foldable)) if file_spec.get("fold_bn", True) and foldable else {}
    spec: dict[str, dict[str, Any]] = {}
    for name, e in layers.items():
        layer = model.get_submodule(name)
        layer = _conv1d_as_linear(layer, "meta") if is_conv1d(layer) else layer  # described as conversion did
        entry: dict[str, Any] = {"format": e["format"], "bits": e["bits"], "kind": layer_kind(layer)}
        bias = None
        if name in pairs:
            entry["folded_bn"] = pairs[name]
            bias = model.get_submodule(pairs[name]).num_features
        if e["format"] == "lowbit":
            entry["spec"] = LowBitLayer.spec_of(layer, e["bits"], e["granularity"], e["activation_bits"], bias)
            if entry["spec"].get("max_norm") is not None and e.get("rows_renormalised"):
                entry["spec"]["rows_renormalised"] = True
        elif e["format"] == "lowbit_attention":
            entry["spec"] = attention_spec(layer, e["bits"], e["granularity"])
        elif e["format"] == "int8_linear":
            entry["spec"] = {"in_features": layer.in_features, "out_features": layer.out_features}
        spec[name] = entry
    return spec


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """``[(module, parameter name), ...]`` for every parameter held by several modules (a float embedding tied to
    its head)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name))
    return [h for h in holders.values() if len(h) > 1]


def _conv1d_as_linear(layer: nn.Module, device: torch.device | str) -> nn.Linear:
    """An empty Linear of the shape a GPT-2 ``Conv1D`` (weight ``(in, out)``) computes with, as conversion treats it
    (weight ``(out, in)``), on ``device`` (``"meta"`` where only its shapes are read)."""
    n_in, n_out = layer.weight.shape
    return nn.Linear(n_in, n_out, bias=layer.bias is not None, device=device, dtype=layer.weight.dtype)


def _check_digests(
    path: str | os.PathLike[str],
    file_spec: dict[str, Any],
    spec: dict[str, dict[str, Any]],
    model: nn.Module,
    new_layers: dict[str, nn.Module],
    state: dict[str, Tensor],
) -> None:
    """Raise when the float model's layers are not those the file was saved from (files in the first
    layout hold the whole spec and have nothing to check)."""
    if "version" not in file_spec:
        return
    if "digests" in file_spec:
        stored, now = file_spec["digests"], _digests(spec)
        if not isinstance(stored, str) or len(stored) != len(now):
            raise ValueError(f"{os.fspath(path)}: its layer digests do not fit the {len(spec)} layers it lists; the file is damaged")
        for i, name in enumerate(spec):
            part = slice(i * _DIGEST_CHARS, (i + 1) * _DIGEST_CHARS)
            if stored[part] != now[part]:
                _raise_mismatch(path, model, name, spec[name], new_layers[name], state)
    elif file_spec.get("digest") != _whole_digest(spec):
        raise ValueError(
            f"{os.fspath(path)} was saved from a model whose quantised layers differ from this float model's "
            "(shapes, convolution arguments or folded BatchNorms); pass the model class it was saved from"
        )


def _raise_mismatch(
    path: str | os.PathLike[str], model: nn.Module, name: str, entry: dict[str, Any], new: nn.Module, state: dict[str, Tensor]
) -> None:
    """Say how layer ``name`` of the float model differs from the one the file was saved from."""
    layer = model.get_submodule(name)
    folded = entry.get("folded_bn")
    what = f"{type(layer).__name__}" + (f" with {folded!r} folded in" if folded else "")
    if entry["kind"].startswith("conv") and not folded:
        what += " (no BatchNorm folded in)"
    stored = state.get(f"{name}.packed")
    if isinstance(new, _PackedLayer) and stored is not None and stored.shape != new.packed.shape:
        detail = f"holds {stored.numel()} packed bytes, but the float model's {what} needs {new.packed.numel()}"
    else:
        detail = f"was saved from a layer other than the float model's {what} (shape, op arguments or folded BatchNorm)"
    raise ValueError(f"{os.fspath(path)}: layer {name!r} {detail}; {_SAME_MODEL}")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _one_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` as views into one buffer per dtype, so that ``torch.save`` writes one storage record
    per dtype instead of one per tensor (each costs a few hundred bytes, as much as the scales of a
    small layer; ``torch.save`` refuses views of one storage as different dtypes). Tensors that are
    the same storage region stay one view. Returned unchanged when a tensor is a subclass (torchao
    layers) or the tensors sit on several devices."""
    from lightning_compress.report import storage_region

    tensors = list(state.values())
    if not tensors or any(type(t) not in (Tensor, nn.Parameter) for t in tensors) or len({t.device for t in tensors}) > 1:
        return state
    regions = {name: storage_region(t) for name, t in state.items()}
    offsets: dict[tuple[Any, ...], int] = {}
    totals: dict[torch.dtype, int] = {}
    for name, t in state.items():
        if regions[name] not in offsets:
            align = max(1, 16 // t.element_size())  # 16-byte starts: views of a view (packed -> float32) stay legal
            start = -(-totals.get(t.dtype, 0) // align) * align
            offsets[regions[name]] = start
            totals[t.dtype] = start + t.numel()
    buffers = {dtype: torch.empty(n, dtype=dtype, device=tensors[0].device) for dtype, n in totals.items()}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        start = offsets[regions[name]]
        view = buffers[t.dtype][start : start + t.numel()].view(t.shape)
        view.copy_(t.detach())
        out[name] = view
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a converted model, to reload with :func:`load_quantized`.

    A ``.safetensors`` path writes a safetensors file (raw tensors, the quantisation spec as JSON in its
    metadata; the smallest file, and loads without pickle); any other path writes
    ``torch.save({"quantization_spec": ..., "state_dict": ...})``, loadable with ``weights_only=True``,
    its plain tensors views into one storage per dtype (one file record each instead of one per
    tensor). The stored spec holds per layer only what the float model does not tell (format, bits,
    granularity, input bits) and a short digest of the rest (shapes, op arguments, folded
    BatchNorm), which :func:`load_quantized` rebuilds from the float model and checks layer by layer,
    and the CRC-32 of each stored tensor's bytes (8 hex digits per tensor, key ``"crc32"``), which
    :func:`load_quantized` checks, so a damaged file is refused with the name of the damaged tensor.
    Layers converted by torchao hold tensor subclasses, which only ``torch.save`` can store.

    Raises:
        ValueError: ``model`` is not a converted model, or a ``.safetensors`` path for torchao layers
            (nothing is written).
    """
    if getattr(model, "quantization_spec", None) is None:
        converted = [m for m in model.modules() if isinstance(m, _PackedLayer)]
        for layer in converted:
            layer.check_unchanged()  # an adapter merged into a converted layer: said with the way out
        if converted:
            raise ValueError(
                f"{type(model).__name__} holds {len(converted)} converted layers but no quantization_spec, which "
                "convert_fake_quant sets on the module it returns (a wrapper such as a PeftModel, whose merge_and_unload "
                "returns the inner model without it): save the module it returned, or merge into the fake-quantised "
                "model and convert that"
            )
        raise ValueError("not a converted model (no quantization_spec); convert it with convert_fake_quant first")
    check_writable(path, "save_quantized", make=False)  # a folder there failed only at the write's last step, its rename
    spec = _file_spec(model)
    if _is_safetensors(path):
        from lightning_compress._files import save_safetensors
        from lightning_compress.report import safetensors_tensors

        tensors, aliases = safetensors_tensors(model.state_dict())
        spec[_CRC_KEY] = crc32_hex(tensors)
        header = {"format": QUANTIZED_FORMAT, "quantization_spec": spec} | ({"aliases": aliases} if aliases else {})
        save_safetensors(tensors, path, metadata={QUANTIZED_HEADER: json.dumps(header, separators=(",", ":"))})
        return
    state = _one_storage(model.state_dict())
    spec[_CRC_KEY] = crc32_hex(state)
    torch.save({"quantization_spec": spec, "state_dict": state}, path)


_WHAT = "quantised model file"
#: What a float model that does not match the file must be instead.
_SAME_MODEL = (
    "pass the float model the file was saved from: the same class and arguments and, when channels, heads or neurons "
    "were removed during the fit, that smaller model (lightning_compress.load_pruned(model, checkpoint) rebuilds it "
    "from the fit's checkpoint)"
)
_CRC_KEY = "crc32"  # optional: files written before it existed load unchecked, and older releases ignore it
_NOT_OURS = (
    "load it into the float model with model.load_state_dict(...) if it is a plain state_dict, or convert the "
    "model (convert_fake_quant) and write it with save_quantized"
)


def _describe_content(blob: Any) -> str:
    """What a torch file that save_quantized did not write holds, in a few words."""
    if not isinstance(blob, Mapping):
        return f"a {type(blob).__name__}"
    keys = list(blob)
    if keys and all(isinstance(v, Tensor) for v in blob.values()):
        return f"a plain state_dict of {len(keys)} tensors (keys like {keys[:4]})"
    if "state_dict" in blob and ("pytorch-lightning_version" in blob or "epoch" in blob):
        return "a Lightning training checkpoint"
    return f"a dict with keys {keys[:6]}"


def _check_file_version(file_spec: Any, path: str | os.PathLike[str]) -> None:
    """Refuse a spec from a newer release, or one whose layer table is missing (damaged or edited)."""
    if not isinstance(file_spec, Mapping) or "version" not in file_spec:
        return  # the first layout (no version): _expand_file_spec checks it
    version = file_spec["version"]
    if isinstance(version, int) and not isinstance(version, bool) and version > max(_READABLE_VERSIONS):
        raise ValueError(
            f"{_WHAT} {os.fspath(path)!r} was written by a newer lightning-compress (file format version {version}; "
            f"this release reads versions {list(_READABLE_VERSIONS)}): upgrade lightning-compress to load it, or save "
            "the model again with this release"
        )
    if version in _READABLE_VERSIONS and not (
        isinstance(file_spec.get("layers"), Mapping) and isinstance(file_spec.get("default"), Mapping)
    ):
        raise ValueError(f"{_WHAT} {os.fspath(path)!r}: its quantisation spec lacks its layer table, so it is damaged or was edited")


def _read_quantized(path: str | os.PathLike[str], map_location: str | torch.device) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The stored spec and the state dict of a :func:`save_quantized` file, its tensors checked against
    their CRC-32 where the file has them. The format is told by the file's first bytes, not its suffix."""
    name = os.fspath(path)
    aliases: dict[str, str] = {}
    if sniff(path, _WHAT) == "safetensors":
        state, meta = load_safetensors_file(path, _WHAT, map_location)
        try:  # one JSON header; files of earlier releases: a key each, the spec and aliases as JSON
            header = json.loads(meta[QUANTIZED_HEADER]) if QUANTIZED_HEADER in meta else dict(meta)
            if QUANTIZED_HEADER not in meta and meta.get("format") == QUANTIZED_FORMAT:  # another tool's keys are not read
                header["quantization_spec"] = json.loads(meta["quantization_spec"]) if "quantization_spec" in meta else None
                header["aliases"] = json.loads(meta.get("aliases", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{_WHAT} {name!r}: its metadata is not valid JSON ({err}), so the file is damaged") from None
        if not isinstance(header, dict) or header.get("format") != QUANTIZED_FORMAT or header.get("quantization_spec") is None:
            if QUANTIZED_HEADER in meta or (isinstance(header, dict) and header.get("format") == QUANTIZED_FORMAT):
                raise ValueError(f"{_WHAT} {name!r} is damaged: its metadata names save_quantized's format but holds no "
                                 "quantisation spec; save it again")
            hint = other_loader_hint(meta, own="quantized")
            if hint is not None:
                raise ValueError(f"{_WHAT} {name!r} was not written by save_quantized: {hint}")
            raise ValueError(
                f"{_WHAT} {name!r} is a safetensors file of {len(state)} tensors that save_quantized did not write (its "
                f"metadata has no lightning-compress quantisation spec, only keys {sorted(meta)}); {_NOT_OURS}"
            )
        file_spec, aliases = header["quantization_spec"], header.get("aliases") or {}
        if not isinstance(aliases, Mapping) or not all(isinstance(v, str) and v in state for v in aliases.values()):
            raise ValueError(f"{_WHAT} {name!r} is damaged: its aliases name tensors the file does not hold; save it again")
    else:
        hint = (
            "Files written by save_quantized hold only tensors and plain values, so this one was written by something "
            f"else or altered; {_NOT_OURS}"
        )
        blob = load_torch_file(path, _WHAT, map_location=map_location, hint=hint)
        if not (isinstance(blob, Mapping) and "quantization_spec" in blob and isinstance(blob.get("state_dict"), Mapping)):
            raise ValueError(f"{_WHAT} {name!r} was not written by save_quantized: it holds {_describe_content(blob)}; {_NOT_OURS}")
        file_spec, state = blob["quantization_spec"], dict(blob["state_dict"])
    _check_file_version(file_spec, path)
    if isinstance(file_spec, Mapping) and "version" in file_spec and _CRC_KEY in file_spec:
        check_crc32_hex(state, file_spec[_CRC_KEY], path, _WHAT)
    for alias, target in aliases.items():
        state[alias] = state[target]
    return file_spec, state


def _in_model_dtypes(state: dict[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each plain floating tensor cast to the dtype of the ``target`` tensor of its name (the
    model's own), so a file saved from a bfloat16 model loads into a float32 one as float32 and back.
    A tensor stored under several names (a tied weight) is cast once, so the names keep sharing one
    tensor; integer tensors (the packed weights) and tensor subclasses (torchao layers) stay as they are."""
    from lightning_compress.report import storage_region

    cast: dict[tuple[Any, ...], Tensor] = {}
    out = dict(state)
    for name, t in state.items():
        want = target.get(name)
        if want is None or type(t) not in (Tensor, nn.Parameter) or type(want) not in (Tensor, nn.Parameter):
            continue
        if t.is_floating_point() and want.is_floating_point() and t.dtype != want.dtype:
            region = (*storage_region(t), want.dtype)
            if region not in cast:
                cast[region] = t.to(want.dtype)
            out[name] = cast[region]
    return out


def load_quantized(float_model: nn.Module, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the converted structure on (a copy of) the float model and load a :func:`save_quantized` file.

    ``.safetensors`` files are read with safetensors, others with ``torch.load(weights_only=True)``
    (torchao tensor subclasses are allow-listed by torchao). ``float_model`` must be built like the
    model that was converted (its trained weights do not matter): the layer shapes, convolution
    arguments and folded BatchNorms are read off it and checked against the file's per-layer digests
    (files written before the spec was reduced hold it whole and load as they are).

    ``float_model`` also decides the dtypes: the float tensors the file holds outside the quantised
    weights (biases of float layers, LayerNorm weights, position tables ...) are cast to the dtype of the
    model's tensor of the same name, and the converted layers compute in their float layer's dtype. A
    file saved from a bfloat16 model loads into a float32 model as a float32 model (its integers and
    scales are the same; the bfloat16 values it holds are exact in float32), and into a bfloat16 model
    as a bfloat16 one.

    Nothing in the file is run: ``.pt`` files are read with ``weights_only=True`` and refused when they
    pickle anything else. Each error names the file and, where it applies, the layer or tensor.

    Raises:
        FileNotFoundError, IsADirectoryError: no such file, or a folder.
        ValueError: a file that :func:`save_quantized` did not write (a plain ``state_dict``, a safetensors
            file without its metadata, a text file), a truncated or damaged file (a tensor whose CRC-32
            differs is named), a file from a newer release, a float model that does not match the file,
            or an unknown layer format.
    """
    tq = import_torchao()  # registers torchao's tensor subclasses as safe globals before torch.load
    file_spec, state = _read_quantized(path, map_location)
    model = copy_model(float_model)
    spec = _expand_file_spec(file_spec, model, path)
    new_layers: dict[str, nn.Module] = {}
    for name, entry in spec.items():
        fmt = entry["format"]
        old = model.get_submodule(name)
        if fmt == "lowbit":
            new: nn.Module = LowBitLayer(entry["spec"])
            new.compute_dtype = getattr(getattr(old, "weight", None), "dtype", torch.float32)  # a bf16 model's: bf16
        elif fmt == "lowbit_attention":
            new = attention_shell(old, entry["spec"])  # in place: ``model`` is a copy
        elif fmt == "int8_linear":
            new = Int8Linear(**entry["spec"])
        elif fmt in ("torchao_int8_weight", "torchao_int8_dynamic"):
            new = _conv1d_as_linear(old, old.weight.device) if is_conv1d(old) else copy.deepcopy(old)
            cfg = tq.Int8WeightOnlyConfig() if fmt == "torchao_int8_weight" else tq.Int8DynamicActivationInt8WeightConfig()
            tq.quantize_(new, cfg, filter_fn=lambda m, n: True)
        elif fmt == "torchao_intx_conv2d":
            new = copy.deepcopy(old)
            tq.quantize_(new, tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=tq.PerAxis(0)), filter_fn=lambda m, n: True)
        else:
            raise ValueError(f"unknown format {fmt!r} for layer {name!r} in {path}")
        new_layers[name] = new
    _check_digests(path, file_spec, spec, model, new_layers, state)
    for name, new in new_layers.items():
        _set_submodule(model, name, new)
        if spec[name].get("folded_bn"):
            _set_submodule(model, spec[name]["folded_bn"], nn.Identity())
    ties = _tied_parameters(model)
    try:
        model.load_state_dict(_in_model_dtypes(state, model.state_dict()), strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"{_WHAT} {os.fspath(path)!r} does not fit the float model: {' '.join(str(err).split())}; pass the model "
            "class it was saved from"
        ) from None
    for holders in ties:  # assign=True gave each holder its own Parameter (over one memory): one object again
        first, leaf = holders[0]
        for module, name in holders[1:]:
            module._parameters[name] = first._parameters[leaf]
    disable_fast_paths(model, new_layers.values())
    model.quantization_spec = spec
    model.quantization_fold_bn = file_spec.get("fold_bn", True)
    return model.eval()
