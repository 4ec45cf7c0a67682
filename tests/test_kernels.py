"""Quantised serving kernels chosen per layer by measurement (torchao's int8/int4/float8 paths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.quantization.kernels import KERNEL_PATHS, use_fastest_kernels


class TwoHeads(nn.Module):
    """A second head the example input never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        self.unused = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _net() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads()


def test_every_reached_layer_takes_the_fastest_available_path_when_any_speed_is_accepted() -> None:
    net, x = _net(), torch.randn(16, 64)
    ref = net(x).detach()
    table = use_fastest_kernels(net, x, min_speedup=0.0, repeats=3)
    assert set(table) == {"body.0", "body.2", "unused"}
    assert table["unused"]["path"] == "dense" and "not called" in table["unused"]["reasons"]["*"]
    for name in ("body.0", "body.2"):
        row = table[name]
        assert row["path"] in KERNEL_PATHS and row["path"] in row["ms"]
        assert row["ms"][row["path"]] == min(v for k, v in row["ms"].items() if k != "dense")  # the fastest path
        assert type(net.get_submodule(name).weight) not in (torch.Tensor, nn.Parameter)  # a torchao quantised tensor
        assert set(row["error"]) | {k for k in row["reasons"] if k not in row["ms"]} >= set(KERNEL_PATHS) - {row["path"]}
    with torch.inference_mode():
        got = net(x)
    assert float((got - ref).norm() / ref.norm()) < 0.05  # quantised, and close to float


def test_nothing_changes_where_no_path_is_fast_enough_or_accurate_enough() -> None:
    for options in ({"min_speedup": 1e6}, {"max_error": 1e-12, "min_speedup": 0.0}):
        net, x = _net(), torch.randn(16, 64)
        before = {n: p for n, p in net.named_parameters()}
        table = use_fastest_kernels(net, x, paths=("int8_weight", "int8_dynamic"), repeats=3, **options)
        assert all(row["path"] == "dense" for row in table.values())
        assert all(p is before[n] for n, p in net.named_parameters())  # the same float parameters
        reasons = " ".join(r for row in table.values() for r in row["reasons"].values())
        assert ("min_speedup=1e+06" in reasons) if "max_error" not in options else ("above max_error=1e-12" in reasons)


def test_a_path_this_machine_lacks_is_reported_not_raised() -> None:
    net, x = _net(), torch.randn(16, 64)
    table = use_fastest_kernels(net, x, paths=("fp8_dynamic", "int8_weight"), min_speedup=1e6, repeats=3)
    row = table["body.0"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has float8 dynamic kernels")
    assert "fp8_dynamic" in row["reasons"] and "fp8_dynamic" not in row["ms"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"paths": ("int3",)}, r"unknown kernel paths \['int3'\]; valid: \['int8_weight'"),
        ({"paths": ()}, "unknown kernel paths"),
        ({"min_speedup": -1.0}, "min_speedup must be a finite number >= 0, got -1.0"),
        ({"max_error": 0}, "max_error must be a number > 0 or None, got 0"),
        ({"repeats": 0}, "repeats must be a positive integer, got 0"),
    ],
)
def test_bad_options_fail_before_any_layer_changes(options: dict, match: str) -> None:
    net = _net()
    before = {n: p for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=match):
        use_fastest_kernels(net, torch.randn(2, 64), **options)
    assert all(p is before[n] for n, p in net.named_parameters())


def test_choosing_kernels_leaves_torchs_random_state_alone() -> None:
    """The error probe drew its inputs from torch's global generator, which a later fit's order and dropout follow."""
    net, x = _net(), torch.randn(8, 64)
    torch.manual_seed(1)
    use_fastest_kernels(net, x, paths=("int8_weight",), repeats=2)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    assert torch.equal(after, torch.get_rng_state())
