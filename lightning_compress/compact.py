"""The compact artifact: a compressed model in one safetensors file that loads without its Python classes.

What is stored:

- the model's graph, as ``torch.export`` captured it (:func:`lightning_compress.capture.capture`), in
  ``torch.export``'s own JSON form, zlib-compressed;
- every weight, buffer and constant of that graph, each encoded the cheapest of four ways and then
  compressed: ``dense`` (its bytes), ``bitmap`` (1 bit per entry saying which are non-zero, then
  the non-zero values) or ``gaps`` (for each non-zero value, how many zeros precede it, as one byte;
  a run of more than 255 zeros takes a filler entry, as in Deep Compression's relative indices).
  Low-bit values stay packed as the converted layers hold them (int8, two int4 per byte), so the
  file holds sparse indices plus packed low-bit values and their scales. A tensor the graph holds
  under several names (a head tied to its embedding) is stored once, the other names pointing to it.

The file is a plain safetensors container (no pickle): the tensors are byte strings, and the metadata
says, per tensor, its dtype, shape, encoding and CRC-32. :func:`load_compact` checks all of that
before it builds anything, and rebuilds the graph with ``torch.export``'s deserializer: reading a
file runs no code from it (the graph runs only when the returned module is called).

Example:
    >>> import torch
    >>> t = torch.zeros(1000)
    >>> t[::100] = 1.0
    >>> payload, entry = encode_tensor(t)
    >>> entry["encoding"], len(payload) < 100, torch.equal(decode_tensor(payload, entry), t)
    ('gaps', True, True)
"""

from __future__ import annotations

import io
import json
import types
import lzma
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.artifact_calls import check_call
from lightning_compress._files import (
    COMPACT_FORMAT,
    COMPACT_HEADER,
    COMPACT_PROGRAM,
    load_safetensors_file,
    other_loader_hint,
    save_safetensors,
    sniff,
    tensor_crc32,
)
from lightning_compress.measure import storage_region
from lightning_compress.sharding import wraps_tensors

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_VERSION",
    "check_plain_tensors",
    "decode_tensor",
    "encode_tensor",
    "load_compact",
    "save_compact",
]

#: the newest format version this library reads; 2 adds entries naming a tensor stored under another name
COMPACT_VERSION = 2
_DEBUG_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "torch_fn", "custom", "seq_nr")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: byte-stream compressors (compress, decompress); each tensor takes the one that gives fewer bytes
_CODECS = {
    "zlib": (lambda b: zlib.compress(b, 9), zlib.decompress),
    "lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
}
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                                torch.int16, torch.int32, torch.int64, torch.bool)}


def _as_integers(t: Tensor) -> np.ndarray:
    """The entries of ``t`` as unsigned/signed integers of the same width (bit patterns, any dtype)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:  # an empty tensor may keep a zero stride, which no view takes
        return torch.zeros(0, dtype=_INT_VIEW[flat.element_size()]).numpy()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(_INT_VIEW[flat.element_size()]).numpy()


def _gaps(nonzero: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gap bytes, values)`` with filler entries (value 0) wherever more than 255 zeros separate two values."""
    previous = np.concatenate([[-1], nonzero[:-1]])
    gap = nonzero - previous - 1
    fillers = gap // 256
    count = fillers + 1  # each value takes its fillers and itself
    gaps = np.full(int(count.sum()), 255, dtype=np.uint8)
    out_values = np.zeros(int(count.sum()), dtype=values.dtype)
    ends = np.cumsum(count) - 1  # where each real value goes
    gaps[ends] = (gap - fillers * 256).astype(np.uint8)
    out_values[ends] = values
    return gaps, out_values


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values (uint8 in [0, 15]) two per byte, the first in the low half."""
    padded = np.concatenate([values, np.zeros(values.size % 2, dtype=np.uint8)]).astype(np.uint8)
    return padded[0::2] | (padded[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:count]


def encode_tensor(t: Tensor) -> tuple[bytes, dict[str, Any]]:
    """``(payload, entry)``: ``t`` in the smallest of the encodings and codecs; the entry
    holds what :func:`decode_tensor` needs and the tensor's CRC-32."""
    if str(t.dtype) not in _DTYPES:
        raise TypeError(f"the compact format stores {sorted(_DTYPES)} tensors, not {t.dtype}")
    ints = _as_integers(t)
    nonzero = np.flatnonzero(ints)
    values = ints[nonzero]
    candidates = {"dense": ints.tobytes(), "bitmap": np.packbits(ints != 0).tobytes() + values.tobytes()}
    if nonzero.size:
        gaps, filled = _gaps(nonzero, values)
        candidates["gaps"] = gaps.tobytes() + filled.tobytes()
        stored = filled.size
    else:
        candidates["gaps"] = b""
        stored = 0
    stored_nibbles = 0
    if t.dtype == torch.uint8 and ints.size:  # two 4-bit values per byte: index the non-zero nibbles
        levels = np.stack([ints & 0xF, ints >> 4], axis=1).reshape(-1)
        where = np.flatnonzero(levels)
        if where.size:
            gaps4, filled4 = _gaps(where, levels[where])
            stored_nibbles = int(filled4.size)
            candidates["nibbles"] = gaps4.tobytes() + _pack_nibbles(filled4).tobytes()
    # lzma for integer payloads (low-bit values, gap indices), where it pays; on the float weights of a 3 MB
    # GPT it took 9.2 s against zlib's 0.55 s and saved 0.5%
    codecs = _CODECS if not t.is_floating_point() else {"zlib": _CODECS["zlib"]}
    packed = {(name, codec): codecs[codec][0](raw) for name, raw in candidates.items() for codec in codecs}
    encoding, codec = min(packed, key=lambda key: len(packed[key]))
    entry = {
        "dtype": str(t.dtype),
        "shape": list(t.shape),
        "encoding": encoding,
        "codec": codec,
        "stored": int({"gaps": stored, "nibbles": stored_nibbles}.get(encoding, values.size)),
        "crc32": tensor_crc32(t.detach().cpu().contiguous()),
    }
    return packed[(encoding, codec)], entry


def _positions(raw: bytes, stored: int, length: int) -> np.ndarray:
    """Where the ``stored`` entries of a gap-encoded payload go (the inverse of :func:`_gaps`)."""
    positions = np.cumsum(np.frombuffer(raw[:stored], dtype=np.uint8).astype(np.int64) + 1) - 1
    if positions.size and positions[-1] >= length:
        raise ValueError("its indices run past the tensor's end")
    return positions


def decode_tensor(payload: bytes, entry: dict[str, Any]) -> Tensor:
    """Inverse of :func:`encode_tensor`.

    Raises:
        ValueError: the payload does not decode to the entry's shape, or its CRC-32 differs.
    """
    dtype = _DTYPES.get(entry.get("dtype", ""))
    shape = [int(s) for s in entry.get("shape", [])]
    if dtype is None:
        raise ValueError(f"unknown dtype {entry.get('dtype')!r}")
    numel = int(np.prod(shape)) if shape else 1
    view = _INT_VIEW[torch.empty(0, dtype=dtype).element_size()]
    np_int = torch.empty(0, dtype=view).numpy().dtype
    codec = _CODECS.get(entry.get("codec", "zlib"))
    if codec is None:
        raise ValueError(f"unknown codec {entry.get('codec')!r}")
    raw = codec[1](payload)
    stored = int(entry.get("stored", 0))
    encoding = entry.get("encoding")
    ints = np.zeros(numel, dtype=np_int)
    if encoding == "dense":
        ints = np.frombuffer(raw, dtype=np_int).copy()
    elif encoding == "bitmap":
        mask_bytes = (numel + 7) // 8
        mask = np.unpackbits(np.frombuffer(raw[:mask_bytes], dtype=np.uint8), count=numel).astype(bool)
        ints[mask] = np.frombuffer(raw[mask_bytes:], dtype=np_int)
    elif encoding == "gaps":
        ints[_positions(raw, stored, numel)] = np.frombuffer(raw[stored:], dtype=np_int)
    elif encoding == "nibbles":
        levels = np.zeros(2 * numel, dtype=np.uint8)
        levels[_positions(raw, stored, 2 * numel)] = _unpack_nibbles(np.frombuffer(raw[stored:], dtype=np.uint8), stored)
        ints = (levels[0::2] | (levels[1::2] << 4)).astype(np_int)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    if ints.size != numel:
        raise ValueError(f"it decodes to {ints.size} entries, its shape {shape} needs {numel}")
    flat = torch.from_numpy(ints).view(torch.uint8 if dtype == torch.bool else dtype)
    t = (flat.to(torch.bool) if dtype == torch.bool else flat).reshape(shape)
    if tensor_crc32(t) != int(entry.get("crc32", -1)):
        raise ValueError("its CRC-32 does not match: the file is damaged")
    return t


def check_plain_tensors(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a model whose weights are tensor subclasses (torchao's quantised ``Int8Tensor``, from
    ``convert_fake_quant(..., backend="torchao")``): the compact format stores plain tensors, and its graph would
    read their inner tensors through the subclass and call torchao's own operators, which a reader without
    torchao cannot load. An AOTInductor package compiles them into its kernels."""
    odd = {
        name: type(t).__name__
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if wraps_tensors(t)
    }
    if odd:
        kinds = sorted(set(odd.values()))
        raise ValueError(
            f"export to {os.fspath(path)!r}: the compact (.safetensors) format stores plain tensors, but "
            f"{sorted(odd)[:5]}{' ...' if len(odd) > 5 else ''} are tensor subclasses ({', '.join(kinds)}; torchao's "
            "quantised weights). Export a .pt2 package instead (format='pt2', export_for_cpu), or convert with "
            "backend='auto' for a compact artifact"
        )


def save_compact(program: torch.export.ExportedProgram, path: str | os.PathLike[str], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``program`` (from :func:`lightning_compress.capture.capture`) as a compact artifact. The
    graph's debugging metadata (source lines, module paths) is dropped from ``program`` and the file.
    ``fixed``: the keyword settings the example fixed in the graph (``use_cache=False``), recorded so that a call
    may pass them again (:func:`~lightning_compress.artifact_calls.check_call`).

    Returns:
        ``{"bytes": file size, "tensors": {name: encoding}, "same_as": {name: the name it is stored
        under}, "graph_bytes": the compressed graph's size}``.
    """
    from torch._export.serde.serialize import serialize

    constants = dict(program.constants)
    odd = [n for n, v in constants.items() if not isinstance(v, Tensor)]
    if odd:
        raise TypeError(f"the compact format stores tensors; the graph holds other constants: {odd[:5]}")
    for node in program.graph.nodes:  # source locations and module paths: a third of the graph's bytes, not needed to run
        for key in _DEBUG_META:
            node.meta.pop(key, None)
    artifact = serialize(program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    tensors: dict[str, Tensor] = {COMPACT_PROGRAM: torch.frombuffer(bytearray(zlib.compress(artifact.exported_program, 9)), dtype=torch.uint8)}
    entries: dict[str, dict[str, Any]] = {}
    stored_as: dict[tuple[Any, ...], str] = {}  # a tensor held under several names (tied weights) is stored once
    for group, mapping in (("state", program.state_dict), ("constants", constants)):
        for name, value in mapping.items():
            key, same = f"{group}/{name}", storage_region(value)
            if same in stored_as and value.numel():  # (every empty tensor has address 0: never one of them)
                entry = {"same_as": stored_as[same]}
            else:
                stored_as[same] = key
                payload, entry = encode_tensor(value.detach())
                tensors[key] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
            if isinstance(value, nn.Parameter):
                entry["parameter"] = True
            entries[key] = entry
    # version 1 readers know no "same_as": a file holds version 2 only where it needs it
    version = 2 if any("same_as" in e for e in entries.values()) else 1
    # one metadata key: safetensors writes several in a per-process order, and every rank must write the same bytes
    header = {"format": COMPACT_FORMAT, "version": version, "entries": entries, **({"fixed": dict(fixed)} if fixed else {})}
    metadata = {COMPACT_HEADER: json.dumps(header, separators=(",", ":"))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return {
        "bytes": path.stat().st_size,
        "tensors": {k: entries[e.get("same_as", k)]["encoding"] for k, e in entries.items()},
        "same_as": {k: e["same_as"] for k, e in entries.items() if "same_as" in e},
        "graph_bytes": int(tensors[COMPACT_PROGRAM].numel()),
    }


def _not_an_artifact(name: str, why: str) -> ValueError:
    return ValueError(f"{name!r} is not a lightning-compress compact artifact ({why}); write one with lightning_compress.export")


def load_compact(path: str | os.PathLike[str]) -> nn.Module:
    """The module stored by :func:`save_compact`: a ``torch.fx.GraphModule`` running the captured graph
    on the decoded tensors (outputs equal to the model that was exported).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a compact artifact, a newer format version, or a damaged or truncated file
            (the message names the tensor that fails its checks).
    """
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    name = os.fspath(path)
    if not Path(name).is_file():
        raise FileNotFoundError(f"no compact artifact at {name!r}")
    if sniff(path, "artifact") != "safetensors":
        raise _not_an_artifact(name, "not a safetensors file")
    tensors, raw_metadata = load_safetensors_file(path, "artifact")
    try:
        metadata = json.loads(raw_metadata.get(COMPACT_HEADER, "null")) or {}
    except ValueError:
        metadata = {}
    if not isinstance(metadata, dict) or metadata.get("format") != COMPACT_FORMAT:
        if COMPACT_HEADER in raw_metadata:
            raise ValueError(f"the compact artifact {name!r} is damaged: its header does not parse as a compact format")
        hint = other_loader_hint(raw_metadata, own="compact")
        if hint is not None:
            raise ValueError(f"{name!r} is not a compact artifact: {hint}")
        raise _not_an_artifact(name, "its metadata names no compact format")
    version = metadata.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _not_an_artifact(name, f"its version is {version!r}")
    if version > COMPACT_VERSION:
        raise ValueError(
            f"{name!r} is a compact artifact of format version {version}, newer than this library reads "
            f"({COMPACT_VERSION}); upgrade lightning-compress"
        )
    try:
        entries = dict(metadata["entries"])
        program = zlib.decompress(tensors[COMPACT_PROGRAM].numpy().tobytes())
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        raise ValueError(f"the compact artifact {name!r} is damaged ({type(err).__name__}: {err})") from err
    decoded: dict[str, dict[str, Tensor]] = {"state": {}, "constants": {}}
    read: dict[str, Tensor] = {}
    for key, entry in sorted(entries.items(), key=lambda item: "same_as" in item[1]):  # stored tensors first
        group, _, tensor_name = key.partition("/")
        same_as = entry.get("same_as")
        if group not in decoded or (key not in tensors if same_as is None else same_as not in read):
            raise ValueError(f"the compact artifact {name!r} is damaged: tensor {key!r} is missing or misnamed")
        try:
            t = read[same_as] if same_as is not None else decode_tensor(tensors[key].numpy().tobytes(), entry)
        except (ValueError, zlib.error, lzma.LZMAError) as err:
            raise ValueError(f"the compact artifact {name!r} is damaged: tensor {tensor_name!r}: {err}") from err
        read[key] = t
        decoded[group][tensor_name] = nn.Parameter(t, requires_grad=False) if entry.get("parameter") else t
    buffers = []
    for group in ("state", "constants"):
        buffer = io.BytesIO()
        torch.save(decoded[group], buffer)  # plain tensors, read back by the deserializer with weights_only=True
        buffers.append(buffer.getvalue())
    try:
        exported = deserialize(SerializedArtifact(program, buffers[0], buffers[1], b""))
    except Exception as err:  # noqa: BLE001 - any failure here means the graph does not fit its tensors
        raise ValueError(f"the compact artifact {name!r} is damaged: its graph does not load ({type(err).__name__}: {err})") from err
    module = _inference_module(exported.module())
    fixed = metadata.get("fixed")
    _check_calls(module, name, fixed if isinstance(fixed, dict) else {})
    return module


def _check_calls(module: nn.Module, name: str, fixed: dict[str, Any]) -> None:
    """Refuse a call with other inputs than ``forward`` took when it was exported (:func:`~lightning_compress.artifact_calls.check_call`;
    torch said only "Ran into a kwarg keyword mismatch")."""
    spec = getattr(module, "_in_spec", None)
    try:
        args_spec, kwargs_spec = spec.children()  # type: ignore[union-attr]
        positional, keywords = args_spec.num_children, list(kwargs_spec.context or [])
    except (AttributeError, TypeError, ValueError):  # another torch's layout: torch's own check stays
        return

    dtypes = [getattr(n.meta.get("val"), "dtype", None) for n in module.graph.nodes if n.op == "placeholder"]
    check = _PositionalCheck(name, positional, keywords, fixed, dtypes if len(dtypes) == positional + len(keywords) else None)
    module.register_forward_pre_hook(check, with_kwargs=True, prepend=True)


class _PositionalCheck:
    """The forward pre-hook of :func:`_check_calls`, run before torch's own check of the inputs; ``dtypes``: of each
    input, positional then keyword, as exported (``None``: not known)."""

    def __init__(
        self, name: str, positional: int, keywords: list[str], fixed: dict[str, Any], dtypes: list[torch.dtype | None] | None = None
    ) -> None:
        self.name, self.positional, self.keywords, self.fixed, self.dtypes = name, positional, keywords, fixed, dtypes

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = check_call(self.name, self.positional, self.keywords, args, kwargs, self.fixed)
        if self.dtypes is not None:  # a graph is exported for its inputs' dtypes: torch said "mat1 and mat2 must have..."
            given = [(f"positional input {i}", v) for i, v in enumerate(args)] + [(f"input {k!r}", kwargs.get(k)) for k in self.keywords]
            for (where, value), expected in zip(given, self.dtypes):
                if not isinstance(value, torch.Tensor) or expected is None or value.dtype == expected:
                    continue
                # integer ids of another width index as well; a float of another width meets weights it does not fit
                if value.dtype.is_floating_point or expected.is_floating_point:
                    raise TypeError(
                        f"{self.name!r}: {where} is {value.dtype}, but the artifact was exported for {expected} inputs; "
                        f"cast it (.to({expected})) or export the model again with an example of that dtype"
                    )
        return args, kwargs


def _train_mode(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "a compact artifact is an inference graph, captured with the model in eval mode (dropout off, BatchNorm on "
            "its running statistics); it cannot be put in training mode. Train the model itself, then export it again"
        )
    return self


def _inference_module(module: nn.Module) -> nn.Module:
    """``module`` (the graph module ``torch.export`` gives back, whose ``train``/``eval`` raise) with ``eval()``
    and ``train(False)`` accepted: the graph is already the model's eval mode, so they change nothing."""
    for name in ("train", "eval"):  # the instance's own methods that raise; Module.eval calls train(False)
        module.__dict__.pop(name, None)
    for child in module.modules():
        child.training = False
    module.train = types.MethodType(_train_mode, module)  # type: ignore[method-assign]
    return module
