"""Channel removal inside a real ``Trainer.fit``: optimizer, scheduler, checkpoints, reload."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import ClassifierModule, DigitsDataModule
from lightning_compress.models import MLP, ResCNN
from lightning_compress.pruning.graph import channel_groups
from lightning_compress.pruning.reload import load_pruned
from lightning_compress.pruning.shrink import shrink_in_training


class ShrinkAt(Callback):
    """Test-only: remove half of every prunable group's channels (lowest L1 norm) at one epoch."""

    def __init__(self, epoch: int = 1, round_to: int | None = None) -> None:
        self.epoch = epoch
        self.round_to = round_to
        self.changes: dict[str, tuple[int, int]] = {}
        self.lr_before: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch != self.epoch or self.changes:
            return
        x = pl_module.example_input_array.to(pl_module.device)
        modules = dict(pl_module.named_modules())
        keep = {}
        for g in channel_groups(pl_module, x):
            w = modules[g.members[0]].weight.detach().flatten(1).abs().sum(1)
            vec = torch.zeros(g.size, dtype=torch.bool)
            vec[w.topk(g.size // 2).indices] = True
            keep[g.members[0]] = vec
        self.lr_before = trainer.optimizers[0].param_groups[0]["lr"]
        self.changes = shrink_in_training(trainer, pl_module, keep, round_to=self.round_to)


def _trainer(tmp_path, callbacks: list, max_epochs: int = 3, **kw: Any) -> Trainer:
    return Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        deterministic=True,
        callbacks=callbacks,
        **kw,
    )


def _module(optimizer: str = "sgd") -> ClassifierModule:
    def opt(params: Any) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if optimizer == "adafactor":  # factored state: a kernel's statistics per row and per column of its last two dimensions
            return torch.optim.Adafactor(params, lr=5e-2)
        return torch.optim.Adam(params, lr=1e-2)

    return ClassifierModule(
        ResCNN(width=8),
        optimizer=opt,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        example_input_shape=(1, 8, 8),
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adafactor"])
def test_fit_shrinks_mid_training_and_reloads(tmp_path, optimizer: str) -> None:
    seed_everything(0)
    shrink = ShrinkAt(epoch=1)
    # no monitor: a checkpoint (and last.ckpt) every epoch, so last.ckpt is the final, shrunk model
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = _module(optimizer)
    dm = DigitsDataModule(batch_size=64)
    trainer = _trainer(tmp_path, [shrink, ckpt])
    trainer.fit(module, dm)

    assert shrink.changes["model.stem.0"] == (8, 4) and shrink.changes["model.block.conv2"] == (8, 4)
    net = module.model
    assert net.block.conv1.in_channels == 4 and net.down[0].out_channels == 8 and net.fc.in_features == 8
    # the optimizer trains the new parameters, with state of the right shapes
    opt = trainer.optimizers[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.parameters()}
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.dim():  # the parameter's shape, or 1 along a factored dimension
                assert v.dim() == p.dim() and all(a in (b, 1) for a, b in zip(v.shape, p.shape))
    # the scheduler kept stepping the same optimizer: lr halves every epoch
    assert shrink.lr_before == pytest.approx(opt.defaults["lr"] * 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] * 0.5**3)
    # training after the shrink still learns
    assert trainer.callback_metrics["val_acc"] > 0.3  # chance is 0.1

    # reload paths: Trainer.test(ckpt_path=...) and load_from_checkpoint / load_pruned on the plain class
    result = trainer.test(module, dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    assert result[0]["test_acc"] > 0.3
    x = torch.randn(5, 1, 8, 8)
    module.eval()
    loaded = ClassifierModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", model=ResCNN(width=8))
    loaded.eval()
    assert loaded.model.stem[0].out_channels == 4
    torch.testing.assert_close(loaded(x), module(x))
    bare = load_pruned(ResCNN(width=8).eval(), tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(bare(x), module(x))


def test_resume_after_shrink(tmp_path) -> None:
    seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [ShrinkAt(epoch=1), ckpt], max_epochs=2)
    trainer.fit(_module(), dm)
    # a fresh, unshrunk module resumes from the shrunk checkpoint: layers and optimizer state resized
    resumed = _module()
    trainer2 = _trainer(tmp_path, [ShrinkAt(epoch=99)], max_epochs=3)
    trainer2.fit(resumed, dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.model.stem[0].out_channels == 4
    assert trainer2.current_epoch == 3
    opt = trainer2.optimizers[0]
    for p in resumed.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape


def test_shrink_needs_example_input(tmp_path) -> None:
    module = ClassifierModule(ResCNN(width=8))
    module.example_input_array = None

    class Early(Callback):
        def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
            shrink_in_training(trainer, pl_module, {"model.block.conv1": torch.arange(8) < 4})

    with pytest.raises(ValueError, match="example_input"):
        _trainer(tmp_path, [Early()], max_epochs=1).fit(module, DigitsDataModule(batch_size=64))


class _NonZeroAtZero(torch.nn.Module):
    """Between the pruned layers, what a dropped channel carries is not 0: a BatchNorm after a residual
    add and a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 1)
        self.b = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8, momentum=0.0)  # frozen statistics: the outputs change only by pruning
        self.bn.bias.data.uniform_(-1, 1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.bn(self.a(x) + self.b(x)))
        return self.fc(torch.nn.functional.softplus(self.c(y)).mean((2, 3)))


def test_pruning_callback_masks_what_removal_removes(tmp_path) -> None:
    """With the weights frozen (lr 0), the masked model of epoch 1 and the model with the channels
    removed at epoch 2 give the same outputs: the masks also cover the input columns reading the
    channels, so a nonzero value in a dropped channel is never read before removal either. The counts stay those
    of the masks removal applied (nonzero and total read 0 after removal)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import PruningCallback

    seed_everything(0)
    module = ClassifierModule(_NonZeroAtZero(), optimizer=lambda p: torch.optim.SGD(p, lr=0.0), example_input_shape=(1, 8, 8))
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    probe = torch.randn(6, 1, 8, 8)

    class Record(Callback):
        outputs: dict[int, torch.Tensor] = {}
        nonzero: dict[int, int] = {}
        logged_target: dict[int, float] = {}

        def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
            self.nonzero[trainer.current_epoch] = prune.nonzero
            self.logged_target[trainer.current_epoch] = float(trainer.callback_metrics["pruning/target"])
            pl_module.eval()
            with torch.no_grad():
                self.outputs[trainer.current_epoch] = pl_module(probe).clone()
            pl_module.train()

    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, shrink_epoch=2, verbose=False)
    record = Record()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    _trainer(tmp_path, [prune, record], max_epochs=3, enable_checkpointing=False).fit(module, loader, loader)
    assert module.model.a.out_channels == 4 and module.model.c.out_channels == 4  # removed
    assert not torch.allclose(record.outputs[0], record.outputs[1])  # masking changed the function
    torch.testing.assert_close(record.outputs[2], record.outputs[1], atol=1e-5, rtol=1e-5)
    summary = prune.compression_summary()
    assert 0 < record.nonzero[1] == record.nonzero[2] == prune.nonzero == summary["nonzero"]
    # the logged target stays the masks' after removal (it read 0.0 once the masks were gone)
    assert record.logged_target[1] == record.logged_target[2] == prune.compression_state()["target"] > 0.4
    assert prune.nonzero == pytest.approx((1 - prune.sparsity) * summary["total"]) and summary["total"] > prune.nonzero


def test_channels_are_removed_under_bf16_true(tmp_path) -> None:
    """precision="bf16-true" casts the module after setup: the trace at removal runs in its dtype."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import PruningCallback
    from lightning_compress.models import MLP

    seed_everything(0)
    module = ClassifierModule(MLP(64, (32,), 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), example_input_shape=(1, 8, 8))
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))), batch_size=16)
    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=0, shrink=True, verbose=False)
    _trainer(tmp_path, [prune], max_epochs=2, precision="bf16-true", enable_checkpointing=False).fit(module, loader)
    layer = module.model.net[1]
    assert layer.out_features == 16 and layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("example_input", [False, True], ids=["found-in-the-step", "example_input_shape"])
def test_channel_removal_shrinks_a_distilled_student_and_leaves_the_teacher(tmp_path, example_input: bool) -> None:
    """A distillation step calls ``self.student(x)``, and the module's forward hands its input to the
    student: channel removal traces and shrinks the student, the teacher keeps every channel, and the
    smaller student trains on. With feature hints the projections read the student's channels, so
    removal is refused in setup, before training."""
    from lightning_compress import MLP, PruningCallback
    from lightning_compress.distillation import DistillationModule

    seed_everything(0)
    extra = {"example_input_shape": (1, 8, 8)} if example_input else {}
    teacher = ResCNN(width=8)
    module = DistillationModule(MLP(64, (32, 16), 10), teacher, **extra)
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    trainer = _trainer(tmp_path, [prune], max_epochs=3, limit_train_batches=4, limit_val_batches=2, enable_checkpointing=False)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    hidden = [m for m in module.student.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in hidden][-1] == 10 and sum(m.out_features for m in hidden[:-1]) == pytest.approx(24, abs=1)
    assert all(torch.equal(p, before[name]) for name, p in module.teacher.named_parameters())
    assert trainer.global_step == 12 and torch.isfinite(torch.tensor(float(trainer.callback_metrics["val_loss"])))
    # the exported student no longer loads into MLP(64, (32, 16), 10) with load_state_dict: said, with the loader that does
    with pytest.warns(UserWarning, match=r"export_student: .* MLP was built with \(net\.1\.weight .*load_pruned\(MLP\(\.\.\.\), path\)"):
        path = module.export_student(tmp_path / "student.safetensors")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(load_pruned(MLP(64, (32, 16), 10), path).eval()(x), module.student.eval()(x), rtol=0, atol=0)

    hinted = DistillationModule(MLP(64, (32, 16), 10), ResCNN(width=8), features={"net.2": "pool"}, **extra)
    again = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    with pytest.raises(ValueError, match=r"shrink=True\) removes student channels that the feature projections .*read, so their projections, sized once, would no longer fit; keep the units masked \(shrink=False\)"):
        _trainer(tmp_path, [again], max_epochs=3, limit_train_batches=4).fit(hinted, DigitsDataModule(batch_size=32))
    assert hinted.trainer.global_step == 0


def test_hints_on_block_outputs_stay_when_heads_and_neurons_are_removed(tmp_path) -> None:
    """Every hint was refused beside a heads/neurons removal, though a transformer block's output keeps its width. The
    widths are measured on a copy with one unit of each group removed: a block's hint is accepted, and its projection
    still fits after the removal; a hint on a q or fc1 projection, whose width the removal changes, is refused
    before any step, naming it."""
    from torch.utils.data import DataLoader

    from lightning_compress import GPTDecoder, PruningCallback
    from lightning_compress.distillation import DistillationModule

    seed_everything(0)
    ids = torch.randint(0, 32, (32, 12))
    loader = DataLoader([{"input_ids": i[:-1], "labels": i[1:]} for i in ids], batch_size=8)

    def pair(features: dict, layers: int = 1) -> DistillationModule:
        student = GPTDecoder(vocab_size=32, d_model=16, n_layers=layers, n_heads=2, max_len=16, attention="sdpa")
        teacher = GPTDecoder(vocab_size=32, d_model=24, n_layers=2, n_heads=2, max_len=16, attention="sdpa")
        return DistillationModule(student, teacher, features=features, feature_weight=0.5)

    def units() -> PruningCallback:
        return PruningCallback(0.5, structure="heads+neurons", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)

    module = pair({"blocks.0": "blocks.1"})
    trainer = _trainer(tmp_path, [units()], max_epochs=2, limit_val_batches=0)
    trainer.fit(module, loader)
    assert module.student.blocks[0].fc1.out_features == 32 and module.student.blocks[0].attn.q.out_features == 8  # removed
    assert math.isfinite(float(trainer.callback_metrics["train_loss"])) and trainer.global_step == 8
    for hinted in ("blocks.0.fc1", "blocks.0.attn.q"):
        refused = pair({hinted: "blocks.1"})
        with pytest.raises(ValueError, match=rf"changes the output width of the hinted student module\(s\) \['{hinted}'\] "
                           r"\(measured on a copy with one unit of each group removed\)"):
            _trainer(tmp_path, [units()], max_epochs=2).fit(refused, loader)
        assert refused.trainer.global_step == 0
    # a block the callback leaves out (exclude) keeps its units: a hint inside it stays
    kept = pair({"blocks.1.fc1": "blocks.1"}, layers=2)
    leave_out = PruningCallback(0.5, structure="heads+neurons", schedule="one_shot", start_epoch=1, shrink=True, verbose=False,
                                exclude=[r"student\.blocks\.1\."])
    _trainer(tmp_path, [leave_out], max_epochs=2, limit_val_batches=0).fit(kept, loader)
    assert kept.student.blocks[1].fc1.out_features == 64 > kept.student.blocks[0].fc1.out_features


def test_attention_transfer_keeps_working_after_the_students_channels_are_removed(tmp_path) -> None:
    """feature_loss='attention' compares maps summed over the channels, which keep their (H, W) after removal, so it is
    not refused with shrink=True: the fit removes the student's channels and the attention term stays finite and
    non-zero after the removal."""
    from lightning_compress import PruningCallback
    from lightning_compress.distillation import DistillationModule

    seed_everything(0)
    module = DistillationModule(ResCNN(width=8), ResCNN(width=16), features={"block": "block", "down": "down"},
                                feature_loss="attention", feature_weight=10.0, example_input_shape=(1, 8, 8))
    prune = PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    trainer = _trainer(tmp_path, [prune], max_epochs=3, limit_train_batches=4, limit_val_batches=2, enable_checkpointing=False)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert module.student.stem[0].out_channels == 4 and module.student.down[0].out_channels == 8
    terms = {k: float(v) for k, v in trainer.callback_metrics.items() if "feature" in k}
    assert terms and all(math.isfinite(v) and v > 0 for v in terms.values()), terms


def test_a_distillation_fit_resumes_after_the_students_channels_were_removed(tmp_path) -> None:
    """The checkpoints after removal hold the smaller student: resuming from one continues bit-identically (it failed
    on a size mismatch, then on the check that configure_model did not rebuild the layers the load resized), and
    load_from_checkpoint builds the smaller student."""
    from lightning_compress import MLP, PruningCallback
    from lightning_compress.distillation import DistillationModule

    def run(ckpt_path=None, root="full"):
        seed_everything(0)
        module = DistillationModule(MLP(64, (32,), 10), MLP(64, (32,), 10))
        prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
        saver = ModelCheckpoint(dirpath=tmp_path / root, save_top_k=-1, filename="{epoch}")
        trainer = _trainer(tmp_path / root, [prune, saver], max_epochs=4, limit_train_batches=4, limit_val_batches=2)
        trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return module

    full = run()
    resumed = run(tmp_path / "full" / "epoch=2.ckpt", root="resumed")
    assert full.student.net[1].out_features == resumed.student.net[1].out_features == 16
    assert all(torch.equal(a, b) for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()))
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "full" / "epoch=3.ckpt", student=MLP(64, (32,), 10), teacher=MLP(64, (32,), 10))
    assert loaded.student.net[1].out_features == 16
    # the smaller student alone, from the fit's checkpoint (its keys under "student."; load_quantized's hint for a
    # shrunk model points here, and it said the model had the wrong class)
    student = load_pruned(MLP(64, (32,), 10), tmp_path / "full" / "epoch=3.ckpt")
    assert student.net[1].out_features == 16
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), full.student.state_dict().values()))


class CachedSGD(torch.optim.Optimizer):
    """An optimizer stepping its own list of the parameters, made once (as some third-party optimizers do)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(list(params), {"lr": lr})
        self._flat = [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for p in self._flat:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        return loss


def test_an_optimizer_keeping_its_own_parameter_list_is_refused_before_training(tmp_path) -> None:
    """Removal replaces the parameters in param_groups and state: an optimizer stepping its own list went on updating
    the old tensors, and the smaller layers never changed again (0.0 in every epoch after the removal), in silence."""
    from lightning_compress import PruningCallback
    from lightning_compress.pruning.shrink import check_optimizer_reads_groups

    seed_everything(0)
    module = ClassifierModule(MLP(64, (32, 16), 10), optimizer=lambda p: CachedSGD(p, 0.1))
    before = [p.clone() for p in module.parameters()]
    prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    with pytest.raises(ValueError, match=r"CachedSGD keeps its own reference to the pruned layers' parameters in its attribute '_flat'"):
        _trainer(tmp_path, [prune], limit_train_batches=2, enable_checkpointing=False).fit(module, DigitsDataModule(batch_size=32))
    assert module.trainer.global_step == 0 and all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    # torch's optimizers, and a wrapper sharing their param_groups, read them at each step
    params = list(module.parameters())
    check_optimizer_reads_groups([torch.optim.Adam(params), torch.optim.SGD(params, lr=0.1, momentum=0.9)], params)


def test_optimizer_state_removal_cannot_follow_is_refused_before_any_change() -> None:
    from lightning_compress.pruning.shrink import remap_optimizer

    old, new = torch.nn.Parameter(torch.ones(6, 4)), torch.nn.Parameter(torch.ones(3, 4))
    optimizer = torch.optim.SGD([old], lr=0.1)
    optimizer.state[old] = {"momentum_buffer": torch.zeros(6, 4), "odd": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match=r"SGD's state 'odd' of a parameter \(6, 4\) has shape \(2, 4\), which removing entries cannot follow \(dimension 0\)"):
        remap_optimizer(optimizer, {old: (new, [(0, torch.tensor([0, 2, 4]))])})
    assert optimizer.param_groups[0]["params"] == [old] and optimizer.state[old]["momentum_buffer"].shape == (6, 4)


def test_a_users_module_resumes_and_tests_from_checkpoints_after_removal(tmp_path) -> None:
    """A module whose class does not call allow_shrunk_checkpoints: resuming from a checkpoint written after removal
    and trainer.validate(ckpt_path=...) failed with torch's size mismatch. The callback lets them load, and a warning at
    fit names what a bare load_from_checkpoint needs."""
    from user_project import PlainClassifier

    from lightning_compress import PruningCallback

    def prune() -> PruningCallback:
        return PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, shrink_epoch=2, verbose=False)

    seed_everything(0)
    module = PlainClassifier(hidden=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, filename="{epoch}")
    trainer = _trainer(tmp_path, [prune(), ckpt], max_epochs=4, limit_train_batches=4, limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"for PlainClassifier.load_from_checkpoint, call lightning_compress.allow_shrunk_checkpoints\(self\)"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert module.net[1].out_features == 16
    from lightning_compress.pruning.reload import resizes_on_load

    assert not resizes_on_load(module)  # the hook was the fit's: the module loads as its class does again
    assert trainer.validate(module, DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "ck" / "epoch=2.ckpt"), verbose=False)[0]["val_acc"] >= 0.0
    resumed = PlainClassifier(hidden=32)
    _trainer(tmp_path, [prune()], max_epochs=4, limit_train_batches=4, limit_val_batches=2).fit(
        resumed, DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "ck" / "epoch=2.ckpt")
    )
    assert resumed.net[1].out_features == 16


@pytest.mark.parametrize(("scope", "target", "match"), [
    ("layer", 0.9, r"a target of 0.9 removes round\(0.9 x 4\) = 4 of the 4 channels of 'model.a', but a layer keeps at least one: at most 0.75"),
    ("global", 0.95, r"a target of 0.95 removes 11 of the 12 channels of the 2 pruned layers, but each keeps at least one: at most 0.8333"),
])
def test_a_channel_target_that_would_empty_a_layer_is_refused_before_any_change(tmp_path, scope: str, target: float, match: str) -> None:
    """A layer keeps its last channel, so a target that needs it was floored without a word (0.9 asked, 0.855
    reached); the docs promised an error before anything changes."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import PruningCallback

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    module = ClassifierModule(Small(), example_input_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    prune = PruningCallback(target, structure="channel", scope=scope, schedule="one_shot", shrink=True, verbose=False)
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, [prune], max_epochs=2, enable_checkpointing=False).fit(module, loader)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()) and module.model.a.out_channels == 4
    # the most that can be reached runs
    prune = PruningCallback(0.75 if scope == "layer" else 0.8, structure="channel", scope=scope, schedule="one_shot", shrink=True, verbose=False)
    _trainer(tmp_path, [prune], max_epochs=2, enable_checkpointing=False).fit(module, loader)
    assert prune.compression_state()["target"] == pytest.approx(prune.sparsity, abs=0.1) and module.model.a.out_channels < 4


@pytest.mark.parametrize("guarded", [False, True])
def test_default_removal_follows_the_last_change_and_leaves_the_guard_a_validation(tmp_path, guarded: bool) -> None:
    """shrink_epoch unset: a one_shot run removes its channels when it prunes (it waited for an unused default
    end_epoch), but with an accuracy guard one validation comes first, so the guard can still undo the step."""
    from lightning_compress import PruningCallback
    from lightning_compress.models import MLP

    seed_everything(0)
    module = ClassifierModule(MLP(64, (64, 32), 10), example_input_shape=(1, 8, 8))
    guard = {"monitor": "val_acc", "max_drop": 0.01} if guarded else {}
    prune = PruningCallback(0.9, structure="channel", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, verbose=False, **guard)
    _trainer(tmp_path, [prune], max_epochs=4, enable_checkpointing=False).fit(module, DigitsDataModule(batch_size=64))
    summary = prune.compression_summary()
    if guarded:  # 90% of each layer at once falls far: restored at epoch 1's validation, nothing left to remove
        assert len(summary["guard"]["events"]) == 1 and summary["shrunk"]["epoch"] == 2.0 and prune.sparsity == 0.0
        assert module.model.net[1].out_features == 64
    else:
        assert summary["shrunk"]["epoch"] == 1.0 and module.model.net[1].out_features == 6


@pytest.mark.parametrize(("schedule", "update_every", "plain", "guarded"), [
    ({"schedule": "one_shot", "start_epoch": 1.5}, None, 2.0, 3.0),  # the step lands at epoch 2's boundary
    ({"schedule": "one_shot", "start_epoch": 1.5}, 5, 1.5, 2.0),  # the step lands within epoch 1
    ({"schedule": "cubic", "end_epoch": 2.5}, None, 3.0, 4.0),
    ({"schedule": "cubic", "end_epoch": 6}, None, 6.0, 6.0),  # at max_epochs: removal when training ends
])
def test_the_default_removal_epoch(schedule: dict, update_every: int | None, plain: float, guarded: float) -> None:
    """With a guard, removal waits for the validation after the last step: with per-epoch updates a fractional
    last change happens at the next boundary, and floor(last) + 1 removed the channels in that same boundary."""
    from lightning_compress.pruning.options import PruningOptions

    for monitor, expected in ((None, plain), ("val_acc", guarded)):
        guard = {"monitor": monitor, "max_drop": 0.1} if monitor else {}
        options = PruningOptions(0.5, structure="channel", shrink=True, update_every_n_steps=update_every, **schedule, **guard)
        assert options.plan(6)[2] == expected


@pytest.mark.parametrize("stop", ["early_stopping", "max_steps"])
def test_a_fit_ending_before_shrink_epoch_removes_the_channels_when_it_ends(tmp_path, stop: str) -> None:
    """EarlyStopping or max_steps ending the fit after the schedule's end but before shrink_epoch left every layer at
    full size, in silence (the report said params 2778 -> 2778)."""
    import warnings

    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_compress import PruningCallback

    seed_everything(0)
    module = _module()
    prune = PruningCallback(0.5, structure="channel", shrink=True, start_epoch=1, end_epoch=2, shrink_epoch=4, verbose=False)
    callbacks: list = [prune]
    limits: dict[str, Any] = {"limit_train_batches": 3, "limit_val_batches": 1, "enable_checkpointing": False}
    if stop == "early_stopping":  # no improvement is enough: it stops at min_epochs
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=0, min_delta=10.0))
        limits["min_epochs"] = 3
    else:
        limits["max_steps"] = 9  # 3 epochs of 3 batches
    trainer = _trainer(tmp_path, callbacks, max_epochs=6, **limits)
    x = torch.randn(4, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DigitsDataModule())
    assert trainer.current_epoch == 3
    said = [str(w.message) for w in caught if "before shrink_epoch=4: the masked channels are removed now" in str(w.message)]
    assert len(said) == 1
    summary = prune.compression_summary()
    assert summary["shrunk"]["epoch"] == 3.0
    assert said[0] in summary["notes"]  # kept for the report, as QuantizeCallback keeps its own
    assert module.model.stem[0].out_channels < 8
    module.eval()
    assert torch.isfinite(module(x)).all()


def test_a_run_stopped_mid_schedule_or_kept_going_is_not_removed_early(tmp_path) -> None:
    """The removal at a fit's end before shrink_epoch is for a run that prunes no further: a fit stopped mid-schedule,
    or a run kept going by make_permanent=False, removed its channels at 34.5% and was stuck there in the next fit."""
    from lightning_compress import PruningCallback

    for permanent, steps, why in ((True, 7, "its schedule had not ended"), (False, 7, "with make_permanent=False the run goes on")):
        seed_everything(0)
        module = _module()
        prune = PruningCallback(0.5, structure="channel", shrink=True, start_epoch=1, end_epoch=2 if not permanent else 4,
                                shrink_epoch=5, make_permanent=permanent, verbose=False)
        _trainer(tmp_path, [prune], max_epochs=6, max_steps=steps, limit_train_batches=3, limit_val_batches=1,
                 enable_checkpointing=False).fit(module, DigitsDataModule())
        summary = prune.compression_summary()
        assert "shrunk" not in summary and module.model.stem[0].out_channels == 8
        assert any("before shrink_epoch=5: the masked channels stay in place" in n and why in n for n in summary["notes"])
    # the kept-going run carries on in a later fit, and removes the channels at shrink_epoch
    _trainer(tmp_path, [prune], max_epochs=6, limit_train_batches=3, limit_val_batches=1,
             enable_checkpointing=False).fit(module, DigitsDataModule())
    assert prune.compression_summary()["shrunk"]["epoch"] == 5.0 and module.model.stem[0].out_channels == 4


def test_a_shrink_epoch_before_the_schedules_last_change_is_refused_before_training(tmp_path) -> None:
    """shrink_epoch=2 with a cubic ramp to 0.75 ending at epoch 4 removed the channels at 53% and pruning stopped
    there for good, the 0.75 asked for nowhere, in silence. Refused when the fit starts, before any training, naming
    both epochs (a resumed run follows its checkpoint's schedule: not checked)."""
    from lightning_compress import PruningCallback

    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    prune = PruningCallback(0.75, structure="channel", schedule="cubic", start_epoch=1, end_epoch=4, shrink=True, shrink_epoch=2, verbose=False)
    trainer = Trainer(max_epochs=5, callbacks=[prune], **trainer_kwargs(tmp_path, limit_train_batches=2))
    with pytest.raises(ValueError, match=r"shrink_epoch=2 is before the schedule's last change at epoch 4 .* Set shrink_epoch >= 4"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0 and all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_a_resumed_run_with_more_epochs_keeps_its_shrink_epoch(tmp_path) -> None:
    """A default end_epoch follows max_epochs: resuming a run that removed its channels at shrink_epoch=3 with
    max_epochs 4 -> 8 was refused ("before the schedule's last change at epoch 6"): a resumed run follows its
    checkpoint's schedule, which the check is not made against."""
    from lightning_compress import PruningCallback

    def prune() -> PruningCallback:
        return PruningCallback(0.5, structure="channel", schedule="linear", start_epoch=0, shrink=True, shrink_epoch=3, verbose=False)

    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    Trainer(max_epochs=4, callbacks=[prune(), checkpoints], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)).fit(
        _module(), DigitsDataModule(batch_size=32))
    resumed = Trainer(max_epochs=8, callbacks=[prune()], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    resumed.fit(_module(), DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert resumed.global_step == 16
