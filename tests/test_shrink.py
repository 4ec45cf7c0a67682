"""Channel removal on modules (no Trainer): graph, exactness, guard rails, optimizer remap, reload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.models import MLP, LeNet5, ResCNN
from lightning_compress.pruning.graph import UnsupportedChannelOpError, channel_groups
from lightning_compress.pruning.reload import load_pruned, resize_to_state_dict
from lightning_compress.pruning.shrink import (
    count_macs,
    remap_optimizer,
    shrink_model,
    zero_channels,
)
from lightning_compress.pruning.shrink import _shrink as shrink_with_map


class DepthwiseNet(nn.Module):
    """MobileNet-style: pointwise -> depthwise -> pointwise, with BN, plus a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(1, 12, 1)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.pw2 = nn.Conv2d(12, 10, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.pw1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw2(x))
        return self.fc(self.pool(x).flatten(1))


class ConcatNet(nn.Module):
    """Two branches concatenated, a BN over the concatenation, a flatten -> Linear, an SE-style gate."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(1, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(11)
        self.c = nn.Conv2d(11, 8, 3, padding=1)
        self.gate = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        y = torch.relu(self.c(y))
        s = torch.relu(self.gate(y.mean((2, 3))))  # couples c with gate
        y = y * s[:, :, None, None]
        y = nn.functional.adaptive_max_pool2d(y, 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))


class ViewNet(nn.Module):
    """Idioms of older code: ``view(x.size(0), -1)``, ``squeeze(-1)``, spatial flattening to (N, C, HW)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4 + 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        pooled = x.reshape(x.size(0), x.size(1), -1).amax(-1, keepdim=True).squeeze(-1)
        return self.fc(torch.cat([x.view(x.size(0), -1), pooled], dim=1))


class Shuffle(nn.Module):
    """A channel shuffle: permutes channels, which no slicing of c2's input can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.c2(x).mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


class NonZeroAtZeroNet(nn.Module):
    """What a dropped channel carries is not 0: a BatchNorm after a residual add (beta - mean * gamma /
    std), a sigmoid, a softplus and an added constant between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.bn(self.a(x) + self.b(x)))
        y = nn.functional.softplus(self.c(y)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)) + 1.0)


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _random_keep(sizes: dict[str, int], fraction: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for name, n in sizes.items():
        vec = torch.zeros(n, dtype=torch.bool)
        vec[torch.randperm(n, generator=gen)[: max(1, round(n * fraction))]] = True
        keep[name] = vec
    return keep


CASES = {
    "rescnn": (lambda: ResCNN(width=8), (1, 8, 8)),
    "lenet5": (lambda: LeNet5(image_size=8), (1, 8, 8)),
    "mlp": (lambda: MLP(64, (32, 16), 10), (1, 8, 8)),
    "depthwise": (DepthwiseNet, (1, 8, 8)),
    "concat": (ConcatNet, (1, 8, 8)),
    "view": (ViewNet, (1, 8, 8)),
    "nonzero_at_zero": (NonZeroAtZeroNet, (1, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shrunk_equals_masked(case: str) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[case]
    model = factory().eval()
    _randomize_bn(model)
    x = torch.randn(4, *shape)
    groups = channel_groups(model, x)
    assert groups, "every test net has something to prune"
    keep = _random_keep({g.members[0]: g.size for g in groups})
    masked = copy.deepcopy(model)
    zero_channels(masked, keep, x)
    shrunk = copy.deepcopy(masked)
    changes = shrink_model(shrunk, keep, x)
    for g in groups:
        for m in g.members:
            assert changes[m] == (g.size, int(keep[g.members[0]].sum()))
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in shrunk.parameters())
    assert n_after < n_before
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), atol=1e-5, rtol=1e-5)
        masked.train(), shrunk.train()  # batch statistics are per channel too
        torch.testing.assert_close(shrunk(x), masked(x), atol=1e-5, rtol=1e-5)


def test_rescnn_residual_groups_and_head() -> None:
    model = ResCNN(width=8)
    x = torch.zeros(1, 1, 8, 8)
    groups = channel_groups(model, x)
    assert [g.members for g in groups] == [["stem.0", "block.conv2"], ["block.conv1"], ["down.0"]]
    assert groups[0].norms == {"stem.0": "stem.1", "block.conv2": "block.bn2"}
    assert all("fc" not in g.members for g in groups)  # the head is never offered
    # a group is offered only when every member may be pruned
    only = channel_groups(model, x, prunable={"stem.0", "block.conv1"})
    assert [g.members for g in only] == [["block.conv1"]]


def test_residual_members_shrink_together() -> None:
    model = ResCNN(width=8).eval()
    x = torch.randn(2, 1, 8, 8)
    shrink_model(model, {"block.conv2": torch.arange(8) < 5}, x)
    assert model.stem[0].out_channels == model.block.conv2.out_channels == 5
    assert model.stem[1].num_features == model.block.bn2.num_features == 5
    assert model.block.conv1.in_channels == model.down[0].in_channels == 5
    assert model(x).shape == (2, 10)


def test_flatten_linear_columns() -> None:
    model = LeNet5(image_size=8).eval()
    x = torch.randn(2, 1, 8, 8)
    shrink_model(model, {"features.3": torch.arange(16) < 4}, x)
    assert model.classifier[1].in_features == 4 * 2 * 2


def test_unsupported_op_names_op_and_exclude() -> None:
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(UnsupportedChannelOpError, match=r"(?s)c1.*method .view.*exclude"):
        channel_groups(Shuffle(), x)
    with pytest.raises(UnsupportedChannelOpError, match="view"):
        shrink_model(Shuffle(), {"c1": torch.arange(8) < 4}, x)
    # excluding the layer makes the rest prunable
    assert [g.members for g in channel_groups(Shuffle(), x, prunable={"c2"})] == [["c2"]]


class _Flattened(nn.Module):
    """Two convs, then the flatten written one of several ways before a Linear (the PyTorch tutorial writes
    ``x.view(-1, 16 * 5 * 5)``)."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.flatten = flatten
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc, self.head = nn.Linear(8 * 4 * 4, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(self.c2(torch.relu(self.c1(x))), 2)
        x = {
            "view(-1, 128)": lambda: x.view(-1, 8 * 4 * 4),
            "reshape(n, 8, 16)": lambda: x.reshape(x.size(0), 8, 16).flatten(1),
            "torch.reshape(x, (n, 128))": lambda: torch.reshape(x, (x.shape[0], 128)),
            "view(n, -1)": lambda: x.view(x.size(0), -1),
            "view(n, -1, 16)": lambda: x.view(x.size(0), -1, 16).flatten(1),
            "flatten(1)": lambda: x.flatten(1),
        }[self.flatten]()
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("flatten", ["view(-1, 128)", "reshape(n, 8, 16)", "torch.reshape(x, (n, 128))"])
def test_a_reshape_with_the_channel_count_written_in_is_refused(flatten: str) -> None:
    """``x.view(-1, 128)`` was followed as a flatten: removal kept 128, and the smaller model failed at its first
    step ("shape '[-1, 128]' is invalid"), mid-fit, after the channels were gone."""
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(UnsupportedChannelOpError, match=r"cannot remove output channels of \['c2'\].*writes the size (128|8) of "
                       r"dimension 1 \(the channels\) as a number.*x.view\(x.size\(0\), -1\)"):
        channel_groups(_Flattened(flatten), x)
    assert [g.members for g in channel_groups(_Flattened(flatten), x, prunable={"c1", "fc"})] == [["c1"], ["fc"]]


@pytest.mark.parametrize("flatten", ["view(n, -1)", "view(n, -1, 16)", "flatten(1)"])
def test_a_reshape_that_computes_the_channel_count_is_followed(flatten: str) -> None:
    model, x = _Flattened(flatten).eval(), torch.randn(2, 1, 8, 8)
    assert [g.members for g in channel_groups(model, x)] == [["c1"], ["c2"], ["fc"]]
    masked = copy.deepcopy(model)
    keep = {"c2": torch.arange(8) % 2 == 0}
    zero_channels(masked, keep, x)
    shrink_model(model, keep, x)
    assert model.fc.in_features == 4 * 16 and torch.allclose(model(x), masked(x), atol=1e-6)


def test_a_depthwise_conv_reading_a_concatenation_is_named_as_such() -> None:
    """It was refused as "grouped convolution 'dw' (groups=16, in=16, out=16); only depthwise convolutions with one
    output per input channel are supported", which it is."""

    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 1), nn.Conv2d(1, 8, 1)
            self.dw, self.head = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.dw(torch.cat([self.a(x), self.b(x)], 1)))

    with pytest.raises(UnsupportedChannelOpError, match=r"depthwise convolution 'dw' reading 2 concatenated tensors"):
        channel_groups(Concat(), torch.randn(1, 1, 8, 8))


def test_grouped_conv_is_a_clear_error() -> None:
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(UnsupportedChannelOpError, match=r"grouped convolution 'c2' \(groups=2"):
        channel_groups(Grouped(), x, prunable={"c1"})
    with pytest.raises(UnsupportedChannelOpError, match="exclude"):
        channel_groups(Grouped(), x, prunable={"c2"})


class TokenNet(nn.Module):
    """Token ids -> embedding -> Linear layers over each token's features (N, T, C) -> mean over T -> head."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 3)
        self.norm = nn.LayerNorm(6) if norm else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(ids))))
        if self.norm is not None:  # a transformer block's residual stream
            h = self.norm(h + self.emb(ids))
        return self.head(torch.relu(h).mean(1))


def test_channels_in_the_last_dimension_of_token_features_are_removed_exactly() -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids = torch.randint(0, 10, (4, 5))
    assert [(g.members, g.size) for g in channel_groups(model, ids)] == [(["fc1"], 8), (["fc2"], 6)]
    keep = {"fc1": torch.arange(8) % 2 == 0, "fc2": torch.arange(6) < 4}
    masked = copy.deepcopy(model)
    zero_channels(masked, keep, ids)
    assert shrink_model(model, keep, ids) == {"fc1": (8, 4), "fc2": (6, 4)}
    assert model.fc2.weight.shape == (4, 4) and model.head.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids), masked(ids), rtol=1e-5, atol=1e-5)
    floats = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # (N, T, C) features as the input
    assert [g.members for g in channel_groups(floats, torch.randn(2, 5, 6))] == [["0"]]


def test_token_features_meeting_a_layer_norm_name_it_and_point_to_neurons_and_heads() -> None:
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(UnsupportedChannelOpError, match=r"(?s)\['fc2'\].*add.*exclude.*structure='neurons', 'heads'"):
        channel_groups(TokenNet(norm=True), ids)
    assert [g.members for g in channel_groups(TokenNet(norm=True), ids, prunable={"fc1"})] == [["fc1"]]


def _old_weight_norm(layer: nn.Linear) -> nn.Linear:
    with pytest.warns(FutureWarning):
        return nn.utils.weight_norm(layer)


@pytest.mark.parametrize(
    ("wrap", "why"),
    [
        (nn.utils.parametrizations.weight_norm,
         r"module '2', whose weight is computed by a parametrization \(WeightNorm\).*remove_parametrizations"),
        (nn.utils.parametrizations.spectral_norm, r"module '2', whose weight is computed by a parametrization \(SpectralNorm\)"),
        (_old_weight_norm, r"module '2', whose weight is recomputed by a forward hook .*remove_weight_norm"),
    ],
    ids=["weight_norm", "spectral_norm", "hook_weight_norm"],
)
def test_a_layer_whose_weight_is_computed_is_refused_before_any_change(wrap, why: str) -> None:
    """Removal cannot cut what a parametrization reads: channels flowing into it, or out of it, are refused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), wrap(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsupportedChannelOpError, match=rf"cannot remove output channels of \['0'\].*{why}"):
        channel_groups(net, x)
    for call in (shrink_model, zero_channels):
        with pytest.raises(UnsupportedChannelOpError, match=why):
            call(net, {"0": torch.arange(8) % 2 == 0}, x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net(x).shape == (4, 3)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_layers_sharing_a_weight_are_refused_naming_both() -> None:
    net = Tied().eval()
    x = torch.randn(4, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tied = r"the tied weights 'a.weight' and 'b.weight' \(one Parameter"
    for keep in ({"a": torch.arange(8) % 2 == 0}, {"b": torch.arange(8) % 2 == 0}):
        with pytest.raises(UnsupportedChannelOpError, match=tied):
            shrink_model(net, keep, x)
        with pytest.raises(UnsupportedChannelOpError, match=tied):
            zero_channels(net, keep, x)
    assert net.a.weight is net.b.weight and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_untraceable_model_is_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedChannelOpError, match="torch.fx"):
        channel_groups(Branchy(), torch.ones(1, 4))


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        ({"stem.0": torch.zeros(8, dtype=torch.bool)}, "every output channel"),
        ({"fc": torch.ones(10, dtype=torch.bool)}, "cannot be removed: the channel group .*reaches the model output; exclude it"),
        ({"stem.1": torch.ones(8, dtype=torch.bool)}, "not a Conv/Linear.*valid names"),
        ({"stem.0": torch.ones(7, dtype=torch.bool)}, "7 entries.*8 output channels"),
        ({"stem.0": torch.arange(8) < 4, "block.conv2": torch.arange(8) >= 4}, "coupled"),
        ({"stem.0": torch.full((8,), 0.5)}, "boolean"),
    ],
)
def test_bad_keep_changes_nothing(keep: dict, match: str) -> None:
    model = ResCNN(width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        shrink_model(model, keep, torch.zeros(1, 1, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_layer_called_twice_is_named_as_the_reason() -> None:
    """keep naming a Linear called twice said it was 'not a Conv/Linear layer'."""

    class CalledTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(self.b(torch.relu(self.a(x)))))

    model = CalledTwice()
    with pytest.raises(ValueError, match=r"keep names 'b', its output channels cannot be removed: it is called more than once"):
        shrink_model(model, {"b": torch.arange(8) < 4}, torch.randn(2, 8))
    assert model.b.out_features == 8


def test_a_forward_with_optional_labels_is_traced_as_called_without_them() -> None:
    """forward(x, labels=None) returning a loss when given labels: the trace took the labels branch (a symbolic labels
    is not None) and failed running it without them (ShapeProp error in cross_entropy)."""

    class WithOptionalLabels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, size: tuple[int, int] = (1, 4)) -> torch.Tensor:
            out = self.b(torch.relu(self.a(x))).reshape(size[0], -1, size[1]).flatten(0, 1)  # a tuple default stays symbolic
            return out if labels is None else nn.functional.cross_entropy(out, labels)

    model, x = WithOptionalLabels(), torch.randn(2, 16)
    masked = copy.deepcopy(model)
    keep = torch.arange(32) < 20
    with torch.no_grad():
        masked.a.weight[~keep] = 0
        masked.a.bias[~keep] = 0
    assert shrink_model(model, {"a": keep}, x) == {"a": (32, 20)}
    assert torch.allclose(model(x), masked(x), atol=1e-6)


def test_round_to() -> None:
    model = MLP(64, (32,), 10)
    changes = shrink_model(model, {"net.1": torch.arange(32) < 9}, torch.zeros(1, 64), round_to=8)
    assert changes == {"net.1": (32, 16)}
    with pytest.raises(ValueError, match="round_to"):
        shrink_model(MLP(64, (32,), 10), {"net.1": torch.arange(32) < 9}, torch.zeros(1, 64), round_to=0)
    # never above the original count
    assert shrink_model(MLP(64, (12,), 10), {"net.1": torch.arange(12) < 9}, torch.zeros(1, 64), round_to=8) == {
        "net.1": (12, 12)
    }


def test_macs_drop_about_fourfold_on_rescnn() -> None:
    model = ResCNN(width=16).eval()
    x = torch.zeros(1, 1, 16, 16)
    before = count_macs(model, x)
    keep = {g.members[0]: torch.arange(g.size) % 2 == 0 for g in channel_groups(model, x)}
    shrink_model(model, keep, x)
    after = count_macs(model, x)
    assert 3.0 < before / after < 4.1


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_state_is_sliced(opt_cls: type) -> None:
    torch.manual_seed(0)
    model = ResCNN(width=8)
    kwargs = {"lr": 0.1, "momentum": 0.9} if opt_cls is torch.optim.SGD else {"lr": 1e-2}
    opt = opt_cls(model.parameters(), **kwargs)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    old_conv1, old_down = model.block.conv1.weight, model.down[0].weight
    old_state = {k: v.clone() for k, v in opt.state[old_conv1].items()}
    keep_stem = torch.arange(8) % 3 != 0
    keep_conv1 = torch.arange(8) < 6
    _, pmap = shrink_with_map(model, {"stem.0": keep_stem, "block.conv1": keep_conv1}, x, None)
    remap_optimizer(opt, pmap)
    new_conv1 = model.block.conv1.weight
    assert new_conv1 is not old_conv1 and old_conv1 not in opt.state
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    for key, value in old_state.items():
        if value.dim():  # conv1 lost output rows (own keep) and input columns (the stem's)
            torch.testing.assert_close(opt.state[new_conv1][key], value[keep_conv1][:, keep_stem])
        else:
            assert torch.equal(opt.state[new_conv1][key], value)
    assert opt.state[model.down[0].weight]["momentum_buffer" if opt_cls is torch.optim.SGD else "exp_avg"].shape == (
        16,
        int(keep_stem.sum()),
        3,
        3,
    )
    assert old_down not in opt.state
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # shapes agree: no error


def test_export_and_compile_keep_output_shape() -> None:
    model = ResCNN(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    keep = {g.members[0]: torch.arange(g.size) < g.size // 2 for g in channel_groups(model, x)}
    shrink_model(model, keep, x)
    expected = model(x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, expected)


@pytest.mark.slow
def test_compile_inductor() -> None:
    model = ResCNN(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    shrink_model(model, {"block.conv1": torch.arange(8) < 3}, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)


def test_reload_into_plain_class(tmp_path) -> None:
    model = DepthwiseNet().eval()
    x = torch.randn(2, 1, 8, 8)
    shrink_model(model, {"pw1": torch.arange(12) < 5, "pw2": torch.arange(10) < 7}, x)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    fresh = load_pruned(DepthwiseNet().eval(), path)
    assert fresh.dw.groups == fresh.dw.in_channels == 5
    torch.testing.assert_close(fresh(x), model(x))
    assert resize_to_state_dict(fresh, model.state_dict()) == []  # already the right size


def test_every_group_that_cannot_be_removed_is_named_in_one_error() -> None:
    """A GroupNorm and a LayerNorm over channels in one network: the error named the first only, so a user needed one
    exclude round per refused layer."""
    net = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)
    ).eval()
    with pytest.raises(UnsupportedChannelOpError) as refused:
        channel_groups(net, torch.randn(4, 6))
    said = str(refused.value)
    assert "of ['2']: their channels flow into unsupported module '3'" in said
    assert "of ['4']: their channels flow into unsupported module '5'" in said and "transformer" not in said
    assert len(channel_groups(net, torch.randn(4, 6), prunable=["0"])) == 1  # the rest, with those left out


def test_a_channels_last_model_keeps_its_layout_once_shrunk() -> None:
    """Cut weights came back contiguous (NCHW) in a channels-last model, beside untouched layers in channels-last;
    so did the optimizer's moments of those weights."""
    model = ResCNN(width=8).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 8, 8).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    expected = copy.deepcopy(model).eval()
    keep = {"block.conv1": torch.arange(8) < 4}
    zero_channels(expected, keep, x)
    _, param_map = shrink_with_map(model.eval(), keep, x, None)
    remap_optimizer(optimizer, param_map)
    conv = model.block.conv1
    assert conv.out_channels == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert optimizer.state[conv.weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(x), expected(x), atol=1e-6)
