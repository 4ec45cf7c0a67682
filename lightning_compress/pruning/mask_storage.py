"""Masks as stored and sent: 1 bit per entry for checkpoints and broadcasts, and the bytes a sparse
tensor would take (CSR or a bitmap) for the report.

Packing happens on the mask's device, so only the bits (an eighth of the mask) reach the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["broadcast_masks", "pack_mask", "sparse_storage_bytes", "storage_bytes", "unpack_mask"]

def sparse_storage_bytes(mask: Tensor, element_size: int = 4) -> dict[str, Any]:
    """Estimated bytes of a tensor stored densely and sparsely (the cheaper of CSR with int32 indices and a bitmap).

    >>> sparse_storage_bytes(torch.tensor([[True, False, False, False]]))
    {'dense_bytes': 16, 'sparse_bytes': 5, 'format': 'bitmap'}
    """
    return storage_bytes(mask.numel(), int(mask.sum()), mask.shape[0] if mask.dim() > 0 else 1, element_size)


def storage_bytes(numel: int, nnz: int, rows: int, element_size: int = 4) -> dict[str, Any]:
    """:func:`sparse_storage_bytes` from the counts: entries, kept entries and rows of the tensor."""
    csr = nnz * (element_size + 4) + (rows + 1) * 4
    bitmap = nnz * element_size + math.ceil(numel / 8)
    fmt, size = ("csr", csr) if csr < bitmap else ("bitmap", bitmap)
    if numel * element_size <= size:
        fmt, size = "dense", numel * element_size
    return {"dense_bytes": numel * element_size, "sparse_bytes": size, "format": fmt}


def broadcast_masks(strategy: Any, world_size: int, masks: Any) -> Any:
    """Rank 0's masks (a dict or a list of bool tensors) on every rank, bit-packed for the broadcast,
    each back on its own tensor's device. One process: ``masks`` as they are."""
    if world_size <= 1:
        return masks
    if isinstance(masks, Mapping):
        packed = strategy.broadcast({n: pack_mask(t) for n, t in masks.items()}, src=0)
        return {n: unpack_mask(v, masks[n].device) for n, v in packed.items()}
    packed_list = strategy.broadcast([pack_mask(t) for t in masks], src=0)
    return [unpack_mask(v, t.device) for v, t in zip(packed_list, masks)]


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy's packbits order: the first entry is the high bit


def pack_mask(mask: Tensor, by_rows: bool = False) -> dict[str, Any]:
    """A bool mask as 1 bit per entry (for checkpoints): ``{"shape": [...], "bits": uint8 tensor}``.

    Packed on the mask's device, so only the bits (an eighth of the mask) reach the host. With
    ``by_rows``, each row (first dimension) starts a new byte: ``bits`` is ``(rows, bytes per row)``,
    so the bits of a weight's rows held by several processes concatenate, and split, by rows.

    >>> m = torch.tensor([[True, False, True]])
    >>> torch.equal(unpack_mask(pack_mask(m)), m)
    True
    >>> pack_mask(m)["bits"].tolist()  # the same bytes as numpy.packbits
    [160]
    """
    if by_rows:
        # sizes spelt out, not -1: a process may hold no row of a weight (FSDP2 shards a 1-row head over 2)
        length = math.prod(mask.shape[1:]) if mask.dim() > 1 else 1
        rows = mask.detach().reshape(mask.shape[0] if mask.dim() else 1, length).to(torch.uint8)
        rows = torch.nn.functional.pad(rows, (0, (-length) % 8))
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8).to(rows.device)
        bits = (rows.view(rows.shape[0], rows.shape[1] // 8, 8) * weights).sum(2, dtype=torch.uint8)
        return {"shape": list(mask.shape), "bits": bits, "by_rows": True}
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8).to(flat.device)
    bits = (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": bits.cpu()}


def unpack_mask(packed: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """Inverse of :func:`pack_mask`, on ``device`` (default the CPU); unpacked there, so only the bits travel.

    ``bits`` may be on any device (a checkpoint loaded with ``map_location="cuda"``)."""
    shape = [int(s) for s in packed["shape"]]
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8)
    if packed.get("by_rows"):
        bits = packed["bits"].detach().to(device or "cpu", torch.uint8)
        length = math.prod(shape[1:]) if len(shape) > 1 else 1
        flags = (bits.unsqueeze(-1) & weights.to(bits.device)).ne(0).reshape(bits.shape[0], bits.shape[1] * 8)
        return flags[:, :length].reshape(shape)
    numel = math.prod(shape) if shape else 1
    bits = packed["bits"].detach().to(device or "cpu", torch.uint8).reshape(-1, 1)
    return (bits & weights.to(bits.device)).ne(0).reshape(-1)[:numel].reshape(shape)
