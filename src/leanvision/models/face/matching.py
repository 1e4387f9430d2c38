"""S3FD's scale-compensation anchor matching (Zhang et al. 2017, Section 3.2; EdgeML's `match`),
vectorised over a batch whose faces are padded to one count.

Stage 1: each prior takes its best face (by IoU) and is positive when that IoU >= 0.35; each face's best
prior is forced to it whatever the IoU (a prior that is the best of several faces goes to the last).
Stage 2, for faces that stage 1 matches poorly: with N = (#faces whose best IoU >= 0.35 + #faces whose
best IoU >= 0.5) // 2 per image, the N priors of highest IoU in (0.1, 0.35) become positive too (EdgeML's
rule; the S3FD paper uses the mean number of priors matched per face instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_convert, box_iou

THRESHOLDS = (0.1, 0.35, 0.5)  # stage-2 floor, positive IoU, "well matched" for stage 2's count


def match_priors(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    priors: torch.Tensor,
    thresholds: Sequence[float] = THRESHOLDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [B, P] (1 face, 0 background) and matched face boxes [B, P, 4] of every prior.

    boxes [B, M, 4]: normalised (x1, y1, x2, y2) faces, padded; valid [B, M]: which are real (M >= 1);
    priors [P, 4]: normalised (cx, cy, w, h). The matched box of a background prior is its best face.
    """
    low, positive, high = thresholds
    batch, faces = valid.shape
    num_priors = len(priors)
    iou = box_iou(boxes.reshape(-1, 4), box_convert(priors, "cxcywh", "xyxy")).view(batch, faces, -1)
    iou = iou.masked_fill(~valid[..., None], -1.0)
    best_prior_iou, best_prior = iou.max(2)  # [B, M]
    best_face_iou, best_face = iou.max(1)  # [B, P]
    face_ids = torch.arange(faces, device=boxes.device).expand(batch, faces).masked_fill(~valid, -1)
    forced = torch.full_like(best_face, -1).scatter_reduce(1, best_prior, face_ids, "amax")
    best_face = torch.where(forced >= 0, forced, best_face)
    best_face_iou = best_face_iou.masked_fill(forced >= 0, 2.0)
    labels = best_face_iou >= positive

    well_matched = (best_prior_iou >= positive) & valid
    extra = (well_matched.sum(1) + ((best_prior_iou >= high) & valid).sum(1)) // 2  # [B]
    candidates = torch.where((best_face_iou > low) & (best_face_iou < positive), best_face_iou, 0.0)
    ranked_iou, order = candidates.sort(dim=1, descending=True, stable=True)
    rank = torch.arange(num_priors, device=boxes.device)
    chosen = (rank < extra[:, None]) & (ranked_iou > low)
    labels = labels | torch.zeros_like(labels).scatter(1, order, chosen)

    matched = boxes.gather(1, best_face[..., None].expand(-1, -1, 4))
    return labels.long(), matched
