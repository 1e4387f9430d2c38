"""MobileNetV1, ReXNet(plain) built on it, and MobileNetV2 (torchvision's blocks and keys)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, _make_divisible
from torchvision.ops.misc import Conv2dNormActivation

from leanvision.errors import InvalidArgumentError
from leanvision.layers import ClassifierHead, ConvNormAct, RNNPool
from leanvision.layers.conv import ActLayer
from leanvision.layers.downsample import create_downsample
from leanvision.models.base import (
    Classifier,
    TorchvisionClassifier,
    check_width,
    feature_level,
    init_like_torchvision,
)
from leanvision.models.registry import register_model

# Pointwise output widths and depthwise strides of the 13 depthwise-separable blocks of MobileNetV1.
MOBILENETV1_WIDTHS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
MOBILENETV1_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
# A 4x downsampling layer after the stem replaces the first four blocks (112x112 -> 28x28), as MobileNetV1
# -ReNet/-RNNPool of the RNNPool paper (Table 3: 569M -> 417M MAdds pins this choice).
MOBILENETV1_REPLACED_BY_DOWNSAMPLE = 4

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
    """Plain stack of depthwise-separable blocks (Howard et al. 2017); `pw_act` picks the 1x1 activation.

    `downsample` (one of leanvision.layers.downsample.DOWNSAMPLE_KINDS) puts that layer, with 4 * hidden_size
    output channels, in place of the first four blocks (`features.0`).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = MOBILENETV1_WIDTHS,
        width_mult: float = 1.0,
        pw_act: ActLayer = nn.ReLU,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        downsample: str | None = None,
        hidden_size: int = 16,
        patch_size: int = 6,
    ) -> None:
        super().__init__()
        check_width(width_mult)
        self.in_chans = in_chans
        self.total_stride = 32
        stem_chs = round(32 * width_mult)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2)
        blocks, self.feature_info = [], []
        in_chs, reduction, first = stem_chs, 2, 0
        if downsample is not None:
            blocks.append(create_downsample(downsample, stem_chs, hidden_size, patch_size, 4, nn.ReLU))
            self.feature_info.append(feature_level(-1, stem_chs, reduction))
            in_chs, reduction, first = 4 * hidden_size, 8, MOBILENETV1_REPLACED_BY_DOWNSAMPLE
        for width, stride in zip(widths[first:], MOBILENETV1_STRIDES[first:]):
            if stride > 1:
                self.feature_info.append(feature_level(len(blocks) - 1, in_chs, reduction))
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


# t (expansion), c (width), n (repeats), s (stride of the first) of MobileNetV2's inverted residual stages.
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# A 4x downsampling layer (RNNPool paper Table 10) replaces the stages that work at 1/2 and 1/4 resolution.
MOBILENETV2_REPLACED_BY_DOWNSAMPLE = 3


class MobileNetV2(TorchvisionClassifier):
    """MobileNetV2 with torchvision's blocks and keys, so torchvision weight files load as they are.

    Keys: `features.0` is the stem, then the inverted residuals, then the 1x1 conv to `last_channel`
    (`features.18` for the standard network); `classifier.1` is the Linear.

    RNNPool paper options (all off by default, giving the standard network):
    - `downsample`: one of leanvision.layers.downsample.DOWNSAMPLE_KINDS replaces the first three stages
      (112x112 -> 28x28), with 4 * hidden_size output channels (`features.1`), as in paper Table 10;
    - `last_pool="rnnpool"`: an RNNPool over the whole last map, hidden C/4, replaces the average pool
      (Appendix F.1.2);
    - `stem_channels` (default 32 x width_mult), `last_channel`: 8 and 320 give the Visual Wake Words
      network. A given stem width, like the downsample width, is not scaled by width_mult (as the reference).

    `stem_stride=1` keeps the stem at full resolution (total stride 16), for 32x32-sized inputs.
    """

    head_modules = ("global_pool", "classifier.0", "classifier.1")

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        stem_channels: int | None = None,
        last_channel: int = 1280,
        downsample: str | None = None,
        hidden_size: int = 16,
        patch_size: int = 6,
        last_pool: str = "avg",
        cell: str = "fastgrnn",
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        check_width(width_mult)
        if last_pool not in ("avg", "rnnpool"):
            raise InvalidArgumentError(f"last_pool must be 'avg' or 'rnnpool', got {last_pool!r}")
        if stem_stride not in (1, 2):
            raise InvalidArgumentError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.in_chans = in_chans
        self.total_stride = 16 * stem_stride
        stem_chs = stem_channels or _make_divisible(32 * width_mult, 8)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_chans, stem_chs, stride=stem_stride, activation_layer=nn.ReLU6)
        ]
        self.feature_info = []
        in_chs, reduction, stages = stem_chs, stem_stride, MOBILENETV2_STAGES
        if downsample is not None:
            features.append(
                create_downsample(downsample, stem_chs, hidden_size, patch_size, stride=4, cell=cell)
            )
            self.feature_info.append(feature_level(0, stem_chs, reduction))
            in_chs, reduction = 4 * hidden_size, 4 * reduction
            stages = stages[MOBILENETV2_REPLACED_BY_DOWNSAMPLE:]
        for t, c, n, s in stages:
            if s > 1:
                self.feature_info.append(feature_level(len(features) - 1, in_chs, reduction))
            out_chs = _make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, expand_ratio=t))
                in_chs = out_chs
            reduction *= s
        self.last_channel = self.num_features = _make_divisible(last_channel * max(1.0, width_mult), 8)
        features.append(
            Conv2dNormActivation(in_chs, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6)
        )
        self.feature_info.append(feature_level(len(features) - 1, self.last_channel, reduction))
        self.features = nn.Sequential(*features)
        self.global_pool = (
            nn.AdaptiveAvgPool2d(1)
            if last_pool == "avg"
            else RNNPool(self.last_channel, self.last_channel // 4, self.last_channel // 4, cell)
        )
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Identity())
        init_like_torchvision(self)
        self.reset_classifier(num_classes)
        if num_classes:  # torchvision's Linear initialisation
            nn.init.normal_(self.classifier[1].weight, 0, 0.01)
            nn.init.zeros_(self.classifier[1].bias)


def mobilenetv2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2 at any positive width multiplier (torchvision rounding to multiples of 8)."""
    return MobileNetV2(width_mult=width_mult, **kwargs)


register_model("mobilenetv1", mobilenetv1)
register_model("mobilenetv1_100", mobilenetv1, paper=dict(top1=70.6, params_m=4.2, flops_b=0.56))
register_model("rexnet_plain", rexnet_plain, paper=dict(top1=74.8, params_m=3.4, flops_b=0.56))
register_model(
    "mobilenetv1_rnnpool",
    mobilenetv1,
    kwargs=dict(downsample="rnnpool"),
    paper=dict(source="RNNPool Table 3 (ImageNet-1K)", top1=69.39, params_m=4.1, madds_m=417),
)
register_model("mobilenetv2", mobilenetv2)
register_model(
    "mobilenetv2_rnnpool",
    mobilenetv2,
    kwargs=dict(downsample="rnnpool"),
    paper=dict(source="RNNPool Tables 3 and 10 (ImageNet-1K)", top1=70.14, params_m=3.2, madds_m=226),
)
# The Visual Wake Words networks (RNNPool paper Section 5.2, EdgeML reference): 0.35x, stem 8, last conv 320.
_VWW = dict(width_mult=0.35, stem_channels=8, last_channel=320, num_classes=2)
register_model(
    "mobilenetv2_035_vww",
    mobilenetv2,
    kwargs=_VWW,
    paper=dict(source="RNNPool Table 2 (VWW)", top1=90.20, params_k=296, madds_m=53.2),
)
register_model(
    "mobilenetv2_035_vww_rnnpool",
    mobilenetv2,
    kwargs=dict(_VWW, downsample="rnnpool", hidden_size=8),
    paper=dict(source="RNNPool Table 2 (VWW)", top1=89.57, params_k=255, madds_m=37.7),
)
register_model("mobilenetv2_100_lowres", mobilenetv2, kwargs=dict(stem_stride=1), input_size=(3, 32, 32))
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
