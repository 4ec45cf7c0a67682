"""The report on language models: MACs of transformer layers, keyword forwards, tokens/s, perplexity.

Two tiny causal LMs of the same shape: one built on ``nn.TransformerEncoder`` (whose inference fast
path hides its matmuls from FLOP counters) and one calling ``F.scaled_dot_product_attention`` on
separate q/k/v projections (whose fused CPU kernel FlopCounterMode has no formula for). Both have the
same hand count of multiply-accumulates per sample of ``T`` tokens:

    T · (layers · (4·D² + 2·D·FF + 2·T·D) + D·V)

weights (q, k, v, out projections; two feed-forward layers; the head) plus the attention scores
(``q @ k.T`` and ``attention @ v``: ``T·T·D`` each, over all heads; a causal mask is not subtracted).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from conftest import trainer_kwargs
from lightning_compress import CompressionReport, compression_report
from lightning_compress.report import count_macs, measure_latency, print_report, sequence_length

V, D, H, FF, LAYERS, T = 32, 16, 2, 32, 2, 8


def hand_macs(tokens: int = T, batch: int = 1, layers: int = LAYERS) -> tuple[int, int]:
    """``(weight-matmul MACs, attention-score MACs)`` of one forward of the tiny LMs."""
    weights = batch * tokens * (layers * (4 * D * D + 2 * D * FF) + D * V)
    scores = batch * layers * 2 * tokens * tokens * D
    return weights, scores


class EncoderLM(nn.Module):
    """Embedding + causal ``nn.TransformerEncoder`` (batch first) + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1], device=input_ids.device)
        return self.head(self.encoder(self.embed(input_ids), mask=mask, is_causal=True))


class SDPABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, t, H, D // H).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.out(attended)
        return x + self.ff(self.norm2(x))


class SDPALM(nn.Module):
    """Embedding + blocks of separate q/k/v projections and ``F.scaled_dot_product_attention`` + head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.Sequential(*(SDPABlock() for _ in range(LAYERS)))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(input_ids)))


class KeywordOnlyLM(SDPALM):
    """An HF-style forward: keyword-only ``input_ids`` and ``attention_mask``; checks what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(  # type: ignore[override]
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert input_ids.dtype == torch.long, input_ids.dtype  # token ids were not turned into floats
        self.seen.append((input_ids.dtype, tuple(input_ids.shape)))
        logits = super().forward(input_ids)
        return logits if attention_mask is None else logits * attention_mask[..., None]


def ids(batch: int = 1, tokens: int = T) -> torch.Tensor:
    return torch.randint(0, V, (batch, tokens))


# ----------------------------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("model_cls", [EncoderLM, SDPALM], ids=["mha", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_macs_equal_hand_count_where_the_fast_path_is_possible(model_cls: type[nn.Module], batch: int) -> None:
    model = model_cls().eval()
    x = ids(batch)
    weights, scores = hand_macs(batch=batch)
    with torch.no_grad():  # eval + no_grad: nn.TransformerEncoderLayer's fused inference path is possible
        plain = FlopCounterMode(display=False)
        with plain:
            model(x)
        assert count_macs(model, x) == weights + scores
    # the bug: a plain FlopCounterMode here saw only the head (MHA: fast path) or missed the scores (SDPA)
    assert plain.get_total_flops() // 2 < weights + scores


class Attention(nn.Module):
    def __init__(self, gqa: bool = False) -> None:
        super().__init__()
        self.gqa = gqa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)


def test_attention_scores_are_counted() -> None:
    q = torch.randn(2, H, T, D // H)
    scores = 2 * 2 * H * T * T * (D // H)  # (T x d) @ (d x T) and (T x T) @ (T x d), per sample and head
    assert count_macs(Attention(), (q, q, q)) == scores  # a tuple: the positional arguments
    kv = q[:, :1]  # grouped-query attention: one key/value head shared by both query heads
    assert count_macs(Attention(gqa=True), (q, kv, kv)) == scores
    # nn.MultiheadAttention on its own (its CPU path calls the fused kernel): weights and scores
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(1, T, D)
    assert count_macs(mha, {"query": x, "key": x, "value": x, "need_weights": False}) == 4 * T * D * D + 2 * T * T * D


@pytest.mark.parametrize("before", [True, False])
def test_fast_path_setting_is_restored_even_on_error(before: bool) -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not torch.backends.mha.get_fastpath_enabled()  # off while counting
            raise RuntimeError("boom")

    torch.backends.mha.set_fastpath_enabled(before)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            count_macs(Fails(), torch.zeros(1, 2))
        assert torch.backends.mha.get_fastpath_enabled() is before
        count_macs(EncoderLM(), ids())
        assert torch.backends.mha.get_fastpath_enabled() is before
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


# ------------------------------------------------------------------------------------ inputs, tokens/s
def test_keyword_only_forward_is_measured_with_integer_ids() -> None:
    model = KeywordOnlyLM()
    x = ids(batch=5)
    call = {"input_ids": x, "attention_mask": torch.ones(5, T)}
    assert count_macs(model, {"input_ids": x[:1]}) == sum(hand_macs())
    lat = measure_latency({"lm": model}, call, batch_size=4, repeats=2, warmup=1, seq_len=sequence_length(call))
    assert set(model.seen) == {(torch.long, (1, T)), (torch.long, (4, T))}  # batch of 4 built from sample 0
    assert lat["lm"]["median_ms"] > 0 and lat["lm"]["tokens_per_s"] > 0


def test_batching_repeats_the_first_sample_and_leaves_unbatched_tensors() -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class TwoArgs(nn.Module):
        def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            seen.append((input_ids, mask))
            return input_ids.float() @ mask

    x = torch.arange(3 * T).view(3, T)  # 3 different samples
    mask = torch.ones(T, T).tril()  # (T, T): not a batch of 3
    measure_latency([TwoArgs()], (x, mask), batch_size=6, repeats=1, warmup=0)
    got_ids, got_mask = seen[-1]
    assert got_ids.dtype == torch.long and got_ids.shape == (6, T)
    assert torch.equal(got_ids, x[:1].expand(6, T))
    assert torch.equal(got_mask, mask)

    class ListArg(nn.Module):
        def forward(self, pair: list[torch.Tensor]) -> torch.Tensor:
            return pair[0].float() @ pair[1]

    # a list is one argument, as Lightning reads example_input_array: (1 x T) @ (T x T) per sample
    assert count_macs(ListArg(), [x[:1], mask]) == T * T


def test_tokens_per_second_for_token_ids_only() -> None:
    assert sequence_length(ids(2, 12)) == 12
    assert sequence_length(torch.randn(2, 12)) is None  # float features: not tokens
    assert sequence_length(torch.zeros(2, 12, 3, dtype=torch.long)) is None
    model = SDPALM()
    lat = measure_latency([model], ids(), batch_size=4, repeats=3, warmup=1, seq_len=T)[0]
    assert lat["tokens_per_s"] == pytest.approx(4 * T / (lat["median_ms"] / 1e3))
    r = compression_report(model, SDPALM(), ids(), batch_size=4, repeats=2, warmup=1)
    assert r["latency_setup"]["seq_len"] == T
    assert r["baseline"]["tokens_per_s"] > 0 and r["compressed"]["tokens_per_s"] > 0
    assert r["baseline"]["macs"] == sum(hand_macs())
    plain = compression_report(nn.Linear(4, 4), nn.Linear(4, 4), torch.randn(1, 4), batch_size=2, repeats=1, warmup=0)
    assert "tokens_per_s" not in plain["baseline"] and plain["latency_setup"]["seq_len"] is None
    given = compression_report(
        nn.Linear(4, 4), nn.Linear(4, 4), torch.randn(1, 4), batch_size=2, repeats=1, warmup=0, seq_len=5
    )
    assert given["compressed"]["tokens_per_s"] > 0


def test_table_shows_tokens_and_perplexity() -> None:
    from rich.console import Console

    r = compression_report(SDPALM(), SDPALM(), ids(), batch_size=2, repeats=1, warmup=0,
                           baseline_metrics={"val_ppl": 1234.5678, "val_loss": 7.1},
                           compressed_metrics={"val_ppl": 1300.0, "val_loss": 7.17})
    out = io.StringIO()
    print_report(r, Console(file=out, width=200))
    text = out.getvalue()
    assert f"latency (ms, CPU, batch 2 × {T} tokens)" in text and "tokens/s (CPU)" in text
    assert "val_ppl (lower is better)" in text and "1,234.57" in text and "1,300.00" in text
    assert "CUDA" not in text  # not timed on a GPU: no empty rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note written without CUDA")
def test_cuda_timing_without_cuda_is_a_note() -> None:
    r = compression_report(SDPALM(), SDPALM(), ids(), batch_size=2, repeats=1, warmup=0, cuda=True)
    assert r["cuda_note"] == "CUDA latency: not measured (CUDA is not available)."
    assert "cuda_latency_ms" not in r["baseline"] and "cuda_latency" not in r["ratios"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_and_tokens_per_second() -> None:
    baseline, compressed = SDPALM(), SDPALM().cuda()  # one on the CPU (copied over), one there already
    r = compression_report(baseline, compressed, ids(), batch_size=4, repeats=3, warmup=1, cuda=True)
    assert "cuda_note" not in r, r.get("cuda_note")
    for side in ("baseline", "compressed"):
        assert r[side]["cuda_latency_ms"] > 0 and r[side]["cuda_tokens_per_s"] > 0
        assert r[side]["macs"] == sum(hand_macs())
    assert r["ratios"]["cuda_latency"] > 0
    assert next(baseline.parameters()).device.type == "cpu"  # the caller's model was not moved


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_bad_seq_len(bad) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        CompressionReport(seq_len=bad)


# ----------------------------------------------------------------------------------- a fit of an LM
class CountingTokens(Dataset):
    """Sequences ``s, s+1, s+2, ...`` (mod V): the next token is predictable, so perplexity falls."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = (torch.arange(T + 1) + i) % V
        return {"input_ids": seq[:-1], "labels": seq[1:]}


class LMModule(L.LightningModule):
    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        self.keyword = keyword
        self.model = KeywordOnlyLM() if keyword else EncoderLM()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(input_ids=batch["input_ids"]) if self.keyword else self(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, V), batch["labels"].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss)
        self.log("val_ppl", torch.exp(loss))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword-only"])
def test_report_on_a_language_model_fit(tmp_path: Path, keyword: bool, capsys) -> None:
    L.seed_everything(0)
    loader = DataLoader(CountingTokens(), batch_size=8)
    report = CompressionReport(batch_size=4, repeats=2, warmup=1, dirpath=str(tmp_path))
    kwargs = trainer_kwargs(tmp_path, limit_train_batches=4, limit_val_batches=1)
    trainer = L.Trainer(max_epochs=2, callbacks=[report], **kwargs)
    trainer.fit(LMModule(keyword), loader, loader)
    data = json.loads((tmp_path / "compression_report.json").read_text())
    assert (tmp_path / "compression_report.png").stat().st_size > 1000
    for side in ("baseline", "compressed"):
        assert data[side]["macs"] == sum(hand_macs()), side  # per sample, attention scores included
        assert data[side]["tokens_per_s"] > 0
    assert data["latency_setup"]["seq_len"] == T
    ppl = data["compressed"]["metrics"]["val_ppl"]
    assert ppl == pytest.approx(math.exp(data["compressed"]["metrics"]["val_loss"]), rel=1e-4)
    assert [h["metrics"]["val_ppl"] for h in data["history"]][-1] == ppl
    assert "cuda_note" not in data  # trained on the CPU: no GPU timing attempted
    printed = capsys.readouterr().out
    assert "tokens/s (CPU)" in printed and "val_ppl (lower is better)" in printed


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_layers_count_their_gate_products(rnn: type[nn.Module]) -> None:
    """oneDNN runs ``nn.LSTM`` as one op the FLOP counter had no formula for (an LSTM counted 0 MACs)."""
    model = rnn(16, 32, num_layers=2, bidirectional=True)
    gates = 4 if rnn is nn.LSTM else 3
    steps = 10
    per_direction = steps * gates * 32 * ((16 + 32) + (2 * 32 + 32))  # layer 1 reads 16 inputs, layer 2 both directions' 64
    assert count_macs(model, torch.randn(steps, 1, 16)) == 2 * per_direction


def test_an_int8_converted_linear_counts_its_integer_matmul() -> None:
    from lightning_compress.quantization import QuantSettings, convert_fake_quant, fake_quant_layers, prepare_fake_quant

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(1, 64)
    dense = count_macs(model, x)
    prepare_fake_quant(model, QuantSettings(bits=8, activation_bits=8))
    for layer in fake_quant_layers(model).values():
        layer.quantizer.observing = True
    with torch.no_grad():
        model(torch.randn(16, 64))
    converted = convert_fake_quant(model.eval())
    assert "int8 x int8" in repr(converted)  # torch._int_mm, which the FLOP counter had no formula for
    assert count_macs(converted, x) == dense == 64 * 32 + 32 * 10


def test_mixture_of_experts_macs_count_the_experts_grouped_matmul() -> None:
    """transformers 5 runs Mixtral's experts through one custom operator (grouped_mm_fallback on the CPU): the counter
    saw none of their matmuls, 266,240 of 659,456 MACs. Counted, the default path gives what the per-expert eager
    path gives, and the expert share follows top-k (hand count: layers x tokens x top-k x 3 matmuls)."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (1, 16))
    counts = {}
    for top_k in (1, 2):
        torch.manual_seed(0)
        config = transformers.MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=top_k, max_position_embeddings=32,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no operator left uncounted
            counts[top_k] = count_macs(model, {"input_ids": ids})
        model.set_experts_implementation("eager")
        assert count_macs(model, {"input_ids": ids}) == counts[top_k]
    assert counts[2] - counts[1] == 2 * 16 * 1 * 3 * 48 * 32


def test_an_operator_without_a_formula_is_named() -> None:
    """A library's own operator hides its matmuls from the counter: count_macs names it instead of counting 0 silently."""

    @torch.library.custom_op("lc_tests::opaque_matmul", mutates_args=())
    def opaque_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w

    class Opaque(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return opaque_matmul(x, torch.ones(4, 3))

    with pytest.warns(UserWarning, match=r"count_macs: \{'lc_tests.opaque_matmul': 1\} \(calls\) are operators without a formula"):
        assert count_macs(Opaque(), torch.ones(2, 4)) == 0
