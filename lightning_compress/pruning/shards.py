"""Pruning weights that are sharded across processes (FSDP2: ``fully_shard`` under ``ModelParallelStrategy``).

Under FSDP2 every parameter is a ``DTensor`` split by rows (``Shard(0)``) over the data-parallel ranks:
rank ``r`` holds rows ``[offset_r, offset_r + rows_r)`` of each weight, in ``torch.chunk`` order. The
pruning masks are made and kept for the local rows only (1 byte per local weight); what needs every
row is reduced across the ranks instead of gathered:

- counts, totals, value ranges and histograms of the global threshold
  (:mod:`~lightning_compress.pruning.threshold`): ``all_reduce``;
- the few candidate scores left at the end of the threshold search, and the per-rank tie counts
  that make the result identical to one process's stable order: ``all_gather`` (small);
- checkpoints: each rank packs its rows at 1 bit per weight, row by row, and rank 0 gathers the
  bits (:func:`gather_rows`), so a resume with any number of ranks takes its own rows back
  (:func:`local_rows`).

The order of entries across ranks is rank-major within each tensor, which is the flat order of the
whole tensor: a threshold found on shards prunes exactly the entries one process would prune.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from lightning_compress.pruning.weights import input_dim
from lightning_compress.sharding import ShardGroup, check_row_sharded, is_sharded, local

__all__ = ["check_sharded_blocks", "find_shard_group", "gather_rows", "local_rows", "row_range"]


def row_range(t: Tensor) -> tuple[int, int, int]:
    """``(first row, local rows, global rows)`` of a row-sharded tensor; ``(0, rows, rows)`` otherwise."""
    rows = t.shape[0] if t.dim() else 1
    if not is_sharded(t):
        return 0, rows, rows
    mesh = t.device_mesh
    per = math.ceil(rows / mesh.size()) if rows else 0
    first = min(mesh.get_local_rank() * per, rows)
    held = local(t).shape[0] if t.dim() else 1
    return first, held, rows


def find_shard_group(params: Mapping[str, Tensor], who: str) -> ShardGroup | None:
    """The :class:`ShardGroup` of ``params`` when they are FSDP2 shards, ``None`` when none is sharded.

    Raises:
        ValueError: only some of them are sharded, or sharded other than by rows over one mesh dimension
            (tensor parallelism), naming the parameter.
    """
    if not check_row_sharded(params, who, every=True):
        return None
    sharded = {n: p for n, p in params.items() if is_sharded(p)}
    meshes = {id(p.device_mesh) for p in sharded.values()}
    if len(meshes) > 1:
        raise ValueError(f"{who}: the pruned weights are sharded over {len(meshes)} different meshes; use one")
    p = next(iter(sharded.values()))
    device = local(p).device
    return ShardGroup(p.device_mesh.get_group(), device)


def gather_rows(shards: ShardGroup, packed_rows: Tensor) -> Tensor | None:
    """Rank 0: every rank's packed rows, concatenated in rank order (the whole tensor's rows), on the CPU.
    Other ranks: ``None``. One ``all_gather`` of at most one bit per weight."""
    width = packed_rows.shape[1] if packed_rows.dim() == 2 else 0
    parts = shards.gather(packed_rows.reshape(-1))
    if shards.rank != 0:
        return None
    return torch.cat([p.cpu() for p in parts]).reshape(-1, width)


def local_rows(t: Tensor, param: Tensor) -> Tensor:
    """The rows of a whole-tensor ``t`` (rows first) that this process holds of ``param``."""
    first, held, _ = row_range(param)
    return t[first : first + held]


def check_sharded_blocks(
    params: Mapping[str, Tensor], input_major: Collection[str] | Mapping[str, int], nm: tuple[int, int] | None
) -> None:
    """N:M blocks of weights stored ``(in, out)`` (``input_major``: their names, or ``{name: input dim}``) run along
    the sharded rows: each process's rows must hold whole blocks (experts stored ``(E, in, out)`` are sharded by
    expert: their blocks stay whole)."""
    if nm is None:
        return
    for n in (name for name in input_major if input_dim(input_major, name, params[name]) == 0):
        first, held, _ = row_range(params[n])
        if first % nm[1] or held % nm[1]:
            raise ValueError(
                f"PruningCallback(structure='{nm[0]}:{nm[1]}'): {n} is stored (in, out) and this process holds its input "
                f"rows {first}..{first + held}, which split blocks of {nm[1]}; use a number of processes that divides "
                f"its {params[n].shape[0] // nm[1]} blocks, or exclude it"
            )
