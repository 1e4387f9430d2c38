"""Training RNNPool-Face detectors on the engine's loop: `leanvision train --task detection`.

The loop (engine/train.py) keeps its checkpoints, exact resume, DDP and progress; this task gives it the
detection data specs, the detector's own S3FD loss (train-mode forward) and WIDER-style AP on the validation
split each epoch (`ap` is the AP of the split's last, widest subset: WIDER "hard", or "all"). The best epoch
is the one with the highest `ap` (EdgeML picks the lowest validation loss). Object detectors (SSDLite,
R-CNNs) train through object_task on the same pieces; `detection_task` picks the task for a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leanvision.detection.augment import S3FDAugment
from leanvision.detection.data import DetectionSplits, build_detection_data, collate_detection
from leanvision.detection.evaluation import few_faces_subsets, subsets_from_targets, wider_ap
from leanvision.detection.haar import HaarCascade
from leanvision.detection.inference import detect_images, eval_area
from leanvision.engine.task import StepMeter, Task
from leanvision.engine.train import TrainConfig
from leanvision.engine.train_state import training_config_of
from leanvision.errors import InvalidArgumentError
from leanvision.models.face import DETECTORS
from leanvision.models.registry import create_model

# S3FD / EdgeML training defaults (notes 1.6): SGD 0.9, lr 1e-2, cosine with 5 warm-up epochs, weight decay
# 5e-4 (EdgeML's code; the paper says 4e-5), batch 32 (EdgeML's README for Quant).
DETECTION_DEFAULTS = {"lr": 1e-2, "wd": 5e-4, "warmup_epochs": 5, "batch_size": 32}
LOSS_TERMS = ("loss_box_reg", "loss_classifier")


def make_detector(name: str) -> nn.Module:
    """The registered detector `name`; any other model name raises, listing the detectors."""
    if name not in DETECTORS:
        raise InvalidArgumentError(
            f"--task detection trains a face detector ({', '.join(sorted(DETECTORS))}), got {name!r}"
        )
    return create_model(name)


class LossMeter(StepMeter):
    """Per-image means of the loss and its `terms` over an epoch, reduced over processes."""

    def __init__(self, terms: Sequence[str], device: torch.device) -> None:
        self.terms = tuple(terms)
        self.sums = torch.zeros(len(self.terms) + 2, dtype=torch.float64, device=device)  # loss, terms, n

    def update(self, loss: torch.Tensor, outputs: dict[str, torch.Tensor], targets: list[dict]) -> None:
        n = len(targets)
        values = [loss.detach(), *(outputs[k].detach() for k in self.terms)]
        self.sums += torch.stack([v.double() * n for v in values] + [self.sums.new_tensor(n)])

    def result(self) -> dict[str, Any]:
        if dist.is_initialized():
            dist.all_reduce(self.sums)
        *sums, n = self.sums.tolist()
        return {"samples": int(n), **{k: s / n for k, s in zip(("loss", *self.terms), sums)}}


class DetectionTaskBase(Task):
    """What the face and object detection tasks share: the name runs are saved under, the data's
    collation (lists: images differ in size and box count), the loss (the sum of the `terms` of the
    detector's train-mode loss dict) and validation in eval mode (`score`)."""

    name = "detection"
    collate = staticmethod(collate_detection)
    defaults: dict[str, float] = {}  # training defaults (lr, wd, warmup_epochs, batch_size)
    terms: tuple[str, ...] = ()

    def loss(self, net, inputs, targets, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = net(inputs, targets)
        return sum(losses[k] for k in self.terms), losses

    def train_meter(self, data: DetectionSplits, device: torch.device) -> LossMeter:
        return LossMeter(self.terms, device)

    def evaluate(
        self, model, data: DetectionSplits, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            return self.score(model, data, config.batch_size, device)
        finally:
            model.train(was_training)

    def score(self, model: nn.Module, data: DetectionSplits, batch_size: int, device: torch.device) -> dict:
        """Validation metrics of `model` (in eval mode) on `data.val`."""
        raise NotImplementedError


def detection_task(model_name: str) -> DetectionTaskBase:
    """The task that trains `model_name`: a face detector's, or an object detector's (object_task)."""
    if model_name in DETECTORS:
        return DetectionTask()
    from leanvision.detection.object_task import (
        OBJECT_DETECTORS,
        ObjectDetectionTask,
    )  # it imports this module

    if model_name not in OBJECT_DETECTORS:
        raise InvalidArgumentError(
            f"--task detection trains a face detector ({', '.join(sorted(DETECTORS))}) or an object detector "
            f"({', '.join(OBJECT_DETECTORS)}), got {model_name!r}"
        )
    return ObjectDetectionTask(model_name)


class DetectionTask(DetectionTaskBase):
    """S3FD training of an RNNPool-Face detector on a `build_detection_data` spec."""

    metric = "ap"
    terms = LOSS_TERMS
    train_columns = ("loss", *LOSS_TERMS)
    val_columns = ("ap", "ap_easy", "ap_medium", "ap_hard", "ap_all")
    defaults = DETECTION_DEFAULTS

    def build_data(self, config: TrainConfig) -> DetectionSplits:
        detector = make_detector(config.model)
        # data-anchor-sampling with the detector's anchors at its own training crop: 640 or 320
        augment = partial(S3FDAugment, anchors=detector.anchor_sizes, anchors_at=max(eval_area(detector)))
        data = build_detection_data(config.data, detector.in_chans, config.img_size, config.strict, augment)
        check_single_class(data, config.model)
        return data

    def make_model(self, config: TrainConfig, data: DetectionSplits) -> nn.Module:
        return make_detector(config.model)

    def check_model_fits(self, model: nn.Module, data: DetectionSplits, name: str) -> None:
        if getattr(model, "in_chans", None) != data.channels:
            raise InvalidArgumentError(
                f"model {name!r} takes {getattr(model, 'in_chans', '?')}-channel images but {data.spec!r} "
                f"was built with {data.channels}"
            )

    def to_device(self, batch, device: torch.device, config: TrainConfig) -> tuple[torch.Tensor, list[dict]]:
        images, targets = batch
        inputs = torch.stack(images).to(device, non_blocking=True)  # training crops share one size
        keys = ("boxes", "labels")
        return inputs, [{k: t[k].to(device, non_blocking=True) for k in keys} for t in targets]

    def score(self, model: nn.Module, data: DetectionSplits, batch_size: int, device: torch.device) -> dict:
        return detection_ap(lambda images: detect_images(model, images), data, batch_size, device)


def check_single_class(data: DetectionSplits, model_name: str) -> None:
    """Face detectors have one class: data with several categories must name the one to train on."""
    if len(data.categories) > 1:
        raise InvalidArgumentError(
            f"{model_name} detects one class, but {data.spec!r} has {len(data.categories)} categories "
            f"({', '.join(data.categories.values())}); choose one (coco-boxes:DIR,category=ID)"
        )


Detector = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


@torch.no_grad()
def run_detector(
    detect: Detector, data: DetectionSplits, batch_size: int, device: str | torch.device
) -> tuple[list[dict], list[dict]]:
    """(detections on the CPU, targets) of `detect` (images -> detections, in the images' pixels) over
    `data.val`. Under DDP each process detects a shard and all get every image's."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(data.val), world))
    detections, targets = [], []
    for start in range(0, len(mine), batch_size):
        images, chunk = zip(*(data.val[i] for i in mine[start : start + batch_size]))
        found = detect([image.to(device) for image in images])
        detections += [{k: v.cpu() for k, v in d.items()} for d in found]
        targets += chunk
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (detections, targets))
        detections = [d for shard, _ in gathered for d in shard]
        targets = [t for _, shard in gathered for t in shard]
    if not targets:
        raise InvalidArgumentError(f"cannot evaluate on an empty validation split ({data.spec!r})")
    return detections, targets


def detection_ap(
    detect: Detector,
    data: DetectionSplits,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_faces: int | None = None,
) -> dict[str, Any]:
    """WIDER AP of `detect` (images -> detections, in the images' pixels) on `data.val`: "ap_NAME" per subset,
    "ap" for the last one, and with `max_faces` also each subset restricted to images with at most that many
    faces in it (the paper's "<= 3 faces" columns). Under DDP each process detects a shard; all get
    every AP."""
    detections, targets = run_detector(detect, data, batch_size, device)
    predictions = {
        t["image_id"]: torch.cat([d["boxes"], d["scores"][:, None]], 1) for d, t in zip(detections, targets)
    }
    ground_truth, subsets = subsets_from_targets(targets)
    if max_faces is not None:
        subsets.update(few_faces_subsets(subsets, ground_truth, max_faces))
    aps = wider_ap(predictions, ground_truth, subsets)
    return {"ap": aps[data.subsets[-1]], **{f"ap_{k}": v for k, v in aps.items()}, "images": len(targets)}


def evaluate_detection(
    model_name: str | None,
    checkpoint: str | Path | None,
    data_spec: str,
    baseline: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    strict: bool = False,
    max_faces: int | None = 3,
    **detect_options,
) -> dict[str, Any]:
    """`leanvision eval --task detection`: WIDER AP of a trained face detector (or of the Haar `baseline`)
    on the validation split of `data_spec`, single-scale at the detector's evaluation area unless
    `detect_options` ask for multiscale / flip (see detect_images); COCO AP of an object detector
    (object_task.evaluate_objects)."""
    if baseline is not None:
        if baseline != "haar":
            raise InvalidArgumentError(f"--baseline must be haar, got {baseline!r}")
        data = build_detection_data(data_spec, 3, strict=strict)
        return detection_ap(HaarCascade(), data, batch_size, "cpu", max_faces)
    if model_name is None or checkpoint is None:
        raise InvalidArgumentError(
            "evaluating a detector needs --model and --checkpoint (or --baseline haar)"
        )
    if model_name not in DETECTORS:
        if any(detect_options.values()):
            raise InvalidArgumentError("--multiscale and --flip are for the face detectors")
        from leanvision.detection.object_task import evaluate_objects

        return evaluate_objects(model_name, checkpoint, data_spec, batch_size, device, strict)
    training_config_of(checkpoint, model_name)
    model = create_model(model_name, pretrained=str(checkpoint)).to(device).eval()  # EdgeML's files too
    data = build_detection_data(data_spec, model.in_chans, strict=strict)
    check_single_class(data, model_name)
    return detection_ap(
        lambda images: detect_images(model, images, **detect_options), data, batch_size, device, max_faces
    )
