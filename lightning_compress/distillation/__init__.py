"""Knowledge distillation: losses (pure functions and modules) and the ``DistillationModule``."""

from lightning_compress.distillation.losses import (
    DISTILL_LOSSES,
    AttentionTransferLoss,
    CosineDistillLoss,
    HintLoss,
    KLDivDistillLoss,
    MSEDistillLoss,
    attention_map,
    attention_transfer_loss,
    cosine_distill,
    hint_loss,
    kl_div_distill,
    mse_distill,
    resolve_distill_loss,
)
from lightning_compress.distillation.module import DistillationModule, split_batch
from lightning_compress.distillation.teacher import IndexedDataset, TeacherCache, load_teacher_weights

__all__ = [
    "DISTILL_LOSSES",
    "AttentionTransferLoss",
    "CosineDistillLoss",
    "DistillationModule",
    "HintLoss",
    "IndexedDataset",
    "KLDivDistillLoss",
    "MSEDistillLoss",
    "TeacherCache",
    "attention_map",
    "attention_transfer_loss",
    "cosine_distill",
    "hint_loss",
    "kl_div_distill",
    "load_teacher_weights",
    "mse_distill",
    "resolve_distill_loss",
    "split_batch",
]
