"""Compiled networks: the fake-quant layers trace as one graph (no break per layer), the compiled step
computes what the eager one does, and ``LanguageModelModule(compile=...)`` fits with the plugins.

The graphs are run by ``torch.compile``'s ``aot_eager`` backend (the captured forward and backward
graphs run op by op): it checks the capture and the autograd wiring in seconds, where inductor would
spend most of a minute generating C++ on this machine. ``fullgraph=True`` turns any graph break into
an error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback, QuantizeCallback
from lightning_compress.lm import GPTDecoder, LanguageModelModule
from lightning_compress.quantization.layer_selection import prepare_fake_quant
from lightning_compress.quantization.layers import QuantSettings, fake_quant_layers

from conftest import trainer_kwargs

FULL_GRAPH = {"backend": "aot_eager", "fullgraph": True}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize(("activation_bits", "bf16"), [(None, False), (8, False), (8, True)])
def test_fake_quant_layers_compile_to_one_graph_that_matches_eager(activation_bits: int | None, bf16: bool) -> None:
    """Three training steps, eager against compiled, from the same weights and fresh observers (and under
    bfloat16 autocast, as ``bf16-mixed`` runs them): equal outputs, observed ranges and gradients. With
    activation observers, their 'initialized' flag is read from the device outside the graph only (a
    read inside would break the graph at every layer)."""
    torch.manual_seed(0)
    eager = GPTDecoder(d_model=32, n_layers=2, n_heads=4, max_len=16)
    prepare_fake_quant(eager, QuantSettings(bits=8, activation_bits=activation_bits))
    for layer in fake_quant_layers(eager).values():
        layer.quantizer.observing = True
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, **FULL_GRAPH)
    tokens = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for net in (eager, compiled):
                net(tokens).float().square().mean().backward()
            assert torch.equal(eager(tokens), compiled(tokens))
    for (name, a), (_, b) in zip(fake_quant_layers(eager).items(), fake_quant_layers(twin).items()):
        obs_a, obs_b = a.quantizer.observer, b.quantizer.observer
        if obs_a is not None:  # (attention and the tied head are weight-only)
            assert obs_b.is_initialized() and bool(obs_b.initialized), name
            assert torch.equal(obs_a.min_val, obs_b.min_val) and torch.equal(obs_a.max_val, obs_b.max_val), name
    for (name, a), (_, b) in zip(eager.named_parameters(), twin.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8), name
    observed = [n for n, layer in fake_quant_layers(twin).items() if layer.quantizer.observer is not None]
    assert len(observed) == (4 if activation_bits else 0)  # fc1 and fc2 of both blocks
    assert counters["graph_break"] == {}


def test_compile_option_is_checked_on_construction() -> None:
    net = GPTDecoder(d_model=16, n_layers=1, n_heads=2, max_len=8)
    with pytest.raises(ValueError, match=r"unknown torch.compile arguments \['fullgrph'\].*valid: \['fullgraph'"):
        LanguageModelModule(net, compile={"fullgrph": True})
    with pytest.raises(ValueError, match="compile must be true, false or a dict"):
        LanguageModelModule(net, compile="yes")  # type: ignore[arg-type]


def test_compiled_language_model_fits_with_pruning_and_qat(tmp_path: Path) -> None:
    """``LanguageModelModule(compile=...)`` compiles its network in place: the plugins select its layers
    by their usual names, the whole forward stays one graph through the switch to fake-quant layers,
    the target sparsity is reached and the converted model agrees with the fake-quantised one."""
    torch.manual_seed(0)
    module = LanguageModelModule(
        GPTDecoder(d_model=32, n_layers=2, n_heads=4, max_len=16), example_seq_len=16, compile=FULL_GRAPH
    )
    tokens = torch.randint(0, 256, (64, 17))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    pruning = PruningCallback(target_sparsity=0.5, end_epoch=1, verbose=False, include=r"blocks\.")
    quantize = QuantizeCallback(start_epoch=1, latency="none")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[pruning, quantize], limit_val_batches=2))
    trainer.fit(module, loader, loader)

    network = module.model
    assert network._compiled_call_impl is not None  # still compiled, under its own names
    assert set(pruning.masks) and all(name.startswith("model.blocks.") for name in pruning.masks)
    assert float(trainer.callback_metrics["pruning/sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert counters["graph_break"] == {} and counters["stats"]["unique_graphs"] >= 2  # float, then fake-quant
    converted = quantize.quantized_model
    assert converted is not None
    with torch.no_grad():
        x = tokens[:4, :-1]
        assert torch.allclose(converted(x), network.eval()(x), rtol=1e-4, atol=1e-4)


def test_channel_removal_of_a_compiled_wrapper_says_to_compile_in_place(tmp_path: Path) -> None:
    """torch.compile(net) returns an OptimizedModule that torch.fx cannot trace; the error said to move code into a
    submodule. It now names the fix, net.compile() in place, which is traced and shrunk."""
    from lightning_compress import ClassifierModule, DigitsDataModule
    from lightning_compress.models import MLP

    def fit(network: torch.nn.Module) -> ClassifierModule:
        module = ClassifierModule(network, num_classes=10)
        prune = PruningCallback(0.5, structure="channel", schedule="one_shot", start_epoch=1, shrink=True, verbose=False)
        Trainer(callbacks=[prune], **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)).fit(module, DigitsDataModule())
        return module

    with pytest.raises(ValueError, match=r"OptimizedModule failed: .* compile it in place instead, which keeps its class: "
                                         r"lightning_compress.module.compile_in_place\(net, \{\}\)"):
        fit(torch.compile(MLP(64, (32,), 10)))
    network = MLP(64, (32,), 10)
    network.compile()
    assert fit(network).model.net[1].out_features == 16


def test_compile_in_place_compiles_torchs_own_containers_too() -> None:
    """``nn.Sequential(...).compile()`` compiles nothing (dynamo skips the frames of torch's modules: 0 frames, the
    call runs eagerly, silently); compile_in_place traces it, keeps its names, and a deep copy runs uncompiled."""
    from torch._dynamo.testing import CompileCounter

    from lightning_compress.module import compile_in_place

    def network() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    x = torch.randn(3, 4)
    plain = network()
    torch._dynamo.reset()
    counted = CompileCounter()
    plain.compile(backend=counted)
    plain(x)
    assert counted.frame_count == 0  # torch's own in-place compile of a Sequential: why compile_in_place exists

    torch._dynamo.reset()
    counted = CompileCounter()
    seq = network()
    names = [n for n, _ in seq.named_parameters()]
    compile_in_place(seq, {"backend": counted})
    with torch.no_grad():
        assert torch.equal(seq(x), network()(x)) and torch.equal(seq(x), network()(x))
    assert counted.frame_count == 1 and counted.op_count == 3
    assert [n for n, _ in seq.named_parameters()] == names and type(seq) is torch.nn.Sequential
    copied = copy.deepcopy(seq)
    with torch.no_grad():
        copied[0].weight.zero_()
        assert not torch.equal(copied(x), seq(x))  # the copy runs its own weights, not the original's compiled call
    assert counted.frame_count == 1
    compile_in_place(seq, {"backend": counted})  # once
    custom = GPTDecoder(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_len=8)
    compile_in_place(custom, {"backend": counted})
    custom(torch.randint(0, 16, (2, 5)))
    assert counted.frame_count >= 2  # a class with its own forward: its own compile, as before

