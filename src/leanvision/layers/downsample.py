"""Fast downsampling layers compared in the RNNPool paper's Table 2 (second block).

Each one shrinks a map `stride` times in one go and outputs 4 * hidden channels, the shape of the
RNNPoolLayer it stands in for, so the rest of the network is the same for every kind:
- "rnnpool": RNNPoolLayer with patch_size x patch_size patches (padding "edgeml", as the reference);
- "avgpool" / "maxpool": a patch_size pooling window, then a 1x1 conv to 4 * hidden channels (the paper
  matches the output size of pooling with a 1x1 conv, Appendix H);
- "strided_conv": one patch_size x patch_size convolution with that stride;
- "renet": a ReNet layer over non-overlapping stride x stride patches with GRUs of 2 * hidden units
  (the paper's sizing, rnnpool-reviews.md).
The pooling and convolution windows are padded by (patch_size - stride + 1) // 2, so a 112 map gives 28
for patch 6 or 8 and stride 4, as RNNPool does.
"""

from __future__ import annotations

from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers.conv import ActLayer, ConvNormAct
from leanvision.layers.renet import ReNetLayer
from leanvision.layers.rnnpool import RNNPoolLayer

DOWNSAMPLE_KINDS = ("rnnpool", "avgpool", "maxpool", "strided_conv", "renet")


def create_downsample(
    kind: str,
    in_channels: int,
    hidden_size: int,
    patch_size: int,
    stride: int,
    act_layer: ActLayer = nn.ReLU6,
    cell: str = "fastgrnn",
) -> nn.Module:
    """A `kind` layer mapping [B, in_channels, H, W] to [B, 4 * hidden_size, ~H / stride, ~W / stride].

    `act_layer` follows the 1x1 conv of the pooling kinds and the strided conv; `cell` is RNNPool's RNN.
    """
    if kind not in DOWNSAMPLE_KINDS:
        raise InvalidArgumentError(f"downsample must be one of {DOWNSAMPLE_KINDS}, got {kind!r}")
    if hidden_size < 1 or patch_size < stride:
        raise InvalidArgumentError(
            f"downsample needs hidden_size >= 1 and patch_size >= stride, got hidden_size={hidden_size}, "
            f"patch_size={patch_size}, stride={stride}"
        )
    out_channels, padding = 4 * hidden_size, (patch_size - stride + 1) // 2
    if kind == "rnnpool":
        return RNNPoolLayer(in_channels, hidden_size, hidden_size, patch_size, stride, cell=cell)
    if kind in ("avgpool", "maxpool"):
        pool = nn.AvgPool2d if kind == "avgpool" else nn.MaxPool2d
        return nn.Sequential(
            pool(patch_size, stride, padding), ConvNormAct(in_channels, out_channels, act_layer=act_layer)
        )
    if kind == "strided_conv":
        return ConvNormAct(
            in_channels, out_channels, patch_size, stride, act_layer=act_layer, padding=padding
        )
    return ReNetLayer(in_channels, 2 * hidden_size, patch_size=stride)
