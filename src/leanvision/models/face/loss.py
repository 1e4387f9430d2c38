"""S3FD's multibox loss (EdgeML's MultiBoxLoss), vectorised over the batch.

Smooth-L1 on the encoded offsets of the positive priors, plus cross-entropy on the positives and the
hardest negatives (3 per positive in each image, ranked by their cross-entropy); both sums divided by
the batch's number of positives. An image without faces has no positives, hence no mined negatives: it
adds nothing to the loss (as in torchvision's SSD loss; EdgeML's `match` does not take such an image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from leanvision.errors import InvalidArgumentError
from leanvision.models.face.matching import THRESHOLDS, match_priors
from leanvision.models.face.priors import VARIANCES, encode


def target_boxes(
    targets: Sequence[dict[str, torch.Tensor]], image_size: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Faces of each image as normalised (x1, y1, x2, y2) [B, M, 4], padded to the batch's most faces
    (at least one), and which rows are real [B, M].

    Each target holds "boxes" [N, 4] in pixels (x1, y1, x2, y2) of an (H, W) image, N >= 0, and
    optionally "labels" [N], all 1 (face). Boxes may reach outside the image; zero-area boxes raise.
    """
    boxes = []
    for i, target in enumerate(targets):
        box = target.get("boxes") if isinstance(target, dict) else None
        if not isinstance(box, torch.Tensor) or box.ndim != 2 or box.shape[1] != 4:
            got = list(box.shape) if isinstance(box, torch.Tensor) else type(box).__name__
            raise InvalidArgumentError(
                f"target {i} needs 'boxes', a [N, 4] tensor (x1, y1, x2, y2); got {got}"
            )
        labels = target.get("labels")
        if labels is not None and (labels.shape != (len(box),) or bool((labels != 1).any())):
            raise InvalidArgumentError(
                f"target {i}: 'labels' must be [N] ones (the detectors have one class, face), got {labels}"
            )
        boxes.append(box.to(device, torch.float32))
    height, width = image_size
    padded = pad_sequence(boxes, batch_first=True)
    if padded.shape[1] == 0:
        padded = padded.new_zeros(len(boxes), 1, 4)
    counts = torch.tensor([len(b) for b in boxes], device=device)
    valid = torch.arange(padded.shape[1], device=device) < counts[:, None]
    degenerate = valid & ((padded[..., 2] <= padded[..., 0]) | (padded[..., 3] <= padded[..., 1]))
    if degenerate.any():
        image, face = degenerate.nonzero()[0].tolist()
        raise InvalidArgumentError(
            f"target {image}, box {face}: {padded[image, face].tolist()} has zero or negative area "
            "(boxes are x1, y1, x2, y2 with x2 > x1 and y2 > y1)"
        )
    return padded / padded.new_tensor([width, height, width, height]), valid


def multibox_loss(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor,
    thresholds: Sequence[float] = THRESHOLDS,
    variances: Sequence[float] = VARIANCES,
    neg_pos_ratio: int = 3,
) -> dict[str, torch.Tensor]:
    """{"loss_box_reg", "loss_classifier"} of head outputs loc [B, P, 4], conf [B, P, 2] with priors
    [P, 4] against faces `boxes` [B, M, 4] / `valid` [B, M] (see `target_boxes`)."""
    with torch.no_grad():
        labels, matched = match_priors(boxes, valid, priors, thresholds)
    positive = labels > 0
    num_priors = len(priors)
    targets = encode(matched[positive], priors.expand_as(loc)[positive], variances)
    loss_box = F.smooth_l1_loss(loc[positive], targets, reduction="sum")

    cross_entropy = F.cross_entropy(conf.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    mining = cross_entropy.detach().masked_fill(positive, 0.0)
    rank = mining.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    num_positive = positive.sum(1, keepdim=True)
    negative = rank < (neg_pos_ratio * num_positive).clamp(max=num_priors - 1)
    loss_cls = cross_entropy[positive | negative].sum()
    total = num_positive.sum().clamp(min=1)
    return {"loss_box_reg": loss_box / total, "loss_classifier": loss_cls / total}
