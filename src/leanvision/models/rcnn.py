"""Faster R-CNN and Mask R-CNN with FPN on leanvision classifier backbones (ReXNet paper 5.3-5.4, Tables 7
and 9), on torchvision's detectors.

As torchvision's `fasterrcnn_resnet50_fpn` (whose 41.8M parameters are the paper's ResNet50 row): the FPN
(256 channels, P2-P5 plus the max-pooled P6) reads the last block of the classifier's stages at strides 4,
8, 16 and 32 (for ReXNet the last bottleneck, not the 1x1 conv before the classifier), one anchor size per
level (32 to 512) with aspect ratios 1/2, 1 and 2, torchvision's RPN and box (and mask) heads. That
reading reproduces the paper's parameter counts to 0.3% and its 1200x800 FLOPs (which count
multiply-accumulates) to 4%; an FPN from stride 8 would have 45.7B instead of 123.0B. The backbone's
BatchNorms are frozen (FrozenBatchNorm2d), as the paper trains the R-CNNs. Inputs are resized to 800 px on
the short side (at most 1333 on the long one): the paper's 1200x800 (torchvision's `min_size` and
`max_size` change it). `head_outputs` (memory analysis, bench, export) runs the backbone, FPN and RPN
head: the RoI heads run on a data-dependent number of proposals and are left out.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from leanvision.errors import InvalidArgumentError
from leanvision.models.base import TorchvisionDetector, check_detection_classes, feature_block, model_name
from leanvision.models.registry import create_model, register_model

FPN_STRIDES = (4, 8, 16, 32)  # the FPN reads the last block of the stages at these strides
FPN_CHANNELS = 256


def freeze_batchnorm_(module: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm2d by a FrozenBatchNorm2d holding its statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm_(child)
    return module


def fpn_backbone(backbone: str, frozen_bn: bool = True) -> BackboneWithFPN:
    """The registered classifier `backbone` with an FPN over the last blocks of its stride 4-32 stages."""
    classifier = create_model(backbone)
    levels = {level["reduction"]: level for level in getattr(classifier, "feature_info", None) or []}
    missing = [s for s in FPN_STRIDES if s not in levels or not levels[s]["module"].startswith("features.")]
    if missing:
        raise InvalidArgumentError(
            f"{model_name(classifier)} has no stages at strides {missing} for an FPN "
            f"(feature levels at {sorted(levels)})"
        )
    stem = [("stem", classifier.stem)] if "stem" in classifier._modules else []
    body = nn.Sequential(OrderedDict(stem + [(f"block{i}", b) for i, b in enumerate(classifier.features)]))
    taps = {f"block{feature_block(levels[s])}": str(i) for i, s in enumerate(FPN_STRIDES)}
    if frozen_bn:
        freeze_batchnorm_(body)
    widths = [levels[s]["num_chs"] for s in FPN_STRIDES]  # the body stops at the last tap
    return BackboneWithFPN(body, taps, widths, FPN_CHANNELS, extra_blocks=LastLevelMaxPool())


class RPNOutputs(TorchvisionDetector):
    """The detector interface of the R-CNNs: their raw outputs are the RPN's over every FPN level."""

    head_output_names = ("objectness", "rpn_box_deltas")
    memory_scope = (
        "traced up to the RPN's outputs; the RoI heads run on a data-dependent number of proposals and "
        "are not counted"
    )

    def raw_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """objectness [B * A, 1] and box deltas [B * A, 4] of the RPN on a normalised batch (A anchors
        per image over the FPN levels, level by level as torchvision orders them)."""
        objectness, deltas = self.rpn.head(list(self.backbone(x).values()))
        return concat_box_prediction_layers(objectness, deltas)


class FasterRCNNFPN(RPNOutputs, FasterRCNN):
    """torchvision's FasterRCNN with leanvision's detector interface."""


class MaskRCNNFPN(RPNOutputs, MaskRCNN):
    """torchvision's MaskRCNN with leanvision's detector interface."""


def fasterrcnn_fpn(backbone: str, num_classes: int = 91, frozen_bn: bool = True, **kwargs) -> FasterRCNN:
    """Faster R-CNN + FPN on the registered classifier `backbone` (module docstring); `kwargs` go to
    torchvision's FasterRCNN."""
    check_detection_classes(num_classes)
    return FasterRCNNFPN(fpn_backbone(backbone, frozen_bn), num_classes, **kwargs)


def maskrcnn_fpn(backbone: str, num_classes: int = 91, frozen_bn: bool = True, **kwargs) -> MaskRCNN:
    """Mask R-CNN + FPN on the registered classifier `backbone` (module docstring); `kwargs` go to
    torchvision's MaskRCNN."""
    check_detection_classes(num_classes)
    return MaskRCNNFPN(fpn_backbone(backbone, frozen_bn), num_classes, **kwargs)


_INPUT = (3, 800, 1200)
RCNN_MODELS = tuple(
    f"{kind}_fpn_rexnet_{width}" for kind in ("fasterrcnn", "maskrcnn") for width in ("090", "220")
)
# ReXNet paper Tables 7 (COCO val, Faster R-CNN + FPN at 1200x800: params M, FLOPs B, box AP) and 9
# (Mask R-CNN + FPN: params M, box AP, mask AP; the same FLOPs as Table 7).
for _width, _faster, _mask in (
    ("090", (20.1, 123.0, 38.0), (22.8, 38.7, 35.2)),
    ("220", (33.0, 153.8, 41.5), (35.6, 42.0, 37.8)),
):
    register_model(
        f"fasterrcnn_fpn_rexnet_{_width}",
        fasterrcnn_fpn,
        kwargs=dict(backbone=f"rexnet_{_width}"),
        input_size=_INPUT,
        paper=dict(source="ReXNet Table 7", params_m=_faster[0], flops_b=_faster[1], box_ap=_faster[2]),
    )
    register_model(
        f"maskrcnn_fpn_rexnet_{_width}",
        maskrcnn_fpn,
        kwargs=dict(backbone=f"rexnet_{_width}"),
        input_size=_INPUT,
        paper=dict(
            source="ReXNet Table 9", params_m=_mask[0], flops_b=_faster[1], box_ap=_mask[1], mask_ap=_mask[2]
        ),
    )
