"""What a ``DistillationModule`` measures in validation and test: the student's accuracy, its agreement
with the teacher (same argmax), and the teacher's own accuracy (once in validation, every test)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.distillation.batch import split_batch

__all__ = ["DistillationEvalMixin"]

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

    _Base = LightningModule
else:
    _Base = object


class DistillationEvalMixin(_Base):
    """Validation and test steps of :class:`~lightning_compress.DistillationModule`.

    Logs ``{stage}_acc``, ``{stage}_loss`` (student, labeled batches), ``{stage}_agreement`` and
    ``teacher_{stage}_acc``. The teacher's validation accuracy is measured at the first validation
    after the sanity check only (it does not change).
    """

    def _init_eval_metrics(self, num_classes: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.test_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_val_accuracy: float | None = None
        self.teacher_test_accuracy: float | None = None
        self.last_agreement: float | None = None

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y, _ = split_batch(batch, self.input_key, self.target_key)  # type: ignore[attr-defined]
        self._remember_input(x)  # type: ignore[attr-defined]
        student_logits = self.student(x)  # type: ignore[attr-defined]
        teacher_logits = self.teacher_forward(x)  # type: ignore[attr-defined]
        self._check_logits(student_logits, teacher_logits)  # type: ignore[attr-defined]
        if student_logits.dim() != 2:
            return
        agreement = self.val_agreement if stage == "val" else self.test_agreement
        agreement(student_logits, teacher_logits.argmax(-1))
        self.log(f"{stage}_agreement", agreement, batch_size=x.shape[0])
        if y is None:
            return
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(student_logits, y)
        self.log(f"{stage}_loss", F.cross_entropy(student_logits, y), prog_bar=stage == "val", sync_dist=True, batch_size=x.shape[0])
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val", batch_size=x.shape[0])
        if stage == "test" or (self.teacher_val_accuracy is None and not self.trainer.sanity_checking):
            (self.teacher_val_acc if stage == "val" else self.teacher_test_acc).update(teacher_logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The student's predicted classes."""
        x, _, _ = split_batch(batch, self.input_key, self.target_key)  # type: ignore[attr-defined]
        return self.student(x).argmax(-1)  # type: ignore[attr-defined]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        value = self.trainer.callback_metrics.get("val_agreement")
        if value is not None:
            self.last_agreement = float(value)
        if self.teacher_val_accuracy is None and self.teacher_val_acc.update_count > 0:
            self.teacher_val_accuracy = float(self.teacher_val_acc.compute())
            self.teacher_val_acc.reset()
            self.log("teacher_val_acc", self.teacher_val_accuracy, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        if self.teacher_test_acc.update_count > 0:
            self.teacher_test_accuracy = float(self.teacher_test_acc.compute())
            self.teacher_test_acc.reset()
            self.log("teacher_test_acc", self.teacher_test_accuracy, sync_dist=True)
