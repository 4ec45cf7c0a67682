"""lightning-compress: pruning, quantisation and distillation inside a PyTorch Lightning run."""

from lightning_compress import schedules
from lightning_compress.data import DigitsDataModule, MNISTDataModule
from lightning_compress.models import MLP, LeNet5, ResCNN
from lightning_compress.module import ClassifierModule
from lightning_compress.plugin import CompressionCallback
from lightning_compress.report import CompressionReport, compression_report

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "ClassifierModule",
    "CompressionCallback",
    "CompressionReport",
    "DigitsDataModule",
    "LeNet5",
    "MNISTDataModule",
    "ResCNN",
    "compression_report",
    "schedules",
]
