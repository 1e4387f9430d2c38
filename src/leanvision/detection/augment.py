"""Detection training augmentation on transforms.v2 with boxes: S3FD's for the face detectors, SSD's for
torchvision-style object detectors.

`S3FDAugment` (EdgeML's VGA `preprocess`, notes 1.5): photometric distortion (p = 0.5 per op) ->
data-anchor-sampling (p = 0.5) or SSD's IoU crop -> square resize -> horizontal flip (p = 0.5) -> faces
whose centre left the crop, or smaller than `min_size` px, dropped -> grayscale (inference.to_channels)
for a 1-channel detector. Deviations from EdgeML: one resize interpolation (bilinear, antialiased)
instead of a random one of PIL's five; the crop's padding is the image's mean colour, not the dataset's;
the QVGA models train on the same pipeline at 320 px (EdgeML's `preprocess_qvga` pads to square and
shrinks images whose largest face exceeds 48 px).

`SSDAugment` (torchvision's detection references' "ssdlite" policy, which trains its SSDLite): SSD's IoU
crop -> square resize -> horizontal flip -> boxes under 1 px dropped; `zoom_out` adds the "ssd" policy's
photometric distortion and zoom out (p = 0.5, up to 4x, ImageNet-mean padding) before the crop.
"""

from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from leanvision.detection.inference import to_channels

VGA_ANCHORS = (16, 32, 64, 128, 256, 512)  # S3FD's anchor sizes (px), EdgeML's VGA config
ANCHOR_SAMPLING_P = 0.5
MIN_FACE = 6  # EdgeML's min_face_size (VGA)
IMAGENET_MEAN = (124, 116, 104)  # uint8 RGB


class BoxAugment:
    """One training sample: uint8 RGB [3, H, W], its boxes [M, 4] xyxy pixels and labels [M] -> a float
    0-1 [channels, size, size] crop, its boxes (float32 xyxy in the crop's pixels, possibly none) and their
    labels. Subclasses choose the photometric distortion and the crop (on uint8 images)."""

    def __init__(self, size: int, channels: int, photometric: v2.Transform, min_size: float) -> None:
        self.size, self.channels, self.photometric = size, channels, photometric
        self.iou_crop = v2.RandomIoUCrop(min_scale=0.3)
        self.resize = v2.Resize((size, size), antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.sanitize = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=min_size)])

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[1:])),
            "labels": labels,
        }
        sample = self.photometric(sample)
        if len(boxes):
            sample = self.crop(sample)
        sample = self.sanitize(self.flip(self.resize(sample)))  # uint8 until here: the crop may be large
        image = TF.to_dtype(sample["image"].as_subclass(torch.Tensor), torch.float32, scale=True)
        return (
            to_channels(image, self.channels),
            sample["boxes"].as_subclass(torch.Tensor).float(),
            sample["labels"],
        )

    def crop(self, sample: dict) -> dict:
        return self.iou_crop(sample)


class SSDAugment(BoxAugment):
    """SSD's augmentation (module docstring) for `size` x `size` training images."""

    def __init__(self, size: int, channels: int = 3, zoom_out: bool = False) -> None:
        photometric = v2.RandomPhotometricDistort(p=0.5) if zoom_out else v2.Identity()
        super().__init__(size, channels, photometric, min_size=1)
        fill = {tv_tensors.Image: IMAGENET_MEAN, "others": 0}
        self.zoom_out = (
            v2.RandomZoomOut(fill=fill, side_range=(1.0, 4.0), p=0.5) if zoom_out else v2.Identity()
        )

    def crop(self, sample: dict) -> dict:
        return self.iou_crop(self.zoom_out(sample))


class S3FDAugment(BoxAugment):
    """S3FD's augmentation (module docstring) for `size` x `size` crops. `anchors`: the detector's anchor
    sizes in pixels at its training crop size `anchors_at` (S3FD: 640), which data-anchor-sampling rescales
    faces to (scaled to `size`)."""

    def __init__(
        self,
        size: int,
        channels: int = 3,
        anchors: tuple[float, ...] = VGA_ANCHORS,
        anchors_at: int = 640,
        min_face: int = MIN_FACE,
    ) -> None:
        photometric = v2.RandomPhotometricDistort(
            brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.05, 0.05), p=0.5
        )  # hue +-18 degrees
        super().__init__(size, channels, photometric, min_size=min_face)
        # the detector's anchors are meant for its own training crops (`anchors_at` px): at another crop
        # size the sampled faces keep their share of the crop
        self.anchors = tuple(a * size / anchors_at for a in anchors)

    def crop(self, sample: dict) -> dict:
        if float(torch.rand(())) < ANCHOR_SAMPLING_P:
            return self.anchor_sample(sample)
        return self.iou_crop(sample)

    def anchor_sample(self, sample: dict) -> dict:
        """PyramidBox's data-anchor-sampling: a random face is rescaled to a random anchor size no larger
        than one above its nearest (times 2^U(-1, 1)) and a square crop of the training size around it is
        taken (in the original pixels: a window of size / scale); outside the image it is padded with the
        image's mean colour. Faces whose centre falls outside the crop are dropped."""
        image, boxes = sample["image"], sample["boxes"]
        pixels = image.float()
        face = boxes[int(torch.randint(len(boxes), ()))].tolist()
        side = math.sqrt(max(face[2] - face[0], 1.0) * max(face[3] - face[1], 1.0))
        nearest = min(range(len(self.anchors)), key=lambda i: abs(self.anchors[i] - side))
        anchor = self.anchors[int(torch.randint(min(nearest + 1, len(self.anchors) - 1) + 1, ()))]
        target = anchor * 2.0 ** float(torch.empty(()).uniform_(-1, 1))
        window = max(1, round(self.size * side / target))
        left = _uniform(min(face[0], face[2] - window), max(face[0], face[2] - window))
        top = _uniform(min(face[1], face[3] - window), max(face[1], face[3] - window))
        mean = pixels.mean((1, 2), keepdim=True)
        crop = TF.crop(pixels - mean, top, left, window, window) + mean  # out of the image: mean colour
        out_boxes = TF.crop(boxes, top, left, window, window)
        centres = (out_boxes[:, :2] + out_boxes[:, 2:]) / 2
        outside = ((centres < 0) | (centres >= window)).any(1)
        out_boxes[outside] = 0  # zero-area: the sanitiser drops them with their labels
        return {
            **sample,
            "image": tv_tensors.wrap(crop.round().to(torch.uint8), like=image),
            "boxes": out_boxes,
        }


def _uniform(low: float, high: float) -> int:
    return round(float(torch.empty(()).uniform_(low, high))) if high > low else round(low)
