"""MobileNetV1, ReXNet(plain) built on it, and MobileNetV2 (torchvision's class, timm-shaped interface)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from leanvision.layers import ClassifierHead, ConvNormAct
from leanvision.layers.conv import ActLayer
from leanvision.models.base import Classifier, check_input, check_width, feature_level
from leanvision.registry import register_model

# Pointwise output widths and depthwise strides of the 13 depthwise-separable blocks of MobileNetV1.
MOBILENETV1_WIDTHS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
MOBILENETV1_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)

# ReXNet(plain), ReXNet paper Appendix B.2. No reference code exists; every choice below is ours:
# - depth, strides, stem (3x3 conv 32, BN, ReLU) and the penultimate 1x1 conv to 1024 are MobileNetV1's
#   ("we do not change the depth", "identical configuration at the stem", "the same large expansion
#   layer at the penultimate layer", "all the other channel dimensions ... are not changed");
# - the other twelve 1x1 convs get linearly growing widths c_i = 96 + 48 i (96 ... 624). The paper gives
#   no slope or intercept; this is the integer-friendly line that meets its stated budget: 3,399,240
#   params (paper 3.4M) and 564.7M conv+FC MACs (paper 0.56B FLOPs, which count MACs as MobileNetV1's do);
# - SiLU after every 1x1 conv, ReLU after every depthwise conv, no SE, no skip connections.
REXNET_PLAIN_WIDTHS = tuple(96 + 48 * i for i in range(12)) + (1024,)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv, BN, act -> 1x1 pointwise conv, BN, act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dw_act: ActLayer, pw_act: ActLayer):
        super().__init__()
        self.conv_dw = ConvNormAct(in_channels, in_channels, 3, stride, groups=in_channels, act_layer=dw_act)
        self.conv_pw = ConvNormAct(in_channels, out_channels, act_layer=pw_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


class MobileNetV1(Classifier):
    """Plain stack of depthwise-separable blocks (Howard et al. 2017); `pw_act` picks the 1x1 activation."""

    def __init__(
        self,
        widths: tuple[int, ...] = MOBILENETV1_WIDTHS,
        width_mult: float = 1.0,
        pw_act: ActLayer = nn.ReLU,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_width(width_mult)
        self.in_chans = in_chans
        self.total_stride = 32
        stem_chs = round(32 * width_mult)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2)
        blocks, self.feature_info = [], []
        in_chs, reduction = stem_chs, 2
        for i, (width, stride) in enumerate(zip(widths, MOBILENETV1_STRIDES)):
            if stride > 1:
                self.feature_info.append(feature_level(i - 1, in_chs, reduction))
                reduction *= stride
            out_chs = round(width * width_mult)
            blocks.append(DepthwiseSeparable(in_chs, out_chs, stride, dw_act=nn.ReLU, pw_act=pw_act))
            in_chs = out_chs
        self.feature_info.append(feature_level(len(blocks) - 1, in_chs, reduction))
        self.features = nn.Sequential(*blocks)
        self.head = ClassifierHead(in_chs, num_classes, drop_rate)


def mobilenetv1(width_mult: float = 1.0, **kwargs) -> MobileNetV1:
    """MobileNetV1 at any positive width multiplier."""
    return MobileNetV1(width_mult=width_mult, **kwargs)


def rexnet_plain(**kwargs) -> MobileNetV1:
    """ReXNet(plain): MobileNetV1 with linearly growing 1x1 widths and SiLU after each 1x1 conv."""
    return MobileNetV1(widths=REXNET_PLAIN_WIDTHS, pw_act=nn.SiLU, drop_rate=0.2, **kwargs)


class MobileNetV2(torchvision.models.MobileNetV2):
    """torchvision's MobileNetV2 (so torchvision weight files load as they are) with the leanvision interface.

    Keys stay torchvision's: `features.0` is the stem, `features.1..17` the inverted residuals,
    `features.18` the 1x1 conv to 1280 (or more above x1.0), `classifier.1` the Linear.
    """

    total_stride = 32

    def __init__(
        self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2
    ) -> None:
        check_width(width_mult)
        super().__init__(num_classes=max(num_classes, 1), width_mult=width_mult, dropout=drop_rate)
        if in_chans != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, 3, 2, 1, bias=False)
        self.in_chans = in_chans
        self.num_features = self.last_channel
        self.feature_info = []
        reduction, channels = 1, in_chans
        for i, block in enumerate(self.features):
            stride = _block_stride(block)
            if stride > 1 and i > 0:
                self.feature_info.append(feature_level(i - 1, channels, reduction))
            reduction *= stride
            channels = _block_out_channels(block)
        self.feature_info.append(feature_level(len(self.features) - 1, channels, reduction))
        if num_classes == 0:
            self.reset_classifier(0)

    @property
    def num_classes(self) -> int:
        fc = self.classifier[1]
        return fc.out_features if isinstance(fc, nn.Linear) else 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> last feature map (before global pooling)."""
        check_input(x, self.in_chans, self.total_stride, type(self).__name__)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (or the pooled vector, with pre_logits=True)."""
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.classifier[0](x)
        return x if pre_logits else self.classifier[1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear by a fresh one for `num_classes` (0 removes it)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.classifier[1] = nn.Linear(self.last_channel, num_classes) if num_classes else nn.Identity()


def _block_stride(block: nn.Module) -> int:
    return max(m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d))


def _block_out_channels(block: nn.Module) -> int:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def mobilenetv2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2 at any positive width multiplier (torchvision rounding to multiples of 8)."""
    return MobileNetV2(width_mult=width_mult, **kwargs)


register_model("mobilenetv1", mobilenetv1)
register_model("mobilenetv1_100", mobilenetv1, paper=dict(top1=70.6, params_m=4.2, flops_b=0.56))
register_model("rexnet_plain", rexnet_plain, paper=dict(top1=74.8, params_m=3.4, flops_b=0.56))
register_model("mobilenetv2", mobilenetv2)
# Published ImageNet top-1 (MobileNetV2 paper); x1.0 and x1.4 params/FLOPs as ReXNet Table 4 prints them.
for _w, _paper in {
    0.35: dict(top1=60.3),
    0.5: dict(top1=65.4),
    0.75: dict(top1=69.8),
    1.0: dict(top1=72.0, params_m=3.5, flops_b=0.30),
    1.4: dict(top1=74.7, params_m=6.9, flops_b=0.59),
}.items():
    register_model(
        f"mobilenetv2_{round(_w * 100):03d}", mobilenetv2, kwargs=dict(width_mult=_w), paper=_paper
    )
