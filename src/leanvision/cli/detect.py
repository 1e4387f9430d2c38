"""`leanvision detect`: a face detector (or the Haar baseline) on image files, its boxes drawn."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from leanvision.cli.common import DeviceOpt, console, fail, run

if TYPE_CHECKING:
    import torch

DEFAULT_THRESHOLD = 0.5  # EdgeML's README_M4 drawing threshold


def detect(
    model: Annotated[str, typer.Argument(help="A face detector (rnnpool_face_*) or haar.")],
    images: Annotated[list[str], typer.Argument(help="Image files (any format PIL reads).")],
    out: Annotated[str, typer.Option(help="Output folder: <stem>.png per image and detections.json.")],
    checkpoint: Annotated[
        str | None, typer.Option(help="Weights: ours, a training run's last.pt or EdgeML's train.py.")
    ] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Run untrained weights (demos and tests).")
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(help="Lowest score drawn and written (default 0.5; haar: all it detects)."),
    ] = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="S3FD's multi-scale test.")] = False,
    flip: Annotated[bool, typer.Option("--flip", help="Add a horizontally flipped pass.")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Detect faces in images: writes OUT/<stem>.png with boxes and scores drawn, and OUT/detections.json
    (per image a list of {"box": x1, y1, x2, y2, "score"}, scores >= --threshold).

    Detectors run at their evaluation area (640x480, or 320x240 for the grayscale ones), boxes are in the
    image's pixels. All images are read first: a missing or unreadable one stops the command before
    anything is detected or written. Haar's scores are cascade level weights, not probabilities.
    """
    if threshold is not None and math.isnan(threshold):
        fail("--threshold must be a score (a number, -inf keeps every detection), got nan")
    detector = _detector(model, checkpoint, random_weights, multiscale, flip, device)
    targets = _outputs(images, Path(out))
    from leanvision.detection.data import read_image

    pixels = run(lambda: [read_image(path) for path in images])
    if threshold is None:
        threshold = float("-inf") if model == "haar" else DEFAULT_THRESHOLD

    from torchvision.utils import draw_bounding_boxes

    Path(out).mkdir(parents=True, exist_ok=True)
    kept = f"score >= {threshold:g}" if threshold > float("-inf") else "all detections"
    table = Table("image", "faces", "time ms", title=f"{model} ({kept})")
    written = {}
    for path, target, image in zip(images, targets, pixels):
        start = time.perf_counter()
        (found,) = detector([image.to(device).float() / 255])
        keep = found["scores"] >= threshold
        boxes, scores = found["boxes"][keep].cpu(), found["scores"][keep].cpu()  # waits for the device
        elapsed = (time.perf_counter() - start) * 1e3
        labels = [f"{s:.2f}" for s in scores.tolist()]
        drawn = draw_bounding_boxes(image, boxes, labels, colors="red", width=2) if len(boxes) else image
        write_image(drawn, target)
        written[path] = [
            {"box": [round(v, 2) for v in box], "score": round(score, 4)}
            for box, score in zip(boxes.tolist(), scores.tolist())
        ]
        table.add_row(path, str(len(boxes)), f"{elapsed:.1f}")
    (Path(out) / "detections.json").write_text(json.dumps(written, indent=1))
    console.print(table)


def _detector(
    name: str, checkpoint: str | None, random_weights: bool, multiscale: bool, flip: bool, device: str
) -> Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The detector the options name: the Haar cascade, or a registered detector with its weights."""
    from leanvision.models.face import DETECTORS

    if name == "haar":
        given = {"--checkpoint": checkpoint is not None, "--random-weights": random_weights}
        given.update({"--multiscale": multiscale, "--flip": flip})
        if any(given.values()):
            fail(f"haar takes none of {', '.join(k for k, v in given.items() if v)}")
        from leanvision.detection.haar import HaarCascade

        return run(HaarCascade)
    if name not in DETECTORS:
        fail(f"{name!r} is not a face detector; expected haar or one of {', '.join(sorted(DETECTORS))}")
    if checkpoint is None and not random_weights:
        fail(f"{name} needs --checkpoint FILE (pass --random-weights to run untrained weights)")
    if checkpoint is not None and random_weights:
        fail("pass either --checkpoint or --random-weights, not both")
    from leanvision.bench import check_device
    from leanvision.deploy import fuse_for_inference
    from leanvision.detection.inference import detect_images
    from leanvision.models.registry import create_model

    run(lambda: check_device(device))
    net = run(lambda: create_model(name, pretrained=checkpoint)).to(device).eval()
    deployed = fuse_for_inference(net)  # BN folded, heads merged: the same detections, faster
    return lambda images: detect_images(deployed, images, multiscale=multiscale, flip=flip)


def _outputs(images: list[str], out: Path) -> list[Path]:
    """OUT/<stem>.png of each image; two images of one stem would overwrite each other's drawing."""
    targets, seen = [], {}
    for path in images:
        target = out / f"{Path(path).stem}.png"
        if target in seen:
            fail(f"{seen[target]} and {path} would both be drawn to {target}; rename one of them")
        seen[target] = path
        targets.append(target)
    return targets


def write_image(pixels: torch.Tensor, path: Path) -> None:
    """uint8 RGB pixels [3, H, W] to an image file, its format named by the suffix."""
    from PIL import Image

    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
