"""lightning-compress: pruning, quantisation and distillation inside a PyTorch Lightning run.

The public API is what this module exports; the subpackages hold the building blocks
(``lightning_compress.pruning``, ``.quantization``, ``.distillation``, ``.schedules``, ``.report``,
``.deploy``).
"""

from lightning_compress import schedules
from lightning_compress.data import DigitsDataModule, MNISTDataModule
from lightning_compress.deploy import compile_for_cpu, export, export_for_cpu, load, load_for_cpu
from lightning_compress.distillation import DistillationModule
from lightning_compress.lm import GPTDecoder, LanguageModelModule
from lightning_compress.models import MLP, LeNet5, ResCNN
from lightning_compress.module import ClassifierModule
from lightning_compress.plugin import CompressionCallback
from lightning_compress.pruning import PruningCallback
from lightning_compress.pruning.graph import channel_groups
from lightning_compress.pruning.reload import allow_shrunk_checkpoints, load_pruned
from lightning_compress.pruning.shrink import count_macs, shrink_model
from lightning_compress.quantization import QuantizeCallback, convert_fake_quant, load_quantized, save_quantized
from lightning_compress.report import CompressionReport, compression_report
from lightning_compress.text import TextDataModule

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "ClassifierModule",
    "CompressionCallback",
    "CompressionReport",
    "DigitsDataModule",
    "DistillationModule",
    "GPTDecoder",
    "LanguageModelModule",
    "LeNet5",
    "MNISTDataModule",
    "PruningCallback",
    "QuantizeCallback",
    "ResCNN",
    "TextDataModule",
    "allow_shrunk_checkpoints",
    "channel_groups",
    "compile_for_cpu",
    "compression_report",
    "convert_fake_quant",
    "count_macs",
    "export",
    "export_for_cpu",
    "load",
    "load_for_cpu",
    "load_pruned",
    "load_quantized",
    "save_quantized",
    "schedules",
    "shrink_model",
]
