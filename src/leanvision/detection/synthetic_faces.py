"""`synthetic:faces`: generated 320x240 RGB scenes with face-like objects of many sizes and counts, and
exact boxes, so that detection trains, evaluates and is tested offline.

A face is a skin-toned ellipse (height 1.1-1.35x its width) with two dark eyes, a mouth and sometimes hair;
its box is the ellipse's bounding box. Its width is log-uniform in 8-120 px, at most 8 faces per image,
placed (almost) without overlapping each other. The scene has a random colour gradient, noise
and distractors a detector must learn to reject: face-coloured ellipses without features, dark dots,
rectangles and rings. Each image is a function of (seed, split, index) only.
"""

from __future__ import annotations

import numpy as np

HEIGHT, WIDTH = 240, 320
MIN_SIDE, MAX_SIDE = 8.0, 120.0
MAX_FACES = 8
SPLIT_STREAMS = {"train": 0, "val": 1}


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `split`: uint8 RGB pixels [H, W, 3] and its face boxes [M, 4] float32 x1, y1, x2, y2
    (pixel edges: a face filling pixels 0..9 has x1 = 0, x2 = 10)."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
    image = background(rng)
    for _ in range(rng.integers(2, 9)):
        _distractor(image, rng)
    boxes = []
    for _ in range(rng.integers(1, MAX_FACES + 1)):
        box = place(rng, boxes, (1.1, 1.35))
        if box is not None:
            _face(image, box, rng)
            boxes.append(box)
    return add_noise(image, rng), np.asarray(boxes, np.float32).reshape(-1, 4)


def background(rng: np.random.Generator) -> np.ndarray:
    """A float32 [H, W, 3] scene of a random colour with a random linear gradient."""
    colour, x_slope, y_slope = rng.uniform(30, 225, 3), rng.uniform(-60, 60, 3), rng.uniform(-60, 60, 3)
    x_ramp = np.linspace(0, 1, WIDTH, dtype=np.float32)[None, :, None] * x_slope.astype(np.float32)
    y_ramp = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None] * y_slope.astype(np.float32)
    return colour.astype(np.float32) + x_ramp + y_ramp


def add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` with Gaussian noise of a random level, as uint8."""
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def place(
    rng: np.random.Generator,
    placed: list[list[float]],
    aspect: tuple[float, float],
    widths: tuple[float, float] = (MIN_SIDE, MAX_SIDE),
    tries: int = 20,
) -> list[float] | None:
    """A box inside the image, of width log-uniform in `widths` and height `aspect` (a range) times it,
    covering at most 5% of any placed box or being covered by 5% of it (None after `tries`)."""
    for _ in range(tries):
        width = float(np.exp(rng.uniform(*np.log(widths))))
        height = width * rng.uniform(*aspect)
        if height > HEIGHT - 2:
            continue
        x1, y1 = rng.uniform(0, WIDTH - width), rng.uniform(0, HEIGHT - height)
        box = [x1, y1, x1 + width, y1 + height]
        if all(_overlap(box, other) <= 0.05 for other in placed):
            return box
    return None


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection over the smaller box's area (a small face on a large one counts as overlapping)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def region(image: np.ndarray, box: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels under `box` (a view) and their centres' coordinates relative to the box, in units of its
    half width / height (-1..1 inside)."""
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(image.shape[1], int(np.ceil(box[2]))), min(image.shape[0], int(np.ceil(box[3])))
    x2, y2 = max(x1, x2), max(y1, y2)  # a box wholly outside the image has no pixels
    yy, xx = np.mgrid[y1:y2, x1:x2].astype(np.float32) + 0.5
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return image[y1:y2, x1:x2], (xx - cx) / ((box[2] - box[0]) / 2), (yy - cy) / ((box[3] - box[1]) / 2)


def ellipse(image: np.ndarray, box: list[float], colour: np.ndarray) -> None:
    pixels, u, v = region(image, box)
    pixels[u**2 + v**2 <= 1] = colour


def _skin(rng: np.random.Generator) -> np.ndarray:
    tone = rng.uniform(0.25, 1.0)
    return np.array([90 + 150 * tone, 50 + 140 * tone, 30 + 120 * tone]) * rng.uniform(0.9, 1.1, 3)


def _face(image: np.ndarray, box: list[float], rng: np.random.Generator) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if rng.random() < 0.5:  # hair: a dark cap behind the top of the face
        ellipse(image, [x1 - 0.05 * w, y1 - 0.08 * h, x2 + 0.05 * w, y1 + 0.55 * h], rng.uniform(10, 90, 3))
    skin = _skin(rng)
    ellipse(image, box, skin)
    dark = skin * rng.uniform(0.1, 0.35)
    eye_w, eye_h = 0.18 * w, 0.12 * h
    for ex in (0.3, 0.7):
        cx, cy = x1 + ex * w, y1 + 0.42 * h
        ellipse(image, [cx - eye_w / 2, cy - eye_h / 2, cx + eye_w / 2, cy + eye_h / 2], dark)
    cx, cy = x1 + 0.5 * w, y1 + 0.74 * h
    mouth = np.array([150.0, 40.0, 50.0]) * rng.uniform(0.5, 1.0)
    ellipse(image, [cx - 0.2 * w, cy - 0.05 * h, cx + 0.2 * w, cy + 0.05 * h], mouth)


def _distractor(image: np.ndarray, rng: np.random.Generator) -> None:
    side = float(np.exp(rng.uniform(np.log(6), np.log(100))))
    x1, y1 = rng.uniform(-side / 2, WIDTH - side / 2), rng.uniform(-side / 2, HEIGHT - side / 2)
    box = [x1, y1, x1 + side * rng.uniform(0.6, 1.6), y1 + side]
    kind = rng.integers(4)
    if kind == 0:  # a face-coloured blob without features
        ellipse(image, box, _skin(rng))
    elif kind == 1:  # a pair of dark dots
        dot = [box[0], box[1], box[0] + side / 5, box[1] + side / 5]
        ellipse(image, dot, rng.uniform(0, 60, 3))
        ellipse(image, [dot[0] + side / 2, dot[1], dot[2] + side / 2, dot[3]], rng.uniform(0, 60, 3))
    elif kind == 2:
        pixels, _, _ = region(image, box)
        pixels[:] = rng.uniform(0, 255, 3)
    else:  # a ring
        pixels, u, v = region(image, box)
        radius = u**2 + v**2
        pixels[(radius <= 1) & (radius >= 0.5)] = rng.uniform(0, 255, 3)
