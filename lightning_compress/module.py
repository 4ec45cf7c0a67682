"""``ClassifierModule``: a LightningModule around any ``nn.Module`` classifier."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress._validation import as_count, check_factories, check_network, sample_shape
from lightning_compress.loader_metrics import loader_metric

__all__ = ["ClassifierModule"]


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def build_optimizers(
    params: Any, optimizer: Any, scheduler: Any | None = None, interval: str | None = None
) -> Any:
    """What ``configure_optimizers`` returns for an ``optimizer`` factory and an optional ``scheduler``
    factory (stepped every epoch, or every ``interval``: ``"step"``/``"epoch"``). A ``ReduceLROnPlateau`` is given
    the metric it watches, as Lightning needs: its ``monitor`` (LightningCLI's ``ReduceLROnPlateau`` takes one),
    else ``val_loss``."""
    opt = optimizer(params)
    if scheduler is None:
        return opt
    sched = scheduler(opt)
    config: dict[str, Any] = {"scheduler": sched}
    if interval is not None:
        config["interval"] = interval
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = getattr(sched, "monitor", None) or "val_loss"
    return {"optimizer": opt, "lr_scheduler": config if len(config) > 1 else sched}


COMPILE_OPTIONS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def compile_options(compile: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """The keyword arguments of ``torch.compile`` a module's ``compile`` option asks for (``None``: do not
    compile). ``True`` means the defaults; a dict is checked against torch.compile's arguments."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, dict):
        raise ValueError(f"compile must be true, false or a dict of torch.compile arguments, got {compile!r}")
    unknown = sorted(set(compile) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown torch.compile arguments {unknown} in compile; valid: {list(COMPILE_OPTIONS)}")
    return dict(compile)


def compile_in_place(network: nn.Module, options: dict[str, Any] | None) -> None:
    """``network.compile(**options)``, once: its forward is compiled when first called, and its module and
    parameter names stay what they were (a ``torch.compile(network)`` wrapper would prefix every name with
    ``_orig_mod.``, and the plugins select layers by name). Compilation is lazy, so layers a plugin swaps
    in before the first step are the ones compiled.

    A network whose ``forward`` is torch's own (``nn.Sequential``, ``nn.TransformerEncoder``) compiles nothing through
    ``network.compile()``: dynamo skips the frames of torch's modules, so its call runs eagerly, without a word. Its
    call is then compiled through a function of this module, which dynamo traces (as the wrapper
    ``torch.compile(network)`` does), kept where ``network.compile()`` keeps its own (a deep copy drops it). As with
    that wrapper, hooks put on such a container after its first call are not run by the compiled call."""
    if options is None or getattr(network, "_compiled_call_impl", None) is not None:
        return
    if not type(network).forward.__module__.startswith("torch."):
        network.compile(**options)
        return
    call = network._call_impl

    def compiled_call(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    network._compiled_call_impl = torch.compile(compiled_call, **options)


class ClassifierModule(LightningModule):
    """Train any classifier with cross-entropy; log ``train_loss``, ``val_loss``, ``val_acc``, ``test_acc``.

    Args:
        model: The network (a class path in YAML). Its parameters are the module's ``model.*`` keys.
        num_classes: Classes, for the accuracy metrics.
        optimizer: A callable ``params -> Optimizer`` (in YAML a class path with ``init_args``);
            default Adam with ``lr=1e-3``.
        scheduler: Optional callable ``optimizer -> LRScheduler``, stepped every epoch.
        example_input_shape: Shape of one input sample (without batch), used for
            ``example_input_array`` (latency measurement, ``torch.export``); inferred from the first
            batch when omitted.

    Example:
        >>> from lightning_compress.models import MLP
        >>> module = ClassifierModule(MLP(64, (32,), 10))
        >>> module(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        example_input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_network(model, "model", owner=self)
        num_classes = as_count(num_classes, "num_classes", minimum=2)
        check_factories(optimizer, scheduler)
        shape = None if example_input_shape is None else sample_shape(example_input_shape)
        if example_input_shape is not None and shape is None:
            raise ValueError(f"example_input_shape must be the positive sizes of one sample, e.g. (1, 28, 28), got {example_input_shape!r}")
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        if shape is not None:
            self.example_input_array = torch.zeros(1, *shape)
        # checkpoints written after channel removal hold smaller tensors: resize the layers when loading
        from lightning_compress.pruning.reload import allow_shrunk_checkpoints

        allow_shrunk_checkpoints(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _remember_input(self, x: torch.Tensor) -> None:
        if self.example_input_array is None:
            self.example_input_array = torch.zeros(1, *x.shape[1:], dtype=x.dtype)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self._remember_input(x)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)  # every rank's mean
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self._remember_input(x)
        logits = self(x)
        acc = loader_metric(self, "val_acc", dataloader_idx)  # each validation loader its own accuracy
        acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self(x)
        acc = loader_metric(self, "test_acc", dataloader_idx)
        acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test_acc", acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_factory, self.scheduler_factory)
