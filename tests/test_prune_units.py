"""Whole attention heads and feed-forward neurons: found by structure, masked exactly, physically removed."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback
from lightning_compress.lm import GPTDecoder, LanguageModelModule
from lightning_compress.pruning.state import PruningState
from lightning_compress.pruning.units import find_units, remove_units


def _gpt(**kw: Any) -> GPTDecoder:
    torch.manual_seed(0)
    return GPTDecoder(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "max_len": 16, "attention": "sdpa", **kw})


def _masked_then_removed(model: nn.Module, kinds: tuple[str, ...], keep_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    groups = find_units(model, kinds)
    g = torch.Generator().manual_seed(keep_seed)
    keep = []
    for group in groups:
        k = torch.rand(group.size, generator=g) > 0.5
        k[0] = True
        keep.append(k)
    params = dict(model.named_parameters())
    members = {f"{m}.weight": params[f"{m}.weight"] for gr in groups for m in gr.members}
    state = PruningState("channel", members, params, {n: 0.5 for n in members}, groups)
    state.set_channel_keep(keep)
    state.apply()
    x = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        masked = model(x)
    shrunk = copy.deepcopy(model)
    remove_units(shrunk, groups, keep)
    with torch.no_grad():
        removed = shrunk(x)
    return masked, removed, shrunk


@pytest.mark.parametrize("kinds", [("heads",), ("neurons",), ("heads", "neurons")])
def test_removing_masked_units_computes_what_the_masked_model_computes(kinds: tuple[str, ...]) -> None:
    model = _gpt()
    before = sum(p.numel() for p in model.parameters())
    masked, removed, shrunk = _masked_then_removed(model, kinds)
    torch.testing.assert_close(removed, masked, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in shrunk.parameters()) < before
    if "heads" in kinds:
        assert any(b.attn.n_heads < 4 for b in shrunk.blocks)
        assert all(b.attn.q.out_features == b.attn.n_heads * b.attn.head_dim for b in shrunk.blocks)


class HFStyleAttention(nn.Module):
    """Names and a plain ``num_heads`` attribute as in Hugging Face decoders, SwiGLU feed-forward."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 64, bias=False), nn.Linear(d, 64, bias=False), nn.Linear(64, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        h = x + self.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))
        return h + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def test_hugging_face_names_swiglu_and_a_plain_head_count_attribute() -> None:
    torch.manual_seed(0)
    block = HFStyleAttention()
    groups = find_units(block, ("heads", "neurons"))
    assert [g.members for g in groups] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
    keep = [torch.tensor([True, False, True, False]), torch.arange(64) % 4 == 0]
    x = torch.randn(2, 5, 32)
    params = dict(block.named_parameters())
    state = PruningState("channel", {f"{m}.weight": params[f"{m}.weight"] for g in groups for m in g.members}, params, {}, groups)
    state.set_channel_keep(keep)
    state.apply()
    with torch.no_grad():
        masked = block(x)
    changes, _ = remove_units(block, groups, keep)
    assert block.num_heads == 2 and block.up_proj.out_features == 16 and block.down_proj.in_features == 16
    assert changes == {"q_proj": (4, 2), "gate_proj": (64, 16)}
    with torch.no_grad():
        torch.testing.assert_close(block(x), masked, rtol=1e-5, atol=1e-5)


class MetaStyleFeedForward(nn.Module):
    """Meta's SwiGLU names: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def test_meta_swiglu_removes_w3_with_w1() -> None:
    torch.manual_seed(0)
    block = MetaStyleFeedForward()
    groups = find_units(block, ("neurons",))
    assert [g.members for g in groups] == [["w1", "w3"]]
    keep = [torch.arange(32) % 2 == 0]
    params = dict(block.named_parameters())
    state = PruningState("channel", {f"{m}.weight": params[f"{m}.weight"] for m in groups[0].members}, params, {}, groups)
    state.set_channel_keep(keep)
    state.apply()
    x = torch.randn(3, 16)
    with torch.no_grad():
        masked = block(x)
        remove_units(block, groups, keep)
        torch.testing.assert_close(block(x), masked, rtol=1e-5, atol=1e-5)
    assert block.w3.weight.shape == (16, 16) and block.w2.in_features == 16


class _PerHeadParameter(HFStyleAttention):
    """Attention sinks: one learned logit per head, read outside q/k/v/o."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))


class _NormOverAllHeads(HFStyleAttention):
    """OLMo2-style query/key norms over all heads' width: a head's rows change the others' scale."""

    def __init__(self) -> None:
        super().__init__()
        self.q_norm, self.k_norm = nn.RMSNorm(32), nn.RMSNorm(32)


class _NormOverOneHead(HFStyleAttention):
    """Qwen3-style query/key norms over one head's width, shared by the heads: heads still go."""

    def __init__(self) -> None:
        super().__init__()
        self.q_norm, self.k_norm = nn.RMSNorm(8), nn.RMSNorm(8)


class _PerHeadNorms(nn.Module):
    def __init__(self, heads: int, width: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(heads))


class _OneNormPerHead(HFStyleAttention):
    """StableLM-style: one LayerNorm of a head's width for each head, in a list under q_layernorm."""

    def __init__(self) -> None:
        super().__init__()
        self.q_layernorm, self.k_layernorm = _PerHeadNorms(4, 8), _PerHeadNorms(4, 8)


class _BiasTable(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(7, heads))


class _PositionBiasChild(HFStyleAttention):
    """Swin-style: a relative position bias table with one column per head, in a child module."""

    def __init__(self) -> None:
        super().__init__()
        self.relative_position_bias = _BiasTable(self.num_heads)


class _MultiQuery(HFStyleAttention):
    """One key/value head shared by every query head (gemma-2b's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.k_proj, self.v_proj = nn.Linear(32, 8), nn.Linear(32, 8)


class _SparseActivations(MetaStyleFeedForward):
    """Gemma 3n: keeps the activations above a quantile taken over all the neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj, self.gate_proj, self.down_proj = self.w1, self.w3, self.w2
        del self.w1, self.w2, self.w3
        self.activation_sparsity = 0.95


class _SharedPositionBias(nn.Module):
    """MPNet/T5-style: one position bias column per head, computed once and shared by every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Embedding(32, 4)
        self.layer = HFStyleAttention()


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (_PerHeadParameter, r"'sinks' \(4,\) is not in q/k/v/o"),
        (_NormOverAllHeads, r"q_norm holds \[\(32,\)\], not one norm over a head's 8: it spans the heads"),
        (_OneNormPerHead, r"q_layernorm holds \[\(8,\), \(8,\), \(8,\)\]\.\.\., not one norm over a head's 8"),
        (_PositionBiasChild, r"'relative_position_bias.table' \(7, 4\) has one entry per head"),
        (_MultiQuery, r"one key/value head \(multi-query attention\)"),
        (_SharedPositionBias, r"'relative_attention_bias' holds one bias per head for all layers"),
    ],
)
def test_heads_that_removal_cannot_cut_exactly_are_kept_and_said_why(model: type[nn.Module], why: str) -> None:
    """Something besides q/k/v/o depends on the heads (removal would crash or change the surviving heads),
    or no head can go: refused before any mask, naming the reason, and the neurons still prune."""
    with pytest.raises(ValueError, match=rf"found no heads it can remove among the selected weights \(.*{why}"):
        find_units(model(), ("heads",))
    with pytest.warns(UserWarning, match=why):
        groups = find_units(model(), ("heads", "neurons"))
    assert [g.members[-1].rpartition(".")[2] for g in groups] == ["up_proj"]


class _NormFormerFeedForward(nn.Module):
    """NormFormer/Kosmos-2: a norm over the hidden neurons between fc1 and fc2 (a LayerNorm module, or
    ``F.layer_norm`` in the forward, which no module search can see)."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.ffn_layernorm = None if functional else nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        return self.fc2(F.layer_norm(h, h.shape[-1:]) if self.ffn_layernorm is None else self.ffn_layernorm(h))


class _NanoGPTAttention(nn.Module):
    """nanoGPT's attention: reshapes its output with the input width C, so it breaks once heads go."""

    def __init__(self) -> None:
        super().__init__()
        self.n_head = 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.n_head, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.heads(x).view(*x.shape))


class _InnerNormAttention(_NanoGPTAttention):
    """Kosmos-2 (sub-LN): a LayerNorm over all heads' outputs before the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.inner_attn_ln = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.inner_attn_ln(self.heads(x)))


class _InnerNormNeedsPositions(_InnerNormAttention):
    """The same with a forward that cannot run on one tensor alone (rotary position embeddings)."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x + positions)


@pytest.mark.parametrize(
    ("model", "kind", "why"),
    [
        (_NormFormerFeedForward, "neurons",
         r"its forward fails once neurons are removed \(RuntimeError: .*\): its ffn_layernorm \(LayerNorm\) normalises over them"),
        (lambda: _NormFormerFeedForward(functional=True), "neurons",
         r"with half its neurons zeroed it computes something else than with them removed"),
        (_InnerNormAttention, "heads", r"its forward fails once heads are removed .*: its inner_attn_ln \(LayerNorm\) normalises over them"),
        (_NanoGPTAttention, "heads", r"its forward fails once heads are removed \(RuntimeError: shape .*\): it may reshape with a fixed width"),
        (_InnerNormNeedsPositions, "heads",
         r"its inner_attn_ln \(LayerNorm\) has the width of its heads .* could not be run alone to check \(TypeError"),
    ],
    ids=["norm_module", "functional_norm", "inner_attn_ln", "view_with_width", "cannot_run_alone"],
)
def test_units_that_something_between_the_projections_mixes_are_kept_and_said_why(model: Any, kind: str, why: str) -> None:
    """Masking them would not compute what removing them computes (or removal would break the forward):
    decided when the units are found, before any mask."""
    with pytest.raises(ValueError, match=rf"found no {kind} it can remove among the selected weights \(.*keeps its {kind}: {why}"):
        find_units(model(), (kind,))


class _PreNormFeedForward(nn.Module):
    """A norm as wide as the neurons, but before fc1 (hidden width == model width): the neurons go."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def test_a_norm_outside_the_units_keeps_them_removable_and_each_class_is_checked_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(_PreNormFeedForward() for _ in range(3)), _NanoGPTAttention())
    _PreNormFeedForward.calls = 0
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"'3' keeps its heads: its forward fails once heads are removed"):
        groups = find_units(model, ("heads", "neurons"))
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))  # the check draws from its own generator
    assert [g.members for g in groups] == [["0.fc1"], ["1.fc1"], ["2.fc1"]]
    assert _PreNormFeedForward.calls == 2  # one class, checked once: masked, then removed
    keep = [torch.arange(16) % 2 == 0] * 3
    params = dict(model.named_parameters())
    state = PruningState("channel", {f"{m}.weight": params[f"{m}.weight"] for g in groups for m in g.members}, params, {}, groups)
    state.set_channel_keep(keep)
    state.apply()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        masked = model[:3](x)
        remove_units(model, groups, keep)
        torch.testing.assert_close(model[:3](x), masked, rtol=1e-5, atol=1e-5)


def test_kosmos2_keeps_its_heads_and_neurons_and_says_which_norm() -> None:
    transformers = pytest.importorskip("transformers", reason="Hugging Face models need transformers (the dev extra)")
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextForCausalLM

    config = transformers.Kosmos2TextConfig(vocab_size=64, embed_dim=32, layers=1, ffn_dim=64, attention_heads=4, max_position_embeddings=16)
    why = r"(?s)found no heads or neurons.*self_attn' keeps its heads: .*inner_attn_ln \(LayerNorm\).*ffn' keeps its neurons: .*ffn_layernorm"
    with pytest.raises(ValueError, match=why):
        find_units(Kosmos2TextForCausalLM(config), ("heads", "neurons"))


def test_a_norm_over_one_head_does_not_keep_the_heads() -> None:
    torch.manual_seed(0)
    block = _NormOverOneHead()
    groups = find_units(block, ("heads",))
    assert [g.members for g in groups] == [["q_proj", "k_proj", "v_proj"]] and groups[0].size == 4


def test_neurons_under_a_threshold_over_all_of_them_are_kept_and_said_why() -> None:
    with pytest.raises(ValueError, match=r"keeps its neurons: it keeps the activations above a quantile"):
        find_units(_SparseActivations(), ("neurons",))


def test_multihead_attention_heads_are_a_clear_error_and_its_neurons_still_prune() -> None:
    model = _gpt(attention="mha")
    with pytest.raises(ValueError, match=r"nn.MultiheadAttention.*attention='sdpa'.*structure='neurons'"):
        find_units(model, ("heads",))
    assert len(find_units(model, ("neurons",))) == 2
    with pytest.raises(ValueError, match=r"criterion 'entropy'.*'heads'"):
        PruningCallback(0.5, structure="heads", criterion="entropy")


def _tokens(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 16, (n, 1), generator=g)
    seq = (base + torch.arange(16)) % 16  # learnable: counting
    return DataLoader(TensorDataset(seq), batch_size=16)


def test_callback_prunes_heads_and_neurons_and_removes_them_in_training(tmp_path) -> None:
    seed_everything(0)
    module = LanguageModelModule(_gpt())
    before = sum(p.numel() for p in module.parameters())
    cb = PruningCallback(0.5, structure="heads+neurons", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
    after_removal: dict[str, torch.Tensor] = {}

    class AfterRemoval(Callback):
        def on_train_epoch_start(self, trainer: Trainer, pl_module: LanguageModelModule) -> None:
            if trainer.current_epoch == 2:
                after_removal.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer = Trainer(callbacks=[cb, AfterRemoval()], **trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True))
    trainer.fit(module, _tokens(), _tokens(32))
    # the optimizer steps the smaller parameters: it held the removed full-size ones, and the cut layers stopped training
    stepped = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert stepped == {id(p) for p in module.parameters()}
    assert all(not torch.equal(p, after_removal[n]) for n, p in module.named_parameters())
    assert [b.attn.n_heads for b in module.model.blocks] == [2, 2]
    assert [b.fc1.out_features for b in module.model.blocks] == [64, 64]
    assert sum(p.numel() for p in module.parameters()) < before
    removed = cb.compression_summary()["shrunk"]["channels"]
    assert removed == {f"model.blocks.{i}{unit}": [n, n // 2] for i in (0, 1) for unit, n in ((".attn", 4), ("", 128))}
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    # a checkpoint of the shrunk model loads into a freshly built one (layers resized, heads from the widths)
    path = trainer.checkpoint_callback.best_model_path
    fresh = LanguageModelModule.load_from_checkpoint(path, model=_gpt())
    x = torch.randint(0, 16, (2, 16))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), module(x))
    assert [b.attn.n_heads for b in fresh.model.blocks] == [2, 2]
    # and a fit resumes from it: the optimizer state it holds is the smaller parameters' (it failed on the old shapes)
    resumed = Trainer(callbacks=[PruningCallback(0.5, structure="heads+neurons", scope="layer", schedule="one_shot", start_epoch=1,
                                                 shrink=True, verbose=False)], **trainer_kwargs(tmp_path / "resumed", max_epochs=4))
    resumed.fit(LanguageModelModule(_gpt()), _tokens(), _tokens(32), ckpt_path=trainer.checkpoint_callback.last_model_path or path)
    assert resumed.current_epoch == 4 and torch.isfinite(resumed.callback_metrics["val_loss"])


def test_a_head_count_that_does_not_divide_the_width_is_a_clear_error() -> None:
    block = HFStyleAttention()
    block.num_heads = 3
    with pytest.raises(ValueError, match=r"'HFStyleAttention' has num_heads=3, which does not divide the width of its query projection \(32\)"):
        find_units(block, ("heads",))


def test_units_left_out_by_exclude_are_named_when_nothing_else_is_found() -> None:
    """exclude=['k'] leaves every attention module a projection short: the error named only what heads need (q/k/v/o
    projections and a head count), which the model has."""
    model = GPTDecoder(d_model=32, n_layers=2, n_heads=4, max_len=16, attention="sdpa")
    names = [n for n, _ in model.named_parameters() if n.endswith("weight") and not n.endswith(".k.weight")]
    with pytest.raises(ValueError, match=r"found no heads .* \('blocks.0.attn' keeps its heads: include/exclude leave out 'blocks.0.attn.k.weight'; 'blocks.1.attn'"):
        find_units(model, ("heads",), names)
    with pytest.warns(UserWarning, match=r"found no heads .* include/exclude leave out 'blocks.0.attn.k.weight'.*, so only neurons are pruned"):
        assert len(find_units(model, ("heads", "neurons"), names)) == 2


def test_a_checkpoint_with_heads_removed_loads_into_the_original_class() -> None:
    """The head count attribute follows the stored shapes (a forward reshapes with it); GPT-2's fused
    Conv1D too."""
    from lightning_compress import allow_shrunk_checkpoints

    torch.manual_seed(0)
    block = HFStyleAttention()
    groups = find_units(block, ("heads", "neurons"))
    remove_units(block, groups, [torch.tensor([False, True, True, False]), torch.arange(64) < 40])
    fresh = allow_shrunk_checkpoints(HFStyleAttention())
    fresh.load_state_dict(block.state_dict())
    assert fresh.num_heads == block.num_heads == 2 and fresh.up_proj.out_features == 40
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), block(x))

    class BesidePackedAttention(nn.Module):  # nn.MultiheadAttention keeps its heads; the other attention's go
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.mha = HFStyleAttention(), nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.attn(x)
            return h + self.mha(h, h, h, need_weights=False)[0]

    torch.manual_seed(0)
    mixed = BesidePackedAttention().eval()
    groups = find_units(mixed, ("heads",), [n for n, _ in mixed.named_parameters() if n.startswith("attn.")])
    remove_units(mixed, groups, [torch.tensor([True, False, True, False])])
    fresh_mixed = allow_shrunk_checkpoints(BesidePackedAttention()).eval()
    fresh_mixed.load_state_dict(mixed.state_dict())
    assert fresh_mixed.attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh_mixed(x), mixed(x))

    transformers = pytest.importorskip("transformers", reason="the GPT-2 case needs transformers (the dev extra)")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    groups = find_units(gpt2, ("heads", "neurons"))
    remove_units(gpt2, groups, [torch.arange(g.size) % 2 == 0 for g in groups])
    reloaded = allow_shrunk_checkpoints(transformers.GPT2LMHeadModel(config)).eval()
    reloaded.load_state_dict(gpt2.state_dict())
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gpt2(ids).logits)
    assert reloaded.transformer.h[0].attn.num_heads == 2


def _hf_decoder(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="Hugging Face decoders need transformers (the dev extra)")
    common = {"vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 16}
    torch.manual_seed(0)
    if kind == "gpt_neox":  # q, k and v of each head side by side in one query_key_value
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common, intermediate_size=64))
    if kind == "phi":  # the output projection is named dense
        return transformers.PhiForCausalLM(transformers.PhiConfig(**common, intermediate_size=64))
    config = transformers.GPTJConfig(vocab_size=256, n_embd=32, n_layer=1, n_head=4, n_positions=16, rotary_dim=4, n_inner=64)
    return transformers.GPTJForCausalLM(config)  # fc_in / fc_out


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["gpt_neox", "phi", "gptj"])
def test_more_decoder_layouts_remove_heads_and_neurons_exactly(kind: str) -> None:
    model = _Logits(_hf_decoder(kind))
    before = sum(p.numel() for p in model.parameters())
    assert len(find_units(model, ("heads",))) == len(find_units(model, ("neurons",))) == 1
    masked, removed, shrunk = _masked_then_removed(model, ("heads", "neurons"))
    torch.testing.assert_close(removed, masked, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in shrunk.parameters()) < before


def test_heads_removed_when_training_ends_keep_the_reports_compressed_metrics(tmp_path) -> None:
    """Removal at the end of fit (shrink_epoch=max_epochs) changed the fingerprint of the validated model, and the
    report said 'Compressed metrics: none', blaming a guard. The removal keeps every output: the last validation
    stands for the returned model."""
    from lightning_compress import CompressionReport

    seed_everything(0)
    module = LanguageModelModule(_gpt())
    cb = PruningCallback(0.5, structure="heads", scope="layer", schedule="one_shot", start_epoch=1, shrink=True, shrink_epoch=2, verbose=False)
    report = CompressionReport(print_table=False, plot=False, repeats=2, warmup=0)
    trainer = Trainer(callbacks=[cb, report], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(module, _tokens(), _tokens(32))
    assert cb.compression_summary()["shrunk"]["epoch"] == 2 and [b.attn.n_heads for b in module.model.blocks] == [2, 2]
    r = report.report
    returned = Trainer(**trainer_kwargs(tmp_path)).validate(module, _tokens(32), verbose=False)[0]
    assert r["compressed"]["metrics"]["val_loss"] == pytest.approx(returned["val_loss"], rel=1e-5)
    assert "before its pruned units (channels, heads, neurons) were removed" in r["compressed_note"]


@pytest.mark.parametrize(("kinds", "said"), [({"heads"}, "'heads'"), ({"heads", "neurons"}, "'heads+neurons'")])
def test_torchs_multihead_attention_is_refused_naming_the_structure_asked(kinds: set[str], said: str) -> None:
    """structure='heads+neurons' was refused as "structure 'heads' cannot remove ..."."""
    from lightning_compress.pruning.units import find_units

    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    with pytest.raises(ValueError, match=rf"structure {re.escape(said)} cannot remove heads of nn.MultiheadAttention \('self_attn'\)"):
        find_units(layer, kinds)
