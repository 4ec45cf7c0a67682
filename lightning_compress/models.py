"""Example networks, usable from YAML by class path (``lightning_compress.models.MLP`` ...).

All of them take images ``(N, C, H, W)`` (or already flat ``(N, D)`` vectors for the MLP) and return
logits ``(N, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "LeNet5", "ResCNN", "ResidualBlock"]


class MLP(nn.Module):
    """Fully connected classifier; ``MLP(784, (300, 100), 10)`` is LeNet-300-100.

    Args:
        in_features: Flattened input size (64 for 8×8 digits, 784 for 28×28 MNIST).
        hidden: Widths of the hidden layers.
        num_classes: Output logits.
        dropout: Dropout probability after each hidden activation (0 disables it).
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (300, 100), num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if in_features <= 0 or num_classes <= 0 or any(h <= 0 for h in hidden):
            raise ValueError(f"MLP sizes must be positive, got in={in_features}, hidden={list(hidden)}, out={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5-style CNN: two 5×5 conv + max-pool stages, then 120-84-``num_classes``.

    Both convolutions use ``padding=2`` so the net also runs on 8×8 digits.

    Args:
        in_channels: Image channels.
        num_classes: Output logits.
        image_size: Height (= width) of the input, to size the first Linear layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"LeNet5 needs image_size >= 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 2 // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))`` with a fixed channel count."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResCNN(nn.Module):
    """A small CNN with BatchNorm and a residual block: a real dependency graph for channel pruning.

    ``stem (conv-bn-relu) → residual block → conv-bn-relu (stride 2) → global average pool → linear``.
    The residual add couples the stem's output channels with the block's second conv.

    Args:
        in_channels: Image channels.
        num_classes: Output logits.
        width: Channels of the stem and the residual block.
        width2: Channels of the last conv stage (default ``2 * width``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, width2: int | None = None) -> None:
        super().__init__()
        width2 = 2 * width if width2 is None else width2
        if width <= 0 or width2 <= 0:
            raise ValueError(f"ResCNN widths must be positive, got width={width}, width2={width2}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = ResidualBlock(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, width2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width2), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
