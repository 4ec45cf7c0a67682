"""What a ``DistillationModule`` tells the compression report, and how its student is exported.

The :class:`~lightning_compress.CompressionReport` reads the methods of
:class:`~lightning_compress.plugin.CompressionCallback` from a LightningModule that defines them;
here the teacher is the baseline and the student the compressed artifact.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.distillation.cache import TeacherCache
from lightning_compress.measure import safetensors_tensors, storage_region
from lightning_compress.schedules import Schedule, schedule_state

__all__ = ["DistillationReportMixin"]


class DistillationReportMixin:
    """The report contract and the student export, mixed into :class:`~lightning_compress.DistillationModule`."""

    student: nn.Module
    teacher: nn.Module
    projections: nn.ModuleDict
    features: dict[str, str]
    feature_loss_name: str
    feature_weight: float
    distill_loss_name: str
    teacher_ckpt: str | None
    teacher_prefix: str | None
    temperature_schedule: Schedule
    alpha_schedule: Schedule
    teacher_cache: TeacherCache
    cache_teacher_outputs: bool
    teacher_val_accuracy: float | None
    teacher_test_accuracy: float | None
    teacher_val_perplexity: float | None
    teacher_test_perplexity: float | None
    last_agreement: float | None
    task_loss_name: str

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's weights, detached CPU copies, loadable into the student's class with strict loading. Tied
        weights (an embedding and its LM head) stay one tensor under both names."""
        copies: dict[tuple[Any, ...], Tensor] = {}
        out = {}
        for k, v in self.student.state_dict().items():
            same = storage_region(v)
            out[k] = copies.get(same) if v.numel() and same in copies else v.detach().cpu().clone()
            copies.setdefault(same, out[k])
        return out

    def export_student(self, path: str | os.PathLike[str]) -> Path:
        """Write the student's ``state_dict`` (``.safetensors`` by suffix, else ``torch.save``); return the path.
        ``torch.save`` stores tied weights once; a ``.safetensors`` file holds each name's own copy (the format
        has no shared tensors, and ``safetensors.torch.load_file`` then gives every key for a strict load).
        A student whose channels, heads or neurons were removed no longer has the shapes its class builds: a
        warning names them, and ``lightning_compress.load_pruned(StudentClass(...), path)`` loads the file (it
        resizes the layers first).

        Example:
            >>> import tempfile
            >>> from lightning_compress import DistillationModule
            >>> from lightning_compress.models import MLP
            >>> m = DistillationModule(MLP(64, (8,), 10), MLP(64, (16,), 10))
            >>> with tempfile.TemporaryDirectory() as d:
            ...     p = m.export_student(f"{d}/student.pt")
            ...     MLP(64, (8,), 10).load_state_dict(torch.load(p))
            <All keys matched successfully>
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.student_state_dict()
        built = getattr(self, "_student_shapes", {})
        resized = [f"{k} {tuple(v.shape)} (built {built[k]})" for k, v in state.items() if k in built and tuple(v.shape) != built[k]]
        if resized:
            name = type(self.student).__name__
            warnings.warn(
                f"export_student: the student's layers no longer have the shapes {name} was built with ({', '.join(resized[:3])}"
                f"{', ...' if len(resized) > 3 else ''}: channels, heads or neurons were removed), so {name}(...).load_state_dict "
                f"refuses this file; load it with lightning_compress.load_pruned({name}(...), path), which resizes the layers",
                UserWarning,
                stacklevel=2,
            )
        if path.suffix == ".safetensors":
            from lightning_compress._files import save_safetensors

            save_safetensors(safetensors_tensors(state, tied="copy")[0], path)
        else:
            torch.save(state, path)
        return path

    def compression_baseline(self) -> nn.Module:
        """The teacher: the model the report compares against."""
        return self.teacher

    def compressed_artifact(self) -> nn.Module:
        """The student: the model the report measures as compressed."""
        return self.student

    def compression_state(self) -> dict[str, float]:
        """Temperature and alpha at the current epoch (for the report's per-epoch plot)."""
        trainer = getattr(self, "_trainer", None)
        epoch = float(trainer.current_epoch) if trainer is not None else 0.0
        return {"temperature": float(self.temperature_schedule(epoch)), "alpha": float(self.alpha_schedule(epoch))}

    def compression_summary(self) -> dict[str, Any]:
        """Parameters of teacher and student, teacher accuracy, agreement, the loss settings and the cache's counts."""
        t_params = sum(p.numel() for p in self.teacher.parameters())
        s_params = sum(p.numel() for p in self.student.parameters())
        p_params = sum(p.numel() for p in self.projections.parameters())
        cache = self.teacher_cache
        return {
            "teacher": type(self.teacher).__name__,
            "student": type(self.student).__name__,
            "teacher_params": t_params,
            "student_params": s_params,
            "projection_params": p_params,
            "param_ratio": t_params / s_params if s_params else None,
            "teacher_val_acc": self.teacher_val_accuracy,
            "teacher_test_acc": self.teacher_test_accuracy,
            "teacher_val_ppl": self.teacher_val_perplexity,
            "teacher_test_ppl": self.teacher_test_perplexity,
            "val_agreement": self.last_agreement,
            "distill_loss": self.distill_loss_name,
            "task_loss": self.task_loss_name,
            "temperature": schedule_state(self.temperature_schedule),
            "alpha": schedule_state(self.alpha_schedule),
            "features": dict(self.features),
            "feature_loss": self.feature_loss_name if self.features else None,
            "feature_weight": self.feature_weight if self.features else None,
            "teacher_ckpt": self.teacher_ckpt,
            "teacher_ckpt_prefix": self.teacher_prefix,
            "teacher_cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses, "on": cache.enabled}
            if self.cache_teacher_outputs
            else None,
        }

    def compression_baseline_metrics(self) -> dict[str, float]:
        """The teacher's measured accuracy or perplexity, as the baseline's metrics (``val_acc``, ``test_acc``,
        ``val_ppl``, ``test_ppl`` once known). The teacher is measured on the first loader of a stage: with several,
        under that loader's name, as Lightning names the student's (``val_acc/dataloader_idx_0``)."""
        trainer = getattr(self, "_trainer", None)

        def named(key: str) -> str:
            loaders = getattr(trainer, f"num_{key.split('_')[0]}_batches", None) if trainer is not None else None
            return f"{key}/dataloader_idx_0" if isinstance(loaders, list) and len(loaders) > 1 else key

        found = {
            "val_acc": self.teacher_val_accuracy,
            "test_acc": self.teacher_test_accuracy,
            "val_ppl": self.teacher_val_perplexity,
            "test_ppl": self.teacher_test_perplexity,
        }
        return {named(k): v for k, v in found.items() if v is not None}

    def is_active(self) -> bool:
        """Distillation changes training from the first step."""
        return True
