r"""What a ``DistillationModule`` measures in validation and test, by the shape of the logits.

``(N, C)`` logits (a classifier): the student's accuracy and loss and the teacher's accuracy over the
labeled samples (label not ``ignore_index``), and the student's agreement with the teacher (same
argmax) over all samples. ``(..., V)`` logits with more than two dimensions (a language model;
channel-first logits once ``class_dim=1`` moved their classes last): over the counted positions
(label not ``ignore_index``, attention mask not 0) the student's perplexity
:math:`\exp(\frac{1}{M}\sum_i -\log \mathrm{softmax}(z^s_i)_{y_i})` pooled over the whole epoch, its
token accuracy, its token agreement with the teacher, and the teacher's perplexity. The teacher's
validation value is measured at the first validation after the sanity check only (it does not
change). A metric that cannot be computed is named once in a warning, with the reason.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_compress.distillation.batch import flat_batch, split_batch
from lightning_compress.distillation.tokens import position_mask, warn_once
from lightning_compress.loader_metrics import loader_metric
from lightning_compress.lm import Perplexity

__all__ = ["DistillationEvalMixin", "MatchRate"]

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

    _Base = LightningModule
else:
    _Base = object


class MatchRate(Metric):
    """Share of equal entries of two id tensors (token accuracy, token agreement).

    Example:
        >>> rate = MatchRate()
        >>> rate.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0]))
        >>> float(rate.compute())
        0.5
        >>> float(MatchRate().compute())  # nothing counted
        0.0
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("equal", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.equal = self.equal + (preds == target).sum()
        self.total = self.total + target.numel()

    def compute(self) -> Tensor:
        return self.equal.float() / self.total.clamp(min=1)  # 0.0 over no entries (not NaN), as torchmetrics' accuracy


def _mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the samples; 0 for none (logged with weight 0, where the mean is NaN)."""
    return F.cross_entropy(logits, labels) if labels.numel() else logits.new_zeros(())


class DistillationEvalMixin(_Base):
    """Validation and test steps of :class:`~lightning_compress.DistillationModule`.

    Logs ``{stage}_acc``, ``{stage}_loss`` (student, labeled samples), ``{stage}_agreement`` and
    ``teacher_{stage}_acc`` for ``(N, C)`` logits; ``{stage}_ppl``, ``{stage}_acc``, ``{stage}_loss``
    (token-level), ``{stage}_agreement`` and ``teacher_{stage}_ppl`` for logits ``(..., V)`` beyond two
    dimensions.
    """

    def _init_eval_metrics(self) -> None:
        # the arg-max class against the label (or the teacher's): no class count is needed, so none is guessed
        self.val_acc, self.test_acc = MatchRate(), MatchRate()
        self.val_agreement, self.test_agreement = MatchRate(), MatchRate()
        self.teacher_val_acc, self.teacher_test_acc = MatchRate(), MatchRate()
        # the counted positions only are passed, as (M, V) logits and (M,) labels: no ignore_index left
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self.teacher_val_ppl, self.teacher_test_ppl = Perplexity(), Perplexity()
        self.val_token_acc, self.test_token_acc = MatchRate(), MatchRate()
        self.val_token_agreement, self.test_token_agreement = MatchRate(), MatchRate()
        self.teacher_val_accuracy: float | None = None
        self.teacher_test_accuracy: float | None = None
        self.teacher_val_perplexity: float | None = None
        self.teacher_test_perplexity: float | None = None
        self.last_agreement: float | None = None
        self._metric_warnings: set[str] = set()

    def _eval_step(self, batch: Any, stage: str, loader: int = 0) -> None:
        """One evaluation batch of dataloader ``loader``: each loader has its own student metrics; the teacher's
        (computed once) are of the first loader."""
        batch = flat_batch(batch, self.input_key, self.student)  # type: ignore[attr-defined]
        x, y, _ = split_batch(batch, self.input_key, self.target_key)  # type: ignore[attr-defined]
        student_call, teacher_call = self.network_calls(batch, x)  # type: ignore[attr-defined]
        self._remember_input(student_call)  # type: ignore[attr-defined]
        student_logits = student_call(self)  # forward: the student's logits
        teacher_logits = self.teacher_logits(teacher_call, student_logits)  # type: ignore[attr-defined]
        if student_logits.dim() > 2:
            mask = self.positions_masks(batch)[0]  # type: ignore[attr-defined]
            self._token_metrics(*self.aligned(x, student_logits, teacher_logits, y, mask), stage, loader)  # type: ignore[attr-defined]
            return
        if student_logits.dim() != 2:
            warn_once(
                self._metric_warnings, f"{stage}:shape",
                f"no {stage} metric is computed: the student's logits have shape {tuple(student_logits.shape)}, and the "
                "metrics need (N, C) classifier logits or (..., V) logits per position",
            )  # fmt: skip
            return
        labeled = y is not None
        if not labeled:
            warn_once(
                self._metric_warnings, f"{stage}:labels",
                f"{stage}_acc and {stage}_loss are not computed: the {stage} batches carry no labels",
            )  # fmt: skip
        # a label equal to ignore_index (an unlabeled sample) leaves the accuracies and the loss, as in training
        keep = None if y is None else y.to(student_logits.device) != self.ignore_index  # type: ignore[attr-defined]
        n_labeled = 0 if keep is None else int(keep.sum())
        if self.num_classes is not None and student_logits.shape[-1] != self.num_classes:  # type: ignore[attr-defined]
            warn_once(
                self._metric_warnings, f"{stage}:classes",
                f"{stage}_acc, {stage}_agreement and teacher_{stage}_acc are not computed: the logits have "
                f"{student_logits.shape[-1]} classes but num_classes={self.num_classes}; set "  # type: ignore[attr-defined]
                f"num_classes={student_logits.shape[-1]}",
            )  # fmt: skip
            if keep is not None and (n_labeled > 0 or self._in_step_with_other_processes()):
                loss = _mean_cross_entropy(student_logits[keep], y.to(keep.device)[keep])  # type: ignore[union-attr]
                self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=n_labeled)
            return
        agreement = loader_metric(self, f"{stage}_agreement", loader)  # type: ignore[arg-type]
        agreement.update(student_logits.argmax(-1), teacher_logits.argmax(-1))
        self.log(f"{stage}_agreement", agreement, batch_size=student_logits.shape[0])
        if keep is None:
            return
        if n_labeled == 0:
            warn_once(
                self._metric_warnings, f"{stage}:unlabeled",
                f"a {stage} batch has no labeled sample (every label is "
                f"ignore_index={self.ignore_index}); it adds to {stage}_agreement only",  # type: ignore[attr-defined]
            )  # fmt: skip
            if not self._in_step_with_other_processes():
                return
        s, t, labels = student_logits[keep], teacher_logits[keep], y.to(keep.device)[keep]  # type: ignore[union-attr]
        acc = loader_metric(self, f"{stage}_acc", loader)  # type: ignore[arg-type]
        if n_labeled:  # nothing to count in an empty batch; logged all the same (see above)
            acc.update(s.argmax(-1), labels)
        self.log(f"{stage}_loss", _mean_cross_entropy(s, labels), prog_bar=stage == "val", sync_dist=True, batch_size=n_labeled)
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val", batch_size=n_labeled)
        if n_labeled and not loader and (stage == "test" or (self.teacher_val_accuracy is None and not self.trainer.sanity_checking)):
            (self.teacher_val_acc if stage == "val" else self.teacher_test_acc).update(t.argmax(-1), labels)

    def _token_metrics(
        self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor | None, mask: Tensor | None, stage: str, loader: int = 0
    ) -> None:
        """Perplexity, token accuracy and agreement over the counted positions of ``(..., V)`` logits."""
        keep = position_mask(student_logits.shape, y, mask, self.ignore_index)  # type: ignore[attr-defined]
        if keep is None:
            keep = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
        s, t = student_logits[keep], teacher_logits[keep]
        n = s.shape[0]
        if n == 0:
            warn_once(
                self._metric_warnings, f"{stage}:empty",
                f"a {stage} batch has no counted position (all padding or ignore_index); it adds nothing to the "
                f"{stage} metrics",
            )  # fmt: skip
            if not self._in_step_with_other_processes():
                return
        agreement = loader_metric(self, f"{stage}_token_agreement", loader)  # type: ignore[arg-type]
        agreement.update(s.argmax(-1), t.argmax(-1))
        self.log(f"{stage}_agreement", agreement, batch_size=n)
        if y is None:
            warn_once(
                self._metric_warnings, f"{stage}:labels",
                f"{stage}_ppl, {stage}_acc, {stage}_loss and teacher_{stage}_ppl are not computed: the {stage} batches "
                "carry no labels (give them under 'labels', or name the key with target_key=...)",
            )  # fmt: skip
            return
        labels = y.to(keep.device)[keep]
        ppl, acc = loader_metric(self, f"{stage}_ppl", loader), loader_metric(self, f"{stage}_token_acc", loader)  # type: ignore[arg-type]
        ppl.update(s, labels)
        acc.update(s.argmax(-1), labels)
        self.log(f"{stage}_ppl", ppl, prog_bar=stage == "val", batch_size=n)
        self.log(f"{stage}_acc", acc, batch_size=n)
        self.log(f"{stage}_loss", _mean_cross_entropy(s.float(), labels), sync_dist=True, batch_size=n)
        if not loader and (stage == "test" or (self.teacher_val_perplexity is None and not self.trainer.sanity_checking)):
            getattr(self, f"teacher_{stage}_ppl").update(t, labels)

    def _in_step_with_other_processes(self) -> bool:
        """Whether a batch that adds nothing must still log (with weight 0): under DDP every process must log
        the same keys, or the epoch-end synchronisation of one key meets another's (a process whose whole
        shard is unlabeled would otherwise never log the accuracy and the loss the others log)."""
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and trainer.world_size > 1

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The student's predicted classes (per position for ``(..., V)`` logits; over ``class_dim``)."""
        batch = flat_batch(batch, self.input_key, self.student)  # type: ignore[attr-defined]
        x, _, _ = split_batch(batch, self.input_key, self.target_key)  # type: ignore[attr-defined]
        student_call, _ = self.network_calls(batch, x)  # type: ignore[attr-defined]
        return student_call(self).argmax(self.class_dim)  # type: ignore[attr-defined]

    def _teacher_once(self, metric: Metric, attr: str, key: str) -> None:
        """Compute a teacher metric (synchronised over processes), keep it in ``attr``, log it, reset it;
        when any process updated it (every process computes then, as the synchronisation needs)."""
        updates = metric.update_count
        if self._in_step_with_other_processes():
            updates = int(self.trainer.strategy.reduce(torch.tensor(float(updates), device=self.device), reduce_op="sum"))
        if updates > 0:
            with warnings.catch_warnings():  # a process whose shard had no labeled sample computes all the same
                warnings.filterwarnings("ignore", message=r".*compute.* was called before the .*update")
                setattr(self, attr, float(metric.compute()))
            metric.reset()
            self.log(key, getattr(self, attr), sync_dist=True)

    def _measure_teacher_again(self) -> None:
        """The teacher's validation metrics are measured at the first validation of each fit and of each
        standalone ``validate`` (each may run on other data): forget the last ones."""
        self.teacher_val_accuracy = self.teacher_val_perplexity = None
        self.teacher_val_acc.reset()
        self.teacher_val_ppl.reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.trainer.callback_metrics  # with several loaders, the first one's, as the teacher's are measured
        value = metrics.get("val_agreement", metrics.get("val_agreement/dataloader_idx_0"))
        if value is not None:
            self.last_agreement = float(value)
        if self.teacher_val_accuracy is None:
            self._teacher_once(self.teacher_val_acc, "teacher_val_accuracy", "teacher_val_acc")
        if self.teacher_val_perplexity is None:
            self._teacher_once(self.teacher_val_ppl, "teacher_val_perplexity", "teacher_val_ppl")

    def on_test_epoch_end(self) -> None:
        self._teacher_once(self.teacher_test_acc, "teacher_test_accuracy", "teacher_test_acc")
        self._teacher_once(self.teacher_test_ppl, "teacher_test_perplexity", "teacher_test_ppl")
