"""``lightning-compress sensitivity``: the scan (pure), the budget search, the command on configs/sensitivity.yaml,
and its suggested maps fitted by PruningCallback and QuantizeCallback as they are."""

from __future__ import annotations

import csv
import itertools
import math
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from lightning_compress import ClassifierModule, DigitsDataModule, PruningCallback, QuantizeCallback
from lightning_compress.batches import random_state_kept
from lightning_compress.models import MLP
from lightning_compress.quantization import fake_quant_layers
from lightning_compress.tuning import sensitivity
from lightning_compress.tuning.sensitivity import (
    SensitivityTable,
    Unit,
    build_units,
    scan_sensitivity,
    suggest_bits,
    suggest_sparsity,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sensitivity.yaml"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_scan_restores_weights_exactly_and_measures_every_probe() -> None:
    net, x = _net(), torch.randn(32, 6)
    ref = net(x).detach()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    def evaluate() -> float:
        calls.append(1)
        return -float((net(x) - ref).abs().mean().detach())

    table = scan_sensitivity(net, evaluate, [0.5, 0.9], [8, 2], monitor="closeness")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [u.name for u in table.units] == ["0", "2", "4"] and len(calls) == 1 + 3 * 4
    assert [u.weights for u in table.units] == [96, 128, 24]
    for u in table.units:  # more pruning or fewer bits: further from the dense output
        assert 0 < table.drop(table.sparsity[u.name][0.5]) < table.drop(table.sparsity[u.name][0.9])
        assert table.drop(table.bits[u.name][8]) < table.drop(table.bits[u.name][2])
    assert len(table.rows()) == 12 and set(table.rows()[0]) >= {"unit", "kind", "setting", "closeness", "drop"}


def test_groups_make_one_row_per_regex() -> None:
    units = build_units(_net(), groups=[r"^[02]$"])
    assert [(u.name, u.layers, u.weights) for u in units] == [("^[02]$", ["0", "2"], 224), ("4", ["4"], 24)]
    assert units[0].prune == ["0.weight", "2.weight"] and units[0].quant == ["0", "2"]
    with pytest.raises(ValueError, match=r"groups regex 'conv' matches none of the layers: \['0', '2', '4'\]"):
        build_units(_net(), groups=["conv"])
    # a regex with an alternation is one cell of the Markdown table, not two
    from lightning_compress.tuning.sensitivity_files import markdown

    net = _net()
    table = scan_sensitivity(net, lambda: 0.0, [0.5], [8], monitor="closeness", groups=["0|2"])
    rows = [line for line in markdown(table).splitlines() if line.startswith("| 0")]
    assert rows and all(line.replace("\\|", "").count("|") == 5 for line in rows), rows


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--sparsities", "0.5,1.2"], r"sparsity 1.2 is not in \(0, 1\)"),
        (["--sparsities", "0.5,x"], "--sparsities must be comma-separated numbers"),
        (["--bits", "8,1"], r"bits 1 is not a valid weight width; valid choices: \[2, 3, 4, 5, 6, 7, 8\]"),
        (["--budget-sparsity", "0.95"], r"--budget-sparsity 0.95 cannot be met: .* largest measured sparsity \(0.9\)"),
        (["--budget-bits", "1.5"], r"--budget-bits 1.5 cannot be met: the narrowest measured width is 2"),
        (["--groups", "conv"], "groups regex 'conv' matches none of the layers"),
        (["--monitor", "val_f1"], r"never logged; logged keys: \['val_acc', 'val_loss'\]"),
        (["--monitor", "val_score"], r"--monitor 'val_score': its name does not tell whether higher is better; pass --mode"),
        # every rank ran the whole scan and wrote its files (DDP); FSDP2's probes failed on sharded weights after the fit
        (["--trainer.strategy=ddp", "--trainer.devices=2"], r"sensitivity runs its fits in its own process on one device, and "
         r"the config asks for strategy=DDPStrategy; set trainer.devices: 1"),
        (["--trainer.devices=2"], r"the config asks for strategy=DDPStrategy"),
    ],
)
def test_bad_input_fails_before_training(args: list[str], match: str, tmp_path, monkeypatch) -> None:
    def no_fit(*a, **k) -> None:
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    with pytest.raises(ValueError, match=match):
        sensitivity.main(["--config", str(CONFIG), "--out", str(tmp_path), *_quick(tmp_path), *args])


def test_a_group_size_that_does_not_fit_a_layer_fails_before_training(tmp_path, monkeypatch) -> None:
    """A QuantizeCallback's integer granularity must divide every quantised row: the command said so only after the
    fit and a probe, with a bare traceback; the scan itself says so before its first evaluation."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"] = [{"class_path": "lightning_compress.QuantizeCallback", "init_args": {"granularity": 128}}]
    path = tmp_path / "grouped.yaml"
    path.write_text(yaml.safe_dump(config))

    def no_fit(*a, **k) -> None:
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    message = r"group size 128 does not divide the 64 weights per output channel of 'weight' in layer 'model.net.1'"
    with pytest.raises(ValueError, match=message):
        sensitivity.main(["--config", str(path), "--out", str(tmp_path), *_quick(tmp_path)])
    evaluated = []
    with pytest.raises(ValueError, match="group size 4 does not divide the 6 weights per output channel"):
        scan_sensitivity(_net(), lambda: evaluated.append(1) or 0.0, [0.5], [4], granularity=4)
    assert not evaluated
    assert scan_sensitivity(_net(), lambda: 0.0, [0.5], [], granularity=4).sparsity  # no quantisation probe: no check


def test_the_mode_is_told_by_the_monitors_name() -> None:
    """A loss is minimised without --mode (the default 'max' read a falling loss as the best choice before); a given
    mode the name contradicts is warned about."""
    assert sensitivity.monitor_mode("val_loss", None) == "min" and sensitivity.monitor_mode("valid/acc", None) == "max"
    assert sensitivity.monitor_mode("val_loss", "max") == "max"  # given: kept, and the scan warns
    net = nn.Linear(4, 2)
    with pytest.warns(UserWarning, match=r"mode='max': 'val_loss' is to maximize, but its name says it is a metric to minimize"):
        scan_sensitivity(net, lambda: 1.0, [0.5], [8], monitor="val_loss", mode="max")


def _table(weights: list[int], drops: list[dict[float, float]], kind: str) -> SensitivityTable:
    units = [Unit(f"l{i}", [f"l{i}"], [f"l{i}.weight"], [f"l{i}"], w, w) for i, w in enumerate(weights)]
    probes = {u.name: d for u, d in zip(units, drops)}
    return SensitivityTable("acc", "max", 1.0, units, *((probes, {}) if kind == "sparsity" else ({}, probes)))


def test_budget_search_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(20):
        weights = [rng.randint(100, 5000) for _ in range(5)]
        drops = [{s: 1.0 - rng.uniform(0, 0.1) * s for s in (0.5, 0.7, 0.9)} for _ in weights]
        table, budget = _table(weights, drops, "sparsity"), rng.uniform(0.3, 0.85)
        got = suggest_sparsity(table, budget)
        best = min(
            sum(1.0 - drops[i][s] for i, s in enumerate(c) if s)
            for c in itertools.product((0.0, 0.5, 0.7, 0.9), repeat=5)
            if sum(s * w for s, w in zip(c, weights)) >= budget * sum(weights)
        )
        assert got.mean >= budget and got.drop == pytest.approx(best)
        bit_drops = [{b: 1.0 - rng.uniform(0, 0.1) / b for b in (8, 4, 3, 2)} for _ in weights]
        bits = suggest_bits(_table(weights, bit_drops, "bits"), 4.0)
        assert bits.mean <= 4.0 and set(bits.map) == {f"^l{i}$" for i in range(5)}
    with pytest.raises(ValueError, match="sparsity budget 0.95 cannot be met"):
        suggest_sparsity(_table([10, 10], [{0.9: 1.0}, {0.9: 1.0}], "sparsity"), 0.95)


def _quick(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
    ]


def test_command_on_the_config_and_its_suggestion_fits(tmp_path) -> None:
    out = tmp_path / "out"
    result = sensitivity.main([
        "--config", str(CONFIG), "--sparsities", "0.5,0.9", "--bits", "8,4,2",
        "--budget-sparsity", "0.7", "--budget-bits", "5", "--out", str(out), *_quick(tmp_path),
    ])
    assert {p.name for p in out.iterdir()} == {"sensitivity.csv", "sensitivity.md", "sensitivity.png", "suggested.yaml"}
    rows = list(csv.DictReader(open(out / "sensitivity.csv")))
    assert len(rows) == 3 * 5 and {r["unit"] for r in rows} == {"model.net.1", "model.net.3", "model.net.5"}
    assert "| model.net.1 | 16,384 |" in (out / "sensitivity.md").read_text()
    suggested = yaml.safe_load((out / "suggested.yaml").read_text())
    weights = {"model.net.1": 64 * 256, "model.net.3": 256 * 128, "model.net.5": 128 * 10}
    sparsity_of = {n: suggested["target_sparsity"].get(f"^{re.escape(n + '.weight')}$", 0.0) for n in weights}
    assert sum(sparsity_of[n] * w for n, w in weights.items()) / sum(weights.values()) >= 0.7
    assert result["suggestions"][0].mean >= 0.7 and result["suggestions"][1].mean <= 5

    seed_everything(0)
    module = ClassifierModule(MLP(64, [256, 128], 10))
    prune = PruningCallback(target_sparsity=suggested["target_sparsity"], schedule="one_shot", verbose=False)
    quant = QuantizeCallback(weight_bits=suggested["weight_bits"], latency="none")
    trainer = Trainer(max_epochs=1, callbacks=[prune, quant], **trainer_kwargs(tmp_path, limit_train_batches=4, limit_val_batches=2))
    trainer.fit(module, DigitsDataModule())
    for name, s in sparsity_of.items():
        w = module.get_submodule(name).weight
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=1e-3), name
    assert {n: m.quantizer.bits for n, m in fake_quant_layers(module).items()} == {
        n: suggested["weight_bits"][f"^{re.escape(n)}$"] for n in weights
    }


def test_ckpt_path_skips_the_fit(tmp_path, monkeypatch) -> None:
    seed_everything(0)
    module = ClassifierModule(MLP(64, [256, 128], 10))
    Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=8)).fit(module, DigitsDataModule())
    torch.save({"state_dict": module.state_dict()}, tmp_path / "dense.ckpt")
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("fitted although --ckpt_path was given"))
    result = sensitivity.main([
        "--config", str(CONFIG), "--ckpt_path", str(tmp_path / "dense.ckpt"), "--sparsities", "0.5", "--bits", "4",
        "--out", str(tmp_path / "out"), *_quick(tmp_path),
    ])
    expected = Trainer(**trainer_kwargs(tmp_path, limit_val_batches=2)).validate(module, DigitsDataModule(), verbose=False)
    assert result["table"].baseline == pytest.approx(expected[0]["val_acc"])
    assert "suggested.yaml" not in result["paths"]


def test_a_tied_head_is_scanned_with_its_embedding() -> None:
    """A language model whose head shares the token embedding (GPT's tied weights): embedding and head are one row
    (they had a row each, and a suggested bits map could give the one stored weight two widths, which
    QuantizeCallback refuses), its weight counted once, and the probe restores the shared tensor exactly."""
    from lightning_compress.lm import GPTDecoder

    torch.manual_seed(0)
    lm = GPTDecoder(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_len=8, attention="mha")
    assert lm.head.weight is lm.tok_emb.weight
    units = {u.name: u for u in build_units(lm, groups=["attn", "fc"])}
    tied = units["tok_emb+head"]
    assert tied.layers == ["tok_emb", "head"] and tied.quant == ["tok_emb", "head"] and "head" not in units
    assert tied.prune == ["head.weight"] and tied.weights == tied.qweights == 32 * 16
    ids = torch.randint(0, 32, (4, 8))
    ref = lm(ids).detach()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    table = scan_sensitivity(lm, lambda: -float((lm(ids) - ref).abs().mean()), [0.5], [4], monitor="closeness",
                             units=list(units.values()))
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    assert table.drop(table.sparsity["tok_emb+head"][0.5]) > 0
    suggested = suggest_bits(table, 4.0).map  # one width for the one weight, under a pattern naming both layers
    assert [k for k in suggested if "head" in k] == ["^(?:tok_emb|head)$"]
    grouped = {u.name: u.layers for u in build_units(lm, groups=["attn", "fc", "head"])}  # the tie joins the group
    assert grouped["head"] == ["tok_emb", "head"] and "tok_emb" not in grouped


def test_the_monitor_check_leaves_the_random_streams_as_they_were() -> None:
    """The validation run that checks the monitor before the fit draws a loader seed; the fit after it must draw what
    a fit of the same config draws (the scanned model is the one `lightning-compress fit` would train)."""
    import numpy as np
    from torch.utils.data import DataLoader

    def draws() -> tuple:
        return torch.rand(3).tolist(), float(np.random.rand()), random.random()

    seed_everything(0)
    expected = draws()
    seed_everything(0)
    with random_state_kept():
        next(iter(DataLoader(list(range(8)), shuffle=True)))
        draws()
    assert draws() == expected


@pytest.mark.parametrize("cls", ["PlainClassifier", "LateBuiltClassifier"])
def test_a_checkpoint_of_a_users_module_with_removed_channels_is_scanned(tmp_path, cls: str) -> None:
    """--ckpt_path of a module whose channels were removed (smaller layers than its config builds), of a class that
    does not call allow_shrunk_checkpoints: a raw size-mismatch error before; the layers now take the checkpoint's
    shapes before the scan selects them. Layers built in configure_model did not exist when the scan chose its
    units ("has no weight to quantise", while fit ran the same config)."""
    import user_project

    seed_everything(0)
    small = getattr(user_project, cls)(hidden=96)
    Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_train_batches=8)).fit(small, DigitsDataModule())
    torch.save({"state_dict": small.state_dict()}, tmp_path / "shrunk.ckpt")
    result = sensitivity.main([
        "--config", str(CONFIG), "--model", f"user_project.{cls}", "--ckpt_path", str(tmp_path / "shrunk.ckpt"),
        "--sparsities", "0.5", "--bits", "4", "--out", str(tmp_path / "out"), *_quick(tmp_path),
    ])
    expected = Trainer(**trainer_kwargs(tmp_path, limit_val_batches=2)).validate(small, DigitsDataModule(), verbose=False)
    assert result["table"].baseline == pytest.approx(expected[0]["val_acc"])
    assert set(result["table"].sparsity) == set(result["table"].bits) == {"net.1", "net.3"}


def test_a_gpt2_conv1d_weight_is_probed_on_the_callbacks_grid() -> None:
    """A Conv1D stores its weight as (in, out): the scan quantised it per input row, the callback per output column,
    so the table's drops and suggested bits came from another grid."""
    from transformers.pytorch_utils import Conv1D

    from lightning_compress.quantization.fake_quant import fake_quantize_weight

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(8, 6))  # weight (6, 8)
    w = net[0].weight.detach().clone()
    seen = []

    def evaluate() -> float:
        seen.append(net[0].weight.detach().clone())
        return 0.0

    scan_sensitivity(net, evaluate, [0.5], [3], monitor="closeness")
    per_column = fake_quantize_weight(w.t(), 3, "per_channel").t()
    assert any(torch.equal(s, per_column) for s in seen)
    assert not any(torch.equal(s, fake_quantize_weight(w, 3, "per_channel")) for s in seen)
    assert torch.equal(net[0].weight, w)


def test_a_monitor_that_is_not_finite_on_the_unchanged_model_is_an_error() -> None:
    """A NaN baseline made every probe +inf and still wrote a suggestion ("summed drop of val_score +inf")."""
    net = MLP(8, (4,), 2)
    with pytest.raises(ValueError, match=r"the unchanged model's val_score is nan: .* must be finite"):
        scan_sensitivity(net, lambda: math.nan, [0.5], [4], monitor="val_score", mode="max")


def test_a_config_that_prunes_channels_is_refused_its_unstructured_probes_before_training(tmp_path, monkeypatch) -> None:
    """Beside a channel-pruning callback the scan measured unstructured pruning: a drop of 0.0185 where removing 90%
    of the layer's neurons cost 0.293, and a suggested map naming the output head, which channel pruning never prunes
    (the callback ignored that entry in silence). Bits alone still scan."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_compress.PruningCallback", "init_args": {"target_sparsity": 0.5, "structure": "channel"}}
    ]
    path = tmp_path / "channels.yaml"
    path.write_text(yaml.safe_dump(config))

    def no_fit(*a, **k) -> None:
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    with pytest.raises(ValueError, match=r"the config's PruningCallback has structure='channel': the drops would not be that "
                       r"callback's .* Pass --sparsities '' to scan weight bits only"):
        sensitivity.main(["--config", str(path), "--out", str(tmp_path), *_quick(tmp_path)])
    monkeypatch.undo()
    result = sensitivity.main(["--config", str(path), "--out", str(tmp_path), *_quick(tmp_path), "--sparsities", "", "--bits", "4"])
    assert not any(result["table"].sparsity.values()) and all(result["table"].bits.values())


def test_the_structure_refused_is_read_as_pruning_reads_it_from_every_pruning_callback() -> None:
    """`structure="Unstructured"` (which PruningCallback takes) was refused, and of two callbacks only the last was read."""
    from lightning_compress import PruningCallback

    assert sensitivity._selections([PruningCallback(structure=" Unstructured ")])[0]["structure"] == "unstructured"
    for callbacks in ([PruningCallback(structure="channel"), PruningCallback()], [PruningCallback(), PruningCallback(structure="2:4")]):
        assert sensitivity._selections(callbacks)[0]["structure"] != "unstructured"
