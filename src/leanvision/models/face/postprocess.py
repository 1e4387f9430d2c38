"""Detections from the heads' raw outputs: softmax, decode, confidence threshold, top-k, NMS (EdgeML's
`detect_function`, on torchvision's NMS, image by image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import nms

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
    scale = loc.new_tensor([width, height, width, height])
    detections = []
    for image_loc, image_conf in zip(loc, conf):  # image by image: the candidates' indices are 1-D
        scores = torch.sigmoid(image_conf[:, 1] - image_conf[:, 0])  # the face's softmax probability
        prior = (scores > score_thresh).nonzero(as_tuple=True)[0]
        scores = scores[prior]
        if len(prior) > pre_nms_top_k:
            best = scores.topk(pre_nms_top_k).indices
            prior, scores = prior[best], scores[best]
        boxes = decode(image_loc[prior], priors[prior], variances) * scale  # the candidates' boxes only
        kept = nms(boxes, scores, nms_thresh)[:post_nms_top_k]  # by decreasing score
        labels = torch.ones(len(kept), dtype=torch.int64, device=loc.device)
        detections.append({"boxes": boxes[kept], "scores": scores[kept], "labels": labels})
    return detections
