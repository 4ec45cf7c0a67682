"""Language models: a GPT-style decoder, perplexity, and ``LanguageModelModule`` to train any of them.

``GPTDecoder`` is a plain pre-LayerNorm causal decoder in two layouts: ``attention="mha"`` keeps q/k/v
in ``nn.MultiheadAttention``'s one packed ``in_proj_weight`` with an ``out_proj`` (the layout most
user models bring), ``attention="sdpa"`` has four ``nn.Linear`` layers ``q``, ``k``, ``v``, ``o`` and
calls ``F.scaled_dot_product_attention``. ``LanguageModelModule`` trains any ``nn.Module`` that maps
token ids ``(B, T)`` to logits ``(B, T, V)`` with next-token cross-entropy and logs perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.text import Perplexity as _TorchmetricsPerplexity

from lightning_compress._validation import as_count, check_factories, check_network
from lightning_compress.outputs import logits_of
from lightning_compress.module import build_optimizers, compile_in_place, compile_options

__all__ = [
    "CausalSelfAttention", "DecoderBlock", "GPTDecoder", "LanguageModelModule", "Perplexity", "perplexity", "token_nll"
]

ATTENTION_KINDS = ("mha", "sdpa")


# --------------------------------------------------------------------------------------------------
# the model


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v``, ``o`` projections."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    @property
    def n_heads(self) -> int:
        """Heads, from the projections' width: removing heads (``structure="heads"``) or loading a checkpoint
        of a model whose heads were removed changes it."""
        return self.q.out_features // self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class DecoderBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))`` (pre-LayerNorm)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention: str) -> None:
        super().__init__()
        self.attention = attention
        self.ln1 = nn.LayerNorm(d_model)
        if attention == "mha":
            self.attn: nn.Module = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        else:
            self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        if self.attention == "mha":
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True: may not attend
            h = self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        else:
            h = self.attn(h)
        x = x + self.drop(h)
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class GPTDecoder(nn.Module):
    """A GPT-style causal decoder: token + learned position embeddings, pre-LayerNorm blocks, a linear head.

    ``forward(input_ids)`` maps a ``LongTensor`` ``(B, T)`` with ``T <= max_len`` to logits ``(B, T, V)``;
    the logits at position ``t`` depend on tokens ``0..t`` only. Weights start as in GPT-2 (normal, std
    0.02; the residual projections scaled by ``1/sqrt(2 n_layers)``), so an untrained model predicts
    nearly uniformly: a perplexity close to ``vocab_size``.

    Sizes (byte vocabulary, ``vocab_size=256``, tied head):

    ==============================================================  ===========
    settings                                                         parameters
    ==============================================================  ===========
    defaults (``d_model=128, n_layers=2, n_heads=4, max_len=256``)      0.46 M
    ``d_model=128, n_layers=4, n_heads=4, max_len=128``                 0.84 M
    ``d_model=768, n_layers=14, n_heads=12, max_len=1024``             100.2 M
    ==============================================================  ===========

    (``d_model=768, n_layers=12, n_heads=12`` is GPT-2 small's body: 86 M with bytes, 124 M with its
    50,257-token vocabulary.)

    Args:
        vocab_size: Tokens (256 for bytes).
        d_model: Width of the residual stream.
        n_layers: Decoder blocks.
        n_heads: Attention heads; must divide ``d_model``.
        d_ff: Hidden width of the feed-forward layers (default ``4 * d_model``).
        max_len: Longest sequence (size of the position embedding).
        dropout: Dropout on attention weights and residual branches (0 disables it).
        tie_weights: Share one ``Parameter`` between the token embedding and the output head.
        attention: ``"mha"``: ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj``) with a
            causal mask. ``"sdpa"``: separate ``q``/``k``/``v``/``o`` ``nn.Linear`` layers and
            ``F.scaled_dot_product_attention(is_causal=True)``.

    Example:
        >>> model = GPTDecoder(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_len=16)
        >>> model(torch.randint(0, 256, (2, 10))).shape
        torch.Size([2, 10, 256])
        >>> model.head.weight is model.tok_emb.weight
        True
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_len: int = 256,
        dropout: float = 0.0,
        tie_weights: bool = True,
        attention: Literal["mha", "sdpa"] = "mha",
    ) -> None:
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        for name, value in (
            ("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
            ("d_ff", d_ff), ("max_len", max_len),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTDecoder: {name} must be a positive integer, got {value!r}")
        if d_model % n_heads:
            raise ValueError(
                f"GPTDecoder: n_heads={n_heads} does not divide d_model={d_model}; "
                f"choose a head count that divides {d_model} (each head gets d_model / n_heads channels)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPTDecoder: dropout must be in [0, 1), got {dropout!r}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"GPTDecoder: attention must be one of {list(ATTENTION_KINDS)}, got {attention!r}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_ff, dropout, attention) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, n_layers: int) -> None:
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:  # Linear, Embedding and the packed in_proj_weight
                residual = name.endswith(("attn.o.weight", "attn.out_proj.weight", "fc2.weight"))
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layers) if residual else 0.02)
            # LayerNorm weights keep their ones

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"GPTDecoder expects token ids of shape (batch, seq_len), got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"GPTDecoder: sequence length {t} is longer than max_len={self.max_len}")
        positions = torch.arange(t, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------------------------------
# perplexity: one functional core for the function, the metric and the module's loss


def token_nll(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood of the targets and the number of tokens counted.

    ``logits`` ``(..., V)``, ``targets`` the same shape without ``V``; positions whose target is
    ``ignore_index`` do not count. The log-softmax runs in float32 whatever the logits' dtype (bf16
    logits would otherwise lose most of the loss's precision).

    Returns:
        ``(nll_sum, count)``: float32 and int64 scalars.
    """
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must have the targets' shape plus a vocabulary dimension, got logits {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be integer token ids (int64), got {targets.dtype}")
    flat_targets = targets.reshape(-1).long()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_targets, ignore_index=ignore_index, reduction="sum"
    )
    return nll, (flat_targets != ignore_index).sum()


def perplexity(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    r"""Perplexity ``exp(mean cross-entropy)`` of next-token predictions.

    .. math::
        \mathrm{PPL} = \exp\Big(-\frac{1}{N}\sum_{i:\,y_i \ne \mathrm{ignore}} \log \mathrm{softmax}(z_i)_{y_i}\Big)

    Args:
        logits: ``(B, T, V)`` (or any ``(..., V)``) unnormalised scores.
        targets: ``(B, T)`` token ids; ``ignore_index`` marks positions that do not count (padding).
        ignore_index: Target value to skip. No counted token at all gives ``nan``.

    Example:
        >>> round(perplexity(torch.zeros(1, 3, 256), torch.tensor([[1, 2, 3]])).item(), 3)  # uniform over 256
        256.0
    """
    nll, count = token_nll(logits, targets, ignore_index)
    return torch.exp(nll / count)


class Perplexity(_TorchmetricsPerplexity):
    """``torchmetrics.text.Perplexity`` with the numerically stable core of :func:`perplexity`.

    Same states (``total_log_probs``, ``count``, summed across processes under DDP), same
    ``compute``; ``update`` uses a float32 log-softmax (:func:`token_nll`) instead of
    ``log(softmax(...))``, which turns one confidently wrong token into ``inf`` and loses precision on
    bf16 logits. The default ``ignore_index`` is ``-100`` (PyTorch's and Hugging Face's padding label).

    Example:
        >>> metric = Perplexity()
        >>> metric.update(torch.zeros(2, 4, 8), torch.randint(0, 8, (2, 4)))
        >>> round(metric.compute().item(), 3)
        8.0
    """

    def __init__(self, ignore_index: int | None = -100, **kwargs: Any) -> None:
        super().__init__(ignore_index=ignore_index, **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:
        nll, count = token_nll(preds, target, -100 if self.ignore_index is None else self.ignore_index)
        # out of place: after a ``trainer.validate`` (run under inference_mode) the reset states are
        # inference tensors, which a later fit's validation (under no_grad) may not update in place
        self.total_log_probs = self.total_log_probs + nll.detach()
        self.count = self.count + count


# --------------------------------------------------------------------------------------------------
# the LightningModule


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4)


def labels_are_inputs(x: Any, labels: Tensor | None, ignore_index: int) -> bool | None:
    """Whether ``labels`` are the token ids of the inputs ``x`` themselves at every counted position: the causal-LM
    convention where the model predicts the next token and shifts the labels itself; ``None`` when no
    position is counted (the batch cannot tell). Inputs given as a tuple or a mapping (``(ids, mask)``,
    ``{"input_ids": ..., "attention_mask": ...}``) are read at ``input_ids``, else their first integer tensor of the
    labels' shape.

    Example:
        >>> ids = torch.tensor([[5, 6, 7]])
        >>> labels_are_inputs(ids, torch.tensor([[5, 6, -100]]), -100), labels_are_inputs(ids, torch.tensor([[6, 7, -100]]), -100)
        (True, False)
        >>> labels_are_inputs((ids, torch.ones(1, 3, dtype=torch.long)), torch.tensor([[5, 6, 7]]), -100)
        True
        >>> labels_are_inputs(ids, torch.full((1, 3), -100), -100) is None
        True
    """
    if labels is None:
        return False
    if isinstance(x, Mapping) and isinstance(x.get("input_ids"), Tensor):
        x = x["input_ids"]
    elif not isinstance(x, Tensor):
        x = next((t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, Tensor) and not t.is_floating_point()
                  and t.shape == labels.shape), None)  # fmt: skip
    if x is None or x.is_floating_point() or x.dim() < 2 or labels.shape != x.shape:
        return False
    counted = labels != ignore_index
    if not bool(counted.any()):
        return None
    return bool((labels[counted] == x.to(labels.device)[counted]).all())


def check_shift_labels(shift_labels: Any) -> None:
    """``shift_labels`` is ``None`` (decided from the first labelled batch by :func:`labels_are_inputs`), ``True`` or
    ``False``; anything else is refused, naming it."""
    if shift_labels not in (None, True, False):
        raise ValueError(f"shift_labels must be None (decide from the labels), True or False, got {shift_labels!r}")


def shift_labels_note(who: str) -> str:
    """What ``who`` says when it decided to shift labels equal to the input ids."""
    return (
        f"{who}: the labels equal the input ids, so they are read as next-token labels: logits at position t are "
        "scored against the label at t + 1 (shift_labels=False turns this off)"
    )


class LanguageModelModule(LightningModule):
    """Train any causal language model with next-token cross-entropy; log loss and perplexity.

    Batches are dicts ``{"input_ids": (B, T), "labels": (B, T)}`` where ``labels[:, t]`` is the token
    that follows ``input_ids[:, t]`` (already shifted, as :class:`~lightning_compress.TextDataModule`
    yields them) and ``-100`` marks padding. A batch without ``"labels"`` is shifted here: the logits
    at ``0..T-2`` predict ``input_ids[:, 1:]``. ``(input_ids, labels)`` tuples work too. Labels equal to
    the inputs (Hugging Face's convention, where the model shifts them) are shifted here too (``shift_labels``).

    Logged: ``train_loss`` (every step), ``val_loss``/``val_ppl`` and ``test_loss``/``test_ppl`` (per
    epoch, token-weighted over the whole split and across processes, so ``val_ppl == exp(val_loss)``).

    Args:
        model: Any ``nn.Module`` mapping ``(B, T)`` token ids to ``(B, T, V)`` logits (a class path in
            YAML, e.g. ``lightning_compress.GPTDecoder``). Its parameters are the ``model.*`` keys.
        optimizer: A callable ``params -> Optimizer`` (in YAML a class path with ``init_args``);
            default AdamW with ``lr=3e-4``.
        scheduler: Optional callable ``optimizer -> LRScheduler``.
        scheduler_interval: Step the scheduler every ``"step"`` (the usual warm-up/cosine for
            language models) or every ``"epoch"``.
        example_seq_len: Length ``T`` of ``example_input_array`` (a ``(1, T)`` ``LongTensor`` of zeros),
            used for latency measurement and export; taken from the first batch when omitted.
        ignore_index: Label value that does not count (padding).
        compile: Compile the network's forward with ``torch.compile`` (in place, so its layer names stay
            the ones the plugins select by; ``True``, or a dict of ``torch.compile`` arguments such as
            ``{"mode": "max-autotune"}``). The fake-quant layers of ``QuantizeCallback`` trace without a
            graph break, so their rounding fuses into the surrounding kernels: what makes QAT cheap on a
            GPU, where an eager step is bound by launching kernels (docs/scale.md).
        shift_labels: Score the logits at ``t`` against ``labels[:, t + 1]`` (labels equal to the inputs).
            ``None`` (default): decided on the first batch with a counted label, shifting when the labels equal
            the input ids at every counted position (trained unshifted, such labels teach the model to copy its
            input, with a perplexity near 1).

    Example:
        >>> module = LanguageModelModule(GPTDecoder(d_model=32, n_layers=1, n_heads=2), example_seq_len=16)
        >>> module(module.example_input_array).shape
        torch.Size([1, 16, 256])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        example_seq_len: int | None = None,
        ignore_index: int = -100,
        compile: bool | dict[str, Any] = False,
        shift_labels: bool | None = None,
    ) -> None:
        super().__init__()
        check_network(model, "model", owner=self)
        check_shift_labels(shift_labels)
        self._shift: bool | None = shift_labels  # decided on the first batch with a counted label when None
        check_factories(optimizer, scheduler, scheduler_interval)
        self.compile_options = compile_options(compile)
        example_seq_len = as_count(example_seq_len, "example_seq_len", allow_none=True)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.ignore_index = ignore_index
        self.val_ppl = Perplexity(ignore_index)
        self.test_ppl = Perplexity(ignore_index)
        if example_seq_len is not None:
            self.example_input_array = torch.zeros(1, example_seq_len, dtype=torch.long)
        from lightning_compress.pruning.reload import allow_shrunk_checkpoints

        allow_shrunk_checkpoints(self)  # checkpoints written after channel removal hold smaller layers

    def forward(self, input_ids: Tensor) -> Tensor:
        """The network's logits (a network may return them in an output object, as Hugging Face's do)."""
        return logits_of(self.model(input_ids), "model")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard with FSDP2 (``fully_shard`` on every block, i.e. every
        entry of the model's ``ModuleList`` s, then on the model and the module) over the data-parallel
        ranks. Under any other strategy nothing happens. Then, with ``compile``, compile the network in place.
        Idempotent, as Lightning requires."""
        from lightning_compress.sharding import shard_with_fsdp2

        shard_with_fsdp2(self, [self.model])
        compile_in_place(self.model, self.compile_options)

    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, dict):
            if "input_ids" not in batch:
                raise KeyError(f"LanguageModelModule expects dict batches with 'input_ids', got keys {sorted(batch)}")
            return batch["input_ids"], batch.get("labels")
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1] if len(batch) > 1 else None
        return batch, None

    def _logits_and_labels(self, batch: Any) -> tuple[Tensor, Tensor]:
        input_ids, labels = self._split_batch(batch)
        if self.example_input_array is None:
            self.example_input_array = torch.zeros(1, input_ids.shape[1], dtype=torch.long)
        logits = self(input_ids)
        if labels is None:
            return logits[:, :-1], input_ids[:, 1:]
        if self._shift is None:
            self._shift = labels_are_inputs(input_ids, labels, self.ignore_index)  # None: nothing counted yet
            if self._shift:
                rank_zero_info(shift_labels_note("LanguageModelModule"))
        if self._shift:
            return logits[:, :-1], labels[:, 1:]
        return logits, labels

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        nll, count = token_nll(*self._logits_and_labels(batch), self.ignore_index)
        loss = nll / count.clamp_min(1)  # a batch of padding only: 0, not nan
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_ppl.update(*self._logits_and_labels(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.test_ppl.update(*self._logits_and_labels(batch))

    def _log_epoch(self, stage: str, metric: Perplexity) -> None:
        # one metric holds the token-weighted sums of the whole split (summed across processes), so
        # the logged loss is its logarithm: val_ppl == exp(val_loss) exactly, under DDP too
        if metric.update_count == 0:
            return
        ppl = metric.compute()
        metric.reset()
        self.log(f"{stage}_loss", ppl.log(), prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_ppl", ppl, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_ppl)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_ppl)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The most likely next token at every position, ``(B, T)``."""
        return self(self._split_batch(batch)[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_factory, self.scheduler_factory, self.scheduler_interval)
