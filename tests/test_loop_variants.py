"""The plugins under training loops their own examples do not use: a callback passed to a new model, accuracy
guards with no validation before compression starts, fits stopped before the schedule acts, evaluations from
files without the callback's state, and standalone validation before fit."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassifierModule, CompressionReport, DistillationModule, PruningCallback, QuantizeCallback
from lightning_compress.models import MLP
from lightning_compress.quantization import fake_quant_layers

_X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
_Y = _X[:, :4].argmax(1)


def _loader(x: torch.Tensor = _X, y: torch.Tensor = _Y, batch_size: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _module(seed: int = 0, hidden: int = 16) -> ClassifierModule:
    seed_everything(seed)
    return ClassifierModule(MLP(16, (hidden,), 4), num_classes=4)


def _fit(tmp_path, module, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", 2)
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kwargs))
    trainer.fit(module, _loader(), _loader())
    return trainer


def _messages(caught: list[warnings.WarningMessage], word: str) -> list[str]:
    return [str(w.message) for w in caught if word in str(w.message)]


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        trainer.should_stop = True


# --------------------------------------------------------------------------- one callback, several models
def test_a_pruning_callback_passed_to_a_new_model_prunes_it(tmp_path) -> None:
    """A loop over seeds that builds a new model and passes the same callback: each model is pruned, and the
    callback reports the model it pruned last (it kept saying 50% of a dense second model before)."""
    prune = PruningCallback(target_sparsity=0.5, schedule="one_shot", verbose=False)
    for seed in (0, 1):
        module = _module(seed)
        _fit(tmp_path, module, [prune])
        weights = [module.model.net[1].weight, module.model.net[3].weight]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(0.5, abs=0.01) and prune.sparsity == pytest.approx(zeros, abs=1e-6), seed
        assert len(prune.compression_summary()["history"]) == 1  # this model's record only


def test_a_pruning_callback_kept_enforcing_moves_to_the_new_model(tmp_path) -> None:
    """make_permanent=False keeps masks between fits of one model; a new model gets its own (the old masks held the
    first model's parameters, whose names the second shares)."""
    prune = PruningCallback(target_sparsity=0.5, schedule="one_shot", make_permanent=False, verbose=False)
    first = _module(0)
    _fit(tmp_path, first, [prune])
    second = _module(1)
    _fit(tmp_path, second, [prune])
    masks = prune.masks
    assert masks["model.net.1.weight"].shape == second.model.net[1].weight.shape
    assert torch.equal(second.model.net[1].weight != 0, masks["model.net.1.weight"])
    assert prune.state_dict()["masks"] is not None  # the state saved is the second model's


def _zeros(module: ClassifierModule) -> float:
    weights = [module.model.net[1].weight, module.model.net[3].weight]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("test_between", [False, True])
def test_a_finished_run_lets_a_later_fit_train_freely_after_an_evaluation_from_a_checkpoint(tmp_path, test_between: bool) -> None:
    """make_permanent=True (the default): a later, shorter fit trains the pruned weights freely. A
    trainer.test(ckpt_path=...) in between restored the checkpoint's run as unfinished: the later fit was refused
    (end_epoch=3 past max_epochs=2) or masked again."""
    prune = PruningCallback(target_sparsity=0.75, schedule="linear", start_epoch=1, end_epoch=3, verbose=False)
    module = _module()
    trainer = _fit(tmp_path, module, [prune, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)],
                   max_epochs=4, enable_checkpointing=True)
    assert _zeros(module) == pytest.approx(0.75, abs=0.01)
    if test_between:
        trainer.test(module, _loader(), ckpt_path="last", verbose=False)
    _fit(tmp_path, module, [prune], max_epochs=2)
    assert _zeros(module) < 0.05  # the zeros trained back: nothing masked them


def test_a_run_that_reached_its_target_keeps_its_masks_in_a_shorter_later_fit(tmp_path) -> None:
    """make_permanent=False: a 2-epoch fine-tune after a run that reached its target at epoch 3 was refused
    ("end_epoch=3 is past max_epochs=2: the target would never be reached"); its masks now hold through it."""
    prune = PruningCallback(target_sparsity=0.75, schedule="linear", start_epoch=1, end_epoch=3, make_permanent=False, verbose=False)
    module = _module()
    _fit(tmp_path, module, [prune], max_epochs=4)
    masks = {k: v.clone() for k, v in prune.masks.items()}
    _fit(tmp_path, module, [prune], max_epochs=2)
    assert _zeros(module) == pytest.approx(0.75, abs=0.01)
    assert all(torch.equal(masks[k], v) for k, v in prune.masks.items())


def test_a_reused_quantize_callback_checks_the_later_fit_as_a_new_one_is(tmp_path) -> None:
    """A QuantizeCallback of an earlier fit skipped every setup check in a later one: a fit too short for its
    start_epoch trained in float and was only warned about after training."""
    quant = QuantizeCallback(start_epoch=3, latency="none")
    module = _module()
    _fit(tmp_path, module, [quant], max_epochs=4)
    with pytest.raises(ValueError, match=r"start_epoch=3 is not before max_epochs=2"):
        _fit(tmp_path, module, [quant], max_epochs=2)


def test_a_quantize_callback_passed_to_a_new_model_quantises_it(tmp_path) -> None:
    """The second model is prepared and converted (it trained in float, then conversion failed, before)."""
    quant = QuantizeCallback(weight_bits=4, latency="none")
    for seed in (0, 1):
        module = _module(seed)
        _fit(tmp_path, module, [quant])
        assert len(fake_quant_layers(module)) == 2, seed
        assert quant.quantized_model is not None and quant.compression_state()["weight_bits"] == 4.0


class NoisyStep(ClassifierModule):
    """A step that augments its inputs with random noise: it draws from torch's generator."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return super().training_step((x + 0.1 * torch.randn_like(x), y), batch_idx)


@pytest.mark.parametrize("plugin", ["channel", "ptq"])
def test_a_step_drawing_random_numbers_trains_the_dense_epoch_as_without_the_plugin(tmp_path, plugin: str) -> None:
    """The plugins run training_step in setup (to find the input, to check batches run outside the loop); its
    draws moved the noise every later step drew, so the dense epoch trained differently with the plugin."""
    def dense_epoch(callbacks: list[Callback]) -> dict[str, torch.Tensor]:
        seed_everything(0)
        module = NoisyStep(MLP(16, (16,), 4), num_classes=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(tmp_path, module, [*callbacks, StopAfterFirstEpoch()])
        return module.model.state_dict()

    made = {"channel": lambda: PruningCallback(0.5, structure="channel", start_epoch=1, verbose=False),
            "ptq": lambda: QuantizeCallback(method="ptq", start_epoch=1, latency="none")}[plugin]
    plain, with_plugin = dense_epoch([]), dense_epoch([made()])
    assert all(torch.equal(plain[k], with_plugin[k]) for k in plain)


class _Stream(torch.utils.data.IterableDataset):
    """Data read once (a socket, a queue): ``__iter__`` hands out the same iterator."""

    def __init__(self) -> None:
        self._samples = iter(list(zip(_X, _Y)))

    def __iter__(self) -> Any:
        return self._samples


class _Rewinding(torch.utils.data.IterableDataset):
    """Read again each time: ``__iter__`` rewinds and returns the dataset itself."""

    def __init__(self) -> None:
        self._samples, self._at = list(zip(_X, _Y)), 0

    def __iter__(self) -> Any:
        self._at = 0
        return self

    def __next__(self) -> Any:
        if self._at == len(self._samples):
            raise StopIteration
        self._at += 1
        return self._samples[self._at - 1]


def test_a_dataset_that_rewinds_and_returns_itself_is_not_a_one_pass_stream(tmp_path) -> None:
    quant = QuantizeCallback(method="ptq", start_epoch=1, latency="none")
    module = _module()
    trainer = Trainer(max_epochs=2, callbacks=[quant], **trainer_kwargs(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(_Rewinding(), batch_size=32))
    assert quant.quantized_model is not None and trainer.global_step == 8


def test_a_one_pass_stream_loses_no_batch_to_setup(tmp_path) -> None:
    """DistillationModule's setup read the stream's first batch, which training then never saw (7 of 8 steps); a
    plugin that needs a batch in setup now says why it cannot read one."""
    seed_everything(0)
    module = DistillationModule(MLP(16, (8,), 4), MLP(16, (16,), 4), num_classes=4)
    trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_val_batches=0))
    trainer.fit(module, torch.utils.data.DataLoader(_Stream(), batch_size=32))
    assert trainer.global_step == 8
    prune = PruningCallback(0.5, structure="channel", start_epoch=1, verbose=False)
    with pytest.raises(ValueError, match=r"training data is a one-pass stream .* set example_input_array"):
        Trainer(max_epochs=2, callbacks=[prune], **trainer_kwargs(tmp_path)).fit(_module(), torch.utils.data.DataLoader(_Stream(), batch_size=32))


class _WarningsAtFirstStep(Callback):
    """The warnings issued before the first training step."""

    def __init__(self, caught: list) -> None:
        self.caught = caught
        self.before: list[str] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            self.before = [str(w.message) for w in self.caught]


def test_a_schedule_max_steps_cannot_reach_is_said_before_training(tmp_path) -> None:
    """max_epochs=2 refuses end_epoch=3 in setup; max_steps=16 (2 epochs of 8 batches) said nothing until training
    had ended. The epoch length is known when training starts: both plugins warn then."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _WarningsAtFirstStep(caught)
        callbacks = [PruningCallback(0.75, schedule="cubic", start_epoch=1, end_epoch=3, verbose=False),
                     QuantizeCallback(weight_bits={0: 8, 3: 4}, latency="none"), first]
        _fit(tmp_path, _module(), callbacks, max_epochs=None, max_steps=16)
    assert any("PruningCallback: max_steps=16 ends training at epoch 2, before the schedule's end at epoch 3" in m for m in first.before)
    assert any("QuantizeCallback: max_steps=16 ends training at epoch 2, before the weight_bits schedule epochs [3.0]" in m for m in first.before)
    kept = PruningCallback(0.5, schedule="linear", start_epoch=1, end_epoch=3, make_permanent=False, verbose=False)
    module = _module()
    _fit(tmp_path, module, [kept], max_epochs=4)
    with warnings.catch_warnings(record=True) as caught:  # a run at its target: nothing left to reach
        warnings.simplefilter("always")
        _fit(tmp_path, module, [kept], max_epochs=None, max_steps=4)
    assert not _messages(caught, "will not be reached")
    # one_shot changes the masks at start_epoch only: its default end_epoch (75% of the epochs) is no later step
    one_shot = PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, _module(), [one_shot], max_epochs=10, max_steps=12)
    assert not _messages(caught, "will not be reached")
    assert one_shot.sparsity == pytest.approx(0.5, abs=0.01)


def test_a_fit_stopped_before_a_bits_milestone_says_the_width_it_converts_at(tmp_path) -> None:
    """An early stop before weight_bits={0: 8, 1: 4} reached 4 bits converted at 8 bits without a word."""
    quant = QuantizeCallback(weight_bits={0: 8, 1: 4}, latency="none")
    with pytest.warns(UserWarning, match=r"before the weight_bits schedule reached 4 bits; the model is converted at the 8 bits"):
        _fit(tmp_path, _module(), [quant, StopAfterFirstEpoch()], max_epochs=3)
    assert {v["bits"] for v in quant.quantized_model.quantization_spec.values()} == {8}


# --------------------------------------------------------------------------- guards with no validation first
def test_pruning_guard_takes_the_first_validation_when_pruning_began_before_any(tmp_path) -> None:
    """Pruning from the first step, validated only after it: the guard's baseline is that first validation
    (each validation was compared with itself before, so the guard could never trip), and a warning says so."""
    prune = PruningCallback(
        target_sparsity=0.97, schedule="linear", start_epoch=0, end_epoch=3, update_every_n_steps=2,
        monitor="val_acc", max_drop=0.0, verbose=False,
    )  # fmt: skip
    module = _module(hidden=32)
    _fit(tmp_path, module, [], max_epochs=6)  # trained first: pruning 97% of it costs accuracy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, module, [prune], max_epochs=4)
    said = _messages(caught, "no validation ran before pruning began")
    assert len(said) == 1 and "val_acc=" in said[0]
    guard = prune.compression_summary()["guard"]
    assert guard["events"], "sparsity rising to 97% lowers val_acc below the first validation's: the guard trips"
    assert prune.sparsity < 0.97


def test_quantize_guard_takes_the_first_validation_when_none_ran_at_the_first_width(tmp_path) -> None:
    """The width drops before the first validation: that validation is the baseline (the guard ignored every
    validation before), with a warning."""
    quant = QuantizeCallback(weight_bits={0: 8, 1: 4, 2: 2}, monitor="val_acc", max_drop=0.0, latency="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, _module(), [quant], max_epochs=3, check_val_every_n_epoch=2)
    said = _messages(caught, "no validation ran at the schedule's first width")
    assert len(said) == 1 and "at 4-bit weights" in said[0]
    assert quant._guard.reference is not None and quant._guard.history[0].get("baseline") is True


# --------------------------------------------------------------------------- stopped before the schedule acts
@pytest.mark.parametrize("stop", ["max_steps", "callback"])
def test_pruning_stopped_before_it_began_says_so(tmp_path, stop: str) -> None:
    prune = PruningCallback(target_sparsity=0.8, schedule="one_shot", start_epoch=2, verbose=False)
    extra: dict[str, Any] = {"max_epochs": -1, "max_steps": 8} if stop == "max_steps" else {"max_epochs": 4}
    callbacks = [prune] + ([StopAfterFirstEpoch()] if stop == "callback" else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, _module(), callbacks, **extra)
    said = _messages(caught, "before its first pruning step")  # not "began at epoch <start_epoch>": a ramp starts later
    assert prune.sparsity == 0.0 and len(said) == 1, _messages(caught, "PruningCallback")


def test_ptq_stopped_before_its_calibration_warns_and_leaves_the_float_model(tmp_path) -> None:
    """The fit ended before the float epochs did: no crash that blamed missing batches; the model is float."""
    quant = QuantizeCallback(method="ptq", start_epoch=2, latency="none")
    module = _module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, module, [quant, StopAfterFirstEpoch()], max_epochs=4)
    assert len(_messages(caught, "before PTQ's calibration")) == 1
    assert quant.quantized_model is None and not fake_quant_layers(module)
    assert any("before PTQ's calibration" in note for note in quant.compression_summary()["notes"])


def test_ptq_cut_short_in_its_last_float_epoch_calibrates_with_a_warning(tmp_path) -> None:
    quant = QuantizeCallback(method="ptq", start_epoch=2, latency="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, _module(), [quant], max_epochs=-1, max_steps=10)  # 8 batches an epoch: 1.25 epochs
    assert len(_messages(caught, "PTQ calibrates the model as trained so far")) == 1
    assert quant.quantized_model is not None


# --------------------------------------------------------------------------- evaluation from files
def test_evaluating_a_weights_only_checkpoint_says_it_is_float(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True, save_last=True)
    module = _module()
    _fit(tmp_path, module, [QuantizeCallback(weight_bits=4, latency="none", convert_on_fit_end=False), ckpt],
         max_epochs=1, enable_checkpointing=True)  # fmt: skip
    trainer = Trainer(callbacks=[QuantizeCallback(weight_bits=4, latency="none")], **trainer_kwargs(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    said = _messages(caught, "holds no QuantizeCallback state")
    assert len(said) == 1 and "trainer.validate runs the model in float" in said[0]


# --------------------------------------------------------------------------- distillation
def test_a_validate_before_fit_does_not_fix_the_teachers_accuracy(tmp_path) -> None:
    """The teacher is measured at the first validation of the fit too: a standalone validate on other data
    before fit used to stand for the whole fit (teacher_val_acc not logged, the report's baseline wrong)."""
    seed_everything(0)
    module = DistillationModule(MLP(16, (8,), 4), MLP(16, (32,), 4), num_classes=4)
    other = _loader(_X[:64], torch.zeros(64, dtype=torch.long))
    report = CompressionReport(print_table=False, plot=False)
    trainer = Trainer(max_epochs=1, callbacks=[report], **trainer_kwargs(tmp_path))
    trainer.validate(module, other, verbose=False)
    on_other = module.teacher_val_accuracy
    trainer.fit(module, _loader(), _loader(_X[:64], _Y[:64]))
    with torch.no_grad():
        real = float((module.teacher(_X[:64]).argmax(1) == _Y[:64]).float().mean())
    assert "teacher_val_acc" in trainer.callback_metrics
    assert module.teacher_val_accuracy == pytest.approx(real) and real != pytest.approx(on_other)
    saved = json.loads((tmp_path / "compression_report.json").read_text())
    assert saved["baseline"]["metrics"]["val_acc"] == pytest.approx(real)


def test_a_distillation_schedule_past_fast_dev_run_names_it(tmp_path) -> None:
    module = DistillationModule(MLP(16, (8,), 4), MLP(16, (32,), 4), num_classes=4, temperature={0: 8.0, 5: 4.0})
    trainer = Trainer(fast_dev_run=True, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"temperature: .*max_epochs=1.*fast_dev_run=True runs one epoch"):
        trainer.fit(module, _loader(), _loader())


@pytest.mark.parametrize("copy_how", ["deepcopy", "pickle"])
def test_a_copied_callback_still_knows_its_model(tmp_path, copy_how: str) -> None:
    """A copy of a used callback (deepcopy, or pickled as ddp_spawn sends it) kept the first model's run and
    left the next model dense; the token the model holds tells them apart."""
    import copy
    import pickle

    prune = PruningCallback(target_sparsity=0.5, schedule="one_shot", verbose=False)
    _fit(tmp_path, _module(0), [prune])
    again = copy.deepcopy(prune) if copy_how == "deepcopy" else pickle.loads(pickle.dumps(prune))
    module = _module(1)
    _fit(tmp_path, module, [again])
    weight = module.model.net[1].weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05) and again.sparsity == pytest.approx(0.5, abs=0.01)


def test_the_pruning_guard_keeps_its_baseline_after_it_trips(tmp_path) -> None:
    """After a trip back to no pruning, the next validation overwrote the baseline (and the good snapshot)."""
    prune = PruningCallback(target_sparsity=0.97, schedule="one_shot", start_epoch=1, monitor="val_acc", max_drop=0.0, verbose=False)
    module = _module(hidden=32)
    _fit(tmp_path, module, [], max_epochs=6)
    _fit(tmp_path, module, [prune], max_epochs=4)
    guard = prune.compression_summary()["guard"]
    assert len(guard["events"]) == 1 and guard["baseline"] == guard["events"][0]["baseline"]


def test_channel_removal_of_a_student_called_by_keyword(tmp_path) -> None:
    """A dict batch whose key names the student's input: the student is called as student(x=...), which the channel
    trace refused ('give the module a forward(x)'); the call is the same by position, so it is traced."""
    from torch.utils.data import Dataset

    class Named(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": _X[i], "y": _Y[i]}

    seed_everything(0)
    module = DistillationModule(MLP(16, (32,), 4), MLP(16, (64,), 4), num_classes=4)
    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    trainer = Trainer(max_epochs=2, callbacks=[prune], **trainer_kwargs(tmp_path))
    trainer.fit(module, DataLoader(Named(), batch_size=16))
    assert module.student.net[1].out_features == 16


def test_a_checkpoint_from_before_channel_removal_tests_and_resumes(tmp_path) -> None:
    """After a fit that removed channels, a checkpoint written before the removal (a best one from an earlier
    epoch) is evaluated and resumed with the same callback: its masks are restored onto the model Lightning put back
    at its earlier shapes (it failed with a bare ``KeyError``), and the resumed fit ends where the first one did."""
    module = _module(hidden=32)
    prune = PruningCallback(0.5, structure="channel", start_epoch=0, end_epoch=1, shrink=True, shrink_epoch=2, verbose=False)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = _fit(tmp_path, module, [prune, every], max_epochs=3, enable_checkpointing=True)
    assert module.model.net[1].out_features == 16 and prune.compression_state()["sparsity"] == pytest.approx(0.5)
    final = {k: v.clone() for k, v in module.state_dict().items()}
    before = str(tmp_path / "ckpt" / "epoch=1.ckpt")  # pruned to 50%, channels not removed yet

    # an evaluation Trainer's own epochs (1) are not the fit's: the schedule is neither checked against them nor replaced
    result = Trainer(callbacks=[prune], **trainer_kwargs(tmp_path, max_epochs=1)).test(module, _loader(), ckpt_path=before, verbose=False)[0]
    fresh = ClassifierModule.load_from_checkpoint(before, model=MLP(16, (32,), 4))  # that file, loaded on its own
    expected = Trainer(**trainer_kwargs(tmp_path)).test(fresh, _loader(), verbose=False)[0]
    assert result == expected and module.model.net[1].out_features == 32
    assert prune.sparsity == pytest.approx(0.5) and int((module.model.net[1].weight == 0).all(1).sum()) == 16
    module.load_state_dict(final)  # shrunk again, as the fit left it: the fit's own Trainer tests the file too
    assert trainer.test(module, _loader(), ckpt_path=before, verbose=False)[0] == expected

    resumed = Trainer(callbacks=[prune], **trainer_kwargs(tmp_path, max_epochs=3))
    resumed.fit(module, _loader(), _loader(), ckpt_path=before)
    assert module.model.net[1].out_features == 16
    assert all(torch.equal(v, final[k]) for k, v in module.state_dict().items())


class _UnusedBranch(torch.nn.Module):
    """A branch the data never takes: its weights get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.unused if x.shape[1] != 16 else self.used)(x).relu())


def test_pruned_weights_no_training_step_uses_are_named(tmp_path) -> None:
    """Weights of a branch the data never takes were ranked with the ones in use (global magnitude spent the budget on
    them: 70% reported, the weights the model runs 1% sparse) and nothing said so. Named after the first epoch; a model
    that uses every weight hears nothing."""
    prune = PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seed_everything(0)
        _fit(tmp_path, ClassifierModule(_UnusedBranch(), num_classes=4), [prune])
    (note,) = _messages(caught, "computed a gradient")
    assert "for 1 of the pruned weights (['model.unused.weight'] (1 in all); 44.4% of the selected entries)" in note
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, _module(), [PruningCallback(0.5, schedule="one_shot", start_epoch=1, verbose=False)])
    assert not _messages(caught, "computed a gradient")


class _RawOptimizer(ClassifierModule):
    """Manual optimisation stepping the optimizer Lightning wraps, unwrapped: ``global_step`` stays 0."""

    def __init__(self) -> None:
        super().__init__(MLP(16, (32,), 4), num_classes=4)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        x, y = batch
        optimizer.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self(x), y))
        optimizer.step()


class _PrunedWrittenAfterBatches(Callback):
    def __init__(self, prune: PruningCallback) -> None:
        self.prune, self.revived = prune, []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        weights = dict(pl_module.named_parameters())
        self.revived.append(sum(int((weights[n][~m] != 0).sum()) for n, m in self.prune.masks.items()))


def test_a_raw_optimizer_in_manual_optimisation_keeps_the_zeros(tmp_path) -> None:
    """A module stepping an optimizer Lightning does not wrap wrote pruned weights after every batch (thousands
    non-zero in the last epoch, after a warning that said the masks were applied after every step). Said once, the
    masks then hold after every batch; the zeros are exact at the end."""
    seed_everything(0)
    module = _RawOptimizer()
    prune = PruningCallback(0.8, start_epoch=0, end_epoch=2, verbose=False)
    count = _PrunedWrittenAfterBatches(prune)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, module, [prune, count], max_epochs=3)
    (said,) = _messages(caught, "without an optimizer step Lightning saw")
    assert "a training epoch passed" in said
    assert count.revived[len(count.revived) // 3:] == [0] * (len(count.revived) - len(count.revived) // 3)
    assert prune.sparsity == pytest.approx(0.8, abs=1e-3)


def test_a_resume_with_a_new_target_goes_on_toward_it(tmp_path) -> None:
    """A finished run resumed with target_sparsity raised stayed at the old sparsity without a word (a resume within
    the schedule did take the new target). It now goes on toward the new target, and says so; a lower target keeps
    the zeros (pruned weights stay pruned)."""
    module = _module(hidden=32)
    first = PruningCallback(0.5, start_epoch=0, end_epoch=1, verbose=False)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, module, [first, every], max_epochs=2, enable_checkpointing=True)
    assert first.sparsity == pytest.approx(0.5, abs=1e-3)
    for target, expected in ((0.8, 0.8), (0.3, 0.5)):
        again = PruningCallback(target, start_epoch=0, end_epoch=1, verbose=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(callbacks=[again], **trainer_kwargs(tmp_path, max_epochs=3))
            trainer.fit(module, _loader(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
        (said,) = _messages(caught, "pruned toward")
        assert f"pruned toward 50.00% and reached 50.00%; this callback's target is {target:.2%}" in said
        assert again.sparsity == pytest.approx(expected, abs=1e-3) and f"goes on toward {expected:.2%}" in said


def test_a_resume_with_other_per_layer_targets_moves_each_layer_on(tmp_path) -> None:
    """Per-layer targets swapped on resume (80%/20% then 20%/80%): one overall ratio left the second layer at 20%.
    Each layer goes on toward its new target; the first keeps the 80% it reached."""
    module = _module(hidden=32)
    first = PruningCallback({r"net\.1": 0.8, r"net\.3": 0.2}, start_epoch=0, end_epoch=1, verbose=False)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, module, [first, every], max_epochs=2, enable_checkpointing=True)
    again = PruningCallback({r"net\.1": 0.2, r"net\.3": 0.8}, start_epoch=0, end_epoch=1, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(callbacks=[again], **trainer_kwargs(tmp_path, max_epochs=3)).fit(
            module, _loader(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    zeros = {n: float((module.model.net[i].weight == 0).float().mean()) for n, i in (("first", 1), ("second", 3))}
    assert zeros["first"] == pytest.approx(0.8, abs=0.01) and zeros["second"] == pytest.approx(0.8, abs=0.01), zeros


def test_a_checkpoint_from_before_head_removal_resumes_a_module_with_configure_model(tmp_path) -> None:
    """A module that builds its layers in configure_model (LanguageModelModule): the restored pre-removal layers are
    new parameters of the recorded shapes, which the idempotency check read as configure_model rebuilding them."""
    from lightning_compress.lm import GPTDecoder, LanguageModelModule

    def tokens(n: int) -> DataLoader:
        base = torch.randint(0, 16, (n, 1), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset((base + torch.arange(16)) % 16), batch_size=16)

    seed_everything(0)
    module = LanguageModelModule(GPTDecoder(d_model=32, n_layers=2, n_heads=4, max_len=16, attention="sdpa"))
    prune = PruningCallback(0.5, structure="heads+neurons", scope="layer", schedule="one_shot", start_epoch=1, shrink=True,
                            shrink_epoch=2, verbose=False)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    Trainer(callbacks=[prune, every], **trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True)).fit(module, tokens(64), tokens(32))
    final = {k: v.clone() for k, v in module.state_dict().items()}
    Trainer(callbacks=[prune], **trainer_kwargs(tmp_path, max_epochs=3)).fit(
        module, tokens(64), tokens(32), ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt")
    )
    assert [b.attn.n_heads for b in module.model.blocks] == [2, 2]
    assert all(torch.equal(v, final[k]) for k, v in module.state_dict().items())


class _CheckpointedMLP(ClassifierModule):
    """Its hidden layer runs under activation checkpointing in training, which reruns it inside backward."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__(MLP(16, (32,), 4), num_classes=4)
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.model.net
        if self.use_reentrant is None or not self.training:
            return net(x)
        hidden = torch.utils.checkpoint.checkpoint(net[:3], x.requires_grad_(), use_reentrant=self.use_reentrant)
        return net[3:](hidden)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_leaves_qat_as_it_is_without(tmp_path, use_reentrant: bool) -> None:
    """The rerun inside backward updated the input ranges a second time (fc ranges 4.91 against 5.36), and the
    rerun quantised with other ranges than the forward: weights differed by 0.04 from the same fit without it."""
    runs = []
    for reentrant in (None, use_reentrant):
        seed_everything(0)
        module = _CheckpointedMLP(reentrant)
        _fit(tmp_path / str(reentrant), module, [QuantizeCallback(start_epoch=0, latency="none")])
        ranges = [(l.quantizer.observer.min_val, l.quantizer.observer.max_val) for l in fake_quant_layers(module).values()]
        runs.append((module.state_dict(), ranges))
    (plain, plain_ranges), (checkpointed, checkpointed_ranges) = runs
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert all(torch.equal(a, b) for pair, other in zip(plain_ranges, checkpointed_ranges) for a, b in zip(pair, other))


class _TwoBackwardsPerStep(ClassifierModule):
    """Manual optimisation stepping its layers in two rounds: the second forward comes after the first backward."""

    def __init__(self) -> None:
        super().__init__(MLP(16, (32,), 4), num_classes=4)
        self.extra = torch.nn.Linear(16, 4)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y = batch
        for logits in (lambda: self(x), lambda: self.extra(x)):
            optimizer.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(logits(), y))
            optimizer.step()


def test_a_forward_after_a_backward_in_the_same_step_is_observed(tmp_path) -> None:
    module = _TwoBackwardsPerStep()
    _fit(tmp_path, module, [QuantizeCallback(start_epoch=0, latency="none", convert_on_fit_end=False)])
    observed = {name: bool(layer.quantizer.observer.is_initialized()) for name, layer in fake_quant_layers(module).items()}
    assert observed == {"model.net.1": True, "model.net.3": True, "extra": True}


def test_activation_checkpointing_leaves_wanda_statistics_as_they_are_without(tmp_path) -> None:
    """Backward's rerun of a checkpointed block was recorded as another training forward: its layers' inputs came
    from half as many batches (each twice) as the layers outside it."""
    from lightning_compress.pruning import Wanda

    recorded = []
    for reentrant in (None, False):
        seed_everything(0)
        wanda = Wanda(calibration_batches=4)

        class Peek(Callback):
            def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
                if trainer.current_epoch == 0:
                    recorded.append(({k: v.clone() for k, v in wanda.sq.items()}, dict(wanda.tokens)))

        _fit(tmp_path / str(reentrant), _CheckpointedMLP(reentrant), [PruningCallback(0.5, schedule="one_shot", start_epoch=1,
                                                                                      criterion=wanda, verbose=False), Peek()])
    (plain_sq, plain_tokens), (checkpointed_sq, checkpointed_tokens) = recorded
    assert checkpointed_tokens == plain_tokens == dict.fromkeys(plain_tokens, 4 * 32)
    assert all(torch.equal(plain_sq[k], checkpointed_sq[k]) for k in plain_sq)


class _ClipsItsGradients(ClassifierModule):
    """Manual optimisation with the step's own clipping between its backward and the optimizer's step."""

    def __init__(self) -> None:
        super().__init__(MLP(16, (64,), 4), num_classes=4)
        self.automatic_optimization = False
        self.applied: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y = batch
        optimizer.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self(x), y))
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="norm")
        optimizer.step()
        self.applied.append(float(torch.stack([p.grad.norm() for p in self.parameters()]).norm()))


def test_manual_clipping_sees_the_masked_gradients(tmp_path) -> None:
    """The masks applied inside optimizer.step(), after the step's clip_gradients: the norm was clipped with the
    gradients of pruned weights in it, and the applied gradients were a third of max_norm at 90% sparsity."""
    seed_everything(0)
    module = _ClipsItsGradients()
    _fit(tmp_path, module, [PruningCallback(0.9, schedule="one_shot", start_epoch=1, verbose=False)])
    after_pruning = module.applied[len(module.applied) // 2:]
    assert after_pruning and all(norm == pytest.approx(0.01, rel=1e-4) for norm in after_pruning)


class _TwoLoaders(ClassifierModule):
    """A step over a dict of training loaders (Lightning combines them: one batch of each per step)."""

    def __init__(self) -> None:
        super().__init__(MLP(16, (32,), 4), num_classes=4)
        self.seen_order: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if torch.is_grad_enabled() and self.current_epoch == 0:
            self.seen_order.append(batch["a"][0][:4].mul(1000).long().tolist())
        return sum(torch.nn.functional.cross_entropy(self(x), y) for x, y in batch.values())


def test_several_training_loaders_and_an_unchanged_data_order(tmp_path) -> None:
    """A dict of loaders passed to fit: the plugins iterated the dict's keys (PTQ ran the step on 'a' and 'b', channel
    pruning failed in setup). And drawing a batch in setup consumed the global generator, so the shuffled order of
    the epochs before compression differed from the same seed's fit without the plugin."""
    orders = []
    for plugin in ("none", "ptq", "channel"):
        seed_everything(0)
        module = _TwoLoaders()
        loaders = {"a": DataLoader(TensorDataset(_X, _Y), batch_size=32, shuffle=True), "b": _loader(batch_size=64)}
        callback = {
            "ptq": QuantizeCallback(method="ptq", start_epoch=1, calibration_batches=3, latency="none"),
            "channel": PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, verbose=False),
        }.get(plugin)
        Trainer(callbacks=[callback] if callback else [], **trainer_kwargs(tmp_path / plugin, max_epochs=2)).fit(module, loaders, _loader())
        if plugin == "ptq":
            assert all(layer.quantizer.observer.is_initialized() for layer in fake_quant_layers(module).values())
            assert callback.quantized_model is not None
        elif plugin == "channel":
            assert callback.sparsity > 0.3
        orders.append(module.seen_order)
    assert orders[0] == orders[1] == orders[2] and len(orders[0]) == 8  # the epoch before compression: the same batches


class _LayerByLayer(ClassifierModule):
    """A step that runs the network's layers itself: no self(...), no call of a child module."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        for layer in self.model.net:
            x = layer(x)
        return torch.nn.functional.cross_entropy(x, y)


def test_a_report_that_cannot_find_an_input_fails_before_training(tmp_path) -> None:
    """The report looked for its example input after the whole fit, and failed there."""
    seed_everything(0)
    module = _LayerByLayer(MLP(16, (16,), 4), num_classes=4)
    trainer = Trainer(max_epochs=2, callbacks=[CompressionReport(plot=False, print_table=False)], **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match=r"CompressionReport needs an example input .* Set example_input_array"):
        trainer.fit(module, _loader(), _loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize("who", ["save_to", "export_to", "report"])
def test_an_output_path_that_cannot_be_written_fails_before_training(tmp_path, who: str) -> None:
    """save_to, export_to and the report's dirpath were first written after the whole fit, which then failed
    (FileNotFoundError) and lost the converted model."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    if who == "report":
        callbacks: list[Callback] = [CompressionReport(dirpath=str(blocker / "report"), plot=False, print_table=False)]
        said = r"CompressionReport: dirpath '.*a_file/report' cannot be written"
    else:
        callbacks = [QuantizeCallback(latency="none", **{who: str(blocker / "model.safetensors")})]
        said = rf"QuantizeCallback: {who} '.*a_file/model.safetensors' cannot be written"
    module = _module()
    with pytest.raises(ValueError, match=said):
        _fit(tmp_path, module, callbacks)
    assert not fake_quant_layers(module)  # refused before any change
