"""Weights sharded across processes by FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``).

What every plugin needs from a sharded model, once:

- :func:`is_sharded` and :func:`local`: a parameter is a ``DTensor``; this process holds some of its
  rows (``local(p)`` is a view: writing it writes the parameter);
- :func:`whole_copy`: a plain, unsharded copy of a sharded network on rank 0 (the model a plugin
  converts and saves at the end of fit), gathered one parameter at a time;
- :func:`shard_with_fsdp2`: the ``configure_model`` of this project's modules (every block, each network,
  then the module).

- :class:`ShardGroup`: the processes that share the rows, and the reductions over them (the finite
  check of :mod:`lightning_compress.guard`, pruning's counts and thresholds); :func:`data_parallel_group`:
  the processes of a DDP fit, over which data-dependent pruning scores sum their statistics.

Pruning's use of the shards (row ranges, 1-bit checkpoints) is in :mod:`lightning_compress.pruning.shards`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from lightning_compress.module_copy import copy_model

__all__ = ["ShardGroup", "check_not_sharded", "check_row_sharded", "data_parallel_group", "has_sharded_parameters", "is_fsdp_unit", "is_sharded", "local", "reshard", "shard_with_fsdp2", "whole_copy", "wraps_tensors"]

#: The hook tables of a module, where ``fully_shard`` registers its own hooks.
_HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


@functools.cache
def _distributed_class(module: str, name: str) -> type | None:
    """A class of torch.distributed (``DTensor``, ``FSDPModule``), looked up once; ``None`` in a build without
    distributed support."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2). Asked per parameter at every
    optimizer step (:func:`local`), so the class is looked up once."""
    dtensor = _distributed_class("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(t, dtensor)


def wraps_tensors(t: Any) -> bool:
    """Whether ``t`` is a tensor subclass holding its values in inner tensors (torchao's quantised weights, whose
    ``__tensor_flatten__`` names them), other than a sharded ``DTensor`` (read through :func:`local`)."""
    return type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__") and not is_sharded(t)


def local(t: Tensor) -> Tensor:
    """The part of a sharded tensor this process holds (a view of it); any other tensor as it is."""
    return t.to_local() if is_sharded(t) else t


class ShardGroup:
    """The processes that share the rows of the pruned weights, and the reductions pruning needs.

    Args:
        group: The process group of the data-parallel mesh dimension.
        device: Where the collectives' tensors live (the CUDA device under NCCL, the CPU under gloo).
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        import torch.distributed as dist

        self.group, self.device = group, device
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _reduce(self, values: Tensor, op: str) -> Tensor:
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        out = values.to(self.device).clone()
        dist.all_reduce(out, ops[op], group=self.group)
        return out

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over the ranks (a new tensor on this group's device)."""
        return self._reduce(values, "sum")

    def min(self, values: Tensor) -> Tensor:
        return self._reduce(values, "min")

    def max(self, values: Tensor) -> Tensor:
        return self._reduce(values, "max")

    def total(self, count: int) -> int:
        """An integer summed over the ranks."""
        return int(self.sum(torch.tensor([count], dtype=torch.int64)).item())

    def gather(self, values: Tensor) -> list[Tensor]:
        """Every rank's 1-D ``values`` (lengths may differ), in rank order, on every rank."""
        import torch.distributed as dist

        flat = values.reshape(-1).to(self.device)
        lengths = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([flat.numel()], dtype=torch.int64, device=self.device), group=self.group)
        sizes = [int(n.item()) for n in lengths]
        padded = torch.zeros(max(sizes), dtype=flat.dtype, device=self.device)
        padded[: flat.numel()] = flat
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return [p[:n] for p, n in zip(parts, sizes)]


def data_parallel_group(trainer: Any) -> ShardGroup | None:
    """The processes of a data-parallel fit (DDP: each runs other batches through the same whole weights), whose
    data statistics a plugin sums; ``None`` with one process."""
    import torch.distributed as dist

    if getattr(trainer, "world_size", 1) <= 1 or not dist.is_available() or not dist.is_initialized():
        return None
    device = trainer.strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
    return ShardGroup(dist.group.WORLD, device)


def is_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` made ``module`` a unit of FSDP2 (its class is then an ``FSDPModule``)."""
    fsdp = _distributed_class("torch.distributed.fsdp", "FSDPModule")
    return fsdp is not None and isinstance(module, fsdp)


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether FSDP2 shards any of ``module``'s parameters: one is a ``DTensor``, or a part of it is a ``fully_shard``
    unit (whose registered parameters are its gathered whole ones between a forward without backward and the
    unit's next reshard)."""
    return any(is_sharded(p) for p in module.parameters()) or any(is_fsdp_unit(m) for m in module.modules())


def check_not_sharded(module: nn.Module, who: str) -> None:
    """Refuse a network FSDP2 shards, for functions that copy or trace it whole on one process.

    Raises:
        ValueError: naming a sharded parameter and :func:`whole_copy`, the collective that gathers the network.
    """
    if has_sharded_parameters(module):
        name = next((n for n, p in module.named_parameters() if is_sharded(p)), None)
        held = f"its parameters are sharded over processes by FSDP2 ({name!r} is a DTensor)" if name else (
            "it is sharded over processes by FSDP2 (fully_shard)")
        raise ValueError(
            f"{who}: {held}; gather it first with whole = lightning_compress.sharding.whole_copy(model), called on every "
            f"process (a collective; it returns the whole network on rank 0 and None elsewhere), then pass whole on rank 0"
        )


def check_row_sharded(params: Mapping[str, Tensor], who: str, *, every: bool = False) -> bool:
    """Whether any of ``params`` is sharded; each that is must be split by rows over one mesh dimension
    (FSDP2's ``fully_shard``), and with ``every`` all of them must be.

    Raises:
        ValueError: a weight sharded otherwise (tensor parallelism), or (``every``) only some sharded,
            naming the weights, before anything changes.
    """
    sharded = [n for n, p in params.items() if is_sharded(p)]
    if not sharded:
        return False
    from torch.distributed.tensor import Shard

    plain = [n for n in params if n not in sharded]
    if every and plain:
        raise ValueError(
            f"{who}: {plain[:3]} are not sharded while {sharded[:3]} are; under ModelParallelStrategy apply "
            "fully_shard to the whole model in configure_model (fully_shard(self) after the layers), so that every "
            "selected weight is sharded"
        )
    for n in sharded:
        p = params[n]
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{who}: {n} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; {who} supports weights "
                "sharded by rows over the data-parallel ranks (FSDP2 fully_shard, placements (Shard(0),)), not tensor "
                "parallelism"
            )
    return True


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its shards. The root unit keeps its whole weights after
    a forward without backward (validation): writing the shards then would not reach that copy."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard_with_fsdp2(module: nn.Module, networks: Sequence[nn.Module], *, whole: bool = True) -> bool:
    """Under Lightning's ``ModelParallelStrategy`` (the LightningModule has a device mesh): apply FSDP2's
    ``fully_shard`` over the data-parallel ranks to every block of each of ``networks`` (each entry of
    their ``ModuleList`` s), to each network, then (``whole``) to ``module``. Once only
    (``configure_model`` is idempotent); returns whether it sharded now. Under any other strategy
    nothing happens.

    ``whole=False`` when ``module`` calls the networks directly rather than through its own ``forward``
    (FSDP2 runs a unit's forward through its root first): each network is then a root of its own, and
    every parameter must be in one of them."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None or module.__dict__.get("_fully_sharded"):
        return False
    from torch.distributed.fsdp import fully_shard

    ranks = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for network in networks:
        for blocks in [m for m in network.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:
                fully_shard(block, mesh=ranks)
        fully_shard(network, mesh=ranks)
    if whole:
        fully_shard(module, mesh=ranks)
    module._fully_sharded = True
    return True


def _owned_by_fsdp(hook: Any) -> bool:
    owner = getattr(hook, "__self__", None)
    return type(owner).__module__.startswith("torch.distributed") or getattr(hook, "__module__", "").startswith(
        "torch.distributed"
    )


def whole_copy(module: nn.Module) -> nn.Module | None:
    """A plain copy of a network whose parameters FSDP2 shards: on rank 0 every parameter whole (on
    the CPU), the FSDP classes and hooks gone; ``None`` on the other ranks.

    Every rank must call it (each parameter is gathered in turn, so no device holds more than one
    gathered parameter beyond its shards). Buffers are copied as they are (FSDP2 does not shard them).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    is_zero = dist.get_rank() == 0
    reshard(module)
    whole: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        gathered = p.full_tensor() if is_sharded(p) else p.detach()
        if is_zero:
            whole[id(p)] = nn.Parameter(gathered.detach().cpu().clone(), requires_grad=p.requires_grad)
    if not is_zero:
        return None
    undo = []
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        plain = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
        state = {k: v for k, v in m.__dict__.items() if k.startswith("__composable_api_state_key") or k.startswith("_is_fsdp")
                 or k.startswith("_fsdp")}
        tables = {t: getattr(m, t) for t in _HOOK_TABLES if isinstance(getattr(m, t, None), dict)}
        undo.append((m, type(m), state, tables))
        for k in state:
            del m.__dict__[k]
        fsdp_ids = {k for t in ("_forward_pre_hooks", "_forward_hooks") for k, h in tables[t].items() if _owned_by_fsdp(h)}
        for t, table in tables.items():  # filtered copies for the deep copy; the originals go back below
            setattr(m, t, type(table)((k, v) for k, v in table.items() if k not in fsdp_ids and not _owned_by_fsdp(v)))
        m.__class__ = plain
    memo: dict[int, Any] = dict(whole)
    for m in module.modules():  # a LightningModule's device mesh stays behind (process groups are not copied)
        if getattr(m, "_device_mesh", None) is not None:
            memo[id(m._device_mesh)] = None
    try:
        copied = copy_model(module, memo)
    finally:
        for m, cls, state, tables in undo:
            m.__class__ = cls
            m.__dict__.update(state)
            for t, table in tables.items():
                setattr(m, t, table)
    return copied.cpu()
