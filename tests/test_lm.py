"""GPTDecoder, perplexity, LanguageModelModule and TextDataModule (tiny models, a 100 kB corpus)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from lightning_compress import GPTDecoder, LanguageModelModule, TextDataModule
from lightning_compress import text as text_module
from lightning_compress.lm import Perplexity, perplexity, token_nll
from lightning_compress.text import SEPARATOR, ByteChunks, decode, encode, source_files, split_of

from conftest import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
ATTENTIONS = ["mha", "sdpa"]


def _tiny(attention: str = "mha", **kwargs) -> GPTDecoder:
    return GPTDecoder(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "max_len": 32, "attention": attention, **kwargs})


# --------------------------------------------------------------------------------------------------
# GPTDecoder


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_decoder_shapes(attention: str) -> None:
    model = _tiny(attention, vocab_size=100)
    assert model(torch.randint(0, 100, (3, 17))).shape == (3, 17, 100)
    assert model(torch.randint(0, 100, (1, 1))).shape == (1, 1, 100)


def test_attention_layouts() -> None:
    mha, sdpa = _tiny("mha").blocks[0], _tiny("sdpa").blocks[0]
    assert isinstance(mha.attn, nn.MultiheadAttention) and mha.attn.in_proj_weight.shape == (96, 32)
    assert isinstance(mha.attn.out_proj, nn.Linear)
    assert all(isinstance(getattr(sdpa.attn, n), nn.Linear) for n in "qkvo")
    for block in (mha, sdpa):
        assert isinstance(block.fc1, nn.Linear) and isinstance(block.fc2, nn.Linear) and block.fc1.out_features == 128
    # the same number of parameters either way (packed q/k/v == three Linears)
    assert sum(p.numel() for p in _tiny("mha").parameters()) == sum(p.numel() for p in _tiny("sdpa").parameters())


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_is_causal(attention: str, mode: str) -> None:
    model = _tiny(attention)
    model.train(mode == "train")  # eval + no_grad is nn.MultiheadAttention's fast path
    x = torch.randint(0, 256, (2, 20))
    t = 11
    changed = x.clone()
    changed[:, t + 1 :] = torch.randint(0, 256, (2, 20 - t - 1))
    assert not torch.equal(changed, x)
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # and later positions do see the change


def test_tied_weights_are_one_parameter() -> None:
    tied, untied = _tiny(), _tiny(tie_weights=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 - shared tensors once
    assert count(untied) - count(tied) == 256 * 32
    # still one tensor after an optimizer step and after a state_dict round trip
    opt = torch.optim.SGD(tied.parameters(), lr=0.1)
    tied(torch.randint(0, 256, (2, 8))).sum().backward()
    opt.step()
    reloaded = _tiny()
    reloaded.load_state_dict(tied.state_dict())
    assert reloaded.head.weight is reloaded.tok_emb.weight
    torch.testing.assert_close(reloaded.head.weight, tied.tok_emb.weight)


def test_untrained_decoder_predicts_nearly_uniformly() -> None:
    model = _tiny()
    x = torch.randint(0, 256, (4, 32))
    assert 230 < perplexity(model(x)[:, :-1], x[:, 1:]).item() < 280


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 32, "n_heads": 3}, r"n_heads=3 does not divide d_model=32"),
        ({"d_model": 0}, r"d_model must be a positive integer, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"attention": "flash"}, r"attention must be one of \['mha', 'sdpa'\], got 'flash'"),
    ],
)
def test_decoder_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTDecoder(**kwargs)


def test_decoder_rejects_too_long_sequences() -> None:
    with pytest.raises(ValueError, match="sequence length 33 is longer than max_len=32"):
        _tiny()(torch.zeros(1, 33, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_is_exp_of_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    targets = torch.tensor([[0, 1, -100]])  # the third position is padding
    ce1 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce2 = -math.log(math.e / (math.e + 2))
    expected = math.exp((ce1 + ce2) / 2)
    assert perplexity(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert perplexity(logits, targets).item() == pytest.approx(math.exp(F.cross_entropy(logits[0], targets[0]).item()))
    nll, count = token_nll(logits, targets)
    assert count.item() == 2 and nll.item() == pytest.approx(ce1 + ce2, rel=1e-6)


def test_metric_matches_function_and_torchmetrics_but_stays_finite() -> None:
    from torchmetrics.text import Perplexity as TorchmetricsPerplexity

    logits, targets = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    targets[0, 5:] = -100
    ours, theirs = Perplexity(), TorchmetricsPerplexity(ignore_index=-100)
    for i in range(3):  # accumulated over batches == computed at once
        ours.update(logits[i : i + 1], targets[i : i + 1])
        theirs.update(logits[i : i + 1], targets[i : i + 1])
    torch.testing.assert_close(ours.compute(), perplexity(logits, targets))
    torch.testing.assert_close(ours.compute(), theirs.compute())
    # one confidently wrong token among 99 right ones: torchmetrics' log(softmax) underflows to inf
    logits = torch.zeros(1, 100, 2)
    logits[..., 0] = 200.0
    targets = torch.zeros(1, 100, dtype=torch.long)
    targets[0, 0] = 1
    ours.reset(), theirs.reset()
    ours.update(logits, targets), theirs.update(logits, targets)
    assert math.isinf(theirs.compute().item())
    assert ours.compute().item() == pytest.approx(math.exp(2.0), rel=1e-5)


def test_perplexity_in_bf16_is_computed_in_float32() -> None:
    logits, targets = torch.randn(2, 16, 256), torch.randint(0, 256, (2, 16))
    ref = perplexity(logits.bfloat16().float(), targets)
    assert perplexity(logits.bfloat16(), targets).dtype == torch.float32
    torch.testing.assert_close(perplexity(logits.bfloat16(), targets), ref)


# --------------------------------------------------------------------------------------------------
# TextDataModule


@pytest.fixture(scope="module")
def small_text() -> TextDataModule:
    dm = TextDataModule(seq_len=32, batch_size=8, max_bytes=200_000)
    dm.setup("fit")
    return dm


def test_split_is_deterministic_and_disjoint_by_file(small_text: TextDataModule, monkeypatch) -> None:
    files = small_text.files
    train, val, test = (set(files[k]) for k in ("train", "val", "test"))
    assert val and test and not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(source_files(small_text.root))
    assert not any("site-packages" in f for f in train | val | test)
    assert not any(f.startswith("test/") or "/tests/" in f for f in train | val | test)  # tests skipped by default
    # the same whatever order the file system lists the files in, and each file by its own path only
    real = text_module.source_files
    monkeypatch.setattr(text_module, "source_files", lambda root, tests=False: list(reversed(real(root, tests))))
    assert TextDataModule(max_bytes=1000).split_files() == files
    for name, paths in files.items():
        assert all(split_of(p, 0.05, 0.05, 0) == name for p in paths[:20])
    # about the asked share of the files
    assert 0.02 < len(val) / len(train | val | test) < 0.09
    # another seed, another split
    other = TextDataModule(seed=1).split_files()
    assert other["val"] != files["val"]


def test_chunks_are_shifted_inputs(small_text: TextDataModule) -> None:
    assert small_text.train_set is not None and small_text.val_set is not None
    first, second = small_text.train_set[0], small_text.train_set[1]
    for sample in (first, second):
        assert sample["input_ids"].shape == sample["labels"].shape == (32,)
        assert sample["input_ids"].dtype == sample["labels"].dtype == torch.int64
        assert torch.equal(sample["labels"][:-1], sample["input_ids"][1:])
    assert first["labels"][-1] == second["input_ids"][0]  # consecutive samples: every byte predicted once
    batch = next(iter(small_text.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32)
    # max_bytes caps the corpus, each split its share
    sizes = {k: getattr(small_text, f"{k}_set").data.numel() for k in ("train", "val", "test")}
    assert sum(sizes.values()) <= 200_000 and sizes["train"] == 180_000 and sizes["val"] == 10_000
    assert "def " in decode(small_text.train_set.data[:50_000])  # real Python source


def test_each_split_is_its_files_joined_by_a_separator(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / ("pkg" if i % 2 else "")).mkdir(exist_ok=True)
        (tmp_path / ("pkg" if i % 2 else "") / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "skipped.py").write_text("y = 0\n")
    dm = TextDataModule(root=str(tmp_path), seq_len=4, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert sum(len(v) for v in dm.files.values()) == 40
    for name in ("train", "val", "test"):
        expected = b"".join((tmp_path / f).read_bytes() + bytes([SEPARATOR]) for f in dm.files[name])
        assert bytes(getattr(dm, f"{name}_set").data.tolist()) == expected


def test_last_chunk_is_padded_with_ignored_labels() -> None:
    chunks = ByteChunks(torch.arange(10, dtype=torch.uint8), seq_len=4)
    assert len(chunks) == 3  # 9 predictions: 4 + 4 + 1
    last = chunks[2]
    assert last["input_ids"].tolist() == [8, SEPARATOR, SEPARATOR, SEPARATOR]
    assert last["labels"].tolist() == [9, -100, -100, -100]
    with pytest.raises(IndexError):
        chunks[3]


def test_encode_decode_round_trip() -> None:
    ids = encode("def f(x):\n    return 'é'\n")
    assert ids.dtype == torch.int64 and int(ids.max()) < 256
    assert decode(ids) == "def f(x):\n    return 'é'\n"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\), got 1.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave training data"),
        ({"max_bytes": -5}, "max_bytes must be a positive integer or None, got -5"),
    ],
)
def test_text_datamodule_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_text_datamodule_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no .py files under"):
        TextDataModule(root=str(tmp_path)).setup()
    (tmp_path / "only.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"the (val|test|train) split is empty \(0 files.*seed=0\).*try another seed"):
        TextDataModule(root=str(tmp_path)).setup()


# --------------------------------------------------------------------------------------------------
# LanguageModelModule


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_module_example_input_and_shift_without_labels() -> None:
    module = LanguageModelModule(_tiny(), example_seq_len=12)
    assert module.example_input_array.shape == (1, 12) and module.example_input_array.dtype == torch.long
    x = torch.randint(0, 256, (2, 16))
    shifted = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    with torch.no_grad():
        explicit = module.training_step(shifted, 0)
        implicit = module.training_step({"input_ids": x}, 0)  # shifted inside: logits[:, :-1] vs ids[:, 1:]
        as_tuple = module.training_step((x[:, :-1], x[:, 1:]), 0)
    # the same predictions on the same prefix, so the same loss
    torch.testing.assert_close(explicit, implicit)
    torch.testing.assert_close(explicit, as_tuple)
    assert module.predict_step(shifted, 0).shape == (2, 15)
    with pytest.raises(ValueError, match="scheduler_interval must be one of"):
        LanguageModelModule(_tiny(), scheduler_interval="batch")  # type: ignore[arg-type]


def test_labels_equal_to_the_inputs_are_shifted() -> None:
    """Hugging Face's convention (labels = input ids, the model shifts them) was scored unshifted: the model learnt to
    copy its input and reported a perplexity near 1. They are read as next-token labels now, decided on the first
    batch; labels already shifted are left as they are, and shift_labels=False keeps them unshifted."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    x[1, :3] = -100  # an ignored position at the start: counted positions decide
    ids = x.clamp_min(0)
    hf = {"input_ids": ids, "labels": x}
    module = LanguageModelModule(_tiny())
    with torch.no_grad():
        logits = module(ids)
        loss = module.training_step(hf, 0)
        nll, count = token_nll(logits[:, :-1], x[:, 1:])
        torch.testing.assert_close(loss, nll / count)
        shifted = LanguageModelModule(module.model)
        torch.testing.assert_close(shifted.training_step({"input_ids": ids[:, :-1], "labels": x[:, 1:]}, 0),
                                   token_nll(logits[:, :-1], x[:, 1:])[0] / count)
        assert shifted._shift is False
        kept = LanguageModelModule(module.model, shift_labels=False)
        unshifted, n = token_nll(logits, x)
        torch.testing.assert_close(kept.training_step(hf, 0), unshifted / n)
    with pytest.raises(ValueError, match="shift_labels must be None .* got 'yes'"):
        LanguageModelModule(_tiny(), shift_labels="yes")  # type: ignore[arg-type]


def test_tiny_fit_lowers_validation_perplexity(tmp_path: Path, one_intra_op_thread) -> None:
    model = GPTDecoder(d_model=64, n_layers=2, n_heads=4, max_len=64)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    module = LanguageModelModule(model, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = TextDataModule(seq_len=64, batch_size=16, max_bytes=100_000)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=40, limit_val_batches=8, val_check_interval=20))
    before = trainer.validate(module, dm, verbose=False)[0]
    assert 200 < before["val_ppl"] < 320  # an untrained byte model: nearly uniform over 256 values
    assert before["val_ppl"] == pytest.approx(math.exp(before["val_loss"]), rel=1e-5)
    trainer.fit(module, dm)
    after = trainer.validate(module, dm, verbose=False)[0]
    assert after["val_ppl"] < 0.8 * before["val_ppl"]
    assert after["val_ppl"] == pytest.approx(math.exp(after["val_loss"]), rel=1e-5)
    assert module.example_input_array.shape == (1, 64)  # taken from the first batch
    test = trainer.test(module, dm, verbose=False)[0]
    assert set(test) == {"test_loss", "test_ppl"} and test["test_ppl"] < 0.8 * before["val_ppl"]


def test_dense_config_runs_through_the_cli(tmp_path: Path, monkeypatch) -> None:
    from lightning_compress.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    short = [
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.max_bytes=60000", "--model.init_args.scheduler.init_args.total_steps=3",
    ]
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "lm_dense.yaml"), *short])
    assert type(cli.model).__name__ == "LanguageModelModule" and type(cli.model.model).__name__ == "GPTDecoder"
    assert type(cli.datamodule).__name__ == "TextDataModule"
    assert cli.trainer.global_step == 3 and "val_ppl" in cli.trainer.callback_metrics
    assert cli.model.model.head.weight is cli.model.model.tok_emb.weight


@pytest.mark.parametrize(
    ("name", "plugin"),
    [("lm_prune.yaml", "PruningCallback"), ("lm_prune_heads.yaml", "PruningCallback"), ("lm_quant.yaml", "QuantizeCallback"), ("lm_qat_compiled.yaml", "QuantizeCallback"), ("lm_distill.yaml", None)],
)
def test_lm_compression_configs_build(name: str, plugin: str | None, tmp_path: Path) -> None:
    """Every LM config parses and builds its model, data and plugins (the runs themselves take minutes)."""
    from lightning_compress.cli import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / name
    overrides = [f"--trainer.default_root_dir={tmp_path}"]
    if name == "lm_distill.yaml":  # its teacher checkpoint is what lm_dense.yaml writes
        overrides.append("--model.init_args.teacher_ckpt=null")
    cli = cli_main(["--config", str(config), *overrides], run=False)
    assert isinstance(cli.datamodule, TextDataModule)
    if plugin is not None:
        assert plugin in [type(c).__name__ for c in cli.trainer.callbacks]
    else:
        assert type(cli.model).__name__ == "DistillationModule" and isinstance(cli.model.student, GPTDecoder)


def test_lm_prune_heads_config_removes_heads_and_neurons(tmp_path: Path) -> None:
    """configs/lm_prune_heads.yaml on a small corpus: the units are masked, removed, and the smaller model trains on."""
    from lightning_compress.cli import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "lm_prune_heads.yaml"
    cli = cli_main([
        "fit", "--config", str(config), "--trainer.max_steps=8", "--trainer.val_check_interval=8",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.max_bytes=60000",
    ])
    blocks = cli.model.model.blocks
    assert [b.attn.n_heads for b in blocks] == [2] * 4 and [b.fc1.out_features for b in blocks] == [256] * 4
    assert cli.trainer.global_step == 8 and torch.isfinite(cli.trainer.callback_metrics["val_ppl"])
