"""Importance criteria: which weights (or channels) matter least.

A criterion scores elements (``unstructured`` and ``N:M``) or output channels (``channel``); higher
scores survive. Built-in names: ``magnitude`` (|w|), ``random`` (seeded, identical on every rank),
``taylor`` (|w·∂L/∂w| accumulated over optimizer steps), ``wanda`` (|w| times the L2 norm of the
layer's input feature, compared within each output row, Sun et al. 2023), ``entropy`` (entropy of each
channel's pooled activation, Luo & Wu 2017), ``bn_scale`` (|γ| of the BatchNorm that follows). A user criterion
is a :class:`Criterion` subclass, or a plain function ``fn(name, weight) -> scores`` returning a
tensor of the weight's shape (or, for channel granularity, one score per output channel), given as
an object or as a ``"package.module.name"`` import path.

Entropy criterion (Luo & Wu 2017): for channel :math:`c`, the activation of each sample is
global-average-pooled to a scalar, the values over the last batches are binned into :math:`m` bins
with frequencies :math:`p_i`, and :math:`H_c = -\\sum_i p_i \\log p_i`. A channel whose output barely
changes across inputs carries little information and is pruned first.

Wanda lives in :mod:`lightning_compress.pruning.wanda`, the interface in
:mod:`lightning_compress.pruning.criterion_base`; both are re-exported here.

Example:
    >>> import torch
    >>> crit = make_criterion("magnitude")
    >>> w = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    >>> crit.element_scores({"w": w})["w"].tolist()
    [[1.0, 3.0], [0.5, 2.0]]
    >>> entropy_of_samples(torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]), bins=4).tolist()
    [0.0, 1.3862943649291992]
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.pruning.criterion_base import Criterion, PruningContext, _per_channel
from lightning_compress.pruning.channel_masks import ChannelGroupSpec
from lightning_compress.pruning.shards import row_range
from lightning_compress.pruning.wanda import Wanda

__all__ = [
    "BNScale",
    "CRITERIA",
    "CallableCriterion",
    "Criterion",
    "Entropy",
    "Magnitude",
    "PruningContext",
    "Random",
    "Taylor",
    "Wanda",
    "entropy_of_samples",
    "make_criterion",
]


class Magnitude(Criterion):
    """``|w|`` per element; the L1 norm of each output channel for channel granularity."""

    name = "magnitude"

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: p.detach().abs() for n, p in params.items()}


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Random(Criterion):
    """A fixed random order per weight, seeded from ``seed`` and the parameter name: the same on every
    rank and across resumes, so the masks only grow as the target rises."""

    name = "random"

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, p in params.items():
            first = row_range(self.ctx.params[n])[0] if n in self.ctx.params else 0
            g = torch.Generator(device=p.device).manual_seed(_seed_for(self.ctx.seed, n if not first else f"{n}@{first}"))
            out[n] = torch.rand(p.shape, generator=g, device=p.device)  # drawn where the weight is: no host copy
        return out

    def channel_scores(self, params: Mapping[str, Tensor], groups: Sequence[ChannelGroupSpec]) -> list[Tensor]:
        out = []
        for g in groups:
            gen = torch.Generator().manual_seed(_seed_for(self.ctx.seed, "|".join(g.members)))
            out.append(torch.rand(g.size, generator=gen))
        return out


class Taylor(Criterion):
    """First-order Taylor importance ``|w · ∂L/∂w|``, summed in float32 over the optimizer steps since the last
    update (Molchanov et al. 2017/2019); a step with an infinite or NaN gradient adds nothing (it still counts
    in ``steps``). Before any step has been seen it falls back to ``|w|``."""

    name = "taylor"

    def __init__(self) -> None:
        self._said_no_steps = False
        self.reset()

    def on_before_optimizer_step(self, params: Mapping[str, Tensor]) -> None:
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        with torch.no_grad():
            # a step with an infinite or NaN gradient (a float16 loss-scale overflow, which the GradScaler then
            # skips) adds nothing: once in a sum, it would make every score NaN; checked on the device, no sync
            first = next(iter(grads.values()), None)  # weights on several devices (device_map, offloading): one flag
            finite = torch.stack([g.isfinite().all().to(first.device) for g in grads.values()]).all() if first is not None else None
            for n, g in grads.items():
                contrib = torch.where(finite.to(g.device), (params[n].detach().float() * g.float()).abs(), 0.0)  # float32
                if n in self.accum and self.accum[n].shape == contrib.shape:
                    self.accum[n].add_(contrib)
                else:
                    self.accum[n] = contrib.clone()
        self.steps += 1

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.steps == 0 and not self.accum and not self._said_no_steps:
            self._said_no_steps = True
            rank_zero_warn(
                "criterion 'taylor' scores |w · gradient| summed over the optimizer steps since the last update, and this "
                "update comes before any step (schedule='one_shot' at start_epoch=0, say): it scores by |w| alone, as "
                "'magnitude' does. Start pruning after some training (start_epoch > 0) for Taylor scores"
            )
        out = {}
        for n, p in params.items():
            acc = self.accum.get(n)
            out[n] = acc.clone() if acc is not None and acc.shape == p.shape else p.detach().abs()
        # weights no step had a gradient for (frozen, or a branch the data never takes) next to weights that had
        # one: their |w| and the others' sums of |w·g| are not on one scale
        scored = [n for n in params if n in self.accum]
        self.unscored = [n for n in params if n not in self.accum] if scored else []
        return out

    def reset(self) -> None:
        self.accum = {}
        self.steps = 0
        self.unscored: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"accum": {n: t.detach().cpu().clone() for n, t in self.accum.items()}, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = getattr(self, "ctx", None)
        device = None
        if params is not None and params.params:
            device = next(iter(params.params.values())).device
        self.accum = {n: t.to(device) if device is not None else t for n, t in state.get("accum", {}).items()}
        self.steps = int(state.get("steps", 0))


def entropy_of_samples(values: Tensor, bins: int = 32) -> Tensor:
    """Entropy (nats) of each column of ``values`` ``(samples, channels)``, binned between the column's min and max."""
    values = values.detach().float()
    lo = values.min(0).values
    hi = values.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    idx = ((values - lo) / span * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(bins, values.shape[1], dtype=torch.float32)
    counts.scatter_add_(0, idx.cpu(), torch.ones_like(idx, dtype=torch.float32).cpu())
    p = counts / values.shape[0]
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
    return torch.where(hi - lo > 1e-12, h.to(values.device), torch.zeros_like(h).to(values.device))


class Entropy(Criterion):
    """Luo & Wu (2017): entropy of each output channel's global-average-pooled activation.

    Forward hooks on each pruned layer (on its BatchNorm when one follows) record the pooled
    activations of the last ``batches`` training batches; the score is their binned entropy.
    Channel granularity only.

    Args:
        batches: Training batches kept for the histogram.
        bins: Histogram bins.
    """

    name = "entropy"
    granularities = ("channel",)
    needs_data = True

    def __init__(self, batches: int = 16, bins: int = 32) -> None:
        if batches < 1 or bins < 2:
            raise ValueError(f"entropy criterion needs batches >= 1 and bins >= 2, got batches={batches}, bins={bins}")
        self.batches = batches
        self.bins = bins
        self.samples: dict[str, deque[Tensor]] = {}
        self._handles: list[Any] = []

    def setup(self, ctx: PruningContext, granularity: str) -> None:
        super().setup(ctx, granularity)
        self.teardown()
        for g in ctx.groups:
            for m in g.members:
                target = ctx.batchnorms.get(m, m)
                self.samples.setdefault(m, deque(maxlen=self.batches))
                self._handles.append(ctx.modules[target].register_forward_hook(self._hook(m)))

    def _hook(self, member: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not module.training or not isinstance(output, Tensor) or output.dim() < 2:
                return
            with torch.no_grad():
                pooled = output.detach().float()
                if pooled.dim() > 2:
                    pooled = pooled.flatten(2).mean(2)
                self.samples[member].append(pooled.cpu())

        return hook

    def teardown(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def channel_scores(self, params: Mapping[str, Tensor], groups: Sequence[ChannelGroupSpec]) -> list[Tensor]:
        out = []
        for g in groups:
            per = []
            for m in g.members:
                values = self._samples_of(m, g.size)
                if values.shape[0] == 0:
                    raise RuntimeError(
                        f"entropy criterion has seen no training activation of {m!r} yet; start pruning after at "
                        "least one training step (start_epoch > 0 or update_every_n_steps)"
                    )
                per.append(entropy_of_samples(values, self.bins))
            out.append(torch.stack(per).mean(0))
        return out

    def _samples_of(self, member: str, channels: int) -> Tensor:
        """The pooled activations of ``member`` this process recorded, with those of the other processes of a
        data-parallel fit (:attr:`PruningContext.data_group`), in rank order."""
        buf = self.samples.get(member)
        mine = torch.cat(list(buf)) if buf else torch.zeros(0, channels)
        group = self.data_processes()
        if group is None:
            return mine
        width = mine.shape[1] if mine.dim() == 2 and mine.shape[0] else channels
        return torch.cat([part.cpu() for part in group.gather(mine.reshape(-1).float())]).reshape(-1, width)

    def reset(self) -> None:
        for buf in self.samples.values():
            buf.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"samples": {m: list(buf) for m, buf in self.samples.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for m, items in state.get("samples", {}).items():
            self.samples[m] = deque(items, maxlen=self.batches)


class BNScale(Criterion):
    """``|γ|`` of the BatchNorm that consumes each layer's output (network slimming, Liu et al. 2017).
    Channel granularity only; every pruned layer needs such a BatchNorm."""

    name = "bn_scale"
    granularities = ("channel",)

    def setup(self, ctx: PruningContext, granularity: str) -> None:
        super().setup(ctx, granularity)
        missing = [m for g in ctx.groups for m in g.members if m not in ctx.batchnorms]
        if missing:
            raise ValueError(
                f"criterion 'bn_scale' needs a BatchNorm right after every pruned layer; {missing} have none. "
                "Exclude them (`exclude`) or use another criterion."
            )

    def channel_scores(self, params: Mapping[str, Tensor], groups: Sequence[ChannelGroupSpec]) -> list[Tensor]:
        out = []
        for g in groups:
            per = []
            for m in g.members:
                bn = self.ctx.modules[self.ctx.batchnorms[m]]
                gamma = bn.weight.detach().abs().float() if bn.weight is not None else torch.ones(g.size)
                per.append(gamma / gamma.mean().clamp_min(1e-12))
            out.append(torch.stack(per).mean(0))
        return out


class CallableCriterion(Criterion):
    """Wrap ``fn(name, weight) -> scores`` (same shape as ``weight``, or one score per output channel)."""

    def __init__(self, fn: Callable[[str, Tensor], Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))

    def _call(self, n: str, p: Tensor) -> Tensor:
        s = self.fn(n, p.detach())
        if not isinstance(s, Tensor):
            raise TypeError(f"criterion {self.name!r} returned {type(s).__name__} for {n!r}; it must return a Tensor")
        return s

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, p in params.items():
            s = self._call(n, p)
            if s.shape != p.shape:
                raise ValueError(
                    f"criterion {self.name!r} returned scores of shape {tuple(s.shape)} for {n!r}; "
                    f"expected the weight's shape {tuple(p.shape)}"
                )
            out[n] = s
        return out

    def channel_scores(self, params: Mapping[str, Tensor], groups: Sequence[ChannelGroupSpec]) -> list[Tensor]:
        out = []
        for g in groups:
            per = []
            for m in g.members:
                n = f"{m}.weight"
                s = self._call(n, params[n]).detach().float()
                if s.dim() == 1 and s.numel() == g.size:
                    pass
                elif s.shape == params[n].shape:
                    s = _per_channel(g, n, s)
                else:
                    raise ValueError(
                        f"criterion {self.name!r} returned scores of shape {tuple(s.shape)} for {n!r}; expected "
                        f"{tuple(params[n].shape)} or ({g.size},)"
                    )
                per.append(s / s.abs().mean().clamp_min(1e-12))
            out.append(torch.stack(per).mean(0))
        return out


CRITERIA: dict[str, type[Criterion]] = {
    "magnitude": Magnitude,
    "random": Random,
    "taylor": Taylor,
    "wanda": Wanda,
    "entropy": Entropy,
    "bn_scale": BNScale,
}


def make_criterion(spec: str | Criterion | Callable[[str, Tensor], Tensor]) -> Criterion:
    """A :class:`Criterion` from a name, an import path (class or function), an instance or a callable.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an import path that does not resolve.
    """
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, type) and issubclass(spec, Criterion):
        return spec()
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key in CRITERIA:
            return CRITERIA[key]()
        if "." not in spec:
            raise ValueError(
                f"unknown criterion {spec!r}; valid: {sorted(CRITERIA)}, a Criterion subclass, a callable "
                "fn(name, weight) -> scores, or an import path 'package.module.name' to one"
            )
        mod_name, _, attr = spec.rpartition(".")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"criterion {spec!r} cannot be imported: {err}") from err
        return make_criterion(obj)
    if callable(spec) and not inspect.isclass(spec):
        return CallableCriterion(spec)
    raise ValueError(
        f"criterion must be one of {sorted(CRITERIA)}, a Criterion, a callable or an import path; got {spec!r}"
    )
