"""Pure functions of the pruning package: selection, masks, criteria (no Trainer)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from lightning_compress.models import MLP, ResCNN
from lightning_compress.pruning import CallableCriterion, Criterion, make_criterion
from lightning_compress.pruning.criteria import PruningContext, entropy_of_samples
from lightning_compress.pruning.channel_masks import channel_masks
from lightning_compress.pruning.channels import find_followers
from lightning_compress.pruning.mask_storage import pack_mask, sparse_storage_bytes, unpack_mask
from lightning_compress.pruning.masks import (
    apply_masks,
    check_nm_shapes,
    layer_targets,
    mask_gradients,
    nm_masks,
    parse_granularity,
    row_masks,
    select_parameters,
    unstructured_masks,
    zero_optimizer_state,
)
from lightning_compress.pruning.weights import input_major


class WithTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.emb = nn.Embedding(10, 8)
        self.teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def test_default_selection_skips_norm_bias_embedding_and_teacher() -> None:
    assert select_parameters(WithTeacher()) == ["model.0.weight", "model.3.weight"]


def test_include_restricts_and_fullmatch_adds_protected() -> None:
    net = WithTeacher()
    assert select_parameters(net, include=[r"model\.3"]) == ["model.3.weight"]
    # a broad module regex never drags in the teacher, the BN or the embedding
    assert select_parameters(net, include=[".*"]) == ["model.0.weight", "model.3.weight"]
    # explicit full parameter names do
    assert select_parameters(net, include=[r"teacher\..*\.weight", r"emb\.weight"]) == [
        "emb.weight",
        "teacher.0.weight",
        "teacher.2.weight",
    ]
    assert select_parameters(net, exclude=[r"model\.0"]) == ["model.3.weight"]


@pytest.mark.parametrize(
    ("include", "exclude", "match"),
    [
        (["nothing_here"], None, "include pattern 'nothing_here' matches no weight to prune"),
        (None, ["nothing_here"], "exclude pattern 'nothing_here' matches none"),
        (None, [r"model"], "leave no weight to prune"),
        (["("], None, "not a valid regex"),
    ],
)
def test_selection_errors(include, exclude, match) -> None:
    with pytest.raises(ValueError, match=match):
        select_parameters(WithTeacher(), include=include, exclude=exclude)


def test_a_full_name_pattern_without_the_parameters_own_name_says_how_to_write_it() -> None:
    """``ws\\.\\d+`` fully matches the ParameterList's ``ws.0`` but was refused with "other parameters need a full-name
    match", which it is."""

    class Listed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws, self.fc = nn.ParameterList([nn.Parameter(torch.randn(4, 4)) for _ in range(2)]), nn.Linear(4, 4)

    said = "matches ['ws.0', 'ws.1'] (2 in all) in full but does not; write each in full, e.g. include=" + repr([re.escape("ws.0"), re.escape("ws.1")])
    with pytest.raises(ValueError, match="spells out the parameter's own name .*" + re.escape(said)):
        select_parameters(Listed(), include=[r"ws\.\d+"])
    assert select_parameters(Listed(), include=[r"ws\.0", r"ws\.1"]) == ["ws.0", "ws.1"]


def test_layer_targets_map_and_unmatched_regex() -> None:
    names = ["a.fc1.weight", "a.fc2.weight", "a.fc3.weight"]
    assert layer_targets(names, {"fc1": 0.9, "fc": 0.5}) == {"a.fc1.weight": 0.9, "a.fc2.weight": 0.5, "a.fc3.weight": 0.5}
    with pytest.raises(ValueError, match="regex 'conv' matches none"):
        layer_targets(names, {"conv": 0.5})


def test_parse_granularity() -> None:
    assert parse_granularity(" 2:4 ") == ("nm", (2, 4))
    for bad, match in (("4:4", "1 <= N < M"), ("5:4", "1 <= N < M"), ("blocks", "unknown structure 'blocks'")):
        with pytest.raises(ValueError, match=match):
            parse_granularity(bad)


def test_unstructured_global_exact_count_and_monotonic() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.rand(30, 10), "b": torch.rand(5, 20)}
    masks = unstructured_masks(scores, {"a": 0.6, "b": 0.6}, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * 400)
    # global: one threshold; every pruned score is <= every kept score
    flat_s = torch.cat([scores[n].flatten() for n in scores])
    flat_m = torch.cat([masks[n].flatten() for n in scores])
    assert flat_s[~flat_m].max() <= flat_s[flat_m].min()
    # new scores that would revive pruned entries cannot: masks only shrink
    reversed_scores = {n: -s for n, s in scores.items()}
    masks2 = unstructured_masks(reversed_scores, {"a": 0.8, "b": 0.8}, "global", current=masks)
    for n in scores:
        assert not (masks2[n] & ~masks[n]).any()
    assert sum(int((~m).sum()) for m in masks2.values()) == 320


def test_unstructured_layer_scope() -> None:
    scores = {"a": torch.rand(10, 10), "b": torch.rand(4, 5) * 100}
    masks = unstructured_masks(scores, {"a": 0.3, "b": 0.5}, "layer")
    assert int((~masks["a"]).sum()) == 30 and int((~masks["b"]).sum()) == 10


def test_nm_masks_every_block_and_ramp() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    full = nm_masks({"w": w.abs()}, 2, 4, {"w": 1.0})["w"]
    assert (full.reshape(-1, 4).sum(1) == 2).all()
    # the kept two are the two largest in the block
    blocks = w.abs().reshape(-1, 4)
    kept_min = torch.where(full.reshape(-1, 4), blocks, torch.full_like(blocks, float("inf"))).min(1).values
    dropped_max = torch.where(~full.reshape(-1, 4), blocks, torch.full_like(blocks, -1.0)).max(1).values
    assert (kept_min >= dropped_max).all()
    half = nm_masks({"w": w.abs()}, 2, 4, {"w": 0.5})["w"]
    per_block = half.reshape(-1, 4).sum(1)
    assert int((per_block == 2).sum()) == 16 and int((per_block == 4).sum()) == 16
    again = nm_masks({"w": -w.abs()}, 2, 4, {"w": 1.0}, current={"w": half})["w"]
    assert not (again & ~half).any() and (again.reshape(-1, 4).sum(1) == 2).all()


def test_nm_blocks_and_rows_of_a_transposed_conv_run_along_its_input_channels() -> None:
    """A transposed convolution stores (in, out, kH, kW) and reduces over ``in``: N:M blocks are 4 input
    channels of one output at one kernel position, and a row is every input of one such output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(8, 4, 2), nn.Conv2d(4, 8, 1))
    names = ["0.weight", "1.weight"]
    assert input_major(net, names) == {"0.weight": 0}
    w = net[0].weight.detach()  # (8 in, 4 out, 2, 2)
    mask = nm_masks({"0.weight": w.abs()}, 2, 4, {"0.weight": 1.0}, input_major={"0.weight"})["0.weight"]
    assert mask.shape == w.shape
    along_in = mask.movedim(0, -1).reshape(-1, 4)
    assert (along_in.sum(1) == 2).all()
    blocks = w.abs().movedim(0, -1).reshape(-1, 4)  # the two largest of each block survive
    kept_min = torch.where(along_in, blocks, torch.inf).min(1).values
    assert (kept_min >= torch.where(~along_in, blocks, -1.0).max(1).values).all()
    assert not (mask.reshape(-1, 4).sum(1) == 2).all()  # not along the stored rows
    rows = row_masks({"0.weight": w.abs()}, {"0.weight": 0.5}, input_major={"0.weight"})["0.weight"]
    assert ((~rows).sum(0) == 4).all()  # each (out, kh, kw) loses 4 of its 8 inputs
    with pytest.raises(ValueError, match=r"0.weight of shape \(6, 4, 2, 2\) has 6 inputs per output"):
        check_nm_shapes({"0.weight": torch.zeros(6, 4, 2, 2)}, 4, "2:4", {"0.weight"})
    check_nm_shapes({"0.weight": w}, 4, "2:4", {"0.weight"})  # 8 inputs


def test_channel_masks_keep_last_channel_and_round_to() -> None:
    s = [torch.tensor([5.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])]
    keep = channel_masks(s, [0.99, 0.5], "layer")
    assert keep[0].tolist() == [True, False, False, False]  # never the last channel
    assert int(keep[1].sum()) == 4
    keep = channel_masks(s, [0.5, 0.5], "layer", round_to=3)
    assert int(keep[0].sum()) == 3 and int(keep[1].sum()) == 6
    glob = channel_masks(s, [0.5, 0.5], "global")
    assert sum(int((~k).sum()) for k in glob) == 6
    assert all(int(k.sum()) >= 1 for k in glob)


def test_apply_masks_gradients_and_optimizer_state() -> None:
    net = nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    params = dict(net.named_parameters())
    mask = torch.rand(3, 4) > 0.5
    masks = {"weight": mask}
    net(torch.randn(5, 4)).sum().backward()
    apply_masks(params, masks)
    mask_gradients(params, masks)
    zero_optimizer_state([opt], params, masks)
    assert (net.weight[~mask] == 0).all() and (net.weight.grad[~mask] == 0).all()
    state = opt.state[net.weight]
    assert (state["exp_avg"][~mask] == 0).all() and (state["exp_avg_sq"][~mask] > 0).all()
    opt.step()
    assert (net.weight[~mask] == 0).all(), "zeroed grads + zeroed first moments: pruned weights stay zero"


def test_second_moments_of_pruned_entries_are_kept_non_zero_and_change_no_weight() -> None:
    """CPU kernels take the square root of an exact zero about 10x slower: zeroing Adam's second moments of pruned
    entries made a half-pruned LeNet-300-100's training step 1.8x slower with non-fused Adam. They are kept (and set where zero,
    as for entries pruned before their first gradient); the kept weights train bit for bit as with zeroed ones."""

    def run(zero_second_moments: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Linear(64, 32)
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        mask = torch.rand(32, 64) > 0.5
        params, masks = dict(net.named_parameters()), {"weight": mask}
        apply_masks(params, masks)
        for step in range(6):
            net(torch.randn(8, 64)).square().sum().backward()
            mask_gradients(params, masks)
            if step == 1:
                assert zero_optimizer_state([opt], params, masks)
                if zero_second_moments:
                    opt.state[net.weight]["exp_avg_sq"].mul_(mask)
            opt.step()
            opt.zero_grad()
        return net.weight.detach().clone(), opt.state[net.weight]["exp_avg_sq"]

    kept, moments = run(False)
    zeroed, zero_moments = run(True)
    assert torch.equal(kept, zeroed) and bool((zero_moments == 0).any())
    assert bool((moments > 0).all())
    fresh = nn.Linear(4, 3)
    assert not zero_optimizer_state([torch.optim.Adam(fresh.parameters())], dict(fresh.named_parameters()), {"weight": torch.ones(3, 4, dtype=torch.bool)})


def test_pack_mask_is_compact_and_exact() -> None:
    m = torch.rand(300, 100) > 0.3
    packed = pack_mask(m)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == 300 * 100 // 8
    assert torch.equal(unpack_mask(packed), m)


@pytest.mark.parametrize("shape", [(0, 16), (0, 3, 5), (3, 5, 2), (0,)])
def test_masks_pack_by_rows_also_with_no_rows(shape: tuple[int, ...]) -> None:
    """A process holding no row of a sharded weight (FSDP2 splits a one-row head over two) packs and unpacks its
    empty share: reshaping with -1 failed ("cannot reshape tensor of 0 elements")."""
    m = torch.rand(shape) > 0.5
    packed = pack_mask(m, by_rows=True)
    width = math.prod(shape[1:])  # entries per row (1 for a vector)
    assert tuple(packed["bits"].shape) == (shape[0], (width + 7) // 8)
    assert torch.equal(unpack_mask(packed), m)


def test_sparse_storage_estimate() -> None:
    m = torch.zeros(100, 100, dtype=torch.bool)
    m[:, :5] = True
    est = sparse_storage_bytes(m)
    assert est["dense_bytes"] == 40000 and est["sparse_bytes"] < 40000 / 5
    assert sparse_storage_bytes(torch.ones(10, 10, dtype=torch.bool))["format"] == "dense"


def test_find_followers_and_heads() -> None:
    net = ResCNN(width=4)
    fol, heads = find_followers(net, torch.zeros(1, 1, 8, 8), ["stem.0", "block.conv1", "down.0", "fc"])
    assert fol == {"stem.0": "stem.1", "block.conv1": "block.bn1", "down.0": "down.1"}
    assert heads == {"fc"}


# --------------------------------------------------------------------------- criteria


def _ctx(net: nn.Module, seed: int = 0) -> PruningContext:
    params = {n: p for n, p in net.named_parameters() if n.endswith("weight")}
    return PruningContext(net, params, dict(net.named_modules()), seed=seed)


def test_random_criterion_is_seeded() -> None:
    net = MLP(16, (8,), 4)
    a, b, c = make_criterion("random"), make_criterion("random"), make_criterion("random")
    a.setup(_ctx(net, 1), "unstructured")
    b.setup(_ctx(copy.deepcopy(net), 1), "unstructured")
    c.setup(_ctx(net, 2), "unstructured")
    pa = dict(net.named_parameters())
    sa, sb, sc = a.element_scores(pa), b.element_scores(pa), c.element_scores(pa)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["net.1.weight"], sc["net.1.weight"])


def test_taylor_accumulates_and_resets() -> None:
    net = nn.Linear(3, 2)
    crit = make_criterion("taylor")
    params = {"weight": net.weight}
    crit.setup(PruningContext(net, params, dict(net.named_modules())), "unstructured")
    expected = torch.zeros(2, 3)
    for _ in range(3):
        net.zero_grad()
        net(torch.randn(4, 3)).pow(2).sum().backward()
        expected += (net.weight * net.weight.grad).abs().detach()
        crit.on_before_optimizer_step(params)
    assert torch.allclose(crit.element_scores(params)["weight"], expected)
    crit.reset()
    assert torch.equal(crit.element_scores(params)["weight"], net.weight.detach().abs())  # falls back to |w|


def test_entropy_of_constant_channel_is_zero() -> None:
    x = torch.stack([torch.full((100,), 3.0), torch.linspace(0, 1, 100)], 1)
    h = entropy_of_samples(x, bins=10)
    assert h[0] == 0 and abs(float(h[1]) - torch.log(torch.tensor(10.0)).item()) < 1e-3


def my_scores(name: str, weight: torch.Tensor) -> torch.Tensor:
    return -weight.abs()


def test_user_criterion_callable_and_import_path() -> None:
    assert isinstance(make_criterion(my_scores), CallableCriterion)
    crit = make_criterion(f"{__name__}.my_scores")
    w = torch.tensor([[1.0, -2.0]])
    assert torch.equal(crit.element_scores({"w": w})["w"], -w.abs())
    bad = make_criterion(lambda n, w: torch.zeros(3))
    with pytest.raises(ValueError, match="expected the weight's shape"):
        bad.element_scores({"w": w})

    class Mine(Criterion):
        name = "mine"

        def element_scores(self, params):
            return {n: torch.ones_like(p) for n, p in params.items()}

    assert make_criterion(Mine).name == "mine"


def test_criterion_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown criterion 'l2'; valid: \['bn_scale', 'entropy'"):
        make_criterion("l2")
    with pytest.raises(ValueError, match="cannot be imported"):
        make_criterion("not_a_package.fn")
    net = MLP(16, (8,), 4)
    with pytest.raises(ValueError, match="criterion 'entropy' does not apply to structure 'unstructured'"):
        make_criterion("entropy").setup(_ctx(net), "unstructured")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),
    t1=st.floats(0.0, 0.99),
    t2=st.floats(0.0, 0.99),
    ties=st.booleans(),
    scope=st.sampled_from(["global", "layer"]),
)
def test_unstructured_counts_exact_and_monotonic(sizes: list[int], t1: float, t2: float, ties: bool, scope: str) -> None:
    lo, hi = sorted((t1, t2))
    gen = torch.Generator().manual_seed(sum(sizes))
    scores = {f"p{i}": (torch.randint(0, 3, (n,), generator=gen).float() if ties else torch.rand(n, generator=gen)) for i, n in enumerate(sizes)}
    first = unstructured_masks(scores, {n: lo for n in scores}, scope)
    second = unstructured_masks(scores, {n: hi for n in scores}, scope, current=first)
    for masks, t in ((first, lo), (second, hi)):
        pruned = {n: int((~m).sum()) for n, m in masks.items()}
        if scope == "layer":
            assert all(pruned[n] == round(t * s.numel()) for n, s in scores.items())
        else:
            assert sum(pruned.values()) == round(t * sum(sizes))
    assert all(not (second[n] & ~first[n]).any() for n in scores)


def test_distillation_teacher_is_not_selected() -> None:
    from lightning_compress.distillation import DistillationModule

    module = DistillationModule(student=MLP(64, (32,), 10), teacher=ResCNN(width=4), num_classes=10)
    assert select_parameters(module) == ["student.net.1.weight", "student.net.3.weight"]
    assert "teacher.fc.weight" in select_parameters(module, include=[r"teacher\.fc\.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # numpy selection / torch.kthvalue
@pytest.mark.parametrize("ties", [False, True])
def test_kth_prune_prunes_the_k_lowest_earlier_index_first_on_ties(dtype: torch.dtype, ties: bool) -> None:
    from lightning_compress.pruning.masks import _kth_prune

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 2000, (1,), generator=gen))
        scores = (torch.randint(0, 4, (n,), generator=gen).float() if ties else torch.rand(n, generator=gen)).to(dtype)
        k = int(torch.randint(0, n + 1, (1,), generator=gen))
        expected = torch.ones(n, dtype=torch.bool)
        expected[torch.sort(scores.float(), stable=True).indices[:k]] = False
        keep = _kth_prune(scores, k)
        assert keep.dtype == torch.bool and torch.equal(keep, expected)


def test_a_target_regex_that_earlier_ones_shadow_is_said_and_the_map_still_applies() -> None:
    """{"l1": 0.5, "l1\\.": 0.9}: the second value was never used, silently. It is said, naming which regex takes
    each weight; an unused catch-all after exact regexes is said the same way, not refused."""
    from lightning_compress.pruning.masks import layer_targets

    with pytest.warns(UserWarning, match=r"regex 'l1\\\\.' matches only weights earlier regexes take \('l1.weight' by 'l1'; .* value 0.9 is not used"):
        assert layer_targets(["l1.weight", "l2.weight"], {"l1": 0.5, r"l1\.": 0.9}) == {"l1.weight": 0.5, "l2.weight": 0.0}
    with pytest.warns(UserWarning, match=r"regex '\.\*' .* \('fc1.weight' by 'fc1', 'fc2.weight' by 'fc2'; .* value 0.3 is not used"):
        assert layer_targets(["fc1.weight", "fc2.weight"], {"fc1": 0.9, "fc2": 0.5, ".*": 0.3}) == {"fc1.weight": 0.9, "fc2.weight": 0.5}


def test_the_second_moment_fill_waits_only_for_state_an_optimizer_makes_and_sums_float16_in_float32() -> None:
    """A frozen pruned layer (or SGD without momentum) never gets optimizer state: waiting for it ran the fill after
    every step. A float16 state's mean overflowed to inf."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net[1].requires_grad_(False)
    params = dict(net.named_parameters())
    masks = {"0.weight": torch.rand(4, 4) > 0.5, "1.weight": torch.rand(2, 4) > 0.5}
    adam = torch.optim.Adam(net.parameters(), lr=0.1)
    assert not zero_optimizer_state([adam], params, masks)  # no step yet: 0.weight's state is still to come
    net(torch.randn(3, 4)).sum().backward()
    adam.step()
    assert zero_optimizer_state([adam], params, masks)  # 1.weight is frozen: it never gets any
    assert zero_optimizer_state([torch.optim.SGD(net.parameters(), lr=0.1)], params, masks)
    half = nn.Linear(4, 4).half()
    opt = torch.optim.Adam(half.parameters(), lr=0.1)
    opt.state[half.weight] = {"exp_avg": torch.zeros(4, 4, dtype=torch.half), "exp_avg_sq": torch.full((4, 4), 6e4, dtype=torch.half)}
    opt.state[half.weight]["exp_avg_sq"][0] = 0
    zero_optimizer_state([opt], {"w": half.weight}, {"w": torch.arange(16).reshape(4, 4) >= 4})
    assert bool(torch.isfinite(opt.state[half.weight]["exp_avg_sq"]).all()) and float(opt.state[half.weight]["exp_avg_sq"][0, 0]) == 6e4


def test_a_mask_update_keeps_a_norms_weight_among_those_still_kept() -> None:
    """update_masks handed keep_one_per_norm no earlier masks: an emptied row of a weight_norm direction revived the
    entry with the highest score, here one pruned before (0.9), so masks grew back."""
    from lightning_compress import PruningCallback
    from lightning_compress.pruning.criterion_base import PruningContext
    from lightning_compress.pruning.mask_update import update_masks
    from lightning_compress.pruning.state import PruningState

    w = nn.Parameter(torch.tensor([[0.1, 0.0, 0.9, 0.0], [0.5, 0.6, 0.7, 0.8]]))
    run = PruningState("unstructured", {"v": w}, {"v": w}, {"v": 0.75})
    run.masks, run.normalised = {"v": torch.tensor([[True, False, False, False], [True] * 4])}, {"v": 0}
    options = PruningCallback(0.75, scope="layer", verbose=False).options
    options.criterion.setup(PruningContext(nn.Module(), {"v": w}, {}), "unstructured")
    update_masks(run, options, 1.0, [], lambda masks: masks, "test")
    assert run.masks["v"].tolist() == [[True, False, False, False], [False, False, True, True]]
