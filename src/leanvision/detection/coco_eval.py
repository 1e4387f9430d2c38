"""COCO box AP of detections against ground truth, with pycocotools' COCOeval (the reference protocol:
AP over IoU 0.50:0.95, AP50, AP75, 100 detections per image, by category then averaged).

Detections and targets are torchvision's: per image {"boxes" [N, 4] x1, y1, x2, y2 pixels, "labels" [N]}
(+ "scores" for detections). Both are turned into in-memory COCO structures (boxes as x, y, w, h).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch

from leanvision.errors import InvalidArgumentError


def _check(detections: Sequence[dict], targets: Sequence[dict]) -> None:
    if len(detections) != len(targets):
        raise InvalidArgumentError(f"{len(detections)} detection dicts for {len(targets)} images")
    for i, (d, t) in enumerate(zip(detections, targets)):
        missing = [k for k in ("boxes", "scores", "labels") if k not in d] + [
            f"target {k}" for k in ("boxes", "labels") if k not in t
        ]
        if missing:
            raise InvalidArgumentError(f"image {i}: no {', '.join(missing)}")


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().double().cpu().reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def coco_ap(detections: Sequence[dict], targets: Sequence[dict]) -> dict[str, float]:
    """{"ap", "ap50", "ap75"} (0-1) of `detections` on `targets`, one dict each per image. Categories are
    the labels found in the targets; an image without boxes counts (its detections are false positives)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise InvalidArgumentError(
            "COCO AP needs pycocotools: pip install pycocotools (or leanvision's 'detection' extra)"
        ) from err
    _check(detections, targets)
    categories = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    if not categories:
        raise InvalidArgumentError("COCO AP needs at least one ground-truth box")
    annotations, results = [], []
    for image, (d, t) in enumerate(zip(detections, targets)):
        for box, label in zip(_xywh(t["boxes"]), t["labels"].tolist()):
            annotations.append(dict(id=len(annotations) + 1, image_id=image, category_id=int(label), bbox=box,
                                    area=box[2] * box[3], iscrowd=0))  # fmt: skip
        for box, label, score in zip(_xywh(d["boxes"]), d["labels"].tolist(), d["scores"].tolist()):
            results.append(dict(image_id=image, category_id=int(label), bbox=box, score=float(score)))
    if not results:
        return dict(ap=0.0, ap50=0.0, ap75=0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        truth = COCO()
        truth.dataset = dict(images=[{"id": i} for i in range(len(targets))], annotations=annotations,
                             categories=[{"id": c} for c in categories])  # fmt: skip
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in evaluation.stats[:3])  # -1: no boxes of that kind
    return dict(ap=ap, ap50=ap50, ap75=ap75)
