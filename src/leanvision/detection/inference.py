"""Face detectors on images of any size: each image is resized to the detector's evaluation area, detected
in eval mode, and its boxes mapped back to the image's pixels; optionally with S3FD's test-time protocol
(a flipped pass, a shrunk and enlarged passes, merged by box voting).

A detector is any module that takes a [B, C, H, W] batch of 0-1 images in eval mode and returns one dict
per image {boxes [N, 4] x1, y1, x2, y2 pixels of its input, scores [N], labels [N]}, as RNNPoolFace does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, clip_boxes_to_image

from leanvision.errors import InvalidArgumentError

Detections = list[dict[str, torch.Tensor]]

VGA_AREA = (480, 640)  # (H, W): RNNPool Table 4's 640x480
QVGA_AREA = (240, 320)  # EdgeML's config_qvga, the SCUT-HEAD models
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # EdgeML's grayscale (ITU-R BT.601)
# S3FD's multi-scale test (notes 1.7): a pass at half the single pass's scale keeps only faces larger than
# BIG_FACE px, enlarged passes keep only faces smaller than SMALL_FACE px, both measured at the single
# pass's scale; box voting keeps the VOTE_TOP_K best merged boxes.
SHRINK_FACTOR = 0.5
ENLARGE_FACTORS = (1.5, 2.0)
BIG_FACE, SMALL_FACE = 30.0, 100.0
VOTE_TOP_K = 750


def eval_area(model: nn.Module) -> tuple[int, int]:
    """The (H, W) area `model` is evaluated at: QVGA (240, 320) for a grayscale detector (`in_chans == 1`:
    EdgeML's QVGA-config models, rnnpool_face_qvga_mono and _m4, are exactly its grayscale ones), else
    VGA (480, 640)."""
    return QVGA_AREA if getattr(model, "in_chans", 3) == 1 else VGA_AREA


def base_scale(height: int, width: int, area: tuple[int, int]) -> float:
    """The single pass's scale of an (H, W) image: min(1, sqrt(area / (H * W))), as EdgeML's test scripts;
    an image smaller than the area keeps its size (no upscaling)."""
    return min(1.0, math.sqrt(area[0] * area[1] / (height * width)))


def box_vote(
    boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float = 0.3, top_k: int = VOTE_TOP_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """S3FD's / SSH's box voting: repeatedly take the best remaining box and all remaining boxes
    overlapping it by IoU >= `iou_thresh`; they merge into their score-weighted mean box, scored with
    their max score. Returns the `top_k` merged boxes [K, 4] and scores [K], best first.

    Unlike S3FD's code, a group of one box is kept (S3FD's bbox_vote drops it unless it is the last).
    """
    order = scores.argsort(descending=True, stable=True)
    boxes, scores = boxes[order], scores[order]
    on_cpu = boxes.cpu()  # the greedy grouping is sequential: on the CPU, one IoU row per group
    group = torch.empty(len(boxes), dtype=torch.int64)
    free = torch.ones(len(boxes), dtype=torch.bool)
    leaders = []
    while len(leaders) < top_k and bool(free.any()):
        best = int(free.to(torch.uint8).argmax())  # the first free box: the best remaining
        members = free[best:] & (box_iou(on_cpu[best, None], on_cpu[best:])[0] >= iou_thresh)
        members[0] = True  # the leader itself, whatever iou_thresh
        group[best:][members] = len(leaders)
        free[best:] &= ~members
        leaders.append(best)
    taken = (~free).to(boxes.device)
    group = group.to(boxes.device)[taken]
    weights = scores[taken]
    sums = boxes.new_zeros(len(leaders), 4).index_add_(0, group, boxes[taken] * weights[:, None])
    totals = scores.new_zeros(len(leaders)).index_add_(0, group, weights)
    return sums / totals[:, None], scores[leaders]


@contextmanager
def _score_thresh(model: nn.Module, value: float | None) -> Iterator[None]:
    """`model.score_thresh` set to `value` (None: unchanged) inside the block, restored after it."""
    if value is None:
        yield
        return
    if not hasattr(model, "score_thresh"):
        raise InvalidArgumentError(f"{type(model).__name__} has no score_thresh to set to {value}")
    saved, model.score_thresh = model.score_thresh, value
    try:
        yield
    finally:
        model.score_thresh = saved


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB image as gray (0.299 R + 0.587 G + 0.114 B) for a 1-channel detector; a gray image
    replicated to 3 channels for an RGB one."""
    if image.shape[0] == channels:
        return image
    if channels == 1:
        return (image * image.new_tensor(GRAY_WEIGHTS).view(3, 1, 1)).sum(0, keepdim=True)
    return image.expand(3, -1, -1)


def _check_images(images: Sequence[torch.Tensor]) -> None:
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
            got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidArgumentError(f"image {i}: expected a [C, H, W] tensor with C = 1 or 3, got {got}")
        if not image.is_floating_point():
            raise InvalidArgumentError(f"image {i}: expected 0-1 float pixels, got {image.dtype}")


@torch.no_grad()
def detect_images(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    area: tuple[int, int] | None = None,
    multiscale: bool = False,
    flip: bool = False,
    vote_thresh: float = 0.3,
    score_thresh: float | None = None,
    max_side: int = 1280,
    batch_size: int = 16,
) -> Detections:
    """Detections of `model` on [C, H, W] 0-1 images of any sizes, in each image's own pixels: one dict
    {boxes [N, 4] xyxy float32, clipped to the image, scores [N], labels [N] (ones)} per image, best first.

    Each image is resized (bilinear, antialiased), keeping its aspect ratio, to the `area` (H, W)
    (default: `eval_area(model)`) by `base_scale`, never upscaled; images of equal resized size run
    together, `batch_size` at a time, in eval mode (the model's mode is restored after). RGB images are
    made gray (0.299 R + 0.587 G + 0.114 B) for a 1-channel detector; gray ones replicated for an RGB one.
    `score_thresh` replaces the model's own threshold for this call.

    `flip` adds a pass on the horizontally flipped image; `multiscale` adds S3FD's passes at 0.5x (keeping
    faces > 30 px) and 1.5x and 2x the single pass's scale (keeping faces < 100 px; both sizes measured at
    the single pass's scale), the enlargements capped so that no input side exceeds `max_side`. With
    either, all passes are merged by `box_vote` at IoU `vote_thresh`.
    """
    _check_images(images)
    area = area or eval_area(model)
    scales = [base_scale(im.shape[1], im.shape[2], area) for im in images]
    jobs = defaultdict(list)  # (input height, input width, flipped) -> [(image index, factor)]
    for i, (image, scale) in enumerate(zip(images, scales)):
        height, width = image.shape[1:]
        for factor, flipped in _passes(multiscale, flip, scale * max(height, width), max_side):
            size = (max(1, round(height * scale * factor)), max(1, round(width * scale * factor)))
            jobs[(*size, flipped)].append((i, factor))
    found: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in images]
    was_training = model.training
    model.eval()
    try:
        with _score_thresh(model, score_thresh):
            for (height, width, flipped), members in jobs.items():
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    batch = [images[i] for i, _ in chunk]
                    for (i, factor), (boxes, scores) in zip(
                        chunk, _detect_batch(model, batch, (height, width), flipped)
                    ):
                        keep = _keep(boxes, factor, scales[i])
                        found[i].append((boxes[keep], scores[keep]))
    finally:
        model.train(was_training)
    results = []
    for image, passes in zip(images, found):
        boxes, scores = (torch.cat(parts) for parts in zip(*passes))
        if len(passes) > 1:
            boxes, scores = box_vote(boxes, scores, vote_thresh)
        boxes = clip_boxes_to_image(boxes, tuple(image.shape[1:]))
        labels = torch.ones(len(boxes), dtype=torch.int64, device=boxes.device)
        results.append({"boxes": boxes, "scores": scores, "labels": labels})
    return results


def _passes(multiscale: bool, flip: bool, longest: float, max_side: int) -> list[tuple[float, bool]]:
    """(factor of the single pass's scale, flipped) of each pass over an image whose single pass has its
    longest side `longest` px; enlargements are capped so that no input side exceeds `max_side`."""
    passes = [(1.0, False)] + [(1.0, True)] * flip
    if multiscale:
        cap = max_side / longest
        passes.append((SHRINK_FACTOR, False))
        passes += [(f, False) for f in sorted({min(f, cap) for f in ENLARGE_FACTORS}) if f > 1]
    return passes


def _keep(boxes: torch.Tensor, factor: float, scale: float) -> torch.Tensor:
    """Which boxes (original pixels) of a pass at `factor` times the single pass's `scale` are trusted:
    those larger than BIG_FACE from a shrunk pass, smaller than SMALL_FACE from an enlarged one."""
    sides = (boxes[:, 2:] - boxes[:, :2]) * scale
    if factor < 1:
        return sides.amax(1) > BIG_FACE
    if factor > 1:
        return sides.amin(1) < SMALL_FACE
    return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)


def _detect_batch(
    model: nn.Module, images: list[torch.Tensor], size: tuple[int, int], flipped: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(boxes in each image's own pixels, scores) of `model` on `images` resized to `size` (H, W) with the
    model's channels, flipped horizontally if `flipped`."""
    device = next(model.parameters(), torch.empty(0)).device
    channels = getattr(model, "in_chans", 3)
    batch = torch.stack([_resize(to_channels(image.to(device), channels), size) for image in images])
    height, width = size
    results = []
    for image, out in zip(images, model(batch.flip(-1) if flipped else batch)):
        boxes = out["boxes"].float()
        if flipped:
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        scale = boxes.new_tensor([image.shape[2] / width, image.shape[1] / height] * 2)
        results.append((boxes * scale, out["scores"].float()))
    return results


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[1:]) == size:
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
