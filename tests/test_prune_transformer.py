"""Pruning attention models: every matmul weight (``in_proj_weight``, ``out_proj``, feed-forward, GPT-2
style ``Conv1D``), N:M along the input dimension, the ``wanda`` criterion, one-shot from pretrained weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.pruning import PruningCallback, PruningContext, Wanda
from lightning_compress.pruning.masks import (
    check_nm_shapes,
    layer_targets,
    nm_masks,
    row_masks,
    select_parameters,
    unstructured_masks,
)
from lightning_compress.pruning.weights import input_major, unknown_matmul_weights

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

VOCAB, D, SEQ = 32, 32, 8


class Conv1D(nn.Module):
    """A stand-in for ``transformers.pytorch_utils.Conv1D``: weight stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class TinyLM(LightningModule):
    """Embedding -> 2-layer ``nn.TransformerEncoder`` (d_model 32, 2 heads) -> Linear head, on token ids.

    ``extra`` adds a GPT-2 style MLP (``Conv1D`` 32 -> 64 -> 32) before the head."""

    def __init__(self, extra: bool = False, tie: bool = False, d: int = D) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mlp = nn.Sequential(Conv1D(64, d), nn.GELU(), Conv1D(d, 64)) if extra else None
        self.head = nn.Linear(d, VOCAB, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(self.emb(x))
        if self.mlp is not None:
            h = h + self.mlp(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loader(batches: int = 3, seed: int = 0) -> DataLoader:
    """Predict the next id (x + 1 mod VOCAB) at every position: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (8 * batches, SEQ), generator=g)
    y = (x + 1) % VOCAB
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(module: LightningModule, tmp_path: Path, callbacks: list, max_epochs: int | None = 1, batches: int = 3, **kw: Any) -> Trainer:
    kw = {"max_epochs": max_epochs, "num_sanity_val_steps": 0, **kw}
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module, loader(batches))
    return trainer


def matmul_weights(module: nn.Module) -> dict[str, Tensor]:
    """Every matmul weight of the model, found independently of the library."""
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if name.endswith(("in_proj_weight", "out_proj.weight", "linear1.weight", "linear2.weight", "head.weight")):
            out[name] = p
        elif name.startswith("mlp.") and name.endswith("weight"):
            out[name] = p
    return out


def zero_fraction(params: dict[str, Tensor]) -> float:
    return sum(int((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())


def quiet(**kw: Any) -> dict[str, Any]:
    return {"verbose": False, "schedule": "one_shot", **kw}


# --------------------------------------------------------------------------- selection


def test_default_selection_takes_every_matmul_weight_and_no_embedding() -> None:
    model = TinyLM(extra=True)
    names = select_parameters(model)
    assert names == list(matmul_weights(model)), names
    assert sum(n.endswith("in_proj_weight") for n in names) == 2
    assert sum(n.endswith("out_proj.weight") for n in names) == 2
    assert "emb.weight" not in names and not any("norm" in n or "bias" in n for n in names)
    assert input_major(model, names) == {"mlp.0.weight": 0, "mlp.2.weight": 0}
    # an embedding only when its full parameter name is spelled out (with '.*' keeping the default layers)
    assert select_parameters(model, include=[".*", r"emb\.weight"]) == ["emb.weight", *names]
    assert select_parameters(model, include=[r"self_attn"]) == [n for n in names if "self_attn" in n]


def test_target_map_naming_in_proj_weight_and_error_for_an_unselected_embedding() -> None:
    names = select_parameters(TinyLM())
    targets = layer_targets(names, {r"in_proj_weight": 0.75, r".*": 0.25})
    assert {n: t for n, t in targets.items() if "in_proj" in n} == {f"enc.layers.{i}.self_attn.in_proj_weight": 0.75 for i in range(2)}
    assert targets["head.weight"] == 0.25
    all_names = [n for n, _ in TinyLM().named_parameters()]
    with pytest.raises(ValueError, match=r"emb\.weight.*not selected.*include=\['\.\*', r'emb\\\.weight'\]"):
        layer_targets(names, {r"emb": 0.5}, all_names)


def test_a_tied_head_is_pruned_once(tmp_path: Path) -> None:
    module = TinyLM(tie=True)
    cb = PruningCallback(0.5, **quiet())
    fit(module, tmp_path, [cb], batches=1)
    assert "head.weight" in cb.masks and "emb.weight" not in cb.masks and module.head.weight is module.emb.weight
    assert zero_fraction(matmul_weights(module)) == pytest.approx(0.5, abs=1e-6) and cb.sparsity == pytest.approx(0.5)


class WithUnknown(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(D, D, batch_first=True)
        self.scale = nn.Parameter(torch.ones(D, D))

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(self.emb(x))
        return self.head(self.gru(h)[0] @ self.scale)


def test_unknown_matmul_weights_are_listed_once_at_setup(tmp_path: Path) -> None:
    model = WithUnknown()
    unknown = unknown_matmul_weights(model, select_parameters(model))
    assert unknown == ["scale", "gru.weight_ih_l0", "gru.weight_hh_l0"]
    cb = PruningCallback(0.5, **quiet())
    with pytest.warns(UserWarning, match=r"does not prune 3 parameter.*'scale', 'gru\.weight_ih_l0'") as record:
        fit(model, tmp_path, [cb], batches=1)
    assert sum("does not prune" in str(w.message) for w in record) == 1
    # named, they are pruned and no longer listed
    named = PruningCallback(0.5, include=[".*", r"gru\.weight_ih_l0", r"scale"], **quiet())
    fit(WithUnknown(), tmp_path, [named], batches=1)
    assert {"gru.weight_ih_l0", "scale"} <= set(named.masks)
    assert unknown_matmul_weights(model, list(named.masks)) == ["gru.weight_hh_l0"]


# --------------------------------------------------------------------------- fits


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_half_of_all_matmul_weights_are_zero_after_fit(tmp_path: Path, criterion: str) -> None:
    seed_everything(0)
    module = TinyLM()
    cb = PruningCallback(0.5, criterion=criterion, **quiet())
    fit(module, tmp_path, [cb])
    weights = matmul_weights(module)
    assert set(cb.masks) == set(weights)
    assert zero_fraction(weights) == pytest.approx(0.5, abs=1e-6)  # counted from the model itself
    assert cb.sparsity == pytest.approx(0.5, abs=1e-6)
    for name in weights:
        assert "in_proj" not in name or (weights[name] == 0).float().mean() > 0.1, f"{name} left dense"
    if criterion == "wanda":  # every output row loses the same share
        for name, w in weights.items():
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_2_4_along_the_input_dimension_of_every_matmul_weight(tmp_path: Path, criterion: str) -> None:
    seed_everything(0)
    module = TinyLM(extra=True)
    cb = PruningCallback(0.5, structure="2:4", criterion=criterion, **quiet())
    fit(module, tmp_path, [cb], batches=2)
    weights = matmul_weights(module)
    assert set(cb.masks) == set(weights)
    for name, w in weights.items():
        mask = cb.masks[name]
        rows = mask.t() if name.startswith("mlp.") else mask  # Conv1D is (in, out): inputs along dim 0
        assert (rows.reshape(-1, 4).sum(1) == 2).all(), f"{name}: not 2:4 along its inputs"
        assert (w[~mask] == 0).all()
    conv1d = cb.masks["mlp.0.weight"]  # (32 in, 64 out): along dim 1 the groups are not 2:4
    assert not (conv1d.reshape(-1, 4).sum(1) == 2).all()
    assert zero_fraction(weights) == pytest.approx(0.5, abs=1e-6)


def test_target_map_prunes_in_proj_weight(tmp_path: Path) -> None:
    module = TinyLM()
    cb = PruningCallback({r"in_proj_weight": 0.75, r".*": 0.25}, **quiet())
    fit(module, tmp_path, [cb], batches=1)
    for name, w in matmul_weights(module).items():
        assert (w == 0).float().mean().item() == pytest.approx(0.75 if "in_proj" in name else 0.25, abs=1e-6), name


def test_embedding_pruned_only_when_named(tmp_path: Path) -> None:
    module = TinyLM()
    cb = PruningCallback(0.5, include=[".*", r"emb\.weight"], **quiet())
    fit(module, tmp_path, [cb], batches=1)
    assert "emb.weight" in cb.masks and (module.emb.weight == 0).any()
    with pytest.raises(ValueError, match="not selected: add their full names to include"):
        fit(TinyLM(), tmp_path, [PruningCallback({r"emb": 0.5}, **quiet())], batches=1)


class HeadByFunction(TinyLM):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.enc(self.emb(x)), self.head.weight)  # the head module is never called


def test_setup_errors_name_the_layer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"criterion 'wanda'.*no input reached \['head'\]"):
        fit(HeadByFunction(), tmp_path, [PruningCallback(0.5, criterion="wanda", **quiet())], batches=1)
    with pytest.raises(ValueError, match=r"cannot prune nn.MultiheadAttention.*enc\.layers\.0\.self_attn"):
        fit(TinyLM(), tmp_path, [PruningCallback(0.5, structure="channel", **quiet())], batches=1)
    with pytest.raises(ValueError, match=r"'2:4': enc\.layers\.0\.self_attn\.in_proj_weight of shape \(90, 30\) has 30 inputs"):
        fit(TinyLM(d=30), tmp_path, [PruningCallback(0.5, structure="2:4", **quiet())], batches=1)
    with pytest.raises(ValueError, match=r"criterion 'wanda'.*'emb\.weight' \(Embedding\)"):
        fit(TinyLM(), tmp_path, [PruningCallback(0.5, criterion="wanda", include=[".*", r"emb\.weight"], **quiet())], batches=1)
    conv1d = {"c.weight": torch.zeros(6, 8)}  # (6 in, 8 out): 6 inputs per output
    with pytest.raises(ValueError, match="has 6 inputs per output"):
        check_nm_shapes(conv1d, 4, "2:4", {"c.weight"})


# --------------------------------------------------------------------------- wanda


def _wanda(model: nn.Module, names: list[str]) -> Wanda:
    crit = Wanda()
    params = dict(model.named_parameters())
    crit.setup(PruningContext(model, {n: params[n] for n in names}, dict(model.named_modules())), "unstructured")
    return crit


def test_wanda_scores_are_weight_times_input_norm() -> None:
    model = nn.Sequential(nn.Linear(4, 3), Conv1D(5, 3), nn.MultiheadAttention(5, 1, batch_first=True))
    attn = model[2]
    names = ["0.weight", "1.weight", "2.in_proj_weight", "2.out_proj.weight"]
    crit = _wanda(model, names)
    x = torch.randn(2, 6, 4)
    h0 = model[0](x)
    h1 = model[1](h0)
    attn(h1, h1, h1, need_weights=False)
    ref = nn.MultiheadAttention(5, 1, batch_first=True)
    ref.load_state_dict(attn.state_dict())
    with torch.no_grad():
        ref.out_proj.weight.copy_(torch.eye(5))
        ref.out_proj.bias.zero_()
        ref.eval()
        context = ref(h1, h1, h1, need_weights=False)[0]
    params = dict(model.named_parameters())
    scores = crit.element_scores({n: params[n] for n in names})
    feat = lambda t: t.detach().reshape(-1, t.shape[-1]).norm(dim=0)  # noqa: E731
    torch.testing.assert_close(scores["0.weight"], model[0].weight.abs() * feat(x))
    torch.testing.assert_close(scores["1.weight"], model[1].weight.abs() * feat(h0).unsqueeze(1))  # (in, out)
    torch.testing.assert_close(scores["2.in_proj_weight"], attn.in_proj_weight.abs() * feat(h1))
    torch.testing.assert_close(scores["2.out_proj.weight"], attn.out_proj.weight.abs() * feat(context))
    state = crit.state_dict()
    crit.reset()
    crit.load_state_dict(state)
    torch.testing.assert_close(crit.element_scores({"0.weight": model[0].weight})["0.weight"], scores["0.weight"])
    with torch.no_grad():  # no gradient (validation, other plugins' batches): not counted
        model[0](x * 100)
    torch.testing.assert_close(crit.element_scores({"0.weight": model[0].weight})["0.weight"], scores["0.weight"])
    crit.teardown()


def test_wanda_refuses_a_weight_two_layers_read_different_inputs_through() -> None:
    """``b.weight = a.weight``: scored with a's inputs only, b's input columns that a never saw were all pruned (b then
    returned nothing), without a word."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"'0.weight' is one weight shared by the layers \['0', '2'\], which read different "
                       r"inputs; untie them, exclude it, or use criterion='magnitude'"):
        _wanda(model, ["0.weight"])


def test_wanda_separates_query_key_value_and_records_the_first_batches_after_an_update() -> None:
    attn = nn.MultiheadAttention(4, 2)  # sequence-first
    crit = _wanda(attn, ["in_proj_weight"])
    crit.calibration_batches = 1
    q, kv = torch.randn(5, 2, 4), torch.randn(7, 2, 4) * 3
    attn(q, kv, kv)
    attn(q * 100, kv, kv)  # past the budget of one batch per update: not recorded
    norms = torch.stack([q.reshape(-1, 4).norm(dim=0), kv.reshape(-1, 4).norm(dim=0), kv.reshape(-1, 4).norm(dim=0)])
    expected = attn.in_proj_weight.abs() * norms.repeat_interleave(4, dim=0)
    torch.testing.assert_close(crit.element_scores({"in_proj_weight": attn.in_proj_weight})["in_proj_weight"], expected)
    crit.reset()  # a mask update: the next batch is recorded again
    attn(q * 100, kv, kv)
    assert crit.sq[":q"].sum() > 1000 * (q**2).sum()  # keys are "<module name>:<input>"; the root is ""
    crit.teardown()


def test_wanda_keeps_the_columns_of_large_inputs_where_magnitude_does_not() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 16).sign() * (0.5 + 0.5 * torch.rand(8, 16)))
        layer.weight[:, :2] *= 0.2  # small weights ...
    x = torch.randn(64, 16)
    x[:, :2] *= 50  # ... on large input features
    crit = _wanda(layer, ["weight"])
    layer(x)
    wanda = row_masks(crit.element_scores({"weight": layer.weight}), {"weight": 0.5})["weight"]
    magnitude = unstructured_masks({"weight": layer.weight.detach().abs()}, {"weight": 0.5}, "layer")["weight"]
    assert wanda[:, :2].all()  # Wanda keeps every weight on the two large features
    assert magnitude[:, :2].float().mean() < 0.2  # magnitude prunes most of them
    assert (wanda.sum(1) == 8).all()  # and every row keeps half
    wanda_nm = nm_masks(crit.element_scores({"weight": layer.weight}), 2, 4, {"weight": 1.0})["weight"]
    assert wanda_nm[:, :2].all()


def test_row_masks_spread_the_exact_count_over_rows_and_only_grow() -> None:
    torch.manual_seed(0)
    scores = {"w": torch.rand(7, 10), "t": torch.rand(10, 7)}  # "t" stored (in, out): rows are its columns
    first = row_masks(scores, {"w": 0.35, "t": 0.35}, input_major={"t"})
    for name, rows in (("w", first["w"]), ("t", first["t"].t())):
        pruned = (~rows).sum(1)
        assert int(pruned.sum()) == round(0.35 * 70) and int(pruned.max() - pruned.min()) <= 1
    second = row_masks(scores, {"w": 0.6, "t": 0.6}, current=first, input_major={"t"})
    for name in scores:
        assert not (second[name] & ~first[name]).any() and int((~second[name]).sum()) == 42


def test_wanda_one_shot_from_pretrained_calibrates_then_recovers(tmp_path: Path) -> None:
    """The recipe of docs/pruning.md: load pretrained weights, prune once at the start, fine-tune."""
    seed_everything(0)
    pretrained = TinyLM(extra=True)
    fit(pretrained, tmp_path, [], max_epochs=4, batches=4)
    path = tmp_path / "pretrained.pt"
    torch.save(pretrained.state_dict(), path)

    for start, every in ((0.0, None), (0.5, 1)):  # the second as a language model runs: bounded by max_steps
        module = TinyLM(extra=True)
        module.load_state_dict(torch.load(path, weights_only=True))
        cb = PruningCallback(0.5, criterion=Wanda(calibration_batches=2), start_epoch=start, update_every_n_steps=every, **quiet())
        calls: list[int] = []
        run_batches = cb.criterion._run_batches
        cb.criterion._run_batches = lambda n: calls.append(n) or run_batches(n)  # type: ignore[method-assign]
        limit = {"max_epochs": 2} if every is None else {"max_epochs": None, "max_steps": 8}
        trainer = fit(module, tmp_path, [cb], batches=4, **limit)
        history = cb.compression_summary()["history"]
        assert len(history) == 1 and cb.sparsity == pytest.approx(0.5)
        if every is None:  # at the start of epoch 0, before any step: calibration batches (plus the setup check)
            assert history[0]["step"] == 0 and calls == [1, 2]
        else:  # half-way through epoch 0, from the two training steps before it: no extra batch
            assert history[0]["step"] == 2 and calls == [1]
        assert zero_fraction(matmul_weights(module)) == pytest.approx(0.5, abs=1e-6)
        assert trainer.callback_metrics["loss"] < 1.0, start  # recovered (chance: ln 32 = 3.47)


class TransposedExperts(nn.Module):
    """Expert weights stored ``(experts, in, out)`` and applied as ``x @ W[e]``, flagged ``is_transposed`` as
    Hugging Face's experts modules flag them (GPT-OSS)."""

    is_transposed = True

    def __init__(self, experts: int = 2, d: int = D) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, d, 2 * d) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, 2 * d, d) / d**0.5)

    def forward(self, h: Tensor) -> Tensor:
        route = (h.sum(-1, keepdim=True) > 0).long()  # a token goes to expert 0 or 1
        up = torch.stack([h @ w for w in self.gate_up_proj], -1).gather(-1, route.unsqueeze(-1).expand(*h.shape[:-1], 2 * D, 1))
        up = nn.functional.gelu(up.squeeze(-1))
        return torch.stack([up @ w for w in self.down_proj], -1).gather(-1, route.unsqueeze(-1).expand(*h.shape, 1)).squeeze(-1)


class ExpertLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.experts = TransposedExperts()

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(self.emb(x))
        return self.head(h + self.experts(h))


def test_a_row_of_experts_stored_out_by_in_is_one_output_unit() -> None:
    """Mixtral keeps its experts (E, out, in): the per-row comparison (Wanda's) took a whole expert as one row, so
    some output units lost every weight and others none. Each output unit of each expert loses the same share."""

    class Experts(nn.Module):
        is_transposed = False

        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 8))

    model = nn.Sequential(Experts())
    layout = input_major(model, ["0.gate_up_proj"])
    assert layout == {"0.gate_up_proj": 2}
    scores = {"0.gate_up_proj": torch.arange(128.0).view(2, 8, 8)}  # ordered: a whole-expert row would lose units 0-3
    keep = row_masks(scores, {"0.gate_up_proj": 0.5}, input_major=layout)["0.gate_up_proj"]
    assert (keep.sum(-1) == 4).all()


def test_2_4_runs_along_the_inputs_of_experts_stored_in_by_out(tmp_path: Path) -> None:
    """GPT-OSS stores its experts (E, in, out) and computes x @ W[e]: 2:4 ran along the outputs (dim 2), which no
    sparse kernel uses and the docs do not promise. Named by include, such weights are grouped along dim 1."""
    seed_everything(0)
    module = ExpertLM()
    experts = [r"experts\.gate_up_proj", r"experts\.down_proj"]
    assert input_major(module, ["experts.gate_up_proj", "experts.down_proj", "head.weight"]) == {
        "experts.gate_up_proj": 1, "experts.down_proj": 1,
    }  # fmt: skip
    cb = PruningCallback(0.5, structure="2:4", include=[".*", *experts], **quiet())
    fit(module, tmp_path, [cb], batches=2)
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        w = dict(module.named_parameters())[name].detach()
        groups = (w.movedim(1, -1).reshape(-1, 4) != 0).sum(-1)  # blocks of 4 consecutive inputs of one output
        assert (groups <= 2).all() and (w == 0).float().mean() == pytest.approx(0.5), name
