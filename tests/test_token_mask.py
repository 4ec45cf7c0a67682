"""Padded positions and the layers' input statistics: which mask, for which batches, and for how long."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import trainer_kwargs
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_compress import DistillationModule, PruningCallback, QuantizeCallback, token_mask
from lightning_compress.quantization import fake_quant_layers

T, D = 6, 8


def padded_samples(n: int, key: str = "attention_mask") -> list[dict[str, Tensor]]:
    """Sequences of features whose padded positions (the last 3) hold 1000: counted, they set every range."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(T, D, generator=g)
        mask = torch.tensor([1, 1, 1, 0, 0, 0])
        out.append({"x": x.masked_fill(mask[:, None] == 0, 1000.0), key: mask, "y": torch.randint(0, 3, (), generator=g)})
    return out


class Tagger(LightningModule):
    """A per-position network over dict batches; ``skip_at`` makes ``on_train_batch_start`` return -1 there."""

    def __init__(self, key: str = "attention_mask", skip_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 3))
        self.key, self.skip_at = key, skip_at

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> int | None:
        return -1 if batch_idx == self.skip_at else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["x"])[:, 0]
        return F.cross_entropy(logits, batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module: LightningModule, callback, tmp_path: Path, key: str = "attention_mask") -> None:
    trainer = Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs(tmp_path, limit_val_batches=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(padded_samples(16, key), batch_size=4))


@pytest.mark.parametrize("skip_at", [None, 2])
def test_the_observed_ranges_leave_padding_out_and_the_mask_ends_with_training(tmp_path: Path, skip_at: int | None) -> None:
    """The first layer's observed range is that of the tokens (|x| < 5), not the padding's 1000. A step skipped with
    -1 in on_train_batch_start has no on_train_batch_end: its mask stayed current after the fit, and a later
    observer of that shape dropped positions."""
    module = Tagger(skip_at=skip_at)
    _fit(module, QuantizeCallback(start_epoch=0, latency="none", convert_on_fit_end=False), tmp_path)
    observer = fake_quant_layers(module)["net.0"].quantizer.observer
    assert 0.5 < float(observer.max_val) < 5.0
    assert token_mask.current() is None


def test_a_modules_own_mask_key_is_read_and_none_reads_none(tmp_path: Path) -> None:
    """DistillationModule(attention_mask_key=...) names the mask of its batches: the plugins read that key; None says
    the batches have none, and every position counts."""
    teacher = nn.Sequential(nn.Linear(D, 3))
    named = DistillationModule(nn.Sequential(nn.Linear(D, 3)), teacher, num_classes=3, attention_mask_key="src_mask")
    assert token_mask.mask_key_of(named) == "src_mask"
    none = DistillationModule(nn.Sequential(nn.Linear(D, 3)), teacher, num_classes=3, attention_mask_key=None)
    assert token_mask.mask_key_of(none) is None and token_mask.batch_mask({"attention_mask": torch.ones(2, 3, dtype=torch.long)}, None) is None
    assert token_mask.mask_key_of(Tagger()) == "attention_mask"


def test_encoder_decoder_models_and_decoder_batches_count_every_position() -> None:
    """With a target as long as the source, the decoder's inputs have the source mask's shape, which would drop real
    decoder tokens from the statistics (a BART's fc1 range shrank from 2.80 to 2.42). An encoder-decoder model, or a
    batch with decoder inputs, has no mask for them."""
    transformers = pytest.importorskip("transformers", reason="the encoder-decoder case is a Hugging Face model")
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0)

    class Seq2Seq(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.T5ForConditionalGeneration(config)

    assert token_mask.mask_key_of(Seq2Seq()) is None
    mask = torch.tensor([[1, 1, 0]])
    assert token_mask.batch_mask({"input_ids": mask, "attention_mask": mask, "decoder_input_ids": mask}) is None
    assert torch.equal(token_mask.batch_mask({"input_ids": mask, "attention_mask": mask}), mask.bool())


def test_a_step_that_reads_its_own_batches_sets_no_mask(tmp_path: Path) -> None:
    """training_step(self, dataloader_iter): the batch the hooks see is the one fetched before, not the one the step
    runs, so no mask is taken from it."""

    class IteratorStep(Tagger):
        def training_step(self, dataloader_iter) -> Tensor:  # type: ignore[override]
            batch = next(dataloader_iter)
            return super().training_step(batch, 0)

    assert token_mask.mask_key_of(IteratorStep()) is None


def test_wanda_scores_the_tokens_inputs_only(tmp_path: Path) -> None:
    """Wanda's input norms over a padded batch: counted, the padding's 1000s (the same in every feature) made the
    norms equal and the masks magnitude's. The masks are those of the norms over the tokens."""
    module = Tagger()
    weight = module.net[0].weight.detach().clone()
    prune = PruningCallback(0.5, criterion="wanda", schedule="one_shot", start_epoch=0, include=[r"net\.0"], verbose=False)
    _fit(module, prune, tmp_path)
    tokens = torch.stack([s["x"][:3] for s in padded_samples(16)]).reshape(-1, D)
    scores = weight.abs() * tokens.square().sum(0).sqrt()
    kept = scores >= scores.kthvalue(D // 2, dim=1, keepdim=True).values.nextafter(torch.tensor(float("inf")))
    assert torch.equal(prune.masks["net.0.weight"].bool(), kept)
    assert token_mask.current() is None


def test_the_plugins_read_a_mask_inside_a_mapping_of_inputs_and_leave_other_batches_alone(tmp_path: Path) -> None:
    """The plugins read any module's batches: a None entry from a collate function, or a nested layout
    ({"inputs": {..., "mask": ...}, "labels": ...}) under a DistillationModule(attention_mask_key="mask"), stopped the fit
    at its first step ("is not a key of the batch"). A nested mask is read; an entry that is no tensor is none."""
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(token_mask.batch_mask({"inputs": {"input_ids": mask, "mask": mask}, "labels": mask}, "mask"), mask.bool())
    assert token_mask.batch_mask({"x": torch.zeros(1, 3), "attention_mask": None}) is None
    assert token_mask.batch_mask({"x": torch.zeros(1, 3)}, "mask") is None
    assert token_mask.batch_mask({"inputs": {"input_ids": mask, "attention_mask": mask, "decoder_input_ids": mask}}) is None

    class NoMask(Tagger):
        def training_step(self, batch: dict, batch_idx: int) -> Tensor:
            return super().training_step({k: v for k, v in batch.items() if k != "attention_mask"}, batch_idx)

    samples = [{k: v for k, v in s.items() if k != "attention_mask"} for s in padded_samples(16)]
    trainer = Trainer(max_epochs=1, callbacks=[QuantizeCallback(start_epoch=0, latency="none", convert_on_fit_end=False)],
                      **trainer_kwargs(tmp_path, limit_val_batches=0))
    loader = DataLoader(samples, batch_size=4, collate_fn=lambda b: {**torch.utils.data.default_collate(b), "attention_mask": None})
    trainer.fit(NoMask(), loader)
    assert trainer.global_step == 4
