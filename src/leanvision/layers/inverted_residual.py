"""ReXNet's linear bottleneck: inverted residual with a partial (zero-padded) shortcut."""

from __future__ import annotations

import torch
from torch import nn

from leanvision.layers.conv import ActLayer, ConvNormAct, create_act
from leanvision.layers.squeeze_excite import SqueezeExcite


class LinearBottleneck(nn.Module):
    """[1x1 expand, BN, act] -> 3x3 depthwise, BN -> [SE] -> dw act -> 1x1 project, BN.

    With stride 1 and in_channels <= out_channels the input is added to the first `in_channels` output
    channels (the shortcut zero-padded to the output width). Written with `torch.cat`, not an in-place
    slice add, so torch.export and ONNX export see a pure graph.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expansion: int,
        se_channels: int = 0,
        exp_act: ActLayer = nn.SiLU,
        dw_act: ActLayer = nn.ReLU6,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_shortcut = stride == 1 and in_channels <= out_channels
        mid = in_channels * expansion
        self.conv_exp = ConvNormAct(in_channels, mid, act_layer=exp_act) if expansion != 1 else None
        self.conv_dw = ConvNormAct(mid, mid, 3, stride, groups=mid, act_layer=None)
        self.se = SqueezeExcite(mid, se_channels) if se_channels > 0 else None
        self.act_dw = create_act(dw_act, inplace=True)  # its input is fresh: a BN, SE or folded-conv output
        self.conv_pwl = ConvNormAct(mid, out_channels, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.conv_pwl(self.act_dw(x))
        if not self.use_shortcut:
            return x
        if self.in_channels == self.out_channels:
            return x + shortcut
        return torch.cat([x[:, : self.in_channels] + shortcut, x[:, self.in_channels :]], dim=1)
