"""Pruning, channel removal, quantisation and distillation in one run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from conftest import trainer_kwargs
from lightning_compress import (
    MLP,
    ClassifierModule,
    CompressionReport,
    DigitsDataModule,
    PruningCallback,
    QuantizeCallback,
)


def test_channel_shrink_then_qat_then_conversion(tmp_path: Path) -> None:
    L.seed_everything(0)
    prune = PruningCallback(
        target_sparsity=0.5, structure="channel", scope="layer", schedule="one_shot",
        start_epoch=1, end_epoch=2, shrink=True, verbose=False,
    )
    quant = QuantizeCallback(start_epoch=2, latency="none")
    report = CompressionReport(batch_size=8, repeats=2, warmup=0, print_table=False)
    module = ClassifierModule(MLP(64, (256, 128), 10))
    trainer = L.Trainer(max_epochs=3, callbacks=[prune, quant, report], **trainer_kwargs(tmp_path))
    dm = DigitsDataModule(batch_size=64)
    trainer.fit(module, dm)
    # the fake-quantised layers were shrunk: 256 -> 128 and 128 -> 64 neurons; the head keeps 10 outputs
    linears = [m for m in module.model.net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [128, 64, 10]
    assert [type(m).__name__ for m in linears] == ["QATLinear"] * 3
    # the converted model agrees with the fake-quantised one on test data
    x, _ = next(iter(dm.test_dataloader()))
    module.eval()
    with torch.no_grad():
        agree = (quant.quantized_model(x).argmax(-1) == module(x).argmax(-1)).float().mean()
    assert agree > 0.95
    r = report.report
    assert r["baseline"]["params"] == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert r["compressed"]["params"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    # int8 storage on top of the 2.95x fewer weights
    assert r["ratios"]["size"] > 2.95 * 3


def test_channel_removal_under_a_quantisation_group_size_needs_round_to(tmp_path: Path) -> None:
    """granularity=8 divided every layer at setup, but removal left a count it does not divide: the fit failed in the
    epoch after removal. Refused in setup without round_to; with round_to=8 every layer keeps a multiple of 8."""
    import pytest

    def callbacks(round_to: int | None) -> list:
        return [PruningCallback(target_sparsity=0.6, structure="channel", scope="layer", schedule="one_shot", start_epoch=1,
                                end_epoch=1, shrink=True, round_to=round_to, verbose=False),
                QuantizeCallback(weight_bits=4, activation_bits=None, granularity=8, start_epoch=2, latency="none")]

    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (40, 24), 10))
    with pytest.raises(ValueError, match=r"granularity=8\) needs a multiple of 8 .* set its round_to to a multiple of 8"):
        L.Trainer(max_epochs=3, callbacks=callbacks(None), **trainer_kwargs(tmp_path)).fit(module, DigitsDataModule(batch_size=64))
    L.Trainer(max_epochs=3, callbacks=callbacks(8), **trainer_kwargs(tmp_path)).fit(module, DigitsDataModule(batch_size=64))
    linears = [m for m in module.model.net if isinstance(m, torch.nn.Linear)]
    assert all(m.in_features % 8 == 0 for m in linears) and linears[0].out_features < 40


def test_a_pruning_guard_restore_keeps_the_activation_ranges_quantisation_observed(tmp_path: Path) -> None:
    """The pruning guard restores the model it last accepted, BatchNorm statistics included, but not another
    plugin's state: it put back the observers' empty ranges of the dense baseline, and the "int8" model was
    converted with float inputs (activation_bits=None) after a warning that blamed the data."""
    L.seed_everything(0)
    module = ClassifierModule(MLP(64, (64, 32), 10), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    prune = PruningCallback(0.97, schedule="one_shot", start_epoch=1, monitor="val_acc", max_drop=0.02, verbose=False)
    quant = QuantizeCallback(method="ptq", weight_bits=8, activation_bits=8, start_epoch=2, latency="none")
    trainer = L.Trainer(max_epochs=4, callbacks=[prune, quant], **trainer_kwargs(tmp_path))
    trainer.fit(module, DigitsDataModule())
    assert len(prune.compression_summary()["guard"]["events"]) == 1  # 97% at once falls too far: restored
    ranges = quant.compression_summary()["observer_ranges"]
    assert len(ranges) == 3 and all(hi > lo for lo, hi in ranges.values())
    converted = [type(m).__name__ for m in quant.quantized_model.modules() if hasattr(m, "packed")]
    assert converted == ["Int8Linear"] * 3


def test_heads_removal_under_a_group_size_that_does_not_divide_a_head_is_refused_in_setup(tmp_path: Path) -> None:
    """Removing 1 of 4 heads (16 wide) left the output projection 48 inputs, which granularity=32 does not divide:
    the fit failed after the removal. Refused in setup, in either callback order; a group size dividing the head
    width runs to the end."""
    import pytest

    from lightning_compress import GPTDecoder, LanguageModelModule

    def fit(granularity: int, quant_first: bool, exclude: list[str] | None = None) -> LanguageModelModule:
        L.seed_everything(0)
        module = LanguageModelModule(GPTDecoder(vocab_size=32, d_model=64, n_layers=1, n_heads=4, max_len=16, attention="sdpa"))
        prune = PruningCallback(0.25, structure="heads", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
        quant = QuantizeCallback(weight_bits=4, activation_bits=None, granularity=granularity, start_epoch=0, latency="none", exclude=exclude)
        tokens = torch.randint(0, 32, (16, 17))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
        callbacks = [quant, prune] if quant_first else [prune, quant]
        L.Trainer(max_epochs=2, callbacks=callbacks, **trainer_kwargs(tmp_path)).fit(module, data)
        return module

    for quant_first in (False, True):  # fake-quantised first, the heads are found as in float (quantisation off in the check)
        with pytest.raises(ValueError, match=r"granularity=32\) needs a multiple of 32 .* 'model.blocks.0.attn.o' leaves it a multiple of 16"):
            fit(32, quant_first)
    module = fit(16, quant_first=True)
    assert module.model.blocks[0].attn.o.in_features == 48
    with pytest.raises(ValueError, match=r"exclude pattern 'nothing' matches none"):  # the quantiser's own error, first
        fit(32, quant_first=False, exclude=["nothing"])
    module = fit(32, quant_first=False, exclude=[r"attn\.o$"])  # the projection is not quantised: nothing to divide
    assert module.model.blocks[0].attn.o.in_features == 48 and type(module.model.blocks[0].attn.o) is torch.nn.Linear


def test_batchnorm_statistics_follow_a_pruning_step_taken_when_training_ends(tmp_path: Path) -> None:
    """With end_epoch == max_epochs pruning takes its last step in on_train_end, after QAT's last BatchNorm
    re-estimation: the returned and converted model kept the statistics of the less sparse weights (0.24 off in
    bn1's mean, in either callback order). They are estimated again for the final weights."""
    import copy

    from lightning_compress import ResCNN

    for quant_first in (True, False):
        L.seed_everything(0)
        module = ClassifierModule(ResCNN(width=8))
        prune = PruningCallback(0.8, schedule="linear", start_epoch=0, end_epoch=2, verbose=False)
        quant = QuantizeCallback(weight_bits=8, activation_bits=8, start_epoch=0, latency="none")
        data = DigitsDataModule()
        callbacks = [quant, prune] if quant_first else [prune, quant]
        L.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1, callbacks=callbacks, **trainer_kwargs(tmp_path)).fit(module, data)
        assert prune.sparsity > 0.79
        fresh = copy.deepcopy(module.model)  # the statistics of the final weights, over the training data
        for m in fresh.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        fresh.train()
        with torch.no_grad():
            for i, (x, _) in enumerate(data.train_dataloader()):
                if i < 32:
                    fresh(x)
        held, wanted = module.model.block.bn1.running_mean, fresh.block.bn1.running_mean
        assert float((held - wanted).abs().max()) < 0.05 * float(wanted.abs().max())


def test_a_distillation_modules_feature_projections_are_neither_pruned_nor_quantised(tmp_path: Path) -> None:
    """The projections map student features to the teacher's for training only; built at construction they were
    pruned and fake-quantised with the student: the summary said 80% where the student was 78.7%, and a
    weight_bits map written for the student failed setup on 'projections.net__2.proj'."""
    from lightning_compress import DistillationModule

    L.seed_everything(0)
    module = DistillationModule(student=MLP(64, (64, 32), 10), teacher=MLP(64, (128, 32), 10),
                                features={"net.2": "net.2"}, example_input_shape=[1, 8, 8])
    assert len(module.projections) == 1  # built at construction
    prune = PruningCallback(0.8, schedule="one_shot", start_epoch=0, verbose=False)
    quant = QuantizeCallback(weight_bits={r"^student\.": 8}, activation_bits=None, start_epoch=0, latency="none")
    L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[prune, quant],
              **trainer_kwargs(tmp_path)).fit(module, DigitsDataModule())
    assert list(prune.compression_summary()["layers"]) == [f"student.net.{i}.weight" for i in (1, 3, 5)]
    assert list(quant.compression_summary()["bits_per_layer"]) == [f"student.net.{i}" for i in (1, 3, 5)]
    weights = [p for p in module.student.parameters() if p.dim() == 2]
    zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert abs(zeros - prune.sparsity) < 1e-3 and abs(prune.sparsity - 0.8) < 1e-3
    assert not (module.projections["net__2"].proj.weight == 0).any()
