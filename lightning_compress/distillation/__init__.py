"""Knowledge distillation: losses (pure functions and modules) and the ``DistillationModule``.

Where things are: ``module.py`` the LightningModule (options, training step); ``losses.py`` the
logit and feature losses; ``teacher.py`` loading teacher weights; ``cache.py`` the teacher-output
cache (content keys); ``features.py`` feature hooks and projections; ``evaluation.py`` validation and
test metrics; ``report_contract.py`` what the compression report reads and the student export;
``watchdog.py`` the loss blow-up guard and the epoch-mean logging; ``batch.py`` reading inputs, labels
and the attention mask from a batch; ``tokens.py`` logits ``(..., V)``: which positions count, the
training loss over them, the checks made in ``setup``.
"""

from lightning_compress.distillation.losses import (
    DISTILL_LOSSES,
    AttentionTransferLoss,
    CosineDistillLoss,
    HintLoss,
    KLDivDistillLoss,
    MSEDistillLoss,
    TokenCrossEntropy,
    attention_map,
    attention_transfer_loss,
    cosine_distill,
    hint_loss,
    kl_div_distill,
    mse_distill,
    resolve_distill_loss,
    resolve_task_loss,
    token_cross_entropy,
)
from lightning_compress.distillation.batch import split_batch
from lightning_compress.distillation.cache import IndexedDataset, TeacherCache
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.distillation.teacher import load_teacher_weights

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
    "TokenCrossEntropy",
    "attention_map",
    "attention_transfer_loss",
    "cosine_distill",
    "hint_loss",
    "kl_div_distill",
    "load_teacher_weights",
    "mse_distill",
    "resolve_distill_loss",
    "resolve_task_loss",
    "split_batch",
    "token_cross_entropy",
]
