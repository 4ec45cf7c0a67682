"""Feature matching (FitNets hints, attention transfer): forward hooks, learned projections, the loss.

:class:`FeatureCapture` records the outputs of named student and teacher modules while it is
active; :func:`build_projections` sizes one :class:`FeatureProjection` per pair whose shapes differ,
from one forward of both networks; :func:`feature_matching_loss` sums the per-pair losses (padded
positions of ``(N, T, D)`` features left out). The
``DistillationModule`` keeps the projections in ``self.projections`` (trained and checkpointed);
:func:`rebuild_projections` recreates them from a checkpoint before it is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_compress.batches import ForwardCall
from lightning_compress.distillation.losses import attention_transfer_loss, hint_loss
from lightning_compress.distillation.teacher import closest_names

__all__ = [
    "FeatureCapture",
    "FeatureProjection",
    "build_projections",
    "feature_matching_loss",
    "projection_key",
]


class FeatureProjection(nn.Module):
    """Learned map from a student feature to the teacher feature's shape (FitNets regressor).

    ``conv``: 1×1 convolution on ``(N, C, H, W)`` maps, then adaptive average pooling to the
    teacher's spatial size if it differs. ``token``: a linear map of the last dimension, the same at
    every position, for ``(N, T, D)`` features (hidden states of a sequence model) that differ in ``D``
    only; it does not depend on ``T``, so batches of any length work. ``linear``: both features
    flattened to ``(N, D)`` (any other pair of shapes; the per-sample size must stay the same).

    Example:
        >>> FeatureProjection("conv", 8, 16, (4, 4))(torch.zeros(2, 8, 7, 7)).shape
        torch.Size([2, 16, 4, 4])
        >>> FeatureProjection("token", 16, 32)(torch.zeros(2, 9, 16)).shape
        torch.Size([2, 9, 32])
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, out_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kind = kind
        if kind not in ("conv", "token", "linear"):
            raise ValueError(f"kind must be 'conv', 'token' or 'linear', got {kind!r}")
        if kind == "conv":
            self.proj: nn.Module = nn.Conv2d(in_dim, out_dim, 1, bias=False)
            self.register_buffer("out_size", torch.tensor(out_hw or (0, 0), dtype=torch.long))
        else:
            self.proj = nn.Linear(in_dim, out_dim)
        if kind == "token":  # stored, so that a checkpoint's projection is rebuilt as the same kind
            self.register_buffer("per_position", torch.ones((), dtype=torch.bool))

    def forward(self, feature: Tensor) -> Tensor:
        if self.kind == "conv":
            out = self.proj(feature)
            h, w = (int(v) for v in self.out_size)
            if h > 0 and tuple(out.shape[-2:]) != (h, w):
                out = F.adaptive_avg_pool2d(out, (h, w))
            return out
        if self.kind == "token":
            return self.proj(feature)
        size = feature[0].numel() if feature.dim() else 0
        expected = int(self.proj.in_features)  # type: ignore[union-attr]
        if size != expected:
            raise ValueError(
                f"features: this projection was sized for student features of {expected} values per "
                f"sample, got shape {tuple(feature.shape)} ({size} per sample). A flattening projection needs the same "
                "feature shape in every batch; only (N, T, D) features that differ from the teacher's in D alone get a "
                "per-position projection that takes any T"
            )
        return self.proj(feature.flatten(1))


def projection_key(student_name: str) -> str:
    """The key of a student module's projection in a ``ModuleDict`` (no dots allowed there)."""
    return student_name.replace(".", "__") or "_root"


class FeatureCapture:
    """Forward hooks on the named modules of ``{student_name: teacher_name}`` pairs.

    While :meth:`active` is entered, each hooked module's output is kept in ``student`` or
    ``teacher`` (by module name). Hooks exist only between :meth:`attach` and :meth:`detach` (the
    module attaches them for training), so a module outside training pickles without closures.
    """

    def __init__(self, features: Mapping[str, str]) -> None:
        self.features = dict(features)
        self.capturing = False
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self.handles: list[Any] = []

    def check_names(self, student: nn.Module, teacher: nn.Module) -> None:
        """A ``ValueError`` listing the closest names when a module named in ``features`` does not exist."""
        s_names = [n for n, _ in student.named_modules()]
        t_names = [n for n, _ in teacher.named_modules()]
        for s, t in self.features.items():
            for side, name, names in (("student", s, s_names), ("teacher", t, t_names)):
                if name not in names:
                    raise ValueError(
                        f"features: the {side} has no module named {name!r}; closest names: "
                        f"{closest_names(name, [n for n in names if n])}"
                    )

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        if self.handles or not self.features:
            return
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for s, t in self.features.items():
            self.handles.append(s_mods[s].register_forward_hook(self._hook(self.student, s)))
            self.handles.append(t_mods[t].register_forward_hook(self._hook(self.teacher, t)))

    def _hook(self, store: dict[str, Tensor], key: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.capturing:
                store[key] = feature_tensor(output)

        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()

    @contextlib.contextmanager
    def active(self, on: bool = True) -> Iterator[None]:
        """Record outputs inside the block (when ``on``)."""
        self.capturing = on
        try:
            yield
        finally:
            self.capturing = False


def feature_tensor(output: Any) -> Any:
    """The feature a module's output holds: the output itself, the first element of a tuple or list, or the first
    tensor of a mapping (a Hugging Face ``ModelOutput``: its ``last_hidden_state``)."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    if isinstance(output, Mapping):
        return next((v for v in output.values() if isinstance(v, Tensor)), output)
    return output


@torch.no_grad()
def build_projections(
    capture: FeatureCapture,
    student: nn.Module,
    teacher: nn.Module,
    student_call: ForwardCall,
    teacher_call: ForwardCall,
    kind: str = "hint",
) -> dict[str, FeatureProjection]:
    """One projection per feature pair whose shapes differ, sized from one forward of both networks
    (each called as ``student_call``/``teacher_call`` says: :mod:`~lightning_compress.distillation.calls`),
    on the device and in the dtype of the student's feature it reads. With ``kind="attention"`` (attention
    transfer compares spatial maps, through no projection): none, after checking every pair is ``(N, C, H, W)``.

    The student runs in eval mode (its mode is restored after); the hooks are removed again.
    """
    capture.attach(student, teacher)
    was_training = student.training
    student.eval()
    try:
        with capture.active(), torch.no_grad():
            student_call(student)
            teacher_call(teacher)
        return _projections_for(capture, kind)
    finally:
        student.train(was_training)
        capture.clear()
        capture.detach()  # re-attached for training; closures must not outlive it (pickling)


def _projections_for(capture: FeatureCapture, kind: str) -> dict[str, FeatureProjection]:
    """The projections the captured feature pairs need (see :func:`build_projections`)."""
    out: dict[str, FeatureProjection] = {}
    for s, t in capture.features.items():
        fs, ft = capture.student.get(s), capture.teacher.get(t)
        if not isinstance(fs, Tensor) or not isinstance(ft, Tensor):
            got = type(fs if not isinstance(fs, Tensor) else ft).__name__
            raise ValueError(f"feature pair {s!r} -> {t!r}: the module's output is a {got}, not a tensor; name the "
                             "sub-module whose output is the feature (e.g. a layer inside it)")
        if kind == "attention":
            if fs.dim() != 4 or ft.dim() != 4:
                raise ValueError(
                    f"feature_loss='attention' compares (N, C, H, W) maps, but the pair {s!r} -> {t!r} gives student "
                    f"{tuple(fs.shape)} and teacher {tuple(ft.shape)} features; use feature_loss='mse' for them"
                )
            continue
        if fs.shape[1:] == ft.shape[1:]:
            continue
        if fs.dim() == 4 and ft.dim() == 4:
            proj = FeatureProjection("conv", fs.shape[1], ft.shape[1], (int(ft.shape[-2]), int(ft.shape[-1])))
        elif fs.dim() > 2 and fs.shape[:-1] == ft.shape[:-1]:  # (N, T, D): the hidden size differs, per position
            proj = FeatureProjection("token", fs.shape[-1], ft.shape[-1])
        else:
            proj = FeatureProjection("linear", fs[0].numel(), ft[0].numel())
        out[projection_key(s)] = proj.to(device=fs.device, dtype=fs.dtype if fs.is_floating_point() else None)
    return out


def feature_matching_loss(
    capture: FeatureCapture,
    projections: nn.ModuleDict,
    kind: str,
    attention_mask: Tensor | Mapping[str, Tensor | None] | None = None,
) -> Tensor:
    """Sum over the feature pairs of the hint loss (through the projection, if any) or attention transfer.

    With ``attention_mask`` (``(N, T)``, 0 = padding), the hint loss of a pair of ``(N, T, D)`` features
    whose first two dimensions are the mask's counts the non-padded positions only (mean over them and
    over ``D``); other features, and attention transfer, are not masked. A mapping gives each student
    feature (by module name) its own mask (an encoder-decoder's source and target masks). No counted
    position gives 0, still connected to the graph.
    """
    total: Tensor | None = None
    for s, t in capture.features.items():
        if s not in capture.student or t not in capture.teacher:
            raise RuntimeError(f"features: module {s!r} or {t!r} did not run in this forward pass")
        fs, ft = capture.student[s], capture.teacher[t].detach()
        if kind == "attention":
            term = attention_transfer_loss(fs, ft)
        else:
            proj = projections[projection_key(s)] if projection_key(s) in projections else None
            # padded positions are picked out before any arithmetic: their values change neither loss nor gradients
            mask = attention_mask.get(s) if isinstance(attention_mask, Mapping) else attention_mask
            keep = _positions(mask, ft) if proj is None or proj.kind == "token" else None
            if keep is not None and fs.shape[:2] == ft.shape[:2]:
                fs, ft = fs[keep.to(fs.device)], ft[keep]
            if proj is not None:
                fs = proj(fs)
            term = hint_loss(fs.reshape(ft.shape), ft) if ft.numel() > 0 else fs.sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def _positions(attention_mask: Tensor | None, feature: Tensor) -> Tensor | None:
    """The boolean ``(N, T)`` mask of the positions of a ``(N, T, D)`` feature that count, or ``None`` (no
    mask, or a feature of another shape: ``(N, D)``, ``(N, C, H, W)``, another ``(N, T)``)."""
    if attention_mask is None or feature.dim() != 3 or tuple(attention_mask.shape) != tuple(feature.shape[:2]):
        return None
    return attention_mask.to(device=feature.device) != 0


def rebuild_projections(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load-state pre hook: create projections stored in ``state_dict`` that were not built yet (sized in setup),
    on the device and in the floating dtype of ``module.student``'s weights (the features they will read)."""
    projections: nn.ModuleDict = module.projections  # type: ignore[assignment]
    student = getattr(module, "student", None)
    weights = student.parameters() if isinstance(student, nn.Module) else iter(())
    weight = next((p for p in weights if p.is_floating_point()), None)
    place: dict[str, Any] = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
    head = prefix + "projections."
    for key, value in state_dict.items():
        if not (key.startswith(head) and key.endswith(".proj.weight")):
            continue
        name = key[len(head) : -len(".proj.weight")]
        if name in projections:
            continue
        if value.dim() == 4:
            size = state_dict.get(f"{head}{name}.out_size")
            out_hw = (int(size[0]), int(size[1])) if size is not None else None
            projection = FeatureProjection("conv", int(value.shape[1]), int(value.shape[0]), out_hw)
        else:
            kind = "token" if f"{head}{name}.per_position" in state_dict else "linear"
            projection = FeatureProjection(kind, int(value.shape[1]), int(value.shape[0]))
        projections[name] = projection.to(**place)
    if getattr(module, "features", None) and len(projections):
        module._projections_ready = True  # type: ignore[assignment]


def hints_reshaped_by_removal(
    student: nn.Module, hints: list[str], student_call: ForwardCall, kinds: tuple[str, ...], names: list[str] | None = None
) -> list[str]:
    """The hinted student modules whose output shape changes when heads or neurons (``kinds``) are removed, measured:
    a copy of ``student`` loses one unit of every group the pruning selects (``names``: its weights, relative to the
    student), and both run ``student_call``. A block's output keeps its width (a projection sized for it still fits);
    a q/k/v or up projection, or an activation between the feed-forward layers, does not. Empty when the student has
    no such unit (the pruning callback says so in its own setup)."""
    import warnings

    from lightning_compress.module_copy import copy_model
    from lightning_compress.pruning.units import find_units, remove_units

    try:
        with warnings.catch_warnings():  # the units left whole were said by the callback's own search
            warnings.simplefilter("ignore")
            groups = find_units(student, kinds, names)
    except ValueError:
        return []
    smaller = copy_model(student)  # (a hook-based weight_norm's weight is no leaf: copy_model copies it)
    for module in smaller.modules():  # the copy runs alone: hooks others put on the student (a criterion's) stay quiet
        module._forward_hooks.clear()
        for key, hook in list(module._forward_pre_hooks.items()):
            if not isinstance(hook, (WeightNorm, SpectralNorm)):  # those compute the weight
                del module._forward_pre_hooks[key]
    keep = [torch.arange(g.size) < max(1, g.size - 1) for g in groups]
    remove_units(smaller, groups, keep)
    before, after = _output_shapes(student, hints, student_call), _output_shapes(smaller, hints, student_call)
    return [h for h in hints if before.get(h) != after.get(h)]


def _output_shapes(network: nn.Module, names: list[str], call: ForwardCall) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of the tensors each named module of ``network`` returns in one eval-mode run of ``call``."""
    modules, shapes = dict(network.named_modules()), {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:  # returns nothing: the output stays as it is
            shapes.setdefault(name, [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)])

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names if n in modules]
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            call(network)
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes
