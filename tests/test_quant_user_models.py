"""Quantising models as users write them: forwards that read their layers' configuration, Conv3d, and
layer types quantisation does not take (recurrent layers, transposed convolutions, parametrised weights)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import calibrate
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import lightning_compress
from lightning_compress.quantization import (
    LowBitLayer,
    QuantSettings,
    convert_fake_quant,
    fake_quant_layers,
    load_quantized,
    prepare_fake_quant,
    save_quantized,
)
from lightning_compress.quantization.layer_selection import float_weight_holders, quantised_fraction, select_layers
from lightning_compress.quantization.layers import QATConv3d
from lightning_compress.selection import select_weights

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
EMBEDDING_ATTRIBUTES = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")


class ReadsItsLayers(nn.Module):
    """Computes its shapes from its layers' attributes in forward, as Whisper's encoder reads ``conv1.stride``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0, max_norm=3.0)
        self.conv1 = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 4, (3, 1), padding="same", dilation=(2, 1), groups=2, padding_mode="reflect")
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        if int(ids.max()) >= self.emb.num_embeddings:
            raise IndexError("token id out of range")
        x = self.emb(ids).transpose(1, 2)  # (N, embedding_dim, L)
        c = self.conv1
        length = (ids.shape[1] + 2 * c.padding[0] - c.dilation[0] * (c.kernel_size[0] - 1) - 1) // c.stride[0] + 1
        h = torch.relu(c(x)).reshape(len(ids), c.out_channels, length, 1)
        h = self.conv2(h)
        return self.head(h.reshape(-1, self.head.in_features))


def _converted(net: nn.Module, example: Tensor, activation_bits: int | None = 8) -> nn.Module:
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=activation_bits))
    calibrate(net, example)
    return convert_fake_quant(net)


def _attributes(layer: nn.Module, names: tuple[str, ...]) -> dict[str, object]:
    return {a: getattr(layer, a) for a in names}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_converted_layers_keep_the_float_layers_configuration(tmp_path: Path, suffix: str) -> None:
    """A forward that reads ``stride``, ``kernel_size``, ``num_embeddings``, ``in_features`` ... of its
    layers runs on the converted model and on one loaded from a file, with the float layers' values;
    ``state_dict`` holds no new entry for them."""
    torch.manual_seed(0)
    float_net = ReadsItsLayers().eval()
    ids = torch.randint(1, 20, (4, 8))
    fake = ReadsItsLayers().eval()
    fake.load_state_dict(float_net.state_dict())
    converted = _converted(fake, ids)
    path = tmp_path / f"model{suffix}"
    save_quantized(converted, path)
    loaded = load_quantized(ReadsItsLayers(), path)
    with torch.no_grad():
        expected = fake(ids)
        for model in (converted, loaded):
            assert isinstance(model.conv1, LowBitLayer) and isinstance(model.emb, LowBitLayer)
            torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
            for name in ("conv1", "conv2"):
                assert _attributes(model.get_submodule(name), CONV_ATTRIBUTES) == _attributes(float_net.get_submodule(name), CONV_ATTRIBUTES)
            assert _attributes(model.emb, EMBEDDING_ATTRIBUTES) == _attributes(float_net.emb, EMBEDDING_ATTRIBUTES)
            assert (model.head.in_features, model.head.out_features) == (16, 3)
            assert not hasattr(model.conv1, "in_features") and not hasattr(model.emb, "stride")  # as on the float layers
            assert model.conv2.float_attributes() == _attributes(float_net.conv2, CONV_ATTRIBUTES)
            assert {k.rpartition(".")[2] for k in model.state_dict()} == {"packed"}
    with pytest.raises(AttributeError):
        converted.conv1.stride = (1,)  # read off the stored spec: the layer's op does not change behind it


@pytest.mark.parametrize("bits", [8, 4])
def test_an_embedding_with_max_norm_renormalises_its_stored_rows_as_nn_embedding_does(tmp_path: Path, bits: int) -> None:
    """``nn.Embedding(max_norm=...)`` renormalises the rows it looks up in its stored weight. Fake-quantised, it
    renormalised a temporary copy instead: the weight never changed, and the first backward failed (the
    straight-through output is a view modified in place). The converted layer gives the fake-quantised outputs."""
    torch.manual_seed(0)
    float_emb = nn.Embedding(30, 16, max_norm=1.0)  # N(0, 1) rows: norms near 4
    net = nn.Sequential(nn.Embedding(30, 16, max_norm=1.0))
    net[0].load_state_dict(float_emb.state_dict())
    prepare_fake_quant(net, QuantSettings(bits=bits, activation_bits=None))
    net[0].quantizer.enabled = True
    ids = torch.tensor([[1, 2, 3], [3, 4, 5]])
    net.train()(ids).sum().backward()
    float_emb(ids)
    torch.testing.assert_close(net[0].weight.detach(), float_emb.weight.detach(), atol=0, rtol=0)  # the same rows renormalised
    norms = net[0].weight.detach().norm(dim=1)
    assert norms[1:6].max() <= 1.0 + 1e-6 and norms[0] > 2.0 and norms[6:].min() > 2.0
    assert net[0].weight.grad is not None and net[0].weight.grad[1:6].abs().sum() > 0
    with torch.no_grad():
        net.eval()(torch.tensor([[7]]))
    assert net[0].weight[7].norm() <= 1.0 + 1e-6  # under no_grad too
    converted = convert_fake_quant(net)
    path = tmp_path / "emb.safetensors"
    save_quantized(converted, path)
    loaded = load_quantized(nn.Sequential(nn.Embedding(30, 16, max_norm=1.0)), path)
    x = torch.randint(0, 30, (4, 6))
    with torch.no_grad():
        expected = net(x)  # renormalises the rows of x not looked up before, then looks up their fake-quantised values
        torch.testing.assert_close(converted(x), expected)
        torch.testing.assert_close(loaded(x), expected)
    assert converted[0].max_norm == 1.0


def test_a_max_norm_embedding_converted_before_rows_were_renormalised_still_renormalises_at_lookup(tmp_path: Path) -> None:
    """Files converted when the rows were renormalised at lookup, not at conversion, have no ``rows_renormalised`` in
    their spec: loaded as such, their rows came out at norms 3.7-5.0 where max_norm is 1."""
    from lightning_compress.quantization.fake_quant import quantize_weight

    torch.manual_seed(0)
    table = nn.Embedding(30, 16, max_norm=1.0)  # N(0, 1) rows: norms near 4, as such a file stores them
    q, scale = quantize_weight(table.weight.detach(), 8, "per_channel")
    older = LowBitLayer(LowBitLayer.spec_of(table, 8, "per_channel", None)).store(q, scale)
    assert "rows_renormalised" not in older.spec
    ids = torch.arange(30)[None]
    with torch.no_grad():
        out, again = older(ids), older(ids)  # its cached rows renormalised in place: no error, the same values
    assert out[0].norm(dim=1).max() <= 1.0 + 1e-5 and torch.equal(out, again)
    with pytest.raises(ValueError, match=r"layer '0' is an embedding with max_norm=1.0 converted before its rows were renormalised.*\.pt2"):
        lightning_compress.export(nn.Sequential(older), tmp_path / "older.onnx", ids)  # the graph would not renormalise
    # what conversion writes now says so, and keeps saying so through a file
    net = nn.Sequential(nn.Embedding(30, 16, max_norm=1.0))
    prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=None))
    net[0].quantizer.enabled = True
    save_quantized(convert_fake_quant(net), tmp_path / "emb.safetensors")
    loaded = load_quantized(nn.Sequential(nn.Embedding(30, 16, max_norm=1.0)), tmp_path / "emb.safetensors")
    assert loaded[0].spec["rows_renormalised"] is True


def test_weight_only_linear_and_a_folded_conv_keep_their_configuration() -> None:
    """Weight-only layers (a LowBitLayer Linear) and a conv with its BatchNorm folded in read the same."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    reference = {"conv": _attributes(net[0], CONV_ATTRIBUTES), "linear": (net[3].in_features, net[3].out_features)}
    converted = _converted(net, torch.randn(4, 3, 8, 8), activation_bits=None)
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[0], LowBitLayer)  # folded
    assert _attributes(converted[0], CONV_ATTRIBUTES) == reference["conv"]
    assert isinstance(converted[3], LowBitLayer) and (converted[3].in_features, converted[3].out_features) == reference["linear"]


def test_conv3d_is_fake_quantised_converted_and_reloaded(tmp_path: Path) -> None:
    """Conv3d takes the path of Conv1d/2d: fake-quantised, stored low-bit, and the converted model computes
    what the fake-quantised one does; its BatchNorm3d stays (only Conv1d/2d fold theirs), also on reload."""
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2 * 2, 3))

    net = make().eval()
    x = torch.randn(4, 2, 2, 4, 4)
    float_out = net(x).detach()
    converted = _converted(net, x)
    assert type(net[0]) is QATConv3d and sorted(fake_quant_layers(net)) == ["0", "4"]
    assert isinstance(converted[0], LowBitLayer) and converted[0].spec["kind"] == "conv3d" and isinstance(converted[1], nn.BatchNorm3d)
    assert converted[0].kernel_size == (3, 3, 3) and converted[0].stride == (1, 2, 2)
    save_quantized(converted, tmp_path / "m.pt")
    loaded = load_quantized(make(), tmp_path / "m.pt")
    with torch.no_grad():
        fake = net(x)
        torch.testing.assert_close(converted(x), fake, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(x), fake, atol=1e-5, rtol=0)
    assert not torch.equal(fake, float_out)  # the weights were rounded


def test_a_converted_whisper_runs_and_agrees() -> None:
    """Whisper's encoder reads ``conv1.stride`` and ``conv2.stride`` in its forward (a tiny offline config)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        vocab_size=60, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    features, labels = torch.randn(2, 8, 16), torch.randint(3, 60, (2, 5))
    with pytest.warns(UserWarning, match="WhisperPositionalEmbedding: a subclass of Embedding with its own forward"):
        prepare_fake_quant(model, QuantSettings(bits=8))
    for layer in fake_quant_layers(model).values():
        layer.quantizer.observing = True
    with torch.no_grad():
        model(input_features=features, labels=labels)
    for layer in fake_quant_layers(model).values():
        layer.quantizer.observing = False
    converted = convert_fake_quant(model)
    assert isinstance(converted.model.encoder.conv1, LowBitLayer) and converted.model.encoder.conv2.stride == (2,)
    with torch.no_grad():
        fake = model(input_features=features, labels=labels).logits
        real = converted(input_features=features, labels=labels).logits
    torch.testing.assert_close(real, fake, atol=1e-4 * float(fake.abs().max()), rtol=0)


class Custom(nn.Module):
    """A layer holding its own weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 8))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.table.t()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 2, 2, stride=2)
        self.bag = nn.EmbeddingBag(10, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.norm = weight_norm(nn.Linear(8, 8))
        self.custom = Custom()
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, img: Tensor, ids: Tensor) -> Tensor:
        h = self.up(img).flatten(1)[:, :8] + self.bag(ids)
        h = self.gru(self.lstm(h[:, None])[0])[0][:, -1]
        return self.head(self.ln(self.custom(self.norm(h))))


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def test_layers_of_other_types_are_named_in_one_warning_with_their_share() -> None:
    """Recurrent layers, transposed convolutions, embedding bags, parametrised weights and custom
    parameters stay in float: one warning at prepare time names each with its type and weight count, and
    gives their share of the model's weights; quantised_fraction counts them against the quantised share."""
    net = Mixed()
    left = ("up", "bag", "lstm", "gru", "norm", "custom")
    total = _weights(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = prepare_fake_quant(net, QuantSettings(bits=8, activation_bits=None))
    assert sorted(layers) == ["head"]
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(said) == 1, said
    share = sum(_weights(net.get_submodule(n)) for n in left) / total
    assert f"{len(left)} modules holding {share:.1%} of the model's weights stay in float" in said[0]
    for name in left:
        module = net.get_submodule(name)
        assert f"{name!r} ({type(module).__name__}, {_weights(module)} weights)" in said[0], name
    assert "remove_parametrizations" in said[0] and "'norm'" in said[0]
    assert float_weight_holders(net, layers) == {n: (type(net.get_submodule(n)).__name__, _weights(net.get_submodule(n))) for n in left}
    assert quantised_fraction(net, layers.values()) == pytest.approx(net.head.weight.numel() / total)
    with torch.no_grad():
        net(torch.randn(2, 1, 2, 2), torch.randint(0, 10, (2, 3)))  # the float layers still run
    fresh = Mixed()
    parametrize.remove_parametrizations(fresh.norm, "weight")  # as the warning advises
    assert "norm" in [name for name, _ in select_layers(fresh)]


def test_a_model_of_supported_layers_gets_no_warning_and_a_full_share() -> None:
    net = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 3), nn.LayerNorm(6), nn.Linear(6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = prepare_fake_quant(net, QuantSettings(bits=8))
    assert float_weight_holders(net, layers) == {} and quantised_fraction(net, layers.values()) == 1.0
    assert quantised_fraction(net, [layers["3"]]) == pytest.approx(net[3].weight.numel() / _weights(net))


def test_errors_about_types_quantisation_does_not_take_point_to_what_it_takes() -> None:
    """With nothing it can take, naming the parameter in include cannot help: the errors say what
    quantisation takes instead. Pruning, which does take a parameter named in full, keeps that advice."""
    from lightning_compress.pruning.weights import prunable_weight

    lstm_only = nn.Sequential(nn.LSTM(4, 8))
    with pytest.raises(ValueError, match=r"Sequential has no weight to quantise: this plugin takes only the weights of \['Linear'") as err:
        select_layers(lstm_only)
    assert "include" not in str(err.value)
    with pytest.raises(ValueError, match=r"cannot quantise '0.weight_ih_l0' \(LSTM\): quantisation takes .*drop the include pattern"):
        select_layers(lstm_only, include=[r"0\.weight_ih_l0"])
    with pytest.raises(ValueError, match="include pattern 'nothing' matches no weight to quantise.*this plugin takes only the weights of") as err:
        select_layers(nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 2)), include=["nothing"])
    assert "full-name match" not in str(err.value)
    with pytest.raises(ValueError, match=r"no weight this plugin can prune by default; name the parameters with include"):
        select_weights(lstm_only, None, None, prunable_weight, "prune")
    # a weight_norm layer named in include is a Linear subclass that keeps forward: what it lacks is said
    normed = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"matches no weight to quantise.*unless a parametrisation computes them \(weight_norm, "
                       r"spectral_norm: remove it first, torch.nn.utils.parametrize.remove_parametrizations\)"):
        select_layers(normed, include=["0"])
    assert select_weights(lstm_only, [r"0\.weight_ih_l0"], None, prunable_weight, "prune") == ["0.weight_ih_l0"]


def test_a_hook_based_weight_norm_layer_stays_float_with_a_note_and_the_model_converts(tmp_path: Path) -> None:
    """The older hook-based torch.nn.utils.weight_norm keeps the weight as a non-leaf tensor its hook recomputes: deepcopy
    refuses it, so the fit crashed at its end (the converted model lost), and the layer was left in float without the
    warning every other float layer gets, nor a note in the summary."""
    import lightning as L
    from conftest import trainer_kwargs
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import QuantizeCallback
    from lightning_compress.module_copy import copy_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = torch.nn.utils.weight_norm(nn.Linear(8, 32)), nn.Linear(32, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.l2(torch.relu(self.l1(x)))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-3)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 8), torch.randn(16, 4)), batch_size=8)
    module, quant = Module(), QuantizeCallback(weight_bits=4, latency="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_epochs=2, callbacks=[quant], **trainer_kwargs(tmp_path)).fit(module, data)  # no validation: the last forward had grad
    said = [str(w.message) for w in caught if "stay in float" in str(w.message)]
    assert len(said) == 1 and "'net.l1' (Linear" in said[0] and "remove_weight_norm" in said[0], said
    assert quant.compression_summary()["notes"] == said
    assert quant.quantized_model is not None and type(quant.quantized_model.l1) is nn.Linear
    x = torch.randn(5, 8)
    copied = copy_model(module.net)  # what every copy of the library makes; the original keeps its tensor
    assert not module.net.l1.weight.is_leaf
    with torch.no_grad():
        torch.testing.assert_close(copied(x), module.net(x))
