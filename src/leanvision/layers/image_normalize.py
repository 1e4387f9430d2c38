"""ImageNormalize: (x - mean) / std per channel, as a module (so executors can see and move it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ImageNormalize(nn.Module):
    """(x - mean) / std over the channels of [B, C, H, W] images. The statistics are plain floats, not
    buffers: they are configuration, and a model's checkpoints stay as they were."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = x.new_tensor(self.mean).view(-1, 1, 1), x.new_tensor(self.std).view(-1, 1, 1)
        return (x - mean).div_(std)  # in place on the difference: one map made, not two

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
