"""The contract between compression plugins, the :class:`~lightning_compress.CompressionReport` and the run.

What every plugin shares lives here or in the modules it names, once:

- the report contract (:class:`CompressionCallback`'s four questions);
- all or nothing in ``setup``: the model as it was before the first plugin changed it is recorded,
  and restored exactly (classes, parameters, buffers, submodules, hooks) if any plugin, or the
  module's own ``setup``, fails before training starts (:class:`ModelSnapshot`);
- one logging path (:meth:`CompressionCallback.log_metrics`): scalars through ``pl_module.log`` so
  that they are in ``trainer.callback_metrics`` (``ModelCheckpoint``, ``EarlyStopping``), per-layer
  detail straight to the loggers;
- the input and batches: :mod:`lightning_compress.batches`; the weights to act on:
  :mod:`lightning_compress.selection`; the accuracy guard: :mod:`lightning_compress.guard`.
"""

from __future__ import annotations

import copy
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_compress import token_mask
from lightning_compress.guard import check_monitor_logged

__all__ = ["CompressionCallback", "ModelSnapshot", "fast_dev_run_note", "instance_suffix"]

#: Hooks where queued plugin metrics are logged: ``True`` per step (in ``callback_metrics`` at once, for
#: ``ModelCheckpoint``/``EarlyStopping`` at the validation of the same epoch), ``False`` per epoch.
_FLUSH_HOOKS = {
    "on_train_batch_end": True,
    "on_before_optimizer_step": True,
    "on_train_epoch_end": False,
    "on_validation_epoch_end": False,
}


def fast_dev_run_note(trainer: Trainer) -> str:
    """Words to add to an error about ``max_epochs`` when ``fast_dev_run`` set it (the user did not)."""
    runs = getattr(trainer, "fast_dev_run", False)
    if not runs:
        return ""
    return (
        f" (fast_dev_run={runs!r} runs one epoch of {1 if runs is True else runs} batches, whatever max_epochs says; "
        "to try the plugin with it, let everything it schedules happen in that epoch: start_epoch=0, and any "
        "end_epoch or shrink_epoch at most 1)"
    )


class ModelSnapshot:
    """The structure of a module tree, to put back exactly: every submodule's class and attributes
    (parameters, buffers, children and hook dictionaries copied one level deep).

    It holds references, not copies of tensors: it undoes swaps of classes, added or removed
    submodules, parameters, buffers and hooks, which is what plugins do in ``setup``. Values written
    into existing tensors are not undone (no plugin writes weights before training starts).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> snap = ModelSnapshot(net)
        >>> net.add_module("extra", nn.ReLU()); h = net.register_forward_hook(lambda *a: None)
        >>> snap.restore()
        >>> len(net), len(net._forward_hooks)
        (1, 0)
    """

    def __init__(self, module: nn.Module) -> None:
        self.records = [
            (m, type(m), {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in vars(m).items()})
            for m in module.modules()
        ]

    def restore(self) -> None:
        for module, cls, attributes in self.records:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update({k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in attributes.items()})


#: The snapshot of each fit's module, taken when the first plugin's ``setup`` starts.
_SNAPSHOTS: weakref.WeakKeyDictionary[Trainer, ModelSnapshot] = weakref.WeakKeyDictionary()


#: The attribute of a module that names it for :meth:`CompressionCallback.prepared_other_module`.
_MODULE_TOKEN = "_lightning_compress_token"


def instance_suffix(callback: Callback, callbacks: Sequence[Callback]) -> str:
    """``""`` for the first callback of its type in ``callbacks``, ``"_2"``, ``"_3"``... for the next: the metrics and
    report entries of two pruning callbacks (one unstructured on some layers, one on channels elsewhere) stay apart.

    >>> a, b = Callback(), Callback()
    >>> instance_suffix(a, [a, b]), instance_suffix(b, [a, b])
    ('', '_2')
    """
    same = [c for c in callbacks if type(c) is type(callback)]
    index = next((i for i, c in enumerate(same) if c is callback), 0)
    return "" if index == 0 else f"_{index + 1}"


class CompressionCallback(Callback):
    """Base class of the callbacks that compress a model.

    The report reads three things from every callback of this type, and from a LightningModule that
    defines the same methods (``DistillationModule`` does):

    - :meth:`compression_state`: scalars recorded once per epoch and plotted (``{"sparsity": 0.42}``,
      ``{"weight_bits": 8}``).
    - :meth:`compression_summary`: a JSON-ready section of the report (per-layer sparsity, bits...).
    - :meth:`compressed_artifact`: the model to measure as "compressed" instead of the trained module
      (the converted int8 model, say), or ``None``.
    - :meth:`is_active`: whether the plugin has changed the model yet; the report takes the baseline
      metrics from the last validation before any plugin became active.

    A LightningModule may also define ``compression_baseline()`` (the model to compare against, e.g.
    a distillation teacher, copied when fit starts) and ``compression_baseline_metrics()`` (that
    model's metrics, used instead of the pre-compression epochs).

    Subclasses that change the model in ``setup`` call ``super().setup(trainer, pl_module, stage)``
    first: it lets every :class:`~lightning_compress.CompressionReport` of the run copy the model
    before it is changed, whatever the order of the callbacks, and records the model so that a
    failure of any plugin before training starts puts it back as it was (:meth:`discard_setup` is
    then called on every plugin, to forget what its ``setup`` prepared).
    """

    #: Whether the plugin acts on weights sharded by FSDP2 (``ModelParallelStrategy``); else it refuses it.
    supports_fsdp2 = False

    @property
    def fit_warnings(self) -> list[str]:
        """The warnings of this plugin's last fit that its summary keeps as notes (:meth:`warn_in_report`)."""
        return self.__dict__.setdefault("_fit_warnings", [])

    def warn_in_report(self, message: str) -> None:
        """Warn, and keep the warning for the summary's notes (a report outlives the console)."""
        self.fit_warnings.append(message)
        rank_zero_warn(message)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.__dict__["_stateless_resume"] = False  # set by on_load_checkpoint, after this
        if stage == "fit":
            self.__dict__["_fit_warnings"] = []
        self.__dict__["_suffix"] = instance_suffix(self, trainer.callbacks)
        check_strategy(trainer, type(self).__name__, self.supports_fsdp2)
        if stage == "fit":
            check_trains(trainer, type(self).__name__)
            check_guard_can_read(trainer, type(self).__name__, getattr(self, "monitor", None))
        build_configured_model(trainer, pl_module)
        if stage == "fit":
            take_baselines(trainer, pl_module)
            if trainer not in _SNAPSHOTS:
                _SNAPSHOTS[trainer] = ModelSnapshot(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_still_configured(pl_module)
        self._validations_in_fit = 0

    def check_monitor(self, trainer: Trainer, monitor: str | None) -> None:
        """At the end of a validation: :func:`~lightning_compress.guard.check_monitor_logged`, with the number of
        validations of this fit that ended before this one."""
        seen = self.__dict__.get("_validations_in_fit", 0)
        check_monitor_logged(trainer, monitor, type(self).__name__, seen)
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._validations_in_fit = seen + 1

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # a fit resumed from a checkpoint this callback did not write (added to a run that had none)
        self._stateless_resume = trainer.state.fn == "fit" and self.state_key not in checkpoint.get("callbacks", {})

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _SNAPSHOTS.pop(trainer, None)  # training runs: from now on the changes are the run's
        start, now = getattr(getattr(self, "options", None), "start_epoch", None), trainer.current_epoch
        value = self.schedule_value
        if (
            self.__dict__.pop("_stateless_resume", False) and isinstance(start, (int, float)) and now > start
            and any(value(start + (now - start) * k / 32) != value(now) for k in range(32))  # a step before now, skipped
        ):  # fmt: skip
            rank_zero_warn(
                f"{type(self).__name__}: the fit resumes at epoch {trainer.current_epoch} from a checkpoint without this "
                f"callback's state (a run it was added to), after its start_epoch={start:g}: the schedule's steps before "
                f"epoch {trainer.current_epoch} are not taken one by one, its first change goes straight to where the "
                "schedule is now. Start the callback from the beginning of a fit for its gradual schedule"
            )

    def count_tokens_of(self, pl_module: LightningModule, batch: Any) -> None:
        """For this training step's forwards, the batch's padding mask is the current one
        (:mod:`lightning_compress.token_mask`; its key: :func:`~lightning_compress.token_mask.mask_key_of`, found
        once per module): statistics of the layers' inputs (Wanda's norms, the observed ranges) leave its padded
        positions out. :meth:`stop_counting_tokens` at the step's end, and at the epoch's and training's end (a
        step that ``on_train_batch_start`` skips with -1 has no end hook)."""
        known = self.__dict__.get("_mask_key")
        if known is None or known[0] != id(pl_module):
            known = self._mask_key = (id(pl_module), token_mask.mask_key_of(pl_module))
        token_mask.set_current(token_mask.batch_mask(batch, known[1]))

    @staticmethod
    def stop_counting_tokens() -> None:
        token_mask.set_current(None)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.stop_counting_tokens()
        snapshot = _SNAPSHOTS.pop(trainer, None)
        if snapshot is None:
            return
        snapshot.restore()
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, CompressionCallback):
                callback.discard_setup()

    def discard_setup(self) -> None:
        """Forget what ``setup`` prepared (the model was put back as it was before any plugin changed it)."""

    def prepared_other_module(self, pl_module: LightningModule) -> bool:
        """Whether this callback last prepared a module other than ``pl_module`` (a loop that builds a new model for
        each run and passes the same callback, or a return to an earlier model): what it holds belongs to that module,
        and it starts afresh. Records ``pl_module`` as the one prepared now: weakly (the callback keeps no model
        alive), and by a token stored in the module, which a copied or pickled callback still compares (ddp_spawn
        pickles the module and the callbacks together)."""
        previous, token = self.__dict__.get("_prepared_module"), self.__dict__.get("_prepared_token")
        mine = pl_module.__dict__.setdefault(_MODULE_TOKEN, uuid.uuid4().hex)
        if previous is not None:
            other = previous() is not pl_module
        else:
            other = token is not None and token != mine
        self._prepared_module, self._prepared_token = weakref.ref(pl_module), mine
        return other

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_prepared_module", None)  # a weak reference does not pickle; the token does
        return state

    def log_metrics(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        metrics: Mapping[str, float],
        detail: Mapping[str, float] | None = None,
    ) -> None:
        """Put ``metrics`` in ``trainer.callback_metrics`` through ``pl_module.log`` and send ``detail`` to
        the loggers.

        ``metrics`` are logged at once in a training-batch hook, else queued until :meth:`flush_metrics`
        (the next training batch): once logged they stay in ``trainer.callback_metrics`` for the rest
        of the epoch, so ``ModelCheckpoint``/``EarlyStopping`` can use them (not the progress bar); queued ones are
        put in ``trainer.callback_metrics`` at once, for the hooks after this one. They are
        logged with ``logger=False``: the loggers get the values a plugin puts in ``detail``, at the
        step it chooses (a mask update, an epoch end), not at the loggers' own interval. The values are
        the same on every rank (no sync).
        """
        named = self._own_name
        queued = self.__dict__.setdefault("_queued_metrics", {})
        queued.update({named(k): float(v) for k, v in metrics.items()})
        self.flush_metrics(pl_module)
        if queued and trainer.state.fn == "fit":
            # a hook that cannot log (a guard's restore at a validation's end): the values ModelCheckpoint and
            # EarlyStopping read there and what callback_metrics holds after the fit are these, not the replaced ones
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in queued.items()})
        if detail and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({named(k): v for k, v in detail.items()}, step=trainer.global_step)

    def _own_name(self, key: str) -> str:
        """``key`` as this callback logs it: a second callback of the same type marks the metric, not a layer name
        after it (``pruning/sparsity_2``, ``pruning/sparsity_2/model.net.1.weight``)."""
        suffix = self.__dict__.get("_suffix", "")
        if not suffix:
            return key
        parts = key.split("/", 2)
        parts[min(1, len(parts) - 1)] += suffix
        return "/".join(parts)

    def flush_metrics(self, pl_module: LightningModule) -> None:
        """Log the queued metrics if the current hook allows it (see :meth:`log_metrics`)."""
        queued = self.__dict__.get("_queued_metrics")
        fx = getattr(pl_module, "_current_fx_name", None)
        if not queued or fx not in _FLUSH_HOOKS:
            return
        per_step = _FLUSH_HOOKS[fx]
        for name, value in queued.items():
            pl_module.log(name, value, on_step=per_step, on_epoch=not per_step, batch_size=1, logger=False)
        queued.clear()

    def pending_metrics(self) -> dict[str, float]:
        """Metrics logged in a hook that cannot log (an accuracy guard's restore at the fit's last validation) and
        not yet put in ``trainer.callback_metrics``: the values that replace theirs there."""
        return dict(self.__dict__.get("_queued_metrics", {}))

    def compression_state(self) -> dict[str, float]:
        return {}

    def schedule_value(self, epoch: float) -> float | None:
        """What the plugin's schedule sets at ``epoch`` (a sparsity's progress, a width); ``None``: no schedule."""
        return None

    def compression_summary(self) -> dict[str, Any]:
        return {}

    def compressed_artifact(self) -> nn.Module | None:
        return None

    def compressed_call(self) -> Any:
        """The :class:`~lightning_compress.batches.ForwardCall` that runs :meth:`compressed_artifact`, when the plugin
        found it (its ``target`` names the module's child the artifact was made from); ``None``: the call the
        training step makes."""
        return None

    def is_active(self) -> bool:
        return False

    def weights_restored(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Another plugin's accuracy guard wrote back weights of an earlier validation: enforce what this plugin
        holds on them (pruning's zeros) before the next step."""

    def tell_weights_restored(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This plugin's guard wrote back weights of an earlier validation: every other plugin's :meth:`weights_restored`."""
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, CompressionCallback) and callback is not self:
                callback.weights_restored(trainer, pl_module)

    def last_weight_change(self, max_epochs: int | None) -> float | None:
        """The (fractional) epoch of the last change this plugin makes to the weights' values or the layers
        during a fit of ``max_epochs`` (``None``: none after ``setup``, or it cannot tell). A plugin that
        measures the weights once and then ends the fit (post-training quantisation) must come after it."""
        return None


def speaks_contract(pl_module: LightningModule) -> bool:
    """Whether a LightningModule is a compression plugin itself (it defines ``compressed_artifact()``,
    as :class:`~lightning_compress.DistillationModule` does)."""
    return callable(getattr(pl_module, "compressed_artifact", None))


def unit_removers(callbacks: Any) -> list[tuple[Any, Any]]:
    """``(callback, its options)`` of each callback that removes channels, heads or neurons during the fit
    (a ``PruningCallback`` with ``shrink=True`` and a channel or unit structure): layer shapes change mid-fit."""
    return [
        (cb, cb.options) for cb in callbacks
        if getattr(getattr(cb, "options", None), "kind", None) == "channel" and getattr(cb.options, "shrink", False)
    ]


def quantisation_group_sizes(callbacks: Any) -> list[tuple[Any, int]]:
    """``(callback, g)`` of each callback quantising with one scale per group of ``g`` input weights
    (``granularity=g``): the layers it quantises must keep a multiple of ``g`` inputs per output channel."""
    found = []
    for cb in callbacks:
        g = getattr(getattr(cb, "options", None), "granularity", None)
        if isinstance(g, int) and not isinstance(g, bool):
            found.append((cb, g))
    return found


def module_artifact(pl_module: LightningModule) -> nn.Module | None:
    """The module's own compressed artifact (a distilled student), or ``None`` when it has none."""
    return pl_module.compressed_artifact() if speaks_contract(pl_module) else None


def compression_plugins(trainer: Trainer, pl_module: LightningModule) -> list[Any]:
    """The compression plugins of a run: the module itself if it speaks the contract, then the
    CompressionCallbacks (in that order: a callback's artifact, an int8 copy of a distilled student say,
    supersedes the module's own)."""
    found: list[Any] = [pl_module] if speaks_contract(pl_module) else []
    found += [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]  # type: ignore[attr-defined]
    return found


def compressed_model(trainer: Trainer, pl_module: LightningModule) -> tuple[nn.Module, Any | None]:
    """What a finished run produced: the last plugin's compressed artifact and that plugin, else the
    module itself and ``None`` (pruning in place leaves the compressed weights in the module)."""
    model: nn.Module = pl_module
    source = None
    for plugin in compression_plugins(trainer, pl_module):
        artifact = plugin.compressed_artifact()
        if artifact is not None:
            model, source = artifact, plugin
    return model, source


def run_dir(trainer: Trainer) -> Path:
    """The run's log directory (``trainer.log_dir``, else ``default_root_dir``). ``trainer.log_dir``
    broadcasts under DDP: call this on every rank, never inside a rank-0-only branch."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def example_input(trainer: Trainer, pl_module: LightningModule, *, full: bool = False) -> Any:
    """The first tensor the module's ``forward`` takes (``example_input_array``, else found in one
    training batch by :func:`lightning_compress.batches.example_call`); ``None`` when there is none.

    With ``full=True``, the whole call instead: a :class:`~lightning_compress.batches.ForwardCall`
    (positional and keyword arguments, so keyword-only forwards can be run), or ``None``."""
    from lightning_compress.batches import example_call

    try:
        call = example_call(trainer, pl_module, "the example input")
    except ValueError:
        return None
    if full:
        return call if call.first_tensor() is not None else None
    return call.first_tensor()


def take_baselines(trainer: Trainer, pl_module: LightningModule) -> None:
    """Ask every callback of ``trainer`` that keeps a baseline (a :class:`~lightning_compress.CompressionReport`,
    or any callback with a ``take_baseline(pl_module)`` method) to copy the model now, before it is changed.

    Duck-typed, so that this module does not import the report (which imports this module)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        take_baseline = getattr(callback, "take_baseline", None)
        if callable(take_baseline):
            check = getattr(callback, "check_trainer", None)
            if callable(check):
                check(trainer)  # before the copy, and before any plugin changes the model
            take_baseline(pl_module)


#: Strategies whose parameters are sharded or managed by the strategy: the plugins hold and mask the
#: module's own parameters, which these replace (flat or distributed tensors) after ``setup``.
_SHARDING_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def weight_averaging(callbacks: Iterable[Callback]) -> list[str]:
    """The names of the weight-averaging callbacks among ``callbacks`` (``StochasticWeightAveraging``, and
    ``WeightAveraging``/``EMAWeightAveraging`` from Lightning 2.6), in order."""
    from lightning.pytorch import callbacks as lightning_callbacks

    kinds = tuple(getattr(lightning_callbacks, k) for k in ("StochasticWeightAveraging", "WeightAveraging") if hasattr(lightning_callbacks, k))
    return [type(cb).__name__ for cb in callbacks if isinstance(cb, kinds)]


def sharding_strategies(trainer: Trainer) -> list[str]:
    """The names of the sharding strategies ``trainer``'s strategy is (an empty list for DDP, one device...)."""
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    return [n for n in _SHARDING_STRATEGIES if n in names]


def check_trains(trainer: Trainer, who: str) -> None:
    """A fit that runs no training step (``limit_train_batches=0``, ``max_steps=0``) gives a plugin nothing to act on:
    Lightning skips the training loop, its hooks with it, and the model came back as it was given, silently.

    Raises:
        ValueError: naming the setting, before anything is changed.
    """
    for name in ("limit_train_batches", "max_steps"):
        if getattr(trainer, name, None) == 0:
            raise ValueError(
                f"{who} needs training batches, but {name}=0 runs no training step: the fit would end with the model as "
                f"it was given (nothing pruned, trained quantised or calibrated). Give {name} > 0, or call "
                "trainer.validate/test to measure the model without training"
            )


def check_guard_can_read(trainer: Trainer, who: str, monitor: str | None) -> None:
    """An accuracy guard reads ``monitor`` from what the module logs, and ``Trainer(barebones=True)`` turns
    ``self.log`` off: the guard would fail after the first validation, telling the user to log what they log.

    Raises:
        ValueError: naming ``monitor`` and ``barebones``, before anything is changed.
    """
    if monitor is not None and getattr(trainer, "barebones", False):
        raise ValueError(
            f"{who}(monitor={monitor!r}): Trainer(barebones=True) turns self.log off, so the accuracy guard could never "
            "read the metric; leave barebones off, or leave monitor and max_drop out"
        )


def check_strategy(trainer: Trainer, who: str, fsdp2: bool = False) -> None:
    """A clear error, before anything is changed, under a strategy that shards the parameters.

    ``fsdp2``: the plugin acts on FSDP2 shards (``ModelParallelStrategy`` with ``fully_shard``).

    Raises:
        ValueError: naming the strategy and the ones that work.
    """
    found = sharding_strategies(trainer)
    if fsdp2 and found == ["ModelParallelStrategy"]:
        return
    if fsdp2 and found:
        raise ValueError(
            f"{who} does not support strategy {type(trainer.strategy).__name__}, which replaces the module's parameters "
            "by flat shards. Shard with FSDP2 instead: strategy=ModelParallelStrategy(), with fully_shard applied in the "
            "module's configure_model; or use one device, strategy='ddp' or 'ddp_spawn'."
        )
    if found:
        raise ValueError(
            f"{who} does not support strategy {type(trainer.strategy).__name__}: it acts on the module's own parameters, "
            "which this strategy replaces by shards. Use one device, strategy='ddp' (any number of devices) or "
            "'ddp_spawn'; compress the model first and shard the compressed model afterwards."
        )


#: Modules whose ``configure_model`` a plugin has already run, with ``{name: (id, shape)}`` of the parameters it built.
_CONFIGURED: weakref.WeakKeyDictionary[LightningModule, dict[str, tuple[int, tuple[int, ...]]]] = weakref.WeakKeyDictionary()


def build_configured_model(trainer: Trainer, pl_module: LightningModule) -> None:
    """Run the module's ``configure_model`` now, if it has one, so that the plugins see the layers it builds.

    Lightning calls ``configure_model`` after every ``setup`` hook, and a plugin changes the model in
    its ``setup``: without this, layers built there would be invisible to it. Lightning requires the
    hook to be idempotent (a later call is a no-op), so running it first, in the same contexts that
    Lightning uses (device, precision), leaves the model as Lightning's own call would.
    :func:`check_still_configured` verifies that at ``on_fit_start``.
    """
    if pl_module in _CONFIGURED or type(pl_module).configure_model is LightningModule.configure_model:
        return
    with (
        trainer.strategy.tensor_init_context(),
        trainer.strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()
    _CONFIGURED[pl_module] = _parameter_record(pl_module)


def _parameter_record(pl_module: LightningModule) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {n: (id(p), tuple(p.shape)) for n, p in pl_module.named_parameters()}


def configured_again(pl_module: LightningModule) -> None:
    """The module's layers were put back by a checkpoint load (at the shapes they had before channel removal): those
    are now the ones its ``configure_model`` built, for :func:`check_still_configured`."""
    if pl_module in _CONFIGURED:
        _CONFIGURED[pl_module] = _parameter_record(pl_module)


def check_still_configured(pl_module: LightningModule) -> None:
    """After Lightning's own ``configure_model`` call: the layers the plugins set up must still be the model's.

    Raises:
        RuntimeError: ``configure_model`` built new layers on its second call (it is not idempotent).
    """
    built = _CONFIGURED.get(pl_module)
    if built is None:
        return
    now = dict(pl_module.named_parameters())
    # a parameter of another shape was resized by a checkpoint load (a resumed fit after channel removal), not rebuilt
    missing = [n for n, (pid, shape) in built.items() if n not in now or (id(now[n]) != pid and tuple(now[n].shape) == shape)]
    if missing:
        raise RuntimeError(
            f"{type(pl_module).__name__}.configure_model built new layers when Lightning called it a second time "
            f"({len(missing)} parameters replaced), so the compression plugins would act on layers the model no longer "
            "uses. Make it idempotent, as Lightning requires: return early when the layers exist "
            "(if self.net is not None: return)."
        )
