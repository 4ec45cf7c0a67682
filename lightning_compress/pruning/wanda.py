r"""Wanda (Sun et al. 2023): :math:`S_{ij} = |W_{ij}| \cdot \lVert X_j \rVert_2`, where :math:`X_j` is input
feature :math:`j` of the layer over the calibration tokens; scores are compared within each output row
:math:`i` (unstructured: every row loses the same share) or within each group of M inputs (N:M)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning.criterion_base import Criterion, PruningContext, _module_of
from lightning_compress.pruning.shards import row_range
from lightning_compress.pruning.weights import MHA_PROJECTIONS, matmul_kind
from lightning_compress.token_mask import zero_padding

__all__ = ["Wanda"]


def _sq_features(x: Tensor, dim: int) -> tuple[Tensor, int]:
    """Sum over every other dimension of ``x**2`` per index of ``dim`` (float32; zeros for a batch holding an
    infinite or NaN value), and the token count."""
    x = x.detach()
    dim %= x.dim()
    others = [d for d in range(x.dim()) if d != dim]
    sq = x.float().square()  # float32: a float16 square overflows above 256 (outlier features do)
    sq = sq.sum(others) if others else sq  # 16x faster than linalg.vector_norm over several dims on the CPU
    # a batch with an infinite or NaN input (a float16 overflow) adds nothing: once in a sum, it would make the
    # layer's scores NaN; checked on the device, no sync
    sq = torch.where(sq.isfinite().all(), sq, 0.0)
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
    without going through the module) the attention output, recomputed without gradient. Padded positions
    of a batch with an integer ``attention_mask`` add nothing (:mod:`lightning_compress.token_mask`).

    Where the inputs come from: the first ``calibration_batches`` training steps after the last mask
    update (or the start) are recorded as they run: no extra forward pass, the statistics are those
    of the model with its current masks, and the steps after them pay nothing. Only forwards with
    gradients in training mode count (not validation, nor another plugin's batches, nor the rerun of a
    checkpointed block inside backward). When an update
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
    reads_inputs = True

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
        holders: dict[int, list[tuple[str, str]]] = {}  # a parameter -> every (module, attribute) holding it (tied weights)
        for m, mod in ctx.modules.items():
            for leaf, q in mod._parameters.items():
                if q is not None:
                    holders.setdefault(id(q), []).append((m, leaf))
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
            readers = [m for m, leaf in holders.get(id(ctx.params[n]), []) if matmul_kind(ctx.modules[m], leaf) is not None]
            if len(readers) > 1:  # scored with the first layer's inputs only: the other's input columns were cut blind
                raise ValueError(
                    f"criterion 'wanda' weighs each weight by the norm of its layer's input, and {n!r} is one weight shared "
                    f"by the layers {readers}, which read different inputs; untie them, exclude it, or use "
                    "criterion='magnitude'"
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
        # a forward inside backward is activation checkpointing's rerun of one already recorded
        if self._recomputing or torch._C._current_graph_task_id() != -1:
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
            if dim == -1:  # a padded position of a (batch, seq_len, features) input adds nothing
                x = zero_padding(x)
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
    def _input_keys(self, param: str) -> list[str]:
        """The input sums the scores of ``param`` read: its layer's input, or the attention's query/key/value."""
        mod_name, kind = self._plan[param]
        roles = MHA_PROJECTIONS.get(param.rsplit(".", 1)[-1], "q") if kind == "attention" else ("in",)
        return [f"{mod_name}:{r}" for r in roles]

    def _seen(self, param: str) -> bool:
        return all(self.tokens.get(key, 0) > 0 for key in self._input_keys(param))

    def _run_batches(self, count: int) -> int:
        from lightning_compress.batches import module_setup_hint, run_training_batches

        self._calibrating = True
        try:
            seen = run_training_batches(self.ctx.model, count)  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - the user's data or step failed outside training: say who ran it
            raise ValueError(
                f"criterion 'wanda' runs training batches through the model to read the layers' inputs, and one failed "
                f"({type(err).__name__}: {err}){module_setup_hint(self.ctx.model, err)}"  # type: ignore[arg-type]
            ) from err
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
        """The squared inputs seen by every process: those sharing the rows of sharded weights (FSDP2) or running
        other batches through whole ones (DDP). A sum a process has not seen (a layer its batches did not reach)
        counts as zeros there. Two reductions: the sizes, then the sums in one tensor."""
        group = self.data_processes()
        if group is None:
            return self.sq
        keys = sorted({key for param in self._plan for key in self._input_keys(param)})  # one order everywhere
        sizes = group.max(torch.tensor([self.sq[k].numel() if k in self.sq else 0 for k in keys], dtype=torch.int64)).tolist()
        mine = [self.sq[k].float().to(group.device) if k in self.sq and self.sq[k].numel() == n
                else torch.zeros(n, device=group.device) for k, n in zip(keys, sizes)]  # fmt: skip
        summed = group.sum(torch.cat(mine)) if mine else torch.zeros(0)
        return {k: part for k, part, n in zip(keys, summed.split(sizes), sizes) if n > 0}

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
        group = self.data_processes()
        if group is not None and group.rank != 0:  # rank 0 holds the sums of all; the next sum counts them once
            self.sq = {k: torch.zeros_like(v) for k, v in self.sq.items()}
        self.tokens = {k: int(v) for k, v in state.get("tokens", {}).items()}
        self.calls = {k: int(v) for k, v in state.get("calls", {}).items()}
