"""The probe datasets of the RNNPool paper (Appendix C.1, Figure 4 left), generated from a seed.

Images are 8-bit monochrome with uniform background noise (0..63) and strokes of value 255:
- `lines`: one line segment of random length and position at one of 9 orientations 0, 20, ..., 160
  degrees; the orientation is the class (multi-class, 9 classes);
- `multilines`: 1 to 3 segments of distinct orientations; one label per orientation (multi-label, 9);
- `shapes`: a non-empty subset of {circle, triangle, square, pentagon, hexagon} drawn as outlines at
  random positions, sizes and rotations, not overlapping (multi-label, 5).

Sample i of a split depends only on (seed, split, i), so a dataset of n images is the first n of any
larger one.
"""

from __future__ import annotations

import numpy as np

from leanvision.errors import DataError

ORIENTATIONS = tuple(range(0, 180, 20))
SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon")
SYNTHETIC = {"lines": ORIENTATIONS, "multilines": ORIENTATIONS, "shapes": SHAPES}
MULTILABEL = {"lines": False, "multilines": True, "shapes": True}
NOISE_LEVELS = 64
SPLITS = ("train", "val")


def _stroke(image: np.ndarray, points: np.ndarray) -> None:
    """Set the pixels under a polyline [K, 2] of (x, y) points to 255, sampled every half pixel."""
    length = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    t = np.linspace(0.0, length[-1], int(2 * length[-1]) + 2)
    xs = np.rint(np.interp(t, length, points[:, 0])).astype(int)
    ys = np.rint(np.interp(t, length, points[:, 1])).astype(int)
    keep = (xs >= 0) & (xs < image.shape[1]) & (ys >= 0) & (ys < image.shape[0])
    image[ys[keep], xs[keep]] = 255


def _segment(rng: np.random.Generator, size: int, degrees: float) -> np.ndarray:
    """End points of a segment at `degrees` (image y axis pointing up), of length 30%..90% of the image."""
    theta = np.deg2rad(degrees)
    direction = np.array([np.cos(theta), -np.sin(theta)])
    half = rng.uniform(0.15, 0.45) * (size - 1) * direction
    margin = np.abs(half)
    center = rng.uniform(margin, size - 1 - margin)
    return np.stack([center - half, center + half])


def _polygon(center: np.ndarray, radius: float, corners: int, rotation: float) -> np.ndarray:
    angles = rotation + np.linspace(0, 2 * np.pi, corners + 1)
    return center + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shapes(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    labels = np.zeros(len(SHAPES), dtype=np.float32)
    while not labels.any():
        labels = (rng.random(len(SHAPES)) < 0.5).astype(np.float32)
    placed: list[tuple[np.ndarray, float]] = []
    for index in np.flatnonzero(labels):
        for _ in range(100):  # rejection sampling of a free spot
            radius = rng.uniform(0.09, 0.16) * size
            center = rng.uniform(radius + 1, size - 2 - radius, size=2)
            if all(np.linalg.norm(center - c) > radius + r + 2 for c, r in placed):
                break
        placed.append((center, radius))
        corners = 64 if SHAPES[index] == "circle" else index + 2
        _stroke(image, _polygon(center, radius, corners, rng.uniform(0, 2 * np.pi)))
    return labels


def make_sample(name: str, size: int, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image [size, size] uint8 and target (class index, or float multi-hot labels) of one sample."""
    rng = np.random.default_rng([seed, list(SYNTHETIC).index(name), SPLITS.index(split), index])
    image = rng.integers(0, NOISE_LEVELS, size=(size, size), dtype=np.uint8)
    if name == "lines":
        label = rng.integers(len(ORIENTATIONS))
        _stroke(image, _segment(rng, size, ORIENTATIONS[label]))
        return image, np.int64(label)
    if name == "multilines":
        chosen = rng.choice(len(ORIENTATIONS), size=rng.integers(1, 4), replace=False)
        for label in chosen:
            _stroke(image, _segment(rng, size, ORIENTATIONS[label]))
        labels = np.zeros(len(ORIENTATIONS), dtype=np.float32)
        labels[chosen] = 1
        return image, labels
    return image, _shapes(rng, image)


def generate(
    name: str, count: int, size: int, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """`count` samples of dataset `name`: images [count, size, size] uint8 and targets."""
    if name not in SYNTHETIC:
        raise DataError(f"unknown synthetic dataset {name!r}; expected one of {sorted(SYNTHETIC)}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 16 or count < 1:
        raise DataError(f"need an image size >= 16 and a count >= 1, got size {size} and count {count}")
    images, targets = zip(*(make_sample(name, size, seed, split, i) for i in range(count)))
    return np.stack(images), np.stack(targets)
