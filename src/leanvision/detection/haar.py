"""The classical baseline: OpenCV's Viola-Jones Haar cascade, called like the detectors (a list of images
in, one detection dict per image out)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanvision.errors import InvalidArgumentError, MissingFileError


def import_cv2() -> Any:
    """The cv2 module, or a clear error naming the extra that installs it."""
    try:
        import cv2
    except ImportError as err:
        raise InvalidArgumentError(
            "the Haar baseline needs OpenCV, an optional dependency that is not installed: "
            "pip install 'leanvision[detection]'"
        ) from err
    return cv2


class HaarCascade:
    """OpenCV's `CascadeClassifier.detectMultiScale3` on the gray image (RGB images are converted by
    OpenCV, 0.299 R + 0.587 G + 0.114 B of the 0-255 pixels).

    `cascade`: a file of OpenCV's `cv2.data.haarcascades` or the path of a cascade XML. Scores are the
    cascade's level weights (outputRejectLevels=True): a ranking for AP, not a probability (they may be
    negative). Returns one dict per image {boxes [N, 4] xyxy float32 pixels, scores [N] float32,
    labels [N] ones}, best first.
    """

    def __init__(
        self,
        cascade: str = "haarcascade_frontalface_default.xml",
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 20,
    ) -> None:
        cv2 = import_cv2()
        path = Path(cascade) if Path(cascade).is_file() else Path(cv2.data.haarcascades) / cascade
        if not path.is_file():
            raise MissingFileError(
                f"Haar cascade {cascade!r} is neither a file nor one of OpenCV's cascades "
                f"({cv2.data.haarcascades})"
            )
        self.classifier = cv2.CascadeClassifier(str(path))
        if self.classifier.empty():
            raise InvalidArgumentError(f"{path} is not a cascade OpenCV can load")
        self.cv2 = cv2
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.detect(image) for image in images]

    def detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections of one [C, H, W] 0-1 image (C = 1 or 3)."""
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise InvalidArgumentError(
                f"HaarCascade takes [C, H, W] images with C = 1 or 3, got {list(image.shape)}"
            )
        pixels = (image.detach().cpu().float() * 255).round().clamp(0, 255).to(torch.uint8)
        gray = pixels[0].numpy()
        if image.shape[0] == 3:
            gray = self.cv2.cvtColor(
                np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()), self.cv2.COLOR_RGB2GRAY
            )
        found, _, weights = self.classifier.detectMultiScale3(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        boxes = torch.as_tensor(np.asarray(found, dtype=np.float32).reshape(-1, 4))
        boxes[:, 2:] += boxes[:, :2]
        scores = torch.as_tensor(np.asarray(weights, dtype=np.float32).reshape(-1))
        order = scores.argsort(descending=True, stable=True)
        return {
            "boxes": boxes[order],
            "scores": scores[order],
            "labels": torch.ones(len(boxes), dtype=torch.int64),
        }
