"""ReXNet and ReXNet-lite (Han et al., "Rethinking Channel Dimensions for Efficient Model Design").

Sixteen linear bottlenecks whose output widths grow linearly with the block index (the paper's searched
channel rule), on a MobileNetV2 skeleton. Shapes follow the official NAVER code exactly; the module layout
follows timm, so timm checkpoints load by name and clovaai checkpoints load by position
(see leanvision.models.weights).
"""

from __future__ import annotations

from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers import ClassifierHead, ConvNormAct, LinearBottleneck
from leanvision.layers.downsample import create_downsample
from leanvision.models.base import Classifier, check_width, feature_level
from leanvision.models.registry import register_model

BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 5)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2)
SE_STAGES = (False, False, True, True, True, True)
SE_REDUCTION = 12
# A 4x downsampling layer (as RNNPool's MobileNetV2, Table 10) replaces the stages at 1/2 and 1/4 resolution.
REXNET_REPLACED_BY_DOWNSAMPLE = 3


def make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10% below `value` (TF MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def rexnet_channels(width_mult: float, lite: bool = False) -> tuple[int, list[int]]:
    """(stem width, the 16 block output widths) of ReXNet (or ReXNet-lite) at `width_mult`.

    Widths start at 16 and grow by final/16 per block (v1: final 180, rounded half-to-even, no divisor) or
    final/15 (lite: final 164, then rounded to multiples of 8). Below x1.0 only the slope scales: the stem
    and the first block keep their x1.0 widths. The float is accumulated block by block, as the
    reference does, so ties round identically.
    """
    num_blocks = sum(BLOCKS_PER_STAGE)
    step = 164 / (num_blocks - 1) if lite else 180 / num_blocks
    base = 16 / width_mult if width_mult < 1.0 else 16.0
    stem = round((32 / width_mult if width_mult < 1.0 else 32) * width_mult)
    widths = []
    for _ in range(num_blocks):
        widths.append(round(base * width_mult))
        base += step
    if lite:
        return make_divisible(stem, 8), [make_divisible(w, 8) for w in widths]
    return stem, widths


class ReXNet(Classifier):
    """ReXNet v1 (SE + SiLU) or, with `lite=True`, ReXNet-lite (no SE, ReLU6 throughout, hidden head layer).

    Head width is int(1280 * w) for v1; for lite it is 1280 unless w > 1, and the head gains a
    1x1 conv to 1024 + BN + ReLU6 before the classifier.

    Small-input and RNNPool options (off by default, giving the paper's network):
    - `stem_stride=1` keeps the stem at full resolution (total stride 16), for 32x32-sized inputs;
    - `downsample`: one of leanvision.layers.downsample.DOWNSAMPLE_KINDS replaces the first three stages
      (the five blocks at 1/2 and 1/4 resolution) by one 4x downsampling to 4 * hidden_size channels
      (`features.0`), as RNNPool does for MobileNetV2.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        lite: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        stem_stride: int = 2,
        downsample: str | None = None,
        hidden_size: int = 16,
        patch_size: int = 6,
        cell: str = "fastgrnn",
    ) -> None:
        super().__init__()
        check_width(width_mult)
        if stem_stride not in (1, 2):
            raise InvalidArgumentError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.in_chans = in_chans
        self.total_stride = 16 * stem_stride
        act = nn.ReLU6 if lite else nn.SiLU
        stem_chs, block_chs = rexnet_channels(width_mult, lite)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=stem_stride, act_layer=act)

        strides = [s if i == 0 else 1 for s, n in zip(STAGE_STRIDES, BLOCKS_PER_STAGE) for i in range(n)]
        use_se = [se for se, n in zip(SE_STAGES, BLOCKS_PER_STAGE) for _ in range(n)]
        blocks: list[nn.Module] = []
        self.feature_info = []
        in_chs, reduction, first = stem_chs, stem_stride, 0
        if downsample is not None:
            blocks.append(create_downsample(downsample, stem_chs, hidden_size, patch_size, 4, act, cell))
            self.feature_info.append(feature_level(-1, stem_chs, reduction))
            first = sum(BLOCKS_PER_STAGE[:REXNET_REPLACED_BY_DOWNSAMPLE])
            in_chs, reduction = 4 * hidden_size, 4 * reduction
        for i in range(first, len(block_chs)):
            out_chs, stride = block_chs[i], strides[i]
            if stride > 1:
                self.feature_info.append(feature_level(len(blocks) - 1, in_chs, reduction))
                reduction *= stride
            expansion = 1 if i == 0 else 6
            se_chs = in_chs * expansion // SE_REDUCTION if use_se[i] and not lite else 0
            blocks.append(LinearBottleneck(in_chs, out_chs, stride, expansion, se_chs, exp_act=act))
            in_chs = out_chs
        self.feature_info.append(feature_level(len(blocks) - 1, in_chs, reduction))
        head_chs = int(1280 * width_mult) if (width_mult > 1 or not lite) else 1280
        blocks.append(ConvNormAct(in_chs, head_chs, act_layer=act))
        self.features = nn.Sequential(*blocks)
        self.head = ClassifierHead(head_chs, num_classes, drop_rate, hidden_size=1024 if lite else None)


def rexnet(width_mult: float = 1.0, **kwargs) -> ReXNet:
    """ReXNet v1 at any positive width multiplier."""
    return ReXNet(width_mult=width_mult, **kwargs)


def rexnet_lite(width_mult: float = 1.0, **kwargs) -> ReXNet:
    """ReXNet-lite at any positive width multiplier."""
    return ReXNet(width_mult=width_mult, lite=True, **kwargs)


# Published ImageNet numbers (ReXNet paper Tables 5 and A1; lite: Table A2):
# top-1 %, params (M), FLOPs as printed (B).
_REXNET_PAPER = {
    0.9: (77.2, 4.1, 0.35),
    1.0: (77.9, 4.8, 0.40),
    1.1: (78.6, 5.6, 0.48),
    1.2: (79.0, 6.6, 0.57),
    1.3: (79.5, 7.6, 0.66),
    1.4: (79.8, 8.6, 0.76),
    1.5: (80.3, 9.7, 0.86),
    2.0: (81.6, 16.0, 1.5),
    2.2: (81.7, 19.0, 1.8),
    3.0: (82.8, 34.0, 3.4),
}
_REXNET_LITE_PAPER = {
    1.0: (76.2, 4.7, 0.4),
    1.3: (77.8, 6.8, 0.6),
    1.5: (78.6, 8.3, 0.8),
    2.0: (80.2, 13.0, 1.5),
}

register_model("rexnet", rexnet)
register_model("rexnet_lite", rexnet_lite)
for _prefix, _builder, _table in (
    ("rexnet", rexnet, _REXNET_PAPER),
    ("rexnet_lite", rexnet_lite, _REXNET_LITE_PAPER),
):
    for _w, (_top1, _params, _flops) in _table.items():
        register_model(
            f"{_prefix}_{round(_w * 100):03d}",
            _builder,
            kwargs=dict(width_mult=_w),
            paper=dict(top1=_top1, params_m=_params, flops_b=_flops),
        )
# Low-resolution variants (28-64 px inputs such as Fashion-MNIST or CIFAR): the stem keeps full resolution,
# and the RNNPool variant replaces the three high-resolution stages by one RNNPool with h1 = h2 = 32
# (128 channels at 1/4 resolution; ~1/5 the peak RAM at 28-32 px).
register_model("rexnet_100_lowres", rexnet, kwargs=dict(stem_stride=1), input_size=(3, 32, 32))
register_model(
    "rexnet_100_lowres_rnnpool",
    rexnet,
    kwargs=dict(stem_stride=1, downsample="rnnpool", hidden_size=32),
    input_size=(3, 32, 32),
)
