"""Squeeze-and-excitation with a BatchNorm in the bottleneck, as ReXNet uses it."""

from __future__ import annotations

import torch
from torch import nn

from leanvision.errors import InvalidArgumentError


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 conv -> BN -> ReLU -> 1x1 conv -> sigmoid -> channel scale.

    The BN sits on a 1x1 map, so in training mode it needs a batch of at least two images.
    """

    def __init__(self, channels: int, reduced_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1)
        self.bn = nn.BatchNorm2d(reduced_channels)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            raise InvalidArgumentError(
                "SqueezeExcite has a BatchNorm over a 1x1 map: training needs a batch of at least 2 images, "
                f"got {x.shape[0]} (use model.eval() for single-image inference)"
            )
        return x * self.scale(x.mean((2, 3), keepdim=True))

    def scale(self, means: torch.Tensor) -> torch.Tensor:
        """Channel scales [B, C, 1, 1] from the channel means [B, C, 1, 1] of the input."""
        return self.gate(self.fc2(self.act(self.bn(self.fc1(means)))))
