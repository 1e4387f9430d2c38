"""The WIDER FACE evaluation protocol (the official eval_tools, as its Python port
wondervictor/WiderFace-Evaluation computes it), written once and vectorised within each image.

- Scores are min-max normalised over all predictions of all images (all equal: all become 1).
- Per image, predictions by descending score; each takes its best-IoU face (IoU with the official
  pixel-inclusive areas, (x2 - x1 + 1)(y2 - y1 + 1)). At IoU >= 0.5 with a face outside the subset the
  prediction is ignored (neither a true nor a false positive); with a subset face not yet found, that face
  is found; otherwise (no face, or a face already found) it stays a proposal that found nothing (a false
  positive).
- At each of 1000 thresholds t = 1 - (k + 1) / 1000: precision = faces found / proposals kept, recall =
  faces found / subset faces, both summed over images; AP is VOC's all-point AP of that curve.
- As the official code: an image with faces but no predictions adds its subset faces as misses; the
  predictions of an image without any face are not counted (no false positives there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_iou

from leanvision.errors import InvalidArgumentError

SIZE_BUCKETS = {"easy": 64, "medium": 32, "hard": 16}  # min(face width, height) in pixels


def _check(predictions: Mapping, ground_truth: Mapping, subsets: Mapping) -> None:
    for image_id, pred in predictions.items():
        if image_id not in ground_truth:
            raise InvalidArgumentError(f"predictions for image {image_id!r}, which has no ground truth")
        if pred.ndim != 2 or pred.shape[1] != 5:
            raise InvalidArgumentError(
                f"predictions of {image_id!r} must be [N, 5] (x1, y1, x2, y2, score), got {list(pred.shape)}"
            )
    for image_id, boxes in ground_truth.items():
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InvalidArgumentError(
                f"ground truth of {image_id!r} must be [M, 4] xyxy, got {list(boxes.shape)}"
            )
    for name, masks in subsets.items():
        for image_id, boxes in ground_truth.items():
            mask = masks.get(image_id)
            if mask is None or mask.shape != (len(boxes),) or mask.dtype != torch.bool:
                got = "nothing" if mask is None else f"{mask.dtype} {list(mask.shape)}"
                raise InvalidArgumentError(
                    f"subset {name!r} needs a [{len(boxes)}] bool mask for image {image_id!r}, got {got}"
                )


def _image_curve(
    pred: torch.Tensor, faces: torch.Tensor, keep: torch.Tensor, thresholds: torch.Tensor, iou: float
):
    """(proposals, faces found) [T] of one image at each threshold; `pred` sorted by descending score."""
    one = pred.new_tensor([0, 0, 1, 1])
    overlap, best = box_iou(pred[:, :4] + one, faces + one).max(1)
    hit = overlap >= iou
    ignored = hit & ~keep[best]
    finds = hit & keep[best]
    first = torch.full((len(faces),), len(pred), dtype=torch.long)  # the first prediction finding each face
    order = torch.arange(len(pred))
    first.scatter_reduce_(0, best[finds], order[finds], "amin")
    found = torch.cumsum(finds & (first[best] == order), 0)
    proposals = torch.cumsum(~ignored, 0)
    # predictions with score >= t: a prefix of the sorted list
    count = torch.searchsorted(-pred[:, 4].contiguous(), -thresholds, right=True)
    last = (count - 1).clamp(min=0)
    return torch.where(count > 0, proposals[last], 0), torch.where(count > 0, found[last], 0)


def _voc_ap(recall: torch.Tensor, precision: torch.Tensor) -> float:
    mrec = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    mpre = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])  # the monotone envelope
    step = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
    return float(((mrec[step + 1] - mrec[step]) * mpre[step + 1]).sum())


def wider_ap(
    predictions: Mapping[str, torch.Tensor],
    ground_truth: Mapping[str, torch.Tensor],
    subsets: Mapping[str, Mapping[str, torch.Tensor]],
    iou_thresh: float = 0.5,
    thresholds: int = 1000,
) -> dict[str, float]:
    """AP per subset. predictions {image id: [N, 5] x1, y1, x2, y2, score}, ground_truth {image id: [M, 4]
    xyxy}, subsets {name: {image id: [M] bool, True for the faces in that subset}}. A subset without faces
    has AP 0."""
    _check(predictions, ground_truth, subsets)
    preds = {k: v.detach().double().cpu() for k, v in predictions.items() if len(v)}
    if preds:
        scores = torch.cat([p[:, 4] for p in preds.values()])
        low, span = scores.min(), scores.max() - scores.min()
        for k, p in preds.items():
            p = p.clone()
            p[:, 4] = (p[:, 4] - low) / span if span > 0 else 1.0
            preds[k] = p[p[:, 4].argsort(descending=True, stable=True)]
    levels = 1 - (torch.arange(thresholds, dtype=torch.float64) + 1) / thresholds
    result = {}
    for name, masks in subsets.items():
        proposals = torch.zeros(thresholds, dtype=torch.float64)
        found = torch.zeros(thresholds, dtype=torch.float64)
        faces = 0
        for image_id, boxes in ground_truth.items():
            keep = masks[image_id].cpu()
            faces += int(keep.sum())
            if len(boxes) == 0 or image_id not in preds:
                continue
            p, f = _image_curve(preds[image_id], boxes.detach().double().cpu(), keep, levels, iou_thresh)
            proposals += p
            found += f
        if faces == 0:
            result[name] = 0.0
            continue
        precision = torch.where(proposals > 0, found / proposals.clamp(min=1), 0.0)
        result[name] = _voc_ap(found / faces, precision)
    return result


def size_subsets(
    ground_truth: Mapping[str, torch.Tensor], min_sizes: Mapping[str, float] = SIZE_BUCKETS
) -> dict[str, dict[str, torch.Tensor]]:
    """Subsets by face size: a face is in subset NAME when min(width, height) >= min_sizes[NAME] pixels."""
    return {
        name: {
            k: torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= size for k, b in ground_truth.items()
        }
        for name, size in min_sizes.items()
    }


def few_faces_subsets(
    subsets: Mapping[str, Mapping[str, torch.Tensor]],
    ground_truth: Mapping[str, torch.Tensor],
    max_faces: int = 3,
) -> dict[str, dict[str, torch.Tensor]]:
    """ "NAME (<= 3 faces)": subset NAME on the images holding at most `max_faces` of its faces; on the other
    images every face is ignored (the RNNPool paper's "MAP for <= 3 faces" columns; it gives no code, so this
    is our reading: the images a low-power camera in a room would see)."""
    return {
        f"{name} (<= {max_faces} faces)": {
            k: mask if int(mask.sum()) <= max_faces else torch.zeros_like(mask) for k, mask in masks.items()
        }
        for name, masks in subsets.items()
    }


def subsets_from_targets(
    targets: Sequence[Mapping],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(ground_truth, subsets) of validation targets, each with "image_id", "boxes" and "subsets" masks."""
    ground_truth = {t["image_id"]: t["boxes"].cpu() for t in targets}
    if len(ground_truth) != len(targets):
        raise InvalidArgumentError("validation targets repeat an image_id")
    names = list(targets[0]["subsets"]) if targets else []
    subsets = {name: {t["image_id"]: t["subsets"][name].cpu() for t in targets} for name in names}
    return ground_truth, subsets
