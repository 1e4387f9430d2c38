"""Convolution + BatchNorm + activation, the unit every model here is built from."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def stack_convs(convs: Sequence[nn.Conv2d], split_input: bool = False) -> nn.Conv2d | None:
    """One convolution whose output channels are those of `convs` side by side, or None where they differ
    in geometry (kernel, stride, padding, dilation), are grouped or lack a bias.

    By default all of them read the same input. With `split_input` each reads its own run of the input
    channels, in order: as one group each where all have the same shape, else through a block-diagonal
    weight (its zero blocks add nothing but float rounding).
    """
    first = convs[0]
    geometry = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
    if any(
        type(c) is not nn.Conv2d
        or c.groups != 1
        or c.bias is None
        or any(getattr(c, g) != getattr(first, g) for g in geometry)
        or (not split_input and c.in_channels != first.in_channels)
        for c in convs
    ):
        return None
    grouped = split_input and all(c.weight.shape == first.weight.shape for c in convs)
    stacked = nn.Conv2d(
        sum(c.in_channels for c in convs) if split_input else first.in_channels,
        sum(c.out_channels for c in convs),
        first.kernel_size, first.stride, first.padding, first.dilation,
        groups=len(convs) if grouped else 1, padding_mode=first.padding_mode,
    ).to(first.weight)  # fmt: skip
    with torch.no_grad():
        stacked.bias.copy_(torch.cat([c.bias for c in convs]))
        if not split_input or grouped:
            stacked.weight.copy_(torch.cat([c.weight for c in convs]))
            return stacked
        stacked.weight.zero_()
        row = col = 0
        for c in convs:
            stacked.weight[row : row + c.out_channels, col : col + c.in_channels] = c.weight
            row, col = row + c.out_channels, col + c.in_channels
    return stacked
