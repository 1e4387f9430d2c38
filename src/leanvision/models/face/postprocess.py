"""Detections from the heads' raw outputs: softmax, decode, confidence threshold, top-k, NMS (EdgeML's
`detect_function`, on torchvision's batched NMS and over the whole batch at once)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from leanvision.models.face.priors import VARIANCES, decode


def detect(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    image_size: tuple[int, int],
    score_thresh: float,
    nms_thresh: float = 0.3,
    pre_nms_top_k: int = 5000,
    post_nms_top_k: int = 750,
    variances: Sequence[float] = VARIANCES,
) -> list[dict[str, torch.Tensor]]:
    """One dict per image: boxes [N, 4] (x1, y1, x2, y2 pixels of an (H, W) image), scores [N], labels [N]
    (1, face), by decreasing score.

    As EdgeML: faces scoring above `score_thresh` (softmax), the `pre_nms_top_k` best of them, NMS at IoU
    `nms_thresh`, at most `post_nms_top_k` kept. Boxes are not clipped to the image. The threshold comes
    first, so only the candidates are ranked and decoded (EdgeML decodes every prior).
    """
    height, width = image_size
    scores = torch.sigmoid(conf[..., 1] - conf[..., 0])  # the face's softmax probability of two logits
    image, prior = (scores > score_thresh).nonzero(as_tuple=True)  # by image, then prior
    scores = scores[image, prior]
    counts = torch.bincount(image, minlength=len(loc)).tolist()
    if max(counts, default=0) > pre_nms_top_k:  # an image keeps its pre_nms_top_k best candidates
        parts = torch.arange(len(image), device=loc.device).split(counts)  # nonzero is by image
        best = torch.cat([part[scores[part].topk(min(pre_nms_top_k, len(part))).indices] for part in parts])
        image, prior, scores = image[best], prior[best], scores[best]
    scale = loc.new_tensor([width, height, width, height])
    boxes = decode(loc[image, prior], priors[prior], variances) * scale  # the candidates' boxes only
    kept = batched_nms(boxes, scores, image, nms_thresh)  # by decreasing score
    detections = []
    for i in range(len(loc)):
        mine = kept[image[kept] == i][:post_nms_top_k]
        labels = torch.ones(len(mine), dtype=torch.int64, device=loc.device)
        detections.append({"boxes": boxes[mine], "scores": scores[mine], "labels": labels})
    return detections
