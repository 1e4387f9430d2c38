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
    `nms_thresh`, at most `post_nms_top_k` kept. Boxes are not clipped to the image.
    """
    batch, num_priors = conf.shape[:2]
    height, width = image_size
    scores = conf.softmax(-1)[..., 1]
    scale = loc.new_tensor([width, height, width, height])
    boxes = decode(loc, priors, variances) * scale
    scores, order = scores.topk(min(pre_nms_top_k, num_priors), dim=1)  # sorted, best first
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    keep = scores > score_thresh
    image = torch.arange(batch, device=loc.device)[:, None].expand_as(keep)[keep]
    boxes, scores = boxes[keep], scores[keep]
    kept = batched_nms(boxes, scores, image, nms_thresh)  # by decreasing score
    detections = []
    for i in range(batch):
        mine = kept[image[kept] == i][:post_nms_top_k]
        labels = torch.ones(len(mine), dtype=torch.int64, device=loc.device)
        detections.append({"boxes": boxes[mine], "scores": scores[mine], "labels": labels})
    return detections
