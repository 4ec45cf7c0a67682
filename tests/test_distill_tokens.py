"""Token-level distillation: (B, T, V) logits, padding masks, task losses, the teacher's dtype, setup checks."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import trainer_kwargs
from lightning.pytorch import Callback, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_compress.distillation import DistillationModule, kl_div_distill, mse_distill, split_batch
from lightning_compress.token_mask import mask_entry as attention_mask
from lightning_compress.distillation.losses import TokenCrossEntropy, cosine_distill, resolve_task_loss, token_cross_entropy
from lightning_compress.batches import ForwardCall
from lightning_compress.distillation.tokens import check_output_shapes, distillation_terms
from lightning_compress.models import MLP

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny GRUs: a second thread only waits

TEXT = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
LENGTH = 24


class TinyLM(nn.Module):
    """A byte-level causal language model: embedding, one GRU layer (causal by construction), a linear head."""

    def __init__(self, dim: int = 32, vocab: int = 256, out: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, out or vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def byte_samples(n: int, seed: int = 0, pad: bool = True) -> list[dict[str, Tensor]]:
    """Next-byte prediction on repetitive text, right-padded to ``LENGTH`` (labels -100 and mask 0 there)."""
    data = torch.tensor(list(TEXT * 8))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - LENGTH - 1, (n,), generator=gen)
    seqs = torch.stack([data[s : s + LENGTH + 1] for s in starts.tolist()])
    ids, labels, mask = seqs[:, :-1].clone(), seqs[:, 1:].clone(), torch.ones(n, LENGTH, dtype=torch.long)
    if pad:
        for i, length in enumerate(torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=gen).tolist()):
            ids[i, length:], labels[i, length:], mask[i, length:] = 0, -100, 0
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def loader(n: int, seed: int = 0, batch_size: int = 16, **kwargs: Any) -> DataLoader:
    return DataLoader(byte_samples(n, seed, **kwargs), batch_size=batch_size)


@pytest.fixture(scope="module")
def teacher_lm(one_intra_op_thread: None) -> TinyLM:
    """A bigger LM trained briefly on the same text (plain torch, a few hundred milliseconds)."""
    torch.manual_seed(1)
    net = TinyLM(dim=64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    batches = [next(iter(loader(32, seed=100 + i, batch_size=32, pad=False))) for i in range(4)]
    for step in range(60):
        batch = batches[step % 4]
        loss = F.cross_entropy(net(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def make_trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", 1)
    return Trainer(**trainer_kwargs(tmp_path, **kwargs))


def _adam(lr: float) -> Any:
    return lambda params: torch.optim.Adam(params, lr=lr)


# --------------------------------------------------------------------------------------------------
# training end to end
# --------------------------------------------------------------------------------------------------
def test_short_fit_lowers_val_ppl_and_logs_token_metrics(tmp_path: Path, teacher_lm: TinyLM) -> None:
    module = DistillationModule(TinyLM(dim=32), copy.deepcopy(teacher_lm), temperature=2.0, alpha=0.5, optimizer=_adam(1e-2))
    val = loader(32, seed=7)
    before = make_trainer(tmp_path).validate(module, val, verbose=False)[0]
    assert before["val_ppl"] > 100  # an untrained student: about uniform over 256 bytes
    trainer = make_trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(module, loader(96), val)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert after["val_ppl"] < before["val_ppl"] / 8, (before, after)
    assert after["val_ppl"] == pytest.approx(math.exp(after["val_loss"]), rel=1e-3)  # the same token-weighted NLL
    assert 0.0 <= after["val_agreement"] <= 1.0 and 0.0 <= after["val_acc"] <= 1.0
    assert module.teacher_val_perplexity is not None and module.teacher_val_perplexity < after["val_ppl"]
    assert module.compression_baseline_metrics()["val_ppl"] == module.teacher_val_perplexity
    assert math.isfinite(after["train_loss"]) and "ce_loss" in after and "distill_loss" in after
    tested = trainer.test(module, val, verbose=False)[0]
    assert {"test_ppl", "test_acc", "test_agreement", "test_loss", "teacher_test_ppl"} <= set(tested)


# --------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------
def _sequence_case() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    labels = torch.randint(1, 11, (3, 5))
    labels[0, 3:] = -100
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 4] = 0  # padding with a real label id under it: the attention mask alone excludes it
    return s, t, labels, mask


@pytest.mark.parametrize("distill", [kl_div_distill, mse_distill, cosine_distill])
def test_masked_positions_change_neither_loss_nor_gradients(distill: Any) -> None:
    s, t, labels, mask = _sequence_case()
    out = (labels == -100) | (mask == 0)

    def run(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        student = student.clone().requires_grad_(True)
        loss, _, n = distillation_terms(student, teacher, labels, mask, distill, TokenCrossEntropy(), 2.0, 0.3)
        assert n == int((~out).sum())
        loss.backward()
        return loss.detach(), student.grad

    loss, grad = run(s, t)
    s2, t2 = s.clone(), t.clone()
    s2[out], t2[out] = 1e4, float("-inf")  # anything at the masked positions, even non-finite logits
    loss2, grad2 = run(s2, t2)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert torch.all(grad[out] == 0)
    # and it is the mean over the counted positions of both terms
    keep = ~out
    ref = 0.3 * distill(s[keep], t[keep], 2.0) + 0.7 * F.cross_entropy(s[keep], labels[keep])
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_training_step_ignores_what_is_under_the_padding(teacher_lm: TinyLM) -> None:
    """Through the module: labels and attention_mask read from the dict batch; other pad tokens, same loss and grads."""
    module = DistillationModule(TinyLM(), copy.deepcopy(teacher_lm), temperature=2.0, alpha=0.5)
    batch = next(iter(loader(8)))
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][other["attention_mask"] == 0] = 200  # right padding, causal model: counted logits unchanged
    other["labels"][other["attention_mask"] == 0] = 7  # real ids under the padding: the attention mask excludes them

    def step(b: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        module.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            loss = module.training_step(b, 0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.student.parameters()]

    (a, ga), (b, gb) = step(batch), step(other)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_fully_masked_batch_gives_zero_loss_with_a_graph() -> None:
    s, t, labels, mask = _sequence_case()
    s.requires_grad_(True)
    loss, parts, n = distillation_terms(s, t, torch.full_like(labels, -100), mask, kl_div_distill, TokenCrossEntropy(), 4.0, 0.5)
    assert n == 0 and float(loss.detach()) == 0.0 and loss.requires_grad and "distill_loss" not in parts
    loss.backward()
    assert torch.all(s.grad == 0)
    # no labels, no attention: every position counts
    _, _, n = distillation_terms(s, t, None, None, kl_div_distill, TokenCrossEntropy(), 4.0, 0.5)
    assert n == 15
    assert float(token_cross_entropy(s, torch.full_like(labels, -100))) == 0.0


def test_fully_padded_batch_in_a_fit_is_finite(tmp_path: Path, teacher_lm: TinyLM) -> None:
    samples = byte_samples(16)
    for sample in samples[:8]:  # the first batch is all padding
        sample["labels"][:] = -100
        sample["attention_mask"][:] = 0
    module = DistillationModule(TinyLM(), copy.deepcopy(teacher_lm), optimizer=_adam(1e-2))
    trainer = make_trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(samples, batch_size=8))
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["train_loss"]))


def test_masked_label_shape_and_keys_errors() -> None:
    s, t, labels, _ = _sequence_case()
    with pytest.raises(ValueError, match=r"labels \(3, 4\) do not match the logits \(3, 5, 11\).*shift_labels=True"):
        distillation_terms(s, t, labels[:, :4], None, kl_div_distill, TokenCrossEntropy(), 1.0, 0.5)
    with pytest.raises(ValueError, match=r"attention_mask \(3, 6\) does not match the logits' positions \(3, 5\)"):
        distillation_terms(s, t, labels, torch.ones(3, 6), kl_div_distill, TokenCrossEntropy(), 1.0, 0.5)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4), "pad": torch.ones(2, 4)}
    x, y, _ = split_batch(batch)  # input_ids and labels are default keys
    assert x is batch["input_ids"] and y is batch["labels"]
    assert attention_mask(batch) is None and attention_mask(batch, None) is None
    assert attention_mask(batch, "pad") is batch["pad"]
    with pytest.raises(ValueError, match="attention_mask_key='padding' is not a key"):
        attention_mask(batch, "padding")


# --------------------------------------------------------------------------------------------------
# classification is unchanged
# --------------------------------------------------------------------------------------------------
def test_nc_training_loss_is_the_classification_formula_bit_for_bit() -> None:
    torch.manual_seed(0)
    module = DistillationModule(MLP(64, (16,), 10), MLP(64, (32,), 10), temperature=3.0, alpha=0.7)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    y[2] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step((x, y), 0)
    s, t = module.student(x), module.teacher(x)
    assert torch.equal(loss, 0.7 * kl_div_distill(s, t, 3.0) + 0.3 * F.cross_entropy(s, y))


# --------------------------------------------------------------------------------------------------
# bad input: found in setup
# --------------------------------------------------------------------------------------------------
def test_vocabulary_mismatch_fails_in_setup_before_any_step(tmp_path: Path) -> None:
    steps: list[int] = []

    class Count(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    module = DistillationModule(TinyLM(vocab=256), TinyLM(vocab=256, out=300))
    trainer = make_trainer(tmp_path, callbacks=[Count()])
    with pytest.raises(ValueError, match=r"student logits \(16, 24, 256\) and teacher logits \(16, 24, 300\).*setup.*vocabulary"):
        trainer.fit(module, loader(32))
    assert trainer.global_step == 0 and not steps and not trainer.optimizers  # configure_optimizers never ran


def test_setup_check_leaves_the_student_untouched() -> None:
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    call = ForwardCall((torch.randn(16, 4),))
    check_output_shapes(student, call, lambda c: c(nn.Linear(4, 3)), call)
    assert student.training and all(m.training for m in student.modules())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # BatchNorm statistics too
    with pytest.raises(ValueError, match=r"student logits \(16, 3\) and teacher logits \(16, 5\).*classes"):
        check_output_shapes(student, call, lambda c: c(nn.Linear(4, 5)), call)


# --------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------
def test_bfloat16_teacher_on_cpu_with_cache(tmp_path: Path, teacher_lm: TinyLM) -> None:
    module = DistillationModule(TinyLM(), copy.deepcopy(teacher_lm), teacher_dtype="bfloat16", cache_teacher_outputs=True)
    trainer = make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, loader(32), loader(16, seed=3))
    assert all(p.dtype == torch.bfloat16 for p in module.teacher.parameters())
    assert all(p.dtype == torch.float32 for p in module.student.parameters())
    assert module.teacher_cache.hits > 0
    assert {t.store.dtype for t in module.teacher_cache.tables.values()} == {torch.bfloat16}  # what the teacher returns
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert module.teacher_logits(ids, module(ids)).dtype == torch.float32  # cast back for the loss
    assert math.isfinite(float(trainer.callback_metrics["train_loss"])) and "val_ppl" in trainer.callback_metrics
    with pytest.raises(ValueError, match=r"teacher_dtype must be None or one of \['bfloat16', 'float16'\]"):
        DistillationModule(TinyLM(), TinyLM(), teacher_dtype="int8")  # type: ignore[arg-type]


def test_custom_task_loss_sees_counted_positions_only(tmp_path: Path, teacher_lm: TinyLM) -> None:
    seen: list[tuple[tuple[int, ...], bool]] = []

    def my_loss(logits: Tensor, labels: Tensor) -> Tensor:
        seen.append((tuple(logits.shape), bool((labels == -100).any())))
        return 2.0 * F.cross_entropy(logits, labels)

    module = DistillationModule(TinyLM(), copy.deepcopy(teacher_lm), task_loss=my_loss, alpha=0.5)
    assert "task_loss" not in module.hparams  # a callable is not a hyper-parameter
    make_trainer(tmp_path, limit_train_batches=2, num_sanity_val_steps=0).fit(module, loader(32))
    assert len(seen) == 2 and all(len(shape) == 2 and shape[1] == 256 and not has_pad for shape, has_pad in seen)
    # by import path (YAML), and "none": the distillation term alone
    assert resolve_task_loss("torch.nn.functional.cross_entropy")[1] == "torch.nn.functional.cross_entropy"
    none = DistillationModule(TinyLM(), copy.deepcopy(teacher_lm), task_loss="none")
    assert none.hparams["task_loss"] == "none"
    trainer = make_trainer(tmp_path, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(none, loader(32))
    assert "ce_loss" not in trainer.callback_metrics and "distill_loss" in trainer.callback_metrics
    with pytest.raises(ValueError, match=r"cannot import task_loss 'nope.missing'.*\['cross_entropy', 'none'\]"):
        DistillationModule(TinyLM(), TinyLM(), task_loss="nope.missing")


def test_ignore_index_and_attention_mask_key_options() -> None:
    s, t, labels, mask = _sequence_case()  # real labels are 1..10
    a = distillation_terms(s, t, labels, mask, kl_div_distill, TokenCrossEntropy(-100), 1.0, 0.5, -100)
    zero = labels.masked_fill(labels == -100, 0)  # a dataset that marks ignored positions with 0
    b = distillation_terms(s, t, zero, mask, kl_div_distill, TokenCrossEntropy(0), 1.0, 0.5, 0)
    assert torch.equal(a[0], b[0]) and a[2] == b[2] == 12
    module = DistillationModule(TinyLM(), TinyLM(), ignore_index=0, attention_mask_key=None)
    assert module._task_fn.ignore_index == 0 and module.attention_mask_key is None


def test_validation_without_labels_warns_once_and_still_measures_agreement(tmp_path: Path, teacher_lm: TinyLM) -> None:
    samples = [{"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]} for s in byte_samples(32)]
    module = DistillationModule(TinyLM(), copy.deepcopy(teacher_lm))
    with pytest.warns(UserWarning, match=r"val_ppl, val_acc, val_loss and teacher_val_ppl are not computed: .*no labels") as record:
        metrics = make_trainer(tmp_path).validate(module, DataLoader(samples, batch_size=8), verbose=False)[0]
    assert sum("are not computed" in str(w.message) for w in record) == 1  # once, not per batch
    assert "val_agreement" in metrics and "val_ppl" not in metrics


def test_token_options_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DistillationModule, "model")
    cfg = parser.parse_string(
        """
model:
  student: {class_path: lightning_compress.models.MLP, init_args: {in_features: 64, hidden: [8]}}
  teacher: {class_path: lightning_compress.models.MLP, init_args: {in_features: 64, hidden: [16]}}
  task_loss: torch.nn.functional.cross_entropy
  teacher_dtype: bfloat16
  ignore_index: 0
  attention_mask_key: null
"""
    )
    module = parser.instantiate(cfg).model
    assert module._task_fn is F.cross_entropy and module.hparams["task_loss"] == "torch.nn.functional.cross_entropy"
    assert module._teacher_dtype is torch.bfloat16 and module.ignore_index == 0 and module.attention_mask_key is None


# --------------------------------------------------------------------------------------------------
# channel-first logits (segmentation): class_dim
# --------------------------------------------------------------------------------------------------
class TinySeg(nn.Module):
    """(N, 3, H, W) images -> (N, C, H, W) per-pixel class logits."""

    def __init__(self, width: int, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).relu())


def _segmentation_data(n: int = 16) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    return torch.randn(n, 3, 6, 7), torch.randint(0, 4, (n, 6, 7))


def test_channel_first_logits_are_distilled_over_the_class_dimension(tmp_path: Path) -> None:
    x, y = _segmentation_data()
    student, teacher = TinySeg(4), TinySeg(16)
    module = DistillationModule(student, teacher, num_classes=4, temperature=2.0, alpha=0.5, class_dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step((x[:4], y[:4]), 0)
    with torch.no_grad():
        s, t = student(x[:4]).movedim(1, -1).reshape(-1, 4), teacher(x[:4]).movedim(1, -1).reshape(-1, 4)
    expected = 0.5 * kl_div_distill(s, t, 2.0) + 0.5 * F.cross_entropy(s, y[:4].reshape(-1))  # per pixel, over classes
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    data = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = make_trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, data, data)
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    metrics = trainer.callback_metrics
    assert float(metrics["val_acc"]) == pytest.approx(float((zs.argmax(1) == y).float().mean()))  # pixel accuracy
    assert float(metrics["val_agreement"]) == pytest.approx(float((zs.argmax(1) == zt.argmax(1)).float().mean()))
    predicted = trainer.predict(module, DataLoader(x, batch_size=8))
    assert predicted is not None and torch.equal(torch.cat(predicted), zs.argmax(1))  # type: ignore[arg-type]


def test_channel_first_labels_without_class_dim_fail_in_setup_naming_it(tmp_path: Path) -> None:
    x, y = _segmentation_data()
    module = DistillationModule(TinySeg(4), TinySeg(16), num_classes=4)
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"labels \(8, 6, 7\) do not match the logits \(8, 4, 6, 7\).*setup.*class_dim=1"):
        trainer.fit(module, DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 0 and not trainer.optimizers
    with pytest.raises(ValueError, match=r"class_dim=4 names a dimension the logits \(2, 4, 6, 7\) do not have"):
        make_trainer(tmp_path).fit(DistillationModule(TinySeg(4), TinySeg(16), class_dim=4), DataLoader(x, batch_size=8))


# --------------------------------------------------------------------------------------------------
# hidden-state hints between sequence models
# --------------------------------------------------------------------------------------------------
def test_hint_loss_leaves_padded_positions_out() -> None:
    from lightning_compress.distillation.features import FeatureCapture, FeatureProjection, feature_matching_loss

    torch.manual_seed(0)
    capture = FeatureCapture({"s": "t"})
    proj = nn.ModuleDict({"s": FeatureProjection("token", 4, 6)})
    fs, ft = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def run(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        student = student.clone().requires_grad_(True)
        capture.student["s"], capture.teacher["t"] = student, teacher
        loss = feature_matching_loss(capture, proj, "mse", mask)
        proj.zero_grad()
        loss.backward()
        return loss.detach(), proj["s"].proj.weight.grad.clone()  # type: ignore[union-attr]

    loss, grad = run(fs, ft)
    fs2, ft2 = fs.clone(), ft.clone()
    fs2[0, 3:], ft2[0, 3:] = float("inf"), 1e6  # anything under the padding
    loss2, grad2 = run(fs2, ft2)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    keep = mask.bool()
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(F.mse_loss(proj["s"](fs)[keep], ft[keep])), rel=1e-6)
    assert float(feature_matching_loss(capture, proj, "mse", torch.zeros(2, 5))) == 0.0  # nothing counted
    with pytest.raises(ValueError, match=r"sized for student features of 20 values per sample, got shape \(2, 6, 4\)"):
        FeatureProjection("linear", 20, 30)(torch.zeros(2, 6, 4))


def test_hidden_state_hints_between_gpt2_widths_with_per_batch_padding(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")

    def gpt2(width: int, layers: int) -> nn.Module:
        torch.manual_seed(width)
        config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=width, n_layer=layers, n_head=2)
        return transformers.GPT2LMHeadModel(config)

    gen = torch.Generator().manual_seed(0)
    lengths = [3, 9, 5, 12, 4, 7, 6, 11, 8, 10, 5, 6]
    sequences = [torch.randint(1, 40, (n,), generator=gen) for n in lengths]

    def collate(seqs: list[Tensor]) -> dict[str, Tensor]:  # pads to the longest of each batch
        ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    data = DataLoader(sequences, batch_size=4, collate_fn=collate)
    assert [b["input_ids"].shape[1] for b in data] == [12, 11, 10]
    module = DistillationModule(
        gpt2(16, 1), gpt2(32, 2), num_classes=40, features={"transformer.h.0": "transformer.h.1"}, optimizer=_adam(1e-2)
    )
    trainer = make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    proj = module.projections["transformer__h__0"]
    assert proj.kind == "token" and tuple(proj.proj.weight.shape) == (32, 16)  # D_student -> D_teacher, any length
    assert trainer.global_step == 6 and 0 < float(trainer.callback_metrics["feature_loss"]) < 10
    path = tmp_path / "hints.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillationModule.load_from_checkpoint(path, student=gpt2(16, 1), teacher=gpt2(32, 2))  # strict
    assert loaded.projections["transformer__h__0"].kind == "token"
    assert torch.equal(loaded.projections["transformer__h__0"].proj.weight, proj.proj.weight)


def _bart(width: int, seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=24, d_model=width, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config).eval()


def _seq2seq_batch(source: int, target: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, 24, (4, target), generator=g)
    labels[0, -2:] = -100  # a padded target
    return {"input_ids": torch.randint(3, 24, (4, source), generator=g), "attention_mask": torch.ones(4, source, dtype=torch.long), "labels": labels}


@pytest.mark.parametrize(("source", "target"), [(9, 5), (6, 6)])
def test_an_encoder_decoder_is_teacher_forced_on_the_labels(source: int, target: int, tmp_path: Path) -> None:
    """BART called with input_ids alone builds its decoder input from the *source*: DistillationModule's CE was
    6.19 on a batch where the model's own loss was 0.03, and targets shorter than sources failed. The decoder
    is fed the labels shifted right (the model's own rule), its logits are scored against the labels unshifted
    (even when labels equal the inputs' shape), so alpha=0 gives exactly the model's own loss; and a fit runs."""
    student, teacher = _bart(16, 0), _bart(32, 1)
    batch = _seq2seq_batch(source, target)
    if source == target:
        batch["labels"] = batch["input_ids"].clone()  # a copy task: labels equal the inputs, no next-token shift
    module = DistillationModule(student, teacher, alpha=0.0, num_classes=24)
    call = module.network_calls(batch, batch["input_ids"])[0]
    assert sorted(call.kwargs) == ["attention_mask", "decoder_input_ids", "input_ids"]
    with torch.no_grad():
        own = float(student(**batch).loss)
        assert float(module.training_step(batch, 0)) == pytest.approx(own, rel=1e-5)
    rows = [{k: v[i] for k, v in _seq2seq_batch(source, target).items()} for i in range(4)]
    module = DistillationModule(_bart(16, 0).train(), teacher, alpha=0.5, num_classes=24)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(module, DataLoader(rows, batch_size=2), DataLoader(rows, batch_size=2))
    assert math.isfinite(float(module.trainer.callback_metrics["train_loss"]))


def test_an_encoder_decoder_without_targets_is_refused_naming_them() -> None:
    student = _bart(16, 0)
    batch = {k: v for k, v in _seq2seq_batch(6, 4).items() if k != "labels"}
    module = DistillationModule(student, _bart(16, 1), alpha=1.0, num_classes=24)
    with pytest.raises(ValueError, match=r"BartForConditionalGeneration is an encoder-decoder that generates its target .* no decoder_input_ids and no targets"):
        module.network_calls(batch, batch["input_ids"])


def test_an_encoder_decoder_classifier_and_a_mixed_pair() -> None:
    """BART's classifier feeds its decoder the source itself: its class labels (under any key) are not decoder
    targets. A sequence-to-sequence student with a decoder-only teacher compares positions of different
    sequences: refused, naming both."""
    transformers = pytest.importorskip("transformers")
    config = _bart(16, 0).config
    torch.manual_seed(0)
    classifiers = [transformers.BartForSequenceClassification(config).eval() for _ in range(2)]
    ids = torch.cat([torch.randint(3, 24, (4, 5)), torch.full((4, 1), 2)], 1)  # each ends in <eos>, as BART's classifier needs
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 6, dtype=torch.long), "label": torch.tensor([0, 1, 2, 1])}
    module = DistillationModule(*classifiers, alpha=0.5, num_classes=3)
    assert sorted(module.network_calls(batch, batch["input_ids"])[0].kwargs) == ["attention_mask", "input_ids"]
    with torch.no_grad():
        assert math.isfinite(float(module.training_step(batch, 0)))
    decoder = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    mixed = DistillationModule(_bart(16, 0), decoder, num_classes=24)
    seq = _seq2seq_batch(6, 6)
    with pytest.raises(ValueError, match=r"the student \(BartForConditionalGeneration\) is an encoder-decoder .* teacher \(GPT2LMHeadModel\)"):
        mixed.network_calls(seq, seq["input_ids"])


def test_decoder_hints_are_masked_by_the_targets_padding() -> None:
    """A hint on a decoder layer of a sequence-to-sequence pair counts the target's real positions
    (decoder_attention_mask), one on the encoder the source's."""
    student, teacher = _bart(16, 0), _bart(16, 1)
    batch = _seq2seq_batch(6, 6)
    batch["attention_mask"][1, -3:] = 0
    batch["decoder_attention_mask"] = torch.ones(4, 6, dtype=torch.long)
    batch["decoder_attention_mask"][0, -2:] = 0
    module = DistillationModule(student, teacher, num_classes=24, features={"model.decoder.layers.0": "model.decoder.layers.0", "model.encoder.layers.0": "model.encoder.layers.0"})
    logits_mask, masks = module.positions_masks(batch)
    assert logits_mask is batch["decoder_attention_mask"]
    assert masks["model.decoder.layers.0"] is batch["decoder_attention_mask"] and masks["model.encoder.layers.0"] is batch["attention_mask"]


class _PairLM(nn.Module):
    """forward(ids, mask) or forward(inputs) -> (N, T, V) logits: the layouts the docs list besides a dict batch."""

    def __init__(self, seed: int, whole: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head, self.whole = nn.Embedding(30, 16), nn.Linear(16, 30), whole

    def forward(self, ids: Any, mask: Tensor | None = None) -> Tensor:
        if self.whole:
            ids, mask = ids["input_ids"], ids["attention_mask"]
        return self.head(self.emb(ids) * mask.unsqueeze(-1))


@pytest.mark.parametrize("layout", ["tuple", "mapping"])
def test_next_token_labels_are_detected_with_inputs_given_as_a_tuple_or_a_mapping(tmp_path: Path, layout: str) -> None:
    """((ids, mask), labels) and {"inputs": {...}, "labels": ...} batches crashed at the first step with shift_labels
    left to be decided ('list' object has no attribute 'is_floating_point'). The token ids are read from the inputs;
    the detected shift trains as shift_labels=True does."""
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (8, 6))
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if layout == "tuple":
        batches = [((ids[i : i + 4], mask[i : i + 4]), labels[i : i + 4]) for i in (0, 4)]
    else:
        batches = [{"inputs": {"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4]}, "labels": labels[i : i + 4]} for i in (0, 4)]

    def fit(shift: bool | None) -> tuple[float, bool | None]:
        whole = layout == "mapping"
        module = DistillationModule(_PairLM(1, whole), _PairLM(2, whole), shift_labels=shift, num_classes=30)
        trainer = Trainer(max_epochs=1, **trainer_kwargs(tmp_path, limit_val_batches=0))
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        return float(trainer.callback_metrics["train_loss"]), module._shift

    detected, shifted = fit(None), fit(True)
    assert detected[1] is True and detected[0] == pytest.approx(shifted[0], rel=1e-6)
