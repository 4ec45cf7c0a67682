"""PruningCallback on layouts users write themselves: a norm inside a feed-forward block, a weight
computed by a parametrization, weights tied between layers, Linear layers over token features and a
transposed convolution. Each is either pruned correctly or refused at setup, before any change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import trainer_kwargs
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Classify(LightningModule):
    """Cross-entropy on ``net(x)``; Adam."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(net: nn.Module, x: Tensor, callback: PruningCallback, tmp_path: Path, epochs: int = 2) -> Trainer:
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, max_epochs=epochs, num_sanity_val_steps=0))
    trainer.fit(Classify(net), DataLoader(TensorDataset(x, y), batch_size=16))
    return trainer


def _quiet(**kw: Any) -> dict[str, Any]:
    return {"verbose": False, "schedule": "one_shot", "scope": "layer", **kw}


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """NormFormer/Kosmos-2: a LayerNorm over the hidden neurons between fc1 and fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ffn_layernorm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class NormFormer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.mlp, self.head = nn.Linear(4, 16), Heads(), FeedForward(), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.attn(h)
        return self.head((h + self.mlp(h)).mean(1))


def test_a_norm_over_the_neurons_keeps_them_whole_and_the_heads_still_go(tmp_path: Path) -> None:
    """The feed-forward's LayerNorm spans its neurons: removing some would crash mid-fit (and masking them
    changes what the norm computes), so it is left whole at setup, with a warning; the heads are removed."""
    seed_everything(0)
    net = NormFormer()
    cb = PruningCallback(0.5, structure="heads+neurons", start_epoch=0, shrink=True, shrink_epoch=1, **_quiet())
    with pytest.warns(UserWarning, match=r"'net.mlp' keeps its neurons: .*ffn_layernorm \(LayerNorm\) normalises over them"):
        trainer = _fit(net, torch.randn(32, 5, 4), cb, tmp_path)
    assert net.attn.num_heads == 2 and net.attn.q_proj.out_features == net.attn.o_proj.in_features == 8
    assert net.mlp.fc1.out_features == 32 and net.mlp.ffn_layernorm.normalized_shape == (32,)
    assert cb.compression_summary()["shrunk"]["channels"] == {"net.attn": [4, 2]}
    assert torch.isfinite(trainer.callback_metrics["loss"])


def test_a_hook_based_spectral_norm_weight_names_weight_orig() -> None:
    """spectral_norm's weight_v is a power-iteration buffer and it has no weight_g: the note named those."""
    from lightning_compress.pruning.weights import parametrized_weights_note

    net = nn.Sequential(nn.Linear(3, 4), torch.nn.utils.spectral_norm(nn.Linear(4, 4)))
    note = parametrized_weights_note(net, ["0.weight"])
    assert note is not None and "['1.weight_orig']" in note and "weight_v" not in note and "weight_g" not in note


def _weight_norm_net(form: str) -> nn.Module:
    norm = nn.utils.parametrizations.weight_norm if form == "parametrization" else torch.nn.utils.weight_norm
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("form", "direction"),
    [("parametrization", "net.2.parametrizations.weight.original1"), ("hook", "net.2.weight_v")],  # the hook-based form
)
@pytest.mark.parametrize("include", [False, True])
def test_a_parametrised_weight_is_named_and_its_direction_prunes_when_included(tmp_path: Path, form: str, direction: str, include: bool) -> None:
    """weight_norm's weight was called a module type pruning does not know, and the include the warning gave
    pruned its norms (original0), which zero nothing of the weight. The older hook-based form (an attribute the hook
    recomputes from weight_v and weight_g) was left dense without a word."""
    import re
    import warnings

    seed_everything(0)
    net = _weight_norm_net(form)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(net, torch.randn(32, 6), PruningCallback(0.5, include=[".*", re.escape(direction)] if include else None, **_quiet()), tmp_path)
    said = [str(w.message) for w in caught if "PruningCallback does not prune" in str(w.message)]
    if not include:
        assert len(said) == 1 and said[0].startswith("PruningCallback does not prune parametrised weights: ['net.2.weight'] (1 in all)")
        assert direction.rsplit(".", 1)[-1] in said[0] and float((net[2].weight == 0).float().mean()) == 0.0
    else:  # the direction's zeros are the weight's
        assert said == [] and float((net[2].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_a_weight_norm_direction_over_columns_keeps_a_weight_in_every_column(tmp_path: Path) -> None:
    """weight_norm(dim=1) (as for a transposed convolution) was left out of the protection: NaN at the next update."""
    seed_everything(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(8, 8), dim=1), nn.ReLU(), nn.Linear(8, 3))
    _fit(net, torch.randn(32, 6), PruningCallback(0.97, include=[r"net\.2\.parametrizations\.weight\.original1"], **_quiet()), tmp_path, epochs=3)
    v = net[2].parametrizations.weight.original1
    assert bool((v != 0).any(0).all()) and all(bool(p.isfinite().all()) for p in net.parameters())


@pytest.mark.parametrize(("form", "direction"), [("parametrization", "net.2.parametrizations.weight.original1"), ("hook", "net.2.weight_v")])
def test_a_weight_norm_direction_keeps_a_weight_in_every_row(tmp_path: Path, form: str, direction: str) -> None:
    """At a high target a row of the direction was pruned whole: weight_norm computed 0/0 there, the loss and every
    weight went NaN, and the fit ended normally at its target. Every row keeps its best-scored weight."""
    import re

    seed_everything(0)
    net = _weight_norm_net(form)
    _fit(net, torch.randn(32, 6), PruningCallback(0.97, include=[re.escape(direction)], **_quiet()), tmp_path)
    v = dict(net.named_parameters())[direction.removeprefix("net.")]
    assert bool((v != 0).any(1).all()) and int((v != 0).sum()) == 8  # one weight in each of the 8 rows: 87.5%, not 97%
    assert all(bool(p.isfinite().all()) for p in net.parameters()) and bool(net(torch.randn(4, 6)).isfinite().all())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: _weight_norm_net("parametrization"), r"\['0'\].*module '2', whose weight is computed by a parametrization \(WeightNorm\).*remove_parametrizations"),
        (lambda: _weight_norm_net("hook"), r"\['0'\].*module '2', whose weight is recomputed by a forward hook .*remove_weight_norm"),
        (Tied, r"\['a'\].*the tied weights 'a.weight' and 'b.weight'"),
    ],
    ids=["weight_norm", "hook_weight_norm", "tied"],
)
def test_channels_that_removal_cannot_cut_are_a_setup_error_before_any_change(tmp_path: Path, make: Any, why: str) -> None:
    seed_everything(0)
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cb = PruningCallback(0.5, structure="channel", start_epoch=1, shrink=True, shrink_epoch=2, **_quiet())
    with pytest.raises(ValueError, match=rf"cannot remove output channels of {why}.*exclude"):
        _fit(net, torch.randn(32, 6), cb, tmp_path, epochs=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class Tokens(nn.Module):
    """Token ids -> embedding -> Linear layers over each token's features -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2, self.head = nn.Embedding(10, 6), nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(ids))))).mean(1))


def test_channels_of_token_features_are_pruned_and_removed(tmp_path: Path) -> None:
    seed_everything(0)
    net = Tokens()
    cb = PruningCallback(0.5, structure="channel", start_epoch=0, shrink=True, shrink_epoch=1, **_quiet())
    trainer = _fit(net, torch.randint(0, 10, (32, 5), generator=torch.Generator().manual_seed(0)), cb, tmp_path)
    assert (net.fc1.out_features, net.fc2.in_features, net.fc2.out_features, net.head.in_features) == (4, 4, 4, 4)
    assert cb.compression_summary()["shrunk"]["channels"] == {"net.fc1": [8, 4], "net.fc2": [8, 4]}
    assert torch.isfinite(trainer.callback_metrics["loss"])


class Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.head = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.up(x)).flatten(1))


def test_2_4_on_a_transposed_conv_runs_along_its_input_channels(tmp_path: Path) -> None:
    """A transposed convolution stores (in, out, kH, kW) and sums over ``in``: its 2:4 blocks are four
    input channels of one output channel at one kernel position."""
    seed_everything(0)
    net = Upsample()
    cb = PruningCallback(0.5, structure="2:4", start_epoch=0, **_quiet())
    _fit(net, torch.randn(32, 8, 4, 4), cb, tmp_path, epochs=1)
    w = net.up.weight.detach()
    assert ((w.movedim(0, -1).reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert (cb.masks["net.up.weight"].movedim(0, -1).reshape(-1, 4).sum(1) == 2).all()
    assert ((net.head.weight.reshape(-1, 4) != 0).sum(1) <= 2).all()


def test_channel_pruning_traces_the_input_a_networks_own_pre_hook_gives(tmp_path: Path) -> None:
    """A network whose forward pre-hook reshapes its input (flat images to (N, 1, 8, 8)): channel pruning traces its
    forward with the input the hook gives it (an fx trace runs no hook), as the forward receives it."""
    class FlatImages(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
            self.net.register_forward_pre_hook(lambda m, a: (a[0].unflatten(-1, (8, 8)).unsqueeze(1),))  # run twice, it fails

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 64), torch.randint(0, 2, (16,))), batch_size=4)
    module = FlatImages()
    prune = PruningCallback(0.5, structure="channel", scope="layer", schedule="one_shot", start_epoch=0, shrink=True, verbose=False)
    Trainer(max_epochs=1, callbacks=[prune], **trainer_kwargs(tmp_path)).fit(module, data)
    assert module.net[0].out_channels == 4 and module.net(torch.randn(3, 64)).shape == (3, 2)

