"""Convolution + BatchNorm + activation, the unit every model here is built from."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ActLayer = Callable[[], nn.Module] | None


def create_act(act_layer: ActLayer, inplace: bool = False) -> nn.Module:
    """Build `act_layer` (None gives Identity); `inplace=True` turns on the activation's own in-place mode
    where it has one (nn.ReLU, nn.ReLU6, nn.SiLU, ...). Only for inputs that nothing else reads."""
    act = act_layer() if act_layer is not None else nn.Identity()
    if inplace and hasattr(act, "inplace"):
        act.inplace = True
    return act


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d -> optional activation; padding defaults to 'same' for odd kernels.

    Attribute names (`conv`, `bn`) match timm's ConvNormAct so timm checkpoints load by name. The activation
    runs in place on the BN output (as timm's does): it saves an allocation and a memory pass per layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: ActLayer = nn.ReLU,
        bias: bool = False,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = create_act(act_layer, inplace=True)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
