"""Where a plugin finds an input, and how it runs a batch outside the training step.

Every plugin that needs data outside ``training_step`` (PTQ calibration, BatchNorm re-estimation,
channel tracing, the distillation projections) goes through this module, so all of them accept what
the user's ``training_step`` accepts: tuples, dicts (``input_ids``, ``attention_mask``, ...) and
models whose ``forward`` takes keywords.

- :func:`train_loader` finds the training data the way Lightning's fit loop does: the datamodule,
  loaders passed to ``fit``, or the module's own ``train_dataloader()``; it works in ``setup``.
- :func:`forward_call` finds the arguments ``training_step`` passes to the module's ``forward`` by
  running it on one batch with a forward pre-hook that records them and stops the step there.
- :func:`run_batch` runs one batch as ``training_step`` would (under ``no_grad``, logging muted)
  and stops right after the module's forward, so no loss or metric is computed.

A module whose ``training_step`` never calls its own ``forward`` (it calls ``self.model(x)``) is run
whole; one with manual optimisation is never run, since its step would update weights: those need
``batch_forward=`` (a function ``(module, batch) -> output``) or ``example_input_array``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_compress import token_mask
from lightning_compress.data import ResumableLoader, random_state, set_random_state
from lightning_compress.measure import fast_paths_off, floating_dtype
from lightning_compress.sharding import is_fsdp_unit

__all__ = [
    "SKIP_TRIES", "BatchForward", "ForwardCall", "check_runnable", "eval_mode", "forward_call", "run_batch",
    "random_state_kept", "run_batches", "run_training_batches", "train_loader",
]  # fmt: skip

#: ``(module, batch) -> output``: how to run one batch through the module, when the default (the
#: module's own ``training_step``, stopped after ``forward``) cannot be used.
BatchForward = Callable[[torch.nn.Module, Any], Any]


@dataclass
class ForwardCall:
    """The positional and keyword arguments of one call of a module's ``forward``, and which module:
    ``target`` is the name of the LightningModule's child that the training step calls (``"model"`` for
    ``self.model(**batch)``), or ``""`` for the module's own ``forward``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: str = ""
    #: Other children with parameters the training step calls besides ``target`` (as found by
    #: :func:`forward_call`): a measurement of ``target`` alone leaves them out.
    others: tuple[str, ...] = ()

    def __call__(self, module: torch.nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        """What to call: the ``target`` child of a LightningModule (of a copy of the one the call was found
        in), else ``module`` itself (a network already, such as a converted copy of that child)."""
        return module.get_submodule(self.target) if self.target and isinstance(module, LightningModule) else module

    def map(self, fn: Callable[[Any], Any]) -> ForwardCall:
        """The same call with ``fn`` applied to each argument (positional and keyword)."""
        return ForwardCall(tuple(fn(v) for v in self.args), {k: fn(v) for k, v in self.kwargs.items()}, self.target)

    def to(self, device: torch.device | str) -> ForwardCall:
        return ForwardCall(move_data_to_device(self.args, device), move_data_to_device(self.kwargs, device), self.target)

    def first_tensor(self) -> Tensor | None:
        """The first tensor of the call (positional arguments first, nested containers searched in order),
        e.g. for an export's example input."""
        from lightning_compress.measure import first_tensor

        return first_tensor(self.args, self.kwargs)

    def sliced(self, n: int) -> ForwardCall:
        """The same call on the first ``n`` samples (tensors sliced along their first dimension)."""

        def cut(v: Any) -> Any:
            if isinstance(v, Tensor) and v.dim() > 0:
                return v[:n]
            if isinstance(v, (list, tuple)):
                return type(v)(cut(x) for x in v)
            if isinstance(v, Mapping):
                return {k: cut(x) for k, x in v.items()}
            return v

        return ForwardCall(cut(self.args), cut(self.kwargs), self.target)


#: Keys of a batch that hold labels or sample indices, not model inputs.
TARGET_KEYS = ("y", "label", "labels", "target", "targets")
INDEX_KEYS = ("index", "idx", "indices")
LABEL_KEYS = TARGET_KEYS + INDEX_KEYS


#: Batch indices :func:`forward_call` tries when ``training_step`` skips one (returns ``None`` without the model);
#: a pass over training batches stops after this many times the batches it wants, however many ran.
SKIP_TRIES = 8


class _Stop(Exception):
    """Raised by the forward hooks to end a ``training_step`` once its forward has run."""


class _StepBatches:
    """Several training loaders as ``training_step`` receives their batches: combined as the fit loop combines
    them (its ``CombinedLoader`` mode), each yielded without the loop's batch and loader indices."""

    def __init__(self, loaders: Any, mode: str) -> None:
        from lightning.pytorch.utilities import CombinedLoader

        self.combined = loaders if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders, mode)

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch, _, _ in self.combined)

    def __len__(self) -> int:
        with random_state_kept(self):  # a CombinedLoader knows its length once iterated, which seeds its samplers
            iter(self.combined)
        return len(self.combined)


def train_loader(trainer: Trainer, pl_module: LightningModule) -> Iterable[Any] | None:
    """The training batches of this fit as ``training_step`` receives them, or ``None`` when there are none.

    In ``setup`` the trainer has not built its loader yet (``trainer.train_dataloader`` is ``None``);
    this asks the same source the fit loop will: the datamodule, the loaders passed to ``fit``, or
    the module's ``train_dataloader()``. Several loaders (a dict or list of them, a ``CombinedLoader``) are
    combined as the fit loop combines them.
    """
    from lightning.pytorch.utilities import CombinedLoader

    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        with random_state_kept():  # a train_dataloader() that draws (a random subset) leaves the fit's draws alone
            loader = source.dataloader() if source is not None and source.is_defined() else None
    if isinstance(loader, (CombinedLoader, Mapping, list, tuple)):
        combined = getattr(getattr(trainer, "fit_loop", None), "_combined_loader", None)
        return _StepBatches(loader, getattr(combined, "_mode", "max_size_cycle"))
    return loader


def _data_loaders(loader: Any) -> list[torch.utils.data.DataLoader]:
    """The ``DataLoader``s behind ``loader`` (one, or those several training loaders are combined from)."""
    if isinstance(loader, _StepBatches):
        return [x for x in loader.combined.flattened if isinstance(x, torch.utils.data.DataLoader)]
    return [loader] if isinstance(loader, torch.utils.data.DataLoader) else []


def _loader_generators(loader: torch.utils.data.DataLoader) -> list[torch.Generator]:
    """The generators a ``DataLoader`` draws from besides the global ones: its own (worker seeds), its sampler's, its
    batch sampler's and that one's sampler's (the order; ``DataLoader(shuffle=True, generator=g)`` hands ``g`` to them)."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for holder in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


@contextlib.contextmanager
def _loaders_kept(loader: Any) -> Iterator[None]:
    """Iterate ``loader`` in the body and leave it as the fit loop left it: its own generators put back, and a
    ``persistent_workers`` loader's one iterator (the fit loop's: iterating the loader again resets and reads that
    one) set aside for a temporary one, shut down afterwards."""
    loaders = _data_loaders(loader)
    states = [(g, g.get_state()) for x in loaders for g in _loader_generators(x)]
    persistent = [(x, x._iterator) for x in loaders if getattr(x, "persistent_workers", False)]
    # what a resumable loader checkpoints is the fit's iteration, not this one's
    counts = [(x, {k: x.__dict__[k] for k in ResumableLoader.STATE if k in x.__dict__}) for x in loaders if isinstance(x, ResumableLoader)]
    shared = [(p, vars(p).copy()) for x, _ in counts if (p := x.progress) is not None]  # its data module's record of it
    for x, _ in persistent:
        x._iterator = None
    try:
        yield
    finally:
        for x, kept in counts:
            for k in ResumableLoader.STATE:
                if k in kept:
                    x.__dict__[k] = kept[k]
                else:
                    x.__dict__.pop(k, None)
        for progress, kept in shared:
            vars(progress).update(kept)
        for x, fits in persistent:
            ours, x._iterator = x._iterator, fits
            if ours is not None and ours is not fits and hasattr(ours, "_shutdown_workers"):
                ours._shutdown_workers()
        for g, state in states:
            g.set_state(state)


@contextlib.contextmanager
def random_state_kept(loader: Any = None) -> Iterator[None]:
    """Run the body with the random generators (torch's on the CPU and on CUDA, ``random``'s, numpy's) put
    back afterwards: drawing training batches outside the loop (a shuffled loader seeds its sampler from
    torch's generator) then leaves the fit's data order as it would be without the plugin. Given the ``loader``
    the body iterates, its own generators and a persistent-workers iterator are kept too (:func:`_loaders_kept`)."""
    state = random_state()  # this process's CUDA device only: reading every GPU's would open a context on each
    try:
        with _loaders_kept(loader):
            yield
    finally:
        set_random_state(state)


def module_setup_hint(pl_module: LightningModule, err: BaseException) -> str:
    """For a missing attribute or name met running the module's data or step in a plugin: the module's own
    ``setup``, when it has one, may be what builds it, and Lightning calls it after the callbacks' ``setup``."""
    if type(pl_module).setup is LightningModule.setup or not isinstance(err, (AttributeError, NameError)):
        return ""
    return (
        f". If {type(pl_module).__name__}.setup() builds it: Lightning calls that after the callbacks' setup, where the "
        "plugins read a batch, so a dataset or tensor built there is not there yet; build it in __init__ or "
        "prepare_data, or in a LightningDataModule (whose setup runs first)"
    )


def _one_pass(loader: Any) -> bool:
    """Whether ``loader`` reads an iterable dataset whose ``__iter__`` hands out one iterator (a stream read once)."""
    dataset = getattr(loader, "dataset", None)
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        return False
    try:
        with random_state_kept():  # an __iter__ that shuffles draws from the generators
            first = iter(dataset)
            # one iterator handed out each time, other than the dataset itself (one that resets in __iter__ and
            # returns self is read again); a generator function's fresh generators run nothing until read
            return first is iter(dataset) and first is not dataset
    except Exception:  # noqa: BLE001 - a dataset that cannot be iterated here fails where the loader reads it
        return False


def first_batch(trainer: Trainer, pl_module: LightningModule, who: str) -> Any:
    """One training batch, or a ``ValueError`` naming ``who`` needs it and why it could not be read."""
    try:
        loader = train_loader(trainer, pl_module)
    except Exception as err:  # noqa: BLE001 - the module's train_dataloader() failed: say where and why
        hint = module_setup_hint(pl_module, err) or "; set example_input_array on the LightningModule"
        raise ValueError(f"{who} needs a training batch, and the fit's train_dataloader() failed ({type(err).__name__}: "
                         f"{err}){hint}") from err
    if loader is None:
        raise ValueError(
            f"{who} needs a training batch, but this fit has no training data (no datamodule, no loaders "
            "passed to fit, no train_dataloader()); set example_input_array on the LightningModule"
        )
    if _one_pass(loader):
        raise ValueError(
            f"{who} needs a training batch, but the training data is a one-pass stream (its dataset's __iter__ returns "
            "the same iterator each time), so a batch read here would be lost to training; set example_input_array on "
            "the LightningModule, or return a new iterator from __iter__"
        )
    try:
        with random_state_kept(loader):
            return next(iter(loader))
    except StopIteration:
        raise ValueError(f"{who} needs a training batch, but the training dataloader is empty") from None


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_module_device(pl_module: LightningModule, batch: Any) -> Any:
    """``batch`` prepared as the loop prepares it: the precision plugin's input conversion
    (``bf16-true`` casts floating tensors to bfloat16), then the module's own hooks
    (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``) to its device."""
    batch = pl_module._on_before_batch_transfer(_precision_input(pl_module, batch), dataloader_idx=0)
    return pl_module._apply_batch_transfer_handler(batch, _device_of(pl_module))


def _precision_input(pl_module: LightningModule, value: Any) -> Any:
    """``value`` through the precision plugin's input conversion, where the module computes in that dtype."""
    plugin = getattr(getattr(pl_module, "_trainer", None), "precision_plugin", None)
    return value if plugin is None else _converted_like_module(pl_module, value, plugin.convert_input(value))


def _converted_like_module(pl_module: LightningModule, batch: Any, converted: Any) -> Any:
    """``converted`` where the module computes in its floating dtype, else ``batch``: in ``setup`` the
    precision plugin has not converted the module yet, so a batch cast there would not fit it."""
    dtype = floating_dtype(pl_module)
    cast = {t.dtype for t in torch.utils._pytree.tree_leaves(converted) if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return converted if dtype is None or not cast or cast == {dtype} else batch


@contextlib.contextmanager
def _muted_logging(pl_module: LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside (a batch run outside the loop logs nothing)."""
    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside (BatchNorm statistics and dropout untouched), each submodule's own
    train/eval mode put back after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def check_runnable(pl_module: LightningModule, who: str) -> None:
    """A ``ValueError`` naming ``who`` when the module's ``training_step`` cannot be run outside the loop
    (manual optimisation: it would update weights), with what to set instead."""
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"{who} needs to run training_step on a training batch outside the training loop, but this module uses "
            "manual optimisation (automatic_optimization=False), so its training_step would update weights. Set "
            "example_input_array on the LightningModule where only the model's input is needed (the report, channel "
            "tracing, the export example); a plugin that runs whole batches (calibration, BatchNorm re-estimation) "
            "takes batch_forward=lambda module, batch: module(...) (the call that runs one batch through the model)."
        )


def _precision_context(pl_module: LightningModule) -> Any:
    trainer = getattr(pl_module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None)
    return plugin.forward_context() if plugin is not None else contextlib.nullcontext()


def _optional_labels_dropped(pl_module: LightningModule, call: ForwardCall) -> ForwardCall:
    """``call`` without the keyword labels (``labels``, ``y``...) that the called child's ``forward`` may
    go without: what the model computes for serving, not its training loss. Whether it may is tried
    once (eval mode, no gradients). An encoder-decoder whose decoder reads the labels (a Hugging Face
    sequence-to-sequence model called without ``decoder_input_ids``: BART, T5) gets the decoder input
    they stand for instead, ``decoder_input_ids``, made by the model's own
    ``prepare_decoder_input_ids_from_labels``: without it BART would run its decoder on the shifted
    source."""
    module = pl_module.get_submodule(call.target)
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return call
    optional = {
        k for k in call.kwargs if k in LABEL_KEYS and (k not in parameters or parameters[k].default is not inspect.Parameter.empty)
    }
    if not optional:
        return call
    kwargs = {k: v for k, v in call.kwargs.items() if k not in optional}
    prepare = getattr(module, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare) and "decoder_input_ids" in parameters and "decoder_input_ids" not in call.kwargs and "labels" in optional:
        with torch.no_grad():  # (a sequence classifier has no such method: its decoder reads its own inputs)
            kwargs["decoder_input_ids"] = prepare(labels=call.kwargs["labels"])
    dropped = ForwardCall(call.args, kwargs, call.target)
    try:  # a model drawing in eval mode too (a VAE's sampling) leaves the fit's draws alone
        with eval_mode(pl_module), torch.no_grad(), _precision_context(pl_module), random_state_kept():
            dropped(module)
    except Exception:  # noqa: BLE001 - the model needs them: the call keeps its labels
        return call
    return dropped


def forward_call(pl_module: LightningModule, batch: Any, who: str) -> ForwardCall:
    """How the module's ``training_step`` runs its model on ``batch``: the arguments it passes to the
    module's own ``forward``; for a step that does not call ``self(...)`` (it calls
    ``self.model(**batch)``, whether or not the module defines a ``forward`` of its own), those it passes
    to the child with the most trainable parameters among those it calls (``target`` names it; a loss or
    a metric module has none, and a frozen ``teacher`` is not looked at). Keyword labels the child may go
    without are left out.

    Runs ``training_step(batch, 0)`` under ``no_grad``, with logging muted and the module in ``eval``
    mode (restored after), up to the module's ``forward`` call or the first call of its largest child,
    which is recorded and not run (else to the step's end).

    Raises:
        ValueError: the step calls neither the module's ``forward`` nor a child with parameters, or fails
            on the batch (the message names ``who`` and the fix: ``example_input_array``).
    """
    from lightning_compress.selection import trained_children

    check_runnable(pl_module, who)
    seen: list[ForwardCall] = []
    # the children the step may call instead of self(...): the first call of the one with the most trainable
    # parameters is the model's; frozen ones (a fine-tuned head's backbone) are recorded too, to be named as left out
    size = trained_children(pl_module)
    # a module with a forward of its own may call a child before self(...): its children are run, not stopped at
    own_forward = type(pl_module).forward is not LightningModule.forward
    largest = max((name for name, n in size.items() if n[0]), key=size.__getitem__, default="")

    def record(target: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(ForwardCall(tuple(args), dict(kwargs), target))
            if target == "" or (target == largest and not own_forward):
                raise _Stop

        return hook

    # on an FSDP2 unit, first among the pre-hooks: stopped before the unit gathers its weights (stopped after, a root
    # unit would keep them gathered with no way to reshard); elsewhere after the module's own pre-hooks, so the call is
    # what its forward receives (a channel trace of forward runs no pre-hook)
    def watch(module: torch.nn.Module, target: str) -> Any:
        return module.register_forward_pre_hook(record(target), with_kwargs=True, prepend=is_fsdp_unit(module))

    handles = [watch(pl_module, "")] + [watch(pl_module.get_submodule(name), name) for name in size]
    skipped = 0
    try:  # eval: children called before the model leave BatchNorm statistics and random state alone
        with eval_mode(pl_module), torch.no_grad(), _muted_logging(pl_module), _precision_context(pl_module), random_state_kept():
            # a step may skip some batch indices (returning None before its forward): the next index is tried
            for batch_idx in range(SKIP_TRIES):
                if pl_module.training_step(batch, batch_idx) is not None or seen:
                    break
                skipped += 1
    except _Stop:
        pass
    except Exception as err:  # noqa: BLE001 - any failure here means: the user must name the input
        raise ValueError(
            f"{who} needs the model's input, and running training_step on one training batch to find it failed "
            f"({type(err).__name__}: {err}){module_setup_hint(pl_module, err)}. Set example_input_array on the LightningModule."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    own = [call for call in seen if not call.target]
    if own:
        return own[0]
    if not seen:
        if skipped == SKIP_TRIES:
            raise ValueError(
                f"{who} needs the model's input, but training_step returned None without calling the model for "
                f"batch_idx 0 to {SKIP_TRIES - 1} of a training batch (it skipped them), so it cannot be found from a "
                "batch. Set example_input_array on the LightningModule."
            )
        raise ValueError(
            f"{who} needs the model's input, but training_step calls neither the module's own forward (self(...)) "
            "nor a child module with parameters, so it cannot be found from a batch. Set example_input_array on the "
            "LightningModule."
        )
    call = max(seen, key=lambda c: size[c.target])  # the first call of the largest child called
    found = _optional_labels_dropped(pl_module, call)
    inside = {id(m) for m in pl_module.get_submodule(call.target).modules()}  # an alias of a part of the target is it
    found.others = tuple(sorted({c.target for c in seen if id(pl_module.get_submodule(c.target)) not in inside}))
    return found


def example_call(trainer: Trainer, pl_module: LightningModule, who: str) -> ForwardCall:
    """How to call the module's ``forward`` on a real input, on the module's device.

    ``example_input_array`` when set (a tensor, a tuple of positional arguments or a dict of keyword
    arguments, as Lightning reads it; through the precision plugin's input conversion, as a batch),
    else the call found in one training batch by :func:`forward_call`.
    """
    example = getattr(pl_module, "example_input_array", None)
    if example is not None:
        example = _precision_input(pl_module, example)
        if isinstance(example, Mapping):
            call = ForwardCall((), dict(example))
        elif isinstance(example, tuple):
            call = ForwardCall(example, {})
        else:
            call = ForwardCall((example,), {})
        return call.to(_device_of(pl_module))
    batch = to_module_device(pl_module, first_batch(trainer, pl_module, who))
    return forward_call(pl_module, batch, who)


def run_batch(pl_module: LightningModule, batch: Any, batch_forward: BatchForward | None = None, batch_idx: int = 0) -> bool:
    """Run one (device-placed) batch through the module without training; whether the model ran.

    With ``batch_forward``, that function is called (and the model counts as run). Otherwise
    ``training_step(batch, batch_idx)`` runs under ``no_grad`` with logging muted and stops as soon as
    the module's own ``forward`` has returned (no loss, no metrics); a step that never calls ``forward``
    runs to its end, and counts as run unless it returns ``None`` (a skipped batch, as the training loop
    reads it). Train/eval mode is the caller's choice and is left as it is.
    """
    if batch_forward is not None:
        with torch.no_grad(), _precision_context(pl_module):
            batch_forward(pl_module, batch)
        return True

    def stop(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise _Stop

    handle = pl_module.register_forward_hook(stop)
    try:
        with torch.no_grad(), _muted_logging(pl_module), _precision_context(pl_module):
            return pl_module.training_step(batch, batch_idx) is not None
    except _Stop:
        return True
    finally:
        handle.remove()


def check_batches_runnable(
    trainer: Trainer, pl_module: LightningModule, who: str, batch_forward: BatchForward | None = None
) -> None:
    """Fail now (in ``setup``) rather than after training if batches cannot be run outside the step.

    Runs one training batch the way :func:`run_batch` will, on a model that has not been changed yet,
    in eval mode (BatchNorm statistics and dropout untouched).
    """
    if batch_forward is None:
        check_runnable(pl_module, who)
    batch = to_module_device(pl_module, first_batch(trainer, pl_module, who))
    try:
        with eval_mode(pl_module), random_state_kept():  # a step drawing random numbers leaves the fit's draws alone
            run_batch(pl_module, batch, batch_forward)
    except Exception as err:  # noqa: BLE001 - say which plugin needs what, before training runs
        fix = "check batch_forward" if batch_forward is not None else "pass batch_forward=lambda module, batch: ..."
        raise ValueError(
            f"{who} runs training batches outside the training step and one training batch failed there "
            f"({type(err).__name__}: {err}){module_setup_hint(pl_module, err)}; {fix}"
        ) from err


def run_training_batches(pl_module: LightningModule, count: int, batch_forward: BatchForward | None = None) -> int | None:
    """Run up to ``count`` training batches through the module as :func:`run_batch` does, in eval mode
    (:func:`eval_mode`) and with the attention fast path off
    (:func:`~lightning_compress.measure.fast_paths_off`): the fused kernels of ``nn.MultiheadAttention``
    and the transformer encoder layers read their sub-layers' weights themselves, so hooks on those
    layers (a criterion collecting their inputs) would see nothing.

    Returns the number of batches run, or ``None`` when training batches cannot be run here: no Trainer,
    no training data, or manual optimisation without ``batch_forward`` (its step would update weights).
    """
    trainer = getattr(pl_module, "_trainer", None)
    loader = train_loader(trainer, pl_module) if trainer is not None else None
    if loader is None or (batch_forward is None and not getattr(pl_module, "automatic_optimization", False)):
        return None
    with eval_mode(pl_module), fast_paths_off(), random_state_kept(loader):
        return run_batches(pl_module, loader, count, batch_forward)


def run_batches(pl_module: LightningModule, batches: Iterable[Any], count: int, batch_forward: BatchForward | None = None) -> int:
    """Run ``batches`` (as the loader yields them: each is prepared by :func:`to_module_device` when its
    turn comes) through :func:`run_batch`, each with its index, until ``count`` of them ran; returns how
    many ran. Batches the step skips do not count, and the pass ends after ``count * SKIP_TRIES`` of
    them whatever ran (a step that skips every batch, an endless loader). Modes are the caller's."""
    seen, key = 0, token_mask.mask_key_of(pl_module)
    for batch_idx, batch in enumerate(batches):
        if seen >= count or batch_idx >= count * SKIP_TRIES:
            break
        batch = to_module_device(pl_module, batch)
        with token_mask.counting_tokens(token_mask.batch_mask(batch, key)):  # padded positions add to no statistic
            seen += run_batch(pl_module, batch, batch_forward, batch_idx)
    return seen
