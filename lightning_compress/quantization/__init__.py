"""Quantisation: fake quantisation with observers and STE (pure torch), conversion to low-bit storage
(torchao and a packed CPU module), and :class:`QuantizeCallback`."""

from lightning_compress.quantization.batchnorm import batchnorm_layers, reestimate_batchnorm
from lightning_compress.quantization.callback import QuantizeCallback
from lightning_compress.quantization.convert import convert_fake_quant
from lightning_compress.quantization.files import load_quantized, save_quantized
from lightning_compress.quantization.kernels import use_fastest_kernels
from lightning_compress.quantization.int8_linear import Int8Linear
from lightning_compress.quantization.lowbit import LowBitLayer, pack_int4, unpack_int4
from lightning_compress.quantization.fake_quant import (
    MinMaxObserver,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
    round_values,
    weight_scale,
)
from lightning_compress.quantization.layer_selection import prepare_fake_quant, select_layers
from lightning_compress.quantization.layers import QuantSettings, fake_quant_layers, strip_fake_quant
from lightning_compress.quantization import int8_linear as _int8_linear
from lightning_compress.quantization import lowbit as _lowbit
from lightning_compress.quantization import lowbit_attention as _lowbit_attention

# the converted attention module and Int8Linear lived in `lowbit` before it was split (and lowbit cannot import
# them: they build on it): their names stay readable there, for imports and for pickles that name them there
for _home, _names in (
    (_int8_linear, ("Int8Linear",)),
    (_lowbit_attention, ("attention_shell", "attention_spec", "convert_attention", "read_packed_projections", "_refresh_attention")),
):
    for _name in _names:
        setattr(_lowbit, _name, getattr(_home, _name))

__all__ = [
    "Int8Linear",
    "LowBitLayer",
    "MinMaxObserver",
    "QuantSettings",
    "QuantizeCallback",
    "batchnorm_layers",
    "convert_fake_quant",
    "fake_quant_layers",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "load_quantized",
    "pack_int4",
    "prepare_fake_quant",
    "quantize_weight",
    "reestimate_batchnorm",
    "round_values",
    "save_quantized",
    "select_layers",
    "strip_fake_quant",
    "unpack_int4",
    "use_fastest_kernels",
    "weight_scale",
]
