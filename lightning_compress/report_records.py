"""Which metrics describe which model: the records :class:`~lightning_compress.report.CompressionReport`
keeps during ``fit``, and the choices made from them.

Plain functions over plain records, so that the rules read apart from the callback's hooks:

- a *validation record*, one per validation in ``fit``: ``{"epoch", "step", "metrics", "active",
  "fingerprint"}`` (``active``: a plugin had changed the model then; ``fingerprint``:
  :func:`model_fingerprint` of the model validated);
- an *epoch record*, one per training epoch (the report's ``history``): ``{"epoch", "metrics",
  "state", "active"}``, whose metrics hold validation metrics only when a validation ran since the
  previous epoch record.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Where to find the metrics of a model no validation measured.
VALIDATE_HINT = "run trainer.validate(model, dataloaders) for its metrics"

#: An integer type of each element width, to read a tensor's bits as integers.
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_fingerprint(model: nn.Module) -> str | None:
    """Which weights and layer settings ``model`` holds now: equal for bit-identical tensors and equal
    settings, on any device and with any thread count, and different after the changes training, guards
    and plugins make (a sum per tensor: a permutation of one tensor's entries would not show).

    Per parameter and buffer: its name, shape, dtype and the sum of its elements' bit patterns read as
    integers (exact, so the order of the reduction does not matter, nor whether the model has been
    moved from the GPU to the CPU since); per module, its ``extra_repr`` (a fake-quantised layer's bit
    width is an attribute, not a tensor). ``None`` when a tensor cannot be read this way (a tensor
    subclass): the model is then not identified.
    """
    digest = hashlib.sha256()
    sums = []
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        t = t.detach()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        try:
            if t.is_complex():
                t = torch.view_as_real(t)
            if t.is_floating_point() or t.dtype == torch.bool:
                t = t.view(_INT_OF_WIDTH[t.element_size()])
            sums.append(t.sum(dtype=torch.int64))
        except (RuntimeError, KeyError, TypeError, NotImplementedError):
            return None
    if sums:
        on_one = len({s.device for s in sums}) == 1
        values = torch.stack(sums).cpu() if on_one else torch.stack([s.cpu() for s in sums])  # one sync per device
        digest.update(values.numpy().tobytes())
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__qualname__}({module.extra_repr()});".encode())
    return digest.hexdigest()


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two fingerprints name the same model; ``True`` when either is unknown (``None``)."""
    return a is None or b is None or a == b


# ------------------------------------------------------------------------------------ epoch records
def is_validation_key(key: str, validation_keys: Collection[str]) -> bool:
    """A metric a validation logs: ``val_*``/``test_*``, or a key seen logged by a validation in this run."""
    return key.startswith(("val_", "test_")) or key in validation_keys


def logged_by_validation(before: Mapping[str, float], after: Mapping[str, float]) -> set[str]:
    """The keys a validation logged, from the logged metrics at its start and at its end: new, or changed."""
    return {k for k, v in after.items() if before.get(k) != v}


def epoch_metrics(logged: Mapping[str, float], validated: bool, validation_keys: Collection[str]) -> dict[str, float]:
    """The metrics of an epoch record, from those logged at the epoch's end: all of them when a validation
    ran since the previous record; else none of the validation metrics, whose values are then an earlier
    validation's (Lightning keeps the last logged value of every key)."""
    if validated:
        return dict(logged)
    return {k: v for k, v in logged.items() if not is_validation_key(k, validation_keys)}


def validated_metrics(record: Mapping[str, Any], validation_keys: Collection[str]) -> dict[str, float]:
    """The validation metrics of a record (a validation's, or an epoch's): without the training loss."""
    return {k: v for k, v in record["metrics"].items() if k != "train_loss" and is_validation_key(k, validation_keys)}


# ------------------------------------------------------------------------------- choices at fit end
def before_compression(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records (validations or epochs) before the first one where a plugin had changed the model."""
    return list(itertools.takewhile(lambda r: not r["active"], records))


#: why a fit whose validations ran has no metric of either model
NOTHING_LOGGED = (
    "The validations of this fit ran but logged no metric (a validation_step without self.log, or Trainer(barebones=True), "
    "which turns self.log off); log the metrics in validation_step for them to be reported."
)


def _validation_metric_keys(validations: Sequence[Mapping[str, Any]], validation_keys: Collection[str]) -> set[str]:
    """The metrics the validations logged (``train_loss``, logged by the training step, is not one)."""
    return set(validation_keys) | {k for v in validations for k in v["metrics"] if k != "train_loss"}


def baseline_metrics(
    validations: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    validation_keys: Collection[str],
) -> tuple[dict[str, float], int | None, str | None]:
    """``(metrics, epoch, note)`` of the baseline: those of the last validation before any plugin changed
    the model (not one after a guard undid it all). Else those of the last epoch record before it with
    validation metrics (a fit resumed from a checkpoint written before validations were kept); else none,
    and a note saying why."""
    keys = _validation_metric_keys(validations, validation_keys)
    epochs = sorted(history, key=lambda h: h["epoch"])
    for records in (before_compression(validations), before_compression(epochs)):
        measured = [r for r in records if validated_metrics(r, keys)]
        if measured:
            return validated_metrics(measured[-1], keys), measured[-1]["epoch"], None
    if not validations and not any(validated_metrics(h, keys) for h in epochs):
        return {}, None, (
            "Baseline metrics: none. No validation ran in this fit (no validation loop); run trainer.validate(model, "
            "dataloaders) on the baseline model (before fit, or the teacher) for its metrics."
        )
    if validations and not keys:
        return {}, None, f"Baseline metrics: none. {NOTHING_LOGGED}"
    first = validations[0]["epoch"] if validations else epochs[0]["epoch"]
    return {}, None, (
        f"Baseline metrics: none (compression was active at the first validation of this fit, epoch {first}; "
        "start compression after a validation, or train a dense model first, for a same-run reference)."
    )


def final_metrics(
    validations: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    final_fingerprint: str | None,
    final_step: int,
    validation_keys: Collection[str],
    averaging: Sequence[str] = (),
    same_outputs: Collection[str] = (),
) -> tuple[dict[str, float], int | None, str | None]:
    """``(metrics, epoch, note)`` of the model ``fit`` returns: those of the last validation of exactly
    these weights and layer settings (``final_fingerprint``; ``final_step``: the trainer's global step at
    the end of fit; ``averaging``: the weight-averaging callbacks of the fit, which the note names). Without any validation in fit, those of the last epoch record when it has validation
    metrics (a fit resumed from a checkpoint written before validations were kept); else none, and a note."""
    if not validations:
        last = max(history, key=lambda h: h["epoch"]) if history else None
        metrics = validated_metrics(last, validation_keys) if last else {}
        if last and metrics:
            return metrics, last["epoch"], None
        return {}, None, (
            "Compressed metrics: none. No validation ran in this fit (no validation loop, a check_val_every_n_epoch "
            "the fit's epochs do not reach (PTQ ends its fit at start_epoch), or PTQ with start_epoch=0, which "
            f"calibrates before any); {VALIDATE_HINT}."
        )
    if not _validation_metric_keys(validations, validation_keys):
        return {}, None, f"Compressed metrics: none. {NOTHING_LOGGED}"
    last = validations[-1]
    if same_model(final_fingerprint, last["fingerprint"]):
        return dict(last["metrics"]), (last["epoch"] if last["metrics"] else None), None
    if last["fingerprint"] in same_outputs:  # a plugin changed the model after it, keeping every output
        return dict(last["metrics"]), (last["epoch"] if last["metrics"] else None), (
            f"Compressed metrics: from the validation at epoch {last['epoch']}, which measured the model before its "
            "pruned units (channels, heads, neurons) were removed; the removal kept every output."
        )
    where = f"the last validation (epoch {last['epoch']}, step {last['step']})"
    same = [v for v in validations if v["fingerprint"] == final_fingerprint]
    if same:
        v = same[-1]
        return dict(v["metrics"]), v["epoch"], (
            f"Compressed metrics: from the validation at epoch {v['epoch']} (step {v['step']}), which measured exactly "
            f"the weights fit returned; {where} measured weights that were replaced afterwards (an accuracy guard "
            "restored earlier ones)."
        )
    steps_after = final_step - last["step"]
    if steps_after > 0:
        trained = max((h["epoch"] for h in history), default=last["epoch"])
        return {}, None, (
            f"Compressed metrics: none. The model was changed after {where}: training continued for {steps_after} "
            f"more step{'s' * (steps_after != 1)} without validation (to step {final_step}, in epoch {trained}), so no validation "
            f"measured the model fit returned; {VALIDATE_HINT}, or end training on a validation (max_epochs a multiple "
            "of check_val_every_n_epoch, no max_steps within an epoch)."
        )
    cause = (
        f"{averaging[0]} put its average of the weights in when training ended" if averaging
        else "an accuracy guard rolled its bits back, or a pruning step was taken when training ended"
    )
    return {}, None, (
        f"Compressed metrics: none. The model was changed after {where}, and no validation measured the model fit "
        f"returned ({cause}); {VALIDATE_HINT}."
    )


def other_model_test(ckpt_path: str | None, metrics: Mapping[str, float]) -> tuple[dict[str, Any], str]:
    """``(entry, warning)`` for a ``Trainer.test`` of a model other than the compressed one: the entry kept
    under the report's ``other_model_tests``, and what to do to test the compressed model."""
    entry = {"ckpt_path": ckpt_path, "metrics": dict(metrics)}
    names = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "no test_* metric"
    if ckpt_path is not None:
        what = f"the checkpoint {ckpt_path!r}"
        how = (
            "Loading it put its weights into the module: to test the compressed model, call trainer.test(model, "
            "dataloaders) without ckpt_path right after fit, or save it with trainer.save_checkpoint(path) after fit "
            "and test ckpt_path=path."
        )
    else:
        what = "a model whose weights or layer settings are not those of the compressed model fit returned"
        how = "To test the compressed model, call trainer.test(model, dataloaders) with the model as fit returned it."
    warning = (
        f"CompressionReport: Trainer.test tested {what}, not the compressed model fit returned; its test metrics "
        f"({names}) are kept under report['other_model_tests'], not in the compressed row. {how}"
    )
    return entry, warning


class DataSeen:
    """How many samples an evaluation ran, per dataloader, to tell a ``trainer.validate`` on the fit's validation
    data (a new loader of the same samples, at any batch size, shuffled or padded otherwise) from one on other data
    (another split, a subset). Read from the shapes alone: no device read, nothing that can fail on a batch."""

    def __init__(self) -> None:
        self.sizes: dict[int, list[tuple[int, ...]]] = {}  # the leading dimensions of each batch's first tensor

    def add(self, batch: Any, dataloader_idx: int = 0) -> None:
        first = next((t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if first is not None:
            self.sizes.setdefault(dataloader_idx, []).append(tuple(first.shape[:2]))

    def samples(self, batch_dim: int = 0) -> dict[int, int] | None:
        """``{dataloader index: samples}`` counted along ``batch_dim`` (1: sequence-first batches); ``None`` when no
        batch was seen."""
        if not self.sizes:
            return None
        return {i: sum(s[batch_dim] if len(s) > batch_dim else 1 for s in shapes) for i, shapes in self.sizes.items()}
