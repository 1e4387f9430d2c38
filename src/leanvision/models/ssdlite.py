"""SSDLite on leanvision classifier backbones (ReXNet paper Section 5.2, Table 6), on torchvision's SSD.

As MobileNetV2's SSDLite (Sandler et al., Section 6.2) and torchvision's `ssdlite320_mobilenet_v3_large`:
the first head reads the expansion layer (1x1 expand conv output) of the first stride-32 block, at stride
16; the second the backbone's final layer (its last 1x1 conv, stride 32); four extra blocks (1x1 to half
width, 3x3 depthwise stride 2, 1x1; widths 512, 256, 256, 128) add strides 64 to 512. Heads are
depthwise-separable (torchvision's SSDLiteHead), six default boxes per location (aspect ratios 2 and 3,
scales 0.2 to 0.95) except on the first map, which has three (scale 0.1, aspect ratios 1, 2 and 1/2: the
TensorFlow Object Detection API's `reduce_boxes_in_lowest_layer`, which the MobileNetV2 and ReXNet
SSDLite results were trained with); 320x320 input (`size` changes it) scaled to [-1, 1]. Extra layers and
heads use BN with eps 1e-3 and momentum 0.03, as torchvision's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block
from torchvision.models.mobilenetv2 import InvertedResidual

from leanvision.errors import InvalidArgumentError
from leanvision.layers import LinearBottleneck
from leanvision.models.base import TorchvisionDetector, check_detection_classes, feature_block, model_name
from leanvision.models.registry import create_model, register_model

EXTRA_WIDTHS = (512, 256, 256, 128)
SIZE = (320, 320)
NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
DEFAULTS = dict(  # torchvision's ssdlite320 test-time settings, and its [-1, 1] input scaling
    score_thresh=0.001, nms_thresh=0.55, detections_per_img=300, topk_candidates=300,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
)  # fmt: skip


LOWEST_LAYER_SCALE = 0.1


class SSDLiteBoxes(DefaultBoxGenerator):
    """torchvision's default boxes (SSD's scales and aspect-ratio pairs), with the first map's replaced by
    three boxes of scale 0.1 and aspect ratios 1, 2 and 1/2 (TF's reduce_boxes_in_lowest_layer)."""

    def __init__(self, num_maps: int) -> None:
        super().__init__([[2, 3] for _ in range(num_maps)], min_ratio=0.2, max_ratio=0.95)

    def _generate_wh_pairs(
        self, num_outputs: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> list[torch.Tensor]:
        device = device or torch.device("cpu")
        pairs = super()._generate_wh_pairs(num_outputs, dtype, device)
        s, r = LOWEST_LAYER_SCALE, math.sqrt(2.0)
        pairs[0] = torch.tensor([[s, s], [s * r, s / r], [s / r, s * r]], dtype=dtype, device=device)
        return pairs

    def num_anchors_per_location(self) -> list[int]:
        return [3, *super().num_anchors_per_location()[1:]]


class AfterExpansion(nn.Sequential):
    """An inverted residual without its expansion conv (depthwise, squeeze-excite, projection): a block of
    its own for the memory analysis, which counts it as an inverted residual (input + output)."""


def split_at_expansion(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the expansion conv, the rest of the block) of a strided inverted residual."""
    if isinstance(block, LinearBottleneck) and block.conv_exp is not None and not block.use_shortcut:
        rest = [block.conv_dw, *([block.se] if block.se is not None else []), block.act_dw, block.conv_pwl]
        return block.conv_exp, AfterExpansion(*rest)
    if isinstance(block, InvertedResidual) and not block.use_res_connect and len(block.conv) == 4:
        return block.conv[0], AfterExpansion(*block.conv[1:])
    raise InvalidArgumentError(
        f"SSDLite's first head reads the expansion layer of the first stride-32 block, which must be an "
        f"expanding inverted residual without shortcut; got {type(block).__name__}"
    )


def out_channels(module: nn.Module) -> int:
    """The output width of a conv block: its last convolution's."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise InvalidArgumentError(f"{type(module).__name__} has no convolution to read its width from")
    return convs[-1].out_channels


class SSDLiteBackbone(nn.Module):
    """A classifier's layers up to the expansion layer of its first stride-32 block (stride 16), the rest
    to its final layer (stride 32), and the extra blocks: six maps, strides 16 to 512."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        levels = getattr(classifier, "feature_info", None) or []
        at_16 = [
            level for level in levels if level["reduction"] == 16 and level["module"].startswith("features.")
        ]
        if not at_16 or levels[-1]["reduction"] != 32:
            raise InvalidArgumentError(
                f"{model_name(classifier)} has no stride-16 and stride-32 stages for SSDLite "
                f"(feature levels: {[level['reduction'] for level in levels]})"
            )
        blocks = list(classifier.features)
        c4 = feature_block(at_16[-1]) + 1  # the first block of the stride-32 stage
        expansion, rest = split_at_expansion(blocks[c4])
        stem = [classifier.stem] if "stem" in classifier._modules else []
        self.body = nn.ModuleList(
            [nn.Sequential(*stem, *blocks[:c4], expansion), nn.Sequential(rest, *blocks[c4 + 1 :])]
        )
        widths = [out_channels(blocks[-1]), *EXTRA_WIDTHS]  # the final layer: the last 1x1 conv
        self.extra = nn.ModuleList(_extra_block(a, b, NORM) for a, b in zip(widths, widths[1:]))
        for conv in self.extra.modules():
            if isinstance(conv, nn.Conv2d):  # torchvision's SSDLite initialisation of new layers
                nn.init.normal_(conv.weight, mean=0.0, std=0.03)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        self.out_channels = [out_channels(expansion), *widths]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = []
        for layer in (*self.body, *self.extra):
            x = layer(x)
            maps.append(x)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class SSDLite(TorchvisionDetector, SSD):
    """torchvision's SSD with leanvision's detector interface (models.base.TorchvisionDetector)."""

    head_output_names = ("bbox_regression", "cls_logits")

    def raw_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bbox_regression [B, A, 4] and cls_logits [B, A, num_classes] of a normalised batch."""
        outputs = self.head(list(self.backbone(x).values()))
        return outputs["bbox_regression"], outputs["cls_logits"]


def ssdlite(backbone: str, num_classes: int = 91, size: tuple[int, int] | int = SIZE, **kwargs) -> SSDLite:
    """SSDLite on the registered classifier `backbone` (see the module docstring), its images resized to
    `size` (H, W; default 320x320); `kwargs` go to torchvision's SSD (thresholds, top-k, image mean /
    std)."""
    check_detection_classes(num_classes)
    features = SSDLiteBackbone(create_model(backbone))
    anchors = SSDLiteBoxes(len(features.out_channels))
    head = SSDLiteHead(features.out_channels, anchors.num_anchors_per_location(), num_classes, NORM)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return SSDLite(features, anchors, size, num_classes, head=head, **{**DEFAULTS, **kwargs})


# ReXNet paper Table 6 (COCO test-dev, SSDLite at 320x320): params (M), MAdds (B), mAP.
_TABLE6 = {
    "rexnet_090": (5.0, 0.88, 24.4),
    "rexnet_100": (5.7, 1.01, 25.5),
    "rexnet_130": (8.4, 1.60, 27.2),
    "mobilenetv2_100": (4.3, 0.8, 22.1),
}
SSDLITE_MODELS = tuple(f"ssdlite_{backbone}" for backbone in _TABLE6)
for _backbone, (_params, _madds, _map) in _TABLE6.items():
    register_model(
        f"ssdlite_{_backbone}",
        ssdlite,
        kwargs=dict(backbone=_backbone),
        input_size=(3, *SIZE),
        paper=dict(source="ReXNet Table 6", params_m=_params, madds_b=_madds, map=_map),
    )
