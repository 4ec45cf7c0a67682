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

Wanda (Sun et al. 2023): :math:`S_{ij} = |W_{ij}| \\cdot \\lVert X_j \\rVert_2`, where :math:`X_j` is input
feature :math:`j` of the layer over the calibration tokens; scores are compared within each output row
:math:`i` (unstructured: every row loses the same share) or within each group of M inputs (N:M).

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning.masks import ChannelGroupSpec
from lightning_compress.pruning.shards import row_range
from lightning_compress.pruning.weights import MHA_PROJECTIONS, matmul_kind

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


@dataclass
class PruningContext:
    """What a criterion may look at.

    Attributes:
        model: The LightningModule (names below are relative to it).
        params: ``{parameter name: parameter}`` of the weights being pruned.
        modules: ``{module name: module}`` of the whole model.
        groups: Channel groups (``channel`` granularity only).
        batchnorms: ``{Conv/Linear module name: name of the BatchNorm that consumes its output}``.
        seed: The callback's seed.
        shards: The processes holding the other rows of sharded weights (FSDP2), else ``None``; the
            scores are then asked for this process's rows (``params`` are still the whole parameters,
            whose :func:`~lightning_compress.pruning.shards.row_range` says which rows those are).
    """

    model: nn.Module
    params: dict[str, Tensor]
    modules: dict[str, nn.Module]
    groups: list[ChannelGroupSpec] = field(default_factory=list)
    batchnorms: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    shards: Any = None


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _per_channel(group: ChannelGroupSpec, name: str, scores: Tensor) -> Tensor:
    """Element scores of a member weight summed over each channel's entries: a channel's rows (a head's
    rows), along the weight's output dim and in each of its blocks (a fused q/k/v)."""
    dim, blocks = group.layout(name)
    if dim:
        scores = scores.movedim(dim, 0)
    return scores.reshape(blocks, group.size, -1).abs().sum((0, 2))


class Criterion:
    """Base class of importance criteria. Override :meth:`element_scores` or :meth:`channel_scores`.

    Class attribute ``granularities`` lists the granularities it supports among ``"unstructured"``,
    ``"channel"`` and ``"nm"``.
    """

    name: str = "custom"
    granularities: tuple[str, ...] = ("unstructured", "channel", "nm")
    #: Whether scores need training batches seen first (pruning cannot happen before the first step).
    needs_data: bool = False
    #: Whether unstructured masks compare scores within each output row (every row loses the same
    #: share; the callback's ``scope`` is then ``"row"``) instead of across a layer or the model.
    per_row: bool = False

    def setup(self, ctx: PruningContext, granularity: str) -> None:
        """Check that the criterion applies (raise ``ValueError`` otherwise) and attach hooks."""
        if granularity not in self.granularities:
            raise ValueError(
                f"criterion {self.name!r} does not apply to structure {_gran_name(granularity)!r}; it supports "
                f"{[_gran_name(g) for g in self.granularities]}"
            )
        self.ctx = ctx

    def teardown(self) -> None:
        """Remove hooks (called when pruning ends)."""

    def on_before_optimizer_step(self, params: Mapping[str, Tensor]) -> None:
        """Called with gradients available, before every optimizer step."""

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Importance of every element of each weight (same shapes)."""
        raise NotImplementedError(f"criterion {self.name!r} does not score individual weights")

    def channel_scores(self, params: Mapping[str, Tensor], groups: Sequence[ChannelGroupSpec]) -> list[Tensor]:
        """Importance of every output channel of each group. Default: the members' element scores summed
        over each output channel, each member normalised by its mean, averaged over the members."""
        names = {f"{m}.weight" for g in groups for m in g.members}
        elem = self.element_scores({n: params[n] for n in names})
        out = []
        for g in groups:
            per = []
            for m in g.members:
                s = _per_channel(g, f"{m}.weight", elem[f"{m}.weight"].detach().float())
                per.append(s / s.mean().clamp_min(1e-12))
            out.append(torch.stack(per).mean(0))
        return out

    def reset(self) -> None:
        """Forget what was accumulated (called after each mask update)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _gran_name(g: str) -> str:
    return "N:M" if g == "nm" else g


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
    """First-order Taylor importance ``|w · ∂L/∂w|``, summed over the optimizer steps since the last update
    (Molchanov et al. 2017/2019). Before any step has been seen it falls back to ``|w|``."""

    name = "taylor"

    def __init__(self) -> None:
        self.accum: dict[str, Tensor] = {}
        self.steps = 0

    def on_before_optimizer_step(self, params: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is None:
                    continue
                contrib = (p.detach() * p.grad).abs()
                if n in self.accum and self.accum[n].shape == contrib.shape:
                    self.accum[n].add_(contrib)
                else:
                    self.accum[n] = contrib.clone()
        self.steps += 1

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, p in params.items():
            acc = self.accum.get(n)
            out[n] = acc.clone() if acc is not None and acc.shape == p.shape else p.detach().abs()
        return out

    def reset(self) -> None:
        self.accum = {}
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"accum": {n: t.detach().cpu().clone() for n, t in self.accum.items()}, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = getattr(self, "ctx", None)
        device = None
        if params is not None and params.params:
            device = next(iter(params.params.values())).device
        self.accum = {n: t.to(device) if device is not None else t for n, t in state.get("accum", {}).items()}
        self.steps = int(state.get("steps", 0))


def _sq_features(x: Tensor, dim: int) -> tuple[Tensor, int]:
    """Sum over every other dimension of ``x**2`` per index of ``dim`` (float32), and the token count."""
    x = x.detach()
    dim %= x.dim()
    others = [d for d in range(x.dim()) if d != dim]
    sq = x.float().square()  # float32: a float16 square overflows above 256 (outlier features do)
    sq = sq.sum(others) if others else sq  # 16x faster than linalg.vector_norm over several dims on the CPU
    return sq, x.numel() // max(1, x.shape[dim])


def _first_tensor(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, key: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(key)


class Wanda(Criterion):
    r"""Wanda (Sun et al. 2023): :math:`|W_{ij}| \cdot \lVert X_j \rVert_2`, compared within each output row.

    :math:`\lVert X_j \rVert_2` is the L2 norm of input feature :math:`j` of the weight's layer over
    the tokens seen: a weight on a large input feature is kept even when it is small. Forward
    pre-hooks on the layers that own the pruned weights sum the squared inputs: the input of a
    ``Linear``/``Conv1D``, each input channel of a convolution (the norm is per channel, shared by its
    kernel positions), the query/key/value of a ``MultiheadAttention`` for the matching rows of
    ``in_proj_weight`` (``q_proj_weight``...), and for its ``out_proj`` (which the attention calls
    without going through the module) the attention output, recomputed without gradient.

    Where the inputs come from: the first ``calibration_batches`` training steps after the last mask
    update (or the start) are recorded as they run: no extra forward pass, the statistics are those
    of the model with its current masks, and the steps after them pay nothing. Only forwards with
    gradients in training mode count (not validation, nor another plugin's batches). When an update
    comes before any training step (``schedule="one_shot"`` at ``start_epoch=0``: pruning pretrained
    weights), ``calibration_batches`` training batches are run through the module first (eval mode, no
    gradient, the attention fast path off, the module's own ``training_step`` stopped after
    ``forward``). In ``setup`` one training batch is run to check that an input reaches every layer.

    Unstructured masks compare within each output row (``scope`` is ``"row"``: every row loses the
    same share, within one weight); N:M compares within each group of M inputs. Supports the weights
    of ``Linear``, ``Conv1d/2d/3d``, ``MultiheadAttention`` and GPT-2 style ``Conv1D``; any other
    selected parameter (a named embedding) is an error.

    Args:
        calibration_batches: Training batches of inputs per mask update: the first this many training
            steps after each update are recorded; when an update comes before any step, this many
            training batches are run.
    """

    name = "wanda"
    granularities = ("unstructured", "nm")
    per_row = True

    def __init__(self, calibration_batches: int = 32) -> None:
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"wanda criterion needs calibration_batches >= 1, got {calibration_batches!r}")
        self.calibration_batches = calibration_batches
        self.sq: dict[str, Tensor] = {}  # "<module>:<role>" -> sum over tokens of each input feature squared
        self.tokens: dict[str, int] = {}
        self.calls: dict[str, int] = {}  # training forwards recorded per hook since the last update
        self._plan: dict[str, tuple[str, str]] = {}  # parameter -> (module name, kind)
        self._handles: list[Any] = []
        self._calibrating = False
        self._recomputing = False
        self._eye: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    # ------------------------------------------------------------------ setup: which input each weight needs
    def setup(self, ctx: PruningContext, granularity: str) -> None:
        super().setup(ctx, granularity)
        self.teardown()
        plan: dict[str, tuple[str, str]] = {}
        for n in ctx.params:
            mod_name = _module_of(n)
            module, leaf = ctx.modules.get(mod_name), n.rsplit(".", 1)[-1]
            kind = matmul_kind(module, leaf) if module is not None else None
            parent = ctx.modules.get(_module_of(mod_name)) if mod_name else None
            if kind == "linear" and isinstance(parent, nn.MultiheadAttention) and parent.out_proj is module:
                kind = "out_proj"
            if kind is None or isinstance(module, nn.modules.conv._ConvTransposeNd):
                what = type(module).__name__ if module is not None else "no module"
                raise ValueError(
                    f"criterion 'wanda' weighs each weight by the norm of its layer's input and supports the weights of "
                    f"Linear, Conv1d/2d/3d, MultiheadAttention and Conv1D; {n!r} ({what}) is none of them: exclude it "
                    "or use criterion='magnitude'"
                )
            plan[n] = (mod_name, kind)
        self._plan = plan
        hooked: set[str] = set()
        for mod_name, kind in plan.values():
            owner = _module_of(mod_name) if kind == "out_proj" else mod_name
            if (owner, kind) in hooked:
                continue
            hooked.add((owner, kind))
            module = ctx.modules[owner]
            if kind == "out_proj":
                hook = self._out_proj_hook(owner, mod_name)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(owner, kind), with_kwargs=True))
        self.reset()
        trainer = getattr(ctx.model, "_trainer", None)
        if trainer is not None and getattr(ctx.model, "automatic_optimization", False):
            self._check_inputs_reach_every_layer()

    def _check_inputs_reach_every_layer(self) -> None:
        self._run_batches(1)
        missing = sorted({m for n, (m, _) in self._plan.items() if not self._seen(n)})
        self.reset()
        if missing:
            raise ValueError(
                f"criterion 'wanda' weighs each weight by the norm of its layer's input, but no input reached {missing} "
                "when a training batch ran through the model (a layer whose weight is used without calling the layer, "
                "e.g. F.linear(x, layer.weight)); exclude them or use criterion='magnitude'"
            )

    # ------------------------------------------------------------------ hooks
    def _recording(self, module: nn.Module, hook: str) -> bool:
        if self._recomputing:
            return False
        if self._calibrating:
            return True
        calls = self.calls.get(hook, 0)
        if not module.training or not torch.is_grad_enabled() or calls >= self.calibration_batches:
            return False
        self.calls[hook] = calls + 1
        return True

    def _add(self, key: str, x: Any, dim: int = -1, done: tuple[Tensor, int] | None = None) -> tuple[Tensor, int] | None:
        """Add the squared features of ``x`` (or the ``done`` sums of the same tensor) to ``key``."""
        if done is None:
            if not isinstance(x, Tensor) or x.is_nested or x.dim() == 0:
                return None
            done = _sq_features(x, dim)
        sq, tokens = done
        acc = self.sq.get(key)
        if acc is not None and acc.shape == sq.shape:
            if acc.device != sq.device:  # loaded from a checkpoint onto the CPU
                acc = self.sq[key] = acc.to(sq.device)
            acc.add_(sq)
        else:
            self.sq[key] = sq.clone()
        self.tokens[key] = self.tokens.get(key, 0) + tokens
        return done

    def _input_hook(self, name: str, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._recording(module, f"{name}:{kind}"):
                return
            with torch.no_grad():
                if kind == "attention":
                    q = _first_tensor(args, kwargs, 0, "query")
                    done = self._add(f"{name}:q", q)
                    for i, role in ((1, "key"), (2, "value")):
                        x = _first_tensor(args, kwargs, i, role)
                        self._add(f"{name}:{role[0]}", x, done=done if x is q else None)  # self-attention: once
                    return
                x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
                if kind == "conv" and isinstance(x, Tensor):
                    self._add(f"{name}:in", x, 1 if x.dim() == module.weight.dim() else 0)  # batched or not
                else:
                    self._add(f"{name}:in", x)

        return hook

    def _out_proj_hook(self, mha_name: str, out_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._recording(module, f"{mha_name}:out_proj"):
                return
            proj = module.out_proj
            weight = proj.weight
            key = (weight.shape[1], weight.dtype, weight.device)
            eye = self._eye.get(key)
            if eye is None:
                eye = self._eye[key] = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            kw = dict(kwargs)
            if len(args) <= 4:
                kw["need_weights"] = False
            # the same attention with an identity out_proj gives out_proj's input. The Parameters are swapped in
            # the module's table, not modified: the tensors autograd saved in the real forward stay as they were.
            held = dict(proj._parameters)
            proj._parameters["weight"] = eye
            if proj.bias is not None:
                proj._parameters["bias"] = torch.zeros_like(proj.bias)
            was, self._recomputing = module.training, True
            module.training = False  # no attention dropout, no random numbers drawn
            try:
                with torch.no_grad():
                    context = module(*args, **kw)
            finally:
                proj._parameters.update(held)
                module.training, self._recomputing = was, False
            with torch.no_grad():
                self._add(f"{out_name}:in", context[0] if isinstance(context, tuple) else context)

        return hook

    def teardown(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ calibration
    def _seen(self, param: str) -> bool:
        mod_name, kind = self._plan[param]
        if kind == "attention":
            role = MHA_PROJECTIONS.get(param.rsplit(".", 1)[-1], "q")
            return all(self.tokens.get(f"{mod_name}:{r}", 0) > 0 for r in role)
        return self.tokens.get(f"{mod_name}:in", 0) > 0

    def _run_batches(self, count: int) -> int:
        from lightning_compress.batches import run_training_batches

        self._calibrating = True
        try:
            seen = run_training_batches(self.ctx.model, count)  # type: ignore[arg-type]
        finally:
            self._calibrating = False
        if seen is None:
            raise ValueError(
                "criterion 'wanda' needs the layers' inputs, and this mask update comes before any training step, "
                "but training batches cannot be run here (no Trainer, no training data or manual optimisation); "
                "start pruning after some training steps (start_epoch > 0 or update_every_n_steps)"
            )
        return seen

    # ------------------------------------------------------------------ scores
    def _norm(self, key: str, size: int, device: torch.device) -> Tensor:
        sq = self.sq.get(key)
        if sq is None or sq.numel() != size:
            return torch.ones(size, device=device)  # never reached: |w| alone
        return sq.to(device).sqrt()

    def _summed(self) -> dict[str, Tensor]:
        """The squared inputs seen by every process (they share the rows of sharded weights, not the batches)."""
        shards = getattr(getattr(self, "ctx", None), "shards", None)
        if shards is None:
            return self.sq
        return {k: shards.sum(self.sq[k]) for k in sorted(self.sq)}  # the same keys, in the same order, everywhere

    def element_scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not any(self._seen(n) for n in params if n in self._plan):
            self._run_batches(self.calibration_batches)
        sq, self.sq = self.sq, self._summed()
        try:
            return {n: self._scores(n, p) for n, p in params.items()}
        finally:
            self.sq = sq

    def _scores(self, n: str, p: Tensor) -> Tensor:
        if n not in self._plan:
            raise ValueError(f"criterion 'wanda' was not set up for {n!r}")
        mod_name, kind = self._plan[n]
        w = p.detach().abs().float()
        first, held, rows = row_range(self.ctx.params[n])  # the rows of ``p`` in the whole weight
        mine = slice(first, first + held)
        if kind == "conv1d":  # (in, out)
            return w * self._norm(f"{mod_name}:in", rows, w.device)[mine].unsqueeze(1)
        if kind == "conv":  # (out, in / groups, *kernel): input channel c of group g feeds its outputs
            groups = self.ctx.modules[mod_name].groups
            norm = self._norm(f"{mod_name}:in", w.shape[1] * groups, w.device).view(groups, w.shape[1])
            norm = norm.repeat_interleave(rows // groups, dim=0)[mine]
            return w * norm.view(*norm.shape, *([1] * (w.dim() - 2)))
        if kind == "attention":
            roles = MHA_PROJECTIONS[n.rsplit(".", 1)[-1]]
            norms = torch.stack([self._norm(f"{mod_name}:{r}", w.shape[1], w.device) for r in roles])
            return w * norms.repeat_interleave(rows // len(roles), dim=0)[mine]
        return w * self._norm(f"{mod_name}:in", w.shape[-1], w.device)  # linear, out_proj: (out, in)

    def reset(self) -> None:
        self.sq, self.tokens, self.calls = {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        sq = {k: v.detach().cpu().clone() for k, v in self._summed().items()}  # every process's inputs
        return {"sq": sq, "tokens": dict(self.tokens), "calls": dict(self.calls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sq = {k: v.clone() for k, v in state.get("sq", {}).items()}
        shards = getattr(getattr(self, "ctx", None), "shards", None)
        if shards is not None and shards.rank != 0:  # rank 0 holds the sums of all; the next sum counts them once
            self.sq = {k: torch.zeros_like(v) for k, v in self.sq.items()}
        self.tokens = {k: int(v) for k, v in state.get("tokens", {}).items()}
        self.calls = {k: int(v) for k, v in state.get("calls", {}).items()}


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
                buf = self.samples.get(m)
                if not buf:
                    raise RuntimeError(
                        f"entropy criterion has seen no training activation of {m!r} yet; start pruning after at "
                        "least one training step (start_epoch > 0 or update_every_n_steps)"
                    )
                per.append(entropy_of_samples(torch.cat(list(buf)), self.bins))
            out.append(torch.stack(per).mean(0))
        return out

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
