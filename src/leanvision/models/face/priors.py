"""S3FD prior (anchor) boxes and SSD's box encoding with variances, as EdgeML's RNNPool face detectors.

Priors are normalised (cx, cy, w, h): one square anchor per location of each source map, rows in
row-major order and maps in the order of the heads' outputs. Boxes elsewhere are (x1, y1, x2, y2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_convert

VARIANCES = (0.1, 0.2)  # centre offsets in units of 0.1 x the prior size, log-sizes in units of 0.2


# the priors made so far, by (map sizes, image size, steps, anchor sizes, device): (priors, their version)
_MADE: dict[tuple, tuple[torch.Tensor, int]] = {}
_MADE_MAX = 16


def prior_boxes(
    feature_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    steps: Sequence[int],
    anchor_sizes: Sequence[int],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Priors [P, 4] (normalised cx, cy, w, h) of source maps of `feature_sizes` for an image (H, W).

    Location (i, j) of a map with stride `step` is centred at ((j + 0.5) step / W, (i + 0.5) step / H);
    its anchor is `anchor_size` pixels square. The map sizes are those the heads produced (not a fixed
    table), so any input size works; priors are not clipped to the image (EdgeML's CLIP=False). Made once
    per sizes and device (a detector asks for the same ones at every call) and handed out without a copy
    (400 KiB at 640x480, RAM that streaming inference counts): a caller that changes them in place gets
    them made again at the next call.
    """
    if torch.compiler.is_compiling():  # traced into the graph, not cached
        return _make_priors(feature_sizes, image_size, steps, anchor_sizes, device)
    key = tuple(map(tuple, feature_sizes)), tuple(image_size), tuple(steps), tuple(anchor_sizes)
    key += (torch.device(device or "cpu"),)
    made = _MADE.get(key)
    if made is None or made[0]._version != made[1]:  # new, or changed in place since it was made
        if len(_MADE) >= _MADE_MAX:
            del _MADE[next(iter(_MADE))]  # the oldest
        priors = _make_priors(*key)
        _MADE[key] = made = priors, priors._version
    return made[0]


def _make_priors(
    feature_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    steps: Sequence[int],
    anchor_sizes: Sequence[int],
    device: torch.device | None,
) -> torch.Tensor:
    height, width = image_size
    parts = []
    for (rows, cols), step, size in zip(feature_sizes, steps, anchor_sizes, strict=True):
        cy = (torch.arange(rows, dtype=torch.float64, device=device) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64, device=device) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        wh = torch.tensor([size / width, size / height], dtype=torch.float64, device=device)
        parts.append(torch.cat([cx.reshape(-1, 1), cy.reshape(-1, 1), wh.expand(rows * cols, 2)], 1))
    return torch.cat(parts).float()


def encode(boxes: torch.Tensor, priors: torch.Tensor, variances: Sequence[float] = VARIANCES) -> torch.Tensor:
    """Regression targets [..., 4] of boxes (x1, y1, x2, y2) against their priors (cx, cy, w, h)."""
    cxcywh = box_convert(boxes, "xyxy", "cxcywh")
    offsets = (cxcywh[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    scales = torch.log(cxcywh[..., 2:] / priors[..., 2:]) / variances[1]
    return torch.cat([offsets, scales], -1)


def decode(loc: torch.Tensor, priors: torch.Tensor, variances: Sequence[float] = VARIANCES) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) [..., 4] from regression outputs and their priors: `encode`'s inverse."""
    centres = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return box_convert(torch.cat([centres, sizes], -1), "cxcywh", "xyxy")
