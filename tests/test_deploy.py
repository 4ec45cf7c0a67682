"""compile_for_cpu: frozen inductor compile of float and converted models, no global side effects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress import compile_for_cpu
from lightning_compress.models import MLP
from lightning_compress.quantization import QuantSettings, convert_fake_quant, fake_quant_layers, prepare_fake_quant


def _converted_mlp(bits: int = 8, activation_bits: int | None = 8) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    float_net = MLP(64, (32, 16), 10)
    net = copy.deepcopy(float_net)
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=activation_bits))
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = True
    with torch.no_grad():
        net(torch.randn(128, 64))
    for layer in fake_quant_layers(net).values():
        layer.quantizer.observing = False
    return float_net.eval(), convert_fake_quant(net)


def test_compile_for_cpu_matches_eager_for_each_batch_size_and_leaves_config_alone() -> None:
    import torch._inductor.config as inductor_config

    float_net, quant = _converted_mlp()
    freezing_before = inductor_config.freezing
    for model in (float_net, quant):
        fast = compile_for_cpu(model)
        assert fast.model is not model and not fast.model.training  # a snapshot
        for batch in (1, 64, 1, 64):  # a second batch size compiles again; a seen one reuses its graph
            x = torch.randn(batch, 64)
            with torch.no_grad():
                ref = model(x)
            out = fast(x)
            assert out.shape == ref.shape and not out.requires_grad
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert "settled signatures=2" in repr(fast)  # both sizes ran once without compiling
    assert inductor_config.freezing == freezing_before  # freezing applies to our compiles only


def test_compile_for_cpu_compiles_a_snapshot_and_sees_new_weights_on_recompile() -> None:
    torch.manual_seed(0)
    model = MLP(16, (8,), 4).eval()
    x = torch.randn(4, 16)
    first = compile_for_cpu(model)
    before = first(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
        now = model(x)
    torch.testing.assert_close(first(x), before)  # the snapshot keeps the old weights
    torch.testing.assert_close(compile_for_cpu(model)(x), now, atol=1e-5, rtol=1e-5)  # a new compile sees the new ones


def test_compile_for_cpu_runs_packed_low_bit_layers() -> None:
    _, quant = _converted_mlp(bits=4, activation_bits=None)  # LowBitLayer: unpacked once, outside the graph
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = quant(x)
    torch.testing.assert_close(compile_for_cpu(quant)(x), ref, atol=1e-5, rtol=1e-5)


def test_compile_for_cpu_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module, got function"):
        compile_for_cpu(lambda x: x)  # type: ignore[arg-type]
