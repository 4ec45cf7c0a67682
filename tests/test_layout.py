"""The batch dimension of a model's inputs: 1 for PyTorch's sequence-first layers, read from the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.layout import input_batch_dim


class TokenEncoder(nn.Module):
    """Token ids ``(seq, batch)`` (or ``(batch, seq)``) into an embedding and a transformer encoder."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc(self.emb(ids))


class Calls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.calls = nn.Linear(4, 2), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


@pytest.mark.parametrize(("batch_first", "shape", "expected"), [(False, (7, 3), 1), (True, (3, 7), 0)])
def test_token_ids_into_a_transformer_encoder(batch_first: bool, shape: tuple[int, int], expected: int) -> None:
    model = TokenEncoder(batch_first).train()
    model.emb.eval()  # a child the user froze
    assert input_batch_dim(model, (torch.randint(0, 32, shape),), {}) == expected
    assert model.training and not model.emb.training and model.enc.training  # every module's mode as it was


def test_an_lstm_and_a_model_that_transposes_itself() -> None:
    assert input_batch_dim(nn.LSTM(4, 8), (torch.randn(6, 2, 4),), {}) == 1
    assert input_batch_dim(nn.LSTM(4, 8, batch_first=True), (torch.randn(2, 6, 4),), {}) == 0
    assert input_batch_dim(nn.LSTM(4, 8), (torch.randn(6, 6, 4),), {}) == 1  # as many steps as samples

    class Transposes(nn.Module):  # batch-first inputs, a sequence-first layer inside
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.transpose(0, 1)
            return self.attn(x, x, x)[0].transpose(0, 1)

    assert input_batch_dim(Transposes(), (torch.randn(2, 6, 4),), {}) == 0
    assert input_batch_dim(Transposes(), (torch.randn(6, 6, 4),), {}) == 0


def test_a_model_without_sequence_first_layers_is_not_run() -> None:
    model = Calls()
    assert input_batch_dim(model, (torch.randn(5, 4),), {}) == 0 and model.calls == 0


def test_equal_batch_and_sequence_sizes_are_told_apart_by_a_second_call() -> None:
    # (5, 5) token ids: cutting dimension 0 to one entry leaves the layer's batch of 5, so it is the sequence
    assert input_batch_dim(TokenEncoder(False), (torch.randint(0, 32, (5, 5)),), {}) == 1
    assert input_batch_dim(TokenEncoder(True), (torch.randint(0, 32, (5, 5)),), {}) == 0


class Classifier(nn.Module):
    """A transformer encoder classifier on ``(seq, batch, features)`` or ``(batch, seq, features)``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head, self.seq_dim = nn.Linear(16, 3), 1 if batch_first else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(self.seq_dim))


def test_the_report_counts_and_times_one_sample_of_a_sequence_first_model() -> None:
    from lightning_compress.report import compression_report

    batch_first, seq_first = Classifier(True), Classifier(False)
    seq_first.load_state_dict(batch_first.state_dict())
    x = torch.randn(4, 12, 16)  # 4 samples of 12 steps
    same = compression_report(batch_first, batch_first, x, batch_size=8, repeats=2, warmup=1)
    report = compression_report(seq_first, seq_first, x.transpose(0, 1), batch_size=8, repeats=2, warmup=1)
    assert report["latency_setup"]["batch_dim"] == 1 and same["latency_setup"]["batch_dim"] == 0
    # per sample: one sequence of 12 steps (dimension 0 would have counted one step of all 4 samples)
    assert report["baseline"]["macs"] == same["baseline"]["macs"] > 0


def test_export_of_a_sequence_first_model_takes_any_batch(tmp_path) -> None:
    import lightning_compress as lc

    model = Classifier(False).eval()
    lc.export(model, tmp_path / "m.safetensors", torch.randn(12, 4, 16))
    loaded = lc.load(tmp_path / "m.safetensors")
    x = torch.randn(12, 9, 16)  # another batch size, in dimension 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
