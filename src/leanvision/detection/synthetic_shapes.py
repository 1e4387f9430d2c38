"""`synthetic:shapes-boxes`: generated 320x240 RGB scenes of filled circles, squares and triangles with
exact boxes and class labels, so that multi-class object detection trains, evaluates and is tested
offline.

Each image holds 1-6 shapes of random colour, width log-uniform in 16-120 px (the box is the shape's
bounding box; squares and circles are square, triangles 0.8-1.2x as tall as wide), placed (almost)
without overlapping, on synthetic_faces' gradient background with its noise, and 0-3 thin rectangular
outlines as distractors. Labels are 1-3 in CLASSES' order (0 is the background, as torchvision's
detectors count it). Each image is a function of (seed, split, index) only.
"""

from __future__ import annotations

import numpy as np

from leanvision.detection.synthetic_faces import HEIGHT, WIDTH, add_noise, background, ellipse, place, region

CLASSES = ("circle", "square", "triangle")
MAX_SHAPES = 6
SPLIT_STREAMS = {"train": 2, "val": 3}  # apart from synthetic:faces' streams
ASPECTS = {"circle": (1.0, 1.0), "square": (1.0, 1.0), "triangle": (0.8, 1.2)}
WIDTHS = (16.0, 120.0)


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image `index` of `split`: uint8 RGB pixels [H, W, 3], boxes [M, 4] float32 x1, y1, x2, y2 (pixel
    edges) and labels [M] int64 (1 = circle, 2 = square, 3 = triangle)."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
    image = background(rng)
    for _ in range(rng.integers(0, 4)):
        _outline(image, rng)
    boxes, labels = [], []
    for _ in range(rng.integers(1, MAX_SHAPES + 1)):
        label = int(rng.integers(len(CLASSES)))
        box = place(rng, boxes, ASPECTS[CLASSES[label]], WIDTHS)
        if box is not None:
            _shape(image, box, CLASSES[label], rng.uniform(0, 255, 3))
            boxes.append(box)
            labels.append(label + 1)
    boxes_array = np.asarray(boxes, np.float32).reshape(-1, 4)
    return add_noise(image, rng), boxes_array, np.asarray(labels, np.int64)


def _shape(image: np.ndarray, box: list[float], kind: str, colour: np.ndarray) -> None:
    if kind == "circle":
        ellipse(image, box, colour)
        return
    pixels, u, v = region(image, box)
    if kind == "square":
        pixels[:] = colour
    else:  # apex at the top centre, base along the bottom edge: |u| <= (v + 1) / 2
        pixels[np.abs(u) <= (v + 1) / 2] = colour


def _outline(image: np.ndarray, rng: np.random.Generator) -> None:
    """A 2-px rectangular frame of random size and colour: edges without an object inside."""
    width, height = rng.uniform(20, 160), rng.uniform(20, 120)
    x1, y1 = rng.uniform(0, WIDTH - width), rng.uniform(0, HEIGHT - height)
    x1, y1, x2, y2 = (int(round(v)) for v in (x1, y1, x1 + width, y1 + height))
    colour = rng.uniform(0, 255, 3)
    image[y1:y2, x1 : x1 + 2] = image[y1:y2, x2 - 2 : x2] = colour
    image[y1 : y1 + 2, x1:x2] = image[y2 - 2 : y2, x1:x2] = colour
