"""Training torchvision-style object detectors (SSDLite, Faster R-CNN + FPN on leanvision backbones) on the
engine's loop: `leanvision train --task detection --model ssdlite_rexnet_100 --data coco-boxes:DIR`.

The loop keeps its checkpoints, exact resume, DDP and progress; this task gives it the detection data
specs with SSD's augmentation (augment.SSDAugment), the detector's own loss (torchvision's train-mode
forward, its terms summed) and COCO box AP / AP50 / AP75 (pycocotools) on the validation split each
epoch. The detector is built for the data's classes (`DetectionSplits.num_classes`) and its images are
resized to `--img-size` (default: the model's own size, SSDLite 320, the R-CNNs 800 on the short side).
Mask R-CNN needs instance masks, which the detection specs do not load: it is evaluated, not trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanvision.detection.augment import SSDAugment
from leanvision.detection.coco_eval import coco_ap
from leanvision.detection.data import DetectionSplits, build_detection_data
from leanvision.detection.task import DetectionTaskBase, run_detector
from leanvision.engine.train import TrainConfig
from leanvision.engine.train_state import training_config_of
from leanvision.errors import InvalidArgumentError
from leanvision.models.rcnn import RCNN_MODELS
from leanvision.models.registry import create_model, get_model_config
from leanvision.models.ssdlite import SSDLITE_MODELS
from leanvision.models.weights import load_checkpoint

OBJECT_DETECTORS = (*SSDLITE_MODELS, *RCNN_MODELS)
# torchvision's detection references, scaled to one process's batch: SSDLite lr 0.15 at batch 192 and
# weight decay 4e-5; the R-CNNs lr 0.02 at batch 16 and weight decay 1e-4
OBJECT_DEFAULTS = {
    "ssdlite": {"lr": 0.015, "wd": 4e-5, "warmup_epochs": 1, "batch_size": 16},
    "rcnn": {"lr": 0.01, "wd": 1e-4, "warmup_epochs": 1, "batch_size": 8},
}
LOSS_TERMS = {
    "ssdlite": ("bbox_regression", "classification"),
    "rcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
}
R_CNN_MAX_SIZE = 1333 / 800  # torchvision's long-side cap relative to the short side


def family(name: str) -> str:
    """ "ssdlite" or "rcnn" for a registered object detector; any other name raises, listing them."""
    if name in SSDLITE_MODELS:
        return "ssdlite"
    if name in RCNN_MODELS:
        return "rcnn"
    raise InvalidArgumentError(
        f"{name!r} is not an object detector; expected one of {', '.join(OBJECT_DETECTORS)}"
    )


def image_size(name: str, img_size: int | None) -> int:
    """The side images are resized to: `img_size`, or the model's own (the shorter side of its input)."""
    return img_size or min(get_model_config(name).input_size[1:])


def make_object_detector(name: str, num_classes: int, img_size: int | None = None) -> nn.Module:
    """The registered detector `name` for `num_classes` (background included), resizing to `img_size`."""
    size = image_size(name, img_size)
    if family(name) == "ssdlite":
        return create_model(name, num_classes=num_classes, size=size)
    return create_model(
        name, num_classes=num_classes, min_size=size, max_size=math.ceil(size * R_CNN_MAX_SIZE)
    )


class ObjectDetectionTask(DetectionTaskBase):
    """Training of an SSDLite or Faster R-CNN detector on a `build_detection_data` spec."""

    metric = "ap"
    val_columns = ("ap", "ap50", "ap75")

    def __init__(self, model_name: str) -> None:
        if model_name.startswith("maskrcnn_"):
            raise InvalidArgumentError(
                f"{model_name} trains on instance masks, which the detection data specs do not load; "
                f"train {model_name.replace('maskrcnn_', 'fasterrcnn_')} on boxes (Mask R-CNN is evaluated "
                "on boxes)"
            )
        self.terms = LOSS_TERMS[family(model_name)]
        self.train_columns = ("loss", *self.terms)
        self.defaults = OBJECT_DEFAULTS[family(model_name)]

    def build_data(self, config: TrainConfig) -> DetectionSplits:
        size = image_size(config.model, config.img_size)
        return build_detection_data(config.data, 3, size, config.strict, SSDAugment)

    def make_model(self, config: TrainConfig, data: DetectionSplits) -> nn.Module:
        return make_object_detector(config.model, data.num_classes, config.img_size)

    def check_model_fits(self, model: nn.Module, data: DetectionSplits, name: str) -> None:
        if data.channels != 3:
            raise InvalidArgumentError(
                f"{name} takes RGB images, but {data.spec!r} was built with {data.channels}"
            )

    def to_device(self, batch, device: torch.device, config: TrainConfig) -> tuple[list, list[dict]]:
        images, targets = batch
        keys = ("boxes", "labels")
        inputs = [image.to(device, non_blocking=True) for image in images]
        return inputs, [{k: t[k].to(device, non_blocking=True) for k in keys} for t in targets]

    def score(self, model: nn.Module, data: DetectionSplits, batch_size: int, device: torch.device) -> dict:
        return object_ap(model, data, batch_size, device)


@torch.no_grad()
def object_ap(
    detect, data: DetectionSplits, batch_size: int = 8, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """COCO box AP / AP50 / AP75 of `detect` (a list of images -> torchvision detections) on `data.val`."""
    detections, targets = run_detector(detect, data, batch_size, device)
    return {**coco_ap(detections, targets), "images": len(targets)}


def evaluate_objects(
    model_name: str,
    checkpoint: str | Path,
    data_spec: str,
    batch_size: int = 8,
    device: str = "cpu",
    strict: bool = False,
) -> dict[str, Any]:
    """`leanvision eval --task detection` of an object detector: COCO AP on `data_spec`'s validation split,
    at the image size the checkpoint's run trained at."""
    saved = training_config_of(checkpoint, model_name)
    img_size = saved["img_size"] if saved is not None else None
    data = build_detection_data(data_spec, 3, image_size(model_name, img_size), strict, SSDAugment)
    detector = make_object_detector(model_name, data.num_classes, img_size)
    model = load_checkpoint(detector, checkpoint).to(device).eval()
    return object_ap(model, data, batch_size, device)
