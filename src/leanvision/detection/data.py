"""Detection datasets, named by `--data` specs.

- `synthetic:faces[,train=N,val=N,seed=S]`: generated 320x240 scenes with exact face boxes
  (synthetic_faces; defaults 2000 / 200 / 0).
- `synthetic:shapes-boxes[,train=N,val=N,seed=S]`: generated 320x240 scenes of circles, squares and
  triangles (labels 1-3) with exact boxes (synthetic_shapes; same defaults).
- `widerface:DIR`: WIDER FACE's official layout, WIDER_train/images, WIDER_val/images and
  wider_face_split/wider_face_{train,val}_bbx_gt.txt; the easy / medium / hard lists from eval_tools'
  wider_{easy,medium,hard}_val.mat, found anywhere under DIR.
- `scut-head:DIR[,seed=S]`: SCUT-HEAD's VOC layout, Annotations/*.xml and JPEGImages/; DIR is one part
  (SCUT_HEAD_Part_A or _B) or a folder of parts, all found pooled; a seeded random 80/20 split (the
  paper's "random 80/20 split" of Part B).
- `coco-boxes:DIR[,category=ID]`: COCO's layout, DIR/annotations/instances_{train,val}*.json with the
  images of instances_X.json in DIR/X/; every non-crowd box is an object labelled with its category id
  (or only those of category ID).

Training samples are augmented square crops (`augment`: S3FD's by default, augment.SSDAugment for object
detectors; `img_size`: 640 for WIDER and COCO, 320 for SCUT-HEAD and synthetic, as EdgeML's VGA / QVGA
configs); validation images keep their resolution (detection resizes them to the detector's evaluation
area). Targets are dicts {"boxes" [M, 4] float32 xyxy pixels, "labels" [M] int64: ones (faces, heads),
the shape classes, or COCO category ids}, validation ones also "image_id" and "subsets" {name: [M]
bool}: WIDER's easy / medium / hard, or objects by size (easy >= 64, medium >= 32, hard >= 16 px;
SCUT-HEAD and COCO add "all"). `DetectionSplits.categories` names the labels.

Annotations: zero-area boxes are dropped and boxes reaching outside their image are clipped to it (both
counted in a warning); a malformed line, a COCO box of an undeclared category, or a corrupt or missing
image is named and skipped, or raises with `strict`.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.ops import clip_boxes_to_image

from leanvision.detection import synthetic_faces, synthetic_shapes
from leanvision.detection.augment import BoxAugment, S3FDAugment
from leanvision.detection.evaluation import SIZE_BUCKETS, size_subsets
from leanvision.detection.inference import to_channels
from leanvision.engine.data import parse_options, readable_images
from leanvision.errors import DataError, MissingFileError

SPEC_HELP = "synthetic:faces, synthetic:shapes-boxes, widerface:DIR, scut-head:DIR, coco-boxes:DIR"
SYNTHETIC_SETS = ("faces", "shapes-boxes")
WIDER_SUBSETS = ("easy", "medium", "hard")
WIDER_URL = (
    "http://shuoyang1213.me/WIDERFACE/ (WIDER_train.zip, WIDER_val.zip, wider_face_split.zip, eval_tools)"
)
SCUT_URL = "https://github.com/HCIILAB/SCUT-HEAD-Release"
SCUT_VAL_FRACTION = 0.2
LARGE_SIZE, SMALL_SIZE = 640, 320  # training crops: EdgeML's VGA and QVGA configs
FACE = {1: "face"}

AugmentFactory = Callable[[int, int], BoxAugment]  # (crop size, channels) -> the training augmentation


@dataclass
class Annotation:
    """One image of a dataset: where its pixels come from, its boxes [M, 4] xyxy (None: they come with
    the generated image) and, where the dataset defines them (WIDER val), its subset masks."""

    image_id: str
    source: Path | int  # an image file, or the index of a generated image
    boxes: torch.Tensor | None
    subsets: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None  # [M] int64; None: all 1

    def box_labels(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.labels if self.labels is not None else torch.ones(len(boxes), dtype=torch.int64)


@dataclass
class DetectionSplits:
    spec: str
    train: Dataset
    val: Dataset
    channels: int
    image_size: int
    subsets: tuple[str, ...]  # validation subsets, the widest last
    categories: dict[int, str]  # label -> name (0 is the background)

    @property
    def num_classes(self) -> int:
        """The class count a torchvision detector needs for these labels, the background included."""
        return max(self.categories) + 1


def read_image(path: str | Path) -> torch.Tensor:
    """The uint8 RGB pixels [3, H, W] of an image file PIL reads (EXIF orientation applied); a missing
    or undecodable file raises an error naming it."""
    from PIL import Image, ImageOps

    if not Path(path).is_file():
        raise MissingFileError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            pixels = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(pixels).permute(2, 0, 1)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """(images, targets) lists: detection images may differ in size and count of boxes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


Loader = Callable[["Annotation"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class BoxImages(Dataset):
    """Annotated images, `load` giving each one's uint8 RGB pixels [3, H, W], boxes and labels; `augment`
    (training) turns each into a training crop, else (validation) the whole image comes with its image_id
    and subset masks."""

    def __init__(
        self,
        annotations: list[Annotation],
        load: Loader,
        channels: int,
        subsets: tuple[str, ...],
        augment: BoxAugment | None = None,
    ) -> None:
        self.annotations, self.load, self.channels = annotations, load, channels
        self.subsets, self.augment = subsets, augment

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        item = self.annotations[index]
        pixels, boxes, labels = self.load(item)
        boxes = clip_boxes_to_image(boxes, tuple(pixels.shape[1:]))
        if self.augment is not None:
            image, boxes, labels = self.augment(pixels, boxes, labels)
            return image, {"boxes": boxes, "labels": labels}
        image = to_channels(pixels.float() / 255, self.channels)
        masks = item.subsets if item.subsets is not None else size_masks(boxes, self.subsets)
        return image, {"boxes": boxes, "labels": labels, "image_id": item.image_id, "subsets": masks}


def size_masks(boxes: torch.Tensor, subsets: Sequence[str]) -> dict[str, torch.Tensor]:
    """One image's faces by size (evaluation.size_subsets' buckets), every face in "all"."""
    buckets = size_subsets({"image": boxes}, {n: SIZE_BUCKETS[n] for n in subsets if n in SIZE_BUCKETS})
    everyone = torch.ones(len(boxes), dtype=torch.bool)
    return {n: buckets[n]["image"] if n in buckets else everyone for n in subsets}


def _non_empty(boxes: torch.Tensor, where: str, dropped: list[str]) -> torch.Tensor:
    """Which of `boxes` have an area (`where` is named in `dropped` if any has not)."""
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not bool(keep.all()):
        dropped.append(where)
    return keep


def _valid_boxes(boxes: torch.Tensor, where: str, dropped: list[str]) -> torch.Tensor:
    """`boxes` without zero-area ones (named in `dropped`)."""
    return boxes[_non_empty(boxes, where, dropped)]


def _warn_dropped(dropped: list[str], what: str) -> None:
    if dropped:
        warnings.warn(f"{what} in {len(dropped)} place(s) (first: {dropped[0]})", stacklevel=3)


class _Problems:
    """Malformed annotations: named and skipped (counted in one warning), or raised with `strict`."""

    def __init__(self, strict: bool) -> None:
        self.strict, self.found = strict, []

    def __call__(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        self.found.append(message)

    def warn(self, where: Path) -> None:
        if self.found:
            warnings.warn(
                f"skipped {len(self.found)} malformed annotation(s) in {where} (first: {self.found[0]}); "
                "pass strict=True (--strict) to fail instead",
                stacklevel=3,
            )


def load_file(item: Annotation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return read_image(item.source), item.boxes, item.box_labels(item.boxes)


def _readable(annotations: list[Annotation], root: Path, strict: bool) -> list[Annotation]:
    """The annotations whose image file PIL can read (see engine.data.readable_images)."""
    kept = readable_images([(a.source, i) for i, a in enumerate(annotations)], root, strict)
    return [annotations[i] for _, i in kept]


# --------------------------------------------------------------------------------------------- synthetic
def synthetic_splits(
    spec: str, name: str, options: str, channels: int, img_size: int | None, augment: AugmentFactory
) -> DetectionSplits:
    """synthetic:faces or synthetic:shapes-boxes (every generated object is boxed: no "all" beyond
    "hard")."""
    opts = parse_options(spec, options, {"train": 2000, "val": 200, "seed": 0})
    if min(opts["train"], opts["val"]) < 1:
        raise DataError(f"{spec!r}: train and val counts must be >= 1, got {opts['train']} and {opts['val']}")

    def annotations(split: str) -> list[Annotation]:
        return [Annotation(f"{split}/{i}", i, None) for i in range(opts[split])]

    def render(item: Annotation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        split = item.image_id.split("/")[0]
        if name == "faces":
            pixels, boxes = synthetic_faces.render(opts["seed"], split, item.source)
            labels = np.ones(len(boxes), np.int64)
        else:
            pixels, boxes, labels = synthetic_shapes.render(opts["seed"], split, item.source)
        return torch.from_numpy(pixels).permute(2, 0, 1), torch.from_numpy(boxes), torch.from_numpy(labels)

    categories = FACE if name == "faces" else dict(enumerate(synthetic_shapes.CLASSES, 1))
    train, val = annotations("train"), annotations("val")
    size = img_size or SMALL_SIZE
    return _splits(spec, train, val, channels, size, augment, tuple(SIZE_BUCKETS), render, categories)


# -------------------------------------------------------------------------------------------- WIDER FACE
def read_wider_annotations(path: Path, images: Path, strict: bool) -> list[Annotation]:
    """WIDER's *_bbx_gt.txt: an image path, a face count, then that many lines `x y w h blur expression
    illumination invalid occlusion pose` (one all-zero line for a count of 0). A malformed count, or one
    that runs into the next image path, skips the image; a malformed face line skips that face."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not WIDER FACE's text annotation file: {err}") from err
    problems, dropped, annotations = _Problems(strict), [], []
    i = 0
    while i < len(lines):
        name = lines[i].strip()
        i += 1
        if not name:
            continue
        count = lines[i].strip() if i < len(lines) else ""
        if not _is_image_path(name) or not count.isdigit():
            problems(f"{path}:{i}: expected an image path and a face count, got {name!r}, {count!r}")
            while i < len(lines) and not _is_image_path(lines[i]):
                i += 1
            continue
        i += 1
        cut = next((k for k, line in enumerate(lines[i : i + int(count)]) if _is_image_path(line)), None)
        if cut is not None:
            problems(
                f"{path}:{i + cut + 1}: expected 'x y w h ...' of a face, got {lines[i + cut].strip()!r} "
                f"(the count {count} runs into the next image)"
            )
            i += cut
            continue
        rows = []
        for line_no in range(i, i + max(int(count), 1)):
            fields = lines[line_no].split() if line_no < len(lines) else []
            try:
                rows.append([float(v) for v in fields[:4]] if len(fields) >= 4 else [])
            except ValueError:
                rows.append([])
            if not rows[-1] and int(count):
                problems(f"{path}:{line_no + 1}: expected 'x y w h ...' of a face, got {' '.join(fields)!r}")
        i += max(int(count), 1)
        xywh = torch.tensor([r for r in rows if r][: int(count)], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        annotations.append(Annotation(name, images / name, _valid_boxes(boxes, name, dropped)))
    problems.warn(path)
    _warn_dropped(dropped, f"{path.name}: dropped zero-area face boxes")
    return annotations


def _is_image_path(line: str) -> bool:
    return line.strip().lower().endswith((".jpg", ".jpeg", ".png"))


def _find_one(root: Path, name: str, hint: str) -> Path:
    found = sorted(root.rglob(name))
    if not found:
        raise MissingFileError(f"{name} not found under {root}; {hint}")
    return found[0]


def wider_subsets(root: Path, annotations: list[Annotation]) -> None:
    """Set each validation annotation's easy / medium / hard masks from eval_tools' .mat files (the faces
    each subset keeps, per event and file); images the lists do not name keep no face in any subset."""
    from scipy.io import loadmat

    hint = f"they come with WIDER FACE's eval_tools ({WIDER_URL})"
    by_name = {Path(a.image_id).stem: a for a in annotations}
    for a in annotations:
        a.subsets = {s: torch.zeros(len(a.boxes), dtype=torch.bool) for s in WIDER_SUBSETS}
    for subset in WIDER_SUBSETS:
        mat = loadmat(_find_one(root, f"wider_{subset}_val.mat", hint))
        for files, keeps in zip(mat["file_list"].ravel(), mat["gt_list"].ravel()):
            for file, keep in zip(files.ravel(), keeps.ravel()):
                annotation = by_name.get(str(file.ravel()[0]))
                if annotation is None:
                    continue
                index = torch.as_tensor(np.asarray(keep, dtype=np.int64).ravel() - 1)  # 1-based face numbers
                mask = annotation.subsets[subset]
                mask[index[(index >= 0) & (index < len(mask))]] = True


def widerface_splits(
    spec: str,
    arg: str,
    channels: int,
    img_size: int | None,
    strict: bool,
    augment: AugmentFactory,
) -> DetectionSplits:
    root = Path(arg)
    hint = f"expected WIDER FACE's official layout under {root} ({WIDER_URL})"
    splits = []
    for split in ("train", "val"):
        gt = root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"
        images = root / f"WIDER_{split}" / "images"
        for needed in (gt, images):
            if not needed.exists():
                raise MissingFileError(f"{needed} not found; {hint}")
        splits.append(_readable(read_wider_annotations(gt, images, strict), images, strict))
    train, val = splits
    wider_subsets(root, val)
    return _splits(spec, train, val, channels, img_size or LARGE_SIZE, augment, WIDER_SUBSETS)


# --------------------------------------------------------------------------------------------- SCUT-HEAD
def read_voc_boxes(path: Path, problems: _Problems) -> torch.Tensor | None:
    """The object boxes [M, 4] of a VOC annotation file (xmin ymin xmax ymax), None if it is malformed."""
    try:
        objects = ET.parse(path).getroot().iter("object")
        rows = [
            [float(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects
        ]
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        problems(f"{path}: not a VOC annotation with numeric bndbox xmin/ymin/xmax/ymax ({err})")
        return None
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def scut_splits(
    spec: str,
    arg: str,
    channels: int,
    img_size: int | None,
    strict: bool,
    augment: AugmentFactory,
) -> DetectionSplits:
    path, _, options = arg.partition(",")
    opts = parse_options(spec, options, {"seed": 0})
    root = Path(path)
    parts = (
        [root] if (root / "Annotations").is_dir() else sorted(p.parent for p in root.glob("*/Annotations"))
    )
    if not parts:
        raise MissingFileError(
            f"no SCUT-HEAD part (Annotations/ and JPEGImages/) at {root} or in its subfolders; get it from "
            f"{SCUT_URL}"
        )
    problems, dropped, annotations = _Problems(strict), [], []
    for part in parts:
        for xml in sorted((part / "Annotations").glob("*.xml")):
            boxes = read_voc_boxes(xml, problems)
            if boxes is not None:
                image_id = f"{part.name}/{xml.stem}"
                image = part / "JPEGImages" / f"{xml.stem}.jpg"
                annotations.append(Annotation(image_id, image, _valid_boxes(boxes, image_id, dropped)))
    problems.warn(root)
    _warn_dropped(dropped, f"{root}: dropped zero-area head boxes")
    annotations = _readable(annotations, root, strict)
    if len(annotations) < 2:
        raise DataError(f"{spec!r}: {len(annotations)} readable annotated image(s), need at least 2 to split")
    order = torch.randperm(len(annotations), generator=torch.Generator().manual_seed(opts["seed"])).tolist()
    n_val = max(1, round(SCUT_VAL_FRACTION * len(annotations)))
    val, train = [annotations[i] for i in order[:n_val]], [annotations[i] for i in order[n_val:]]
    return _splits(spec, train, val, channels, img_size or SMALL_SIZE, augment)


def _splits(
    spec: str,
    train: list[Annotation],
    val: list[Annotation],
    channels: int,
    size: int,
    augment: AugmentFactory,
    subsets: tuple[str, ...] = (*SIZE_BUCKETS, "all"),
    load: Loader = load_file,
    categories: dict[int, str] = FACE,
) -> DetectionSplits:
    """Training crops (augmented to `size`) and whole validation images of the annotations."""
    return DetectionSplits(
        spec,
        BoxImages(train, load, channels, subsets, augment(size, channels)),
        BoxImages(val, load, channels, subsets),
        channels, size, subsets, categories,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------- COCO
def read_coco_boxes(
    path: Path, images: Path, category: int, problems: _Problems
) -> tuple[list[Annotation], dict[int, str]]:
    """One Annotation per image of a COCO json (images without boxes included) and its categories
    {id: name}. Boxes are the non-crowd annotations' [x, y, w, h] labelled with their category id, or
    only those of `category` (labelled 1) unless it is 0."""
    try:
        data = json.loads(path.read_text())
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        anns = data["annotations"]
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{path} is not a COCO annotation file (images, annotations, categories with id and name): {err}"
        ) from err
    if not categories or min(categories) < 1:
        raise DataError(f"{path}: categories must be a non-empty list with ids >= 1 (0 is the background)")
    if category and category not in categories:
        raise DataError(f"{path}: category={category} is not one of its categories {sorted(categories)}")
    boxes: dict[int, list[list[float]]] = {i: [] for i in files}
    labels: dict[int, list[int]] = {i: [] for i in files}
    for k, ann in enumerate(anns):
        bbox = _coco_bbox(ann, files)
        if bbox is None:
            problems(f"{path}: annotation {k} has no known image_id or no [x, y, w, h] bbox of numbers")
            continue
        if ann.get("category_id") not in categories:
            problems(f"{path}: annotation {k} has category_id {ann.get('category_id')!r}, not a category")
            continue
        if ann.get("iscrowd", 0) or (category and ann["category_id"] != category):
            continue
        x, y, w, h = bbox
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
        labels[ann["image_id"]].append(1 if category else ann["category_id"])
    problems.warn(path)
    dropped: list[str] = []
    annotations = []
    for i, name in files.items():
        image_boxes = torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4)
        keep = _non_empty(image_boxes, name, dropped)
        image_labels = torch.tensor(labels[i], dtype=torch.int64)[keep]
        annotations.append(Annotation(name, images / name, image_boxes[keep], labels=image_labels))
    _warn_dropped(dropped, f"{path.name}: dropped zero-area boxes")
    return annotations, ({1: categories[category]} if category else categories)


def _coco_bbox(ann: Any, files: dict[int, str]) -> list[float] | None:
    """A COCO annotation's [x, y, w, h] if it is an object with a known image_id and four numbers."""
    if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int) or ann["image_id"] not in files:
        return None
    bbox = ann.get("bbox")
    numbers = isinstance(bbox, list) and len(bbox) == 4
    if not numbers or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
        return None
    return [float(v) for v in bbox]


def coco_splits(
    spec: str,
    arg: str,
    channels: int,
    img_size: int | None,
    strict: bool,
    augment: AugmentFactory,
) -> DetectionSplits:
    path, _, options = arg.partition(",")
    opts = parse_options(spec, options, {"category": 0})
    root = Path(path)
    splits, categories = [], []
    for split in ("train", "val"):
        found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
        if not found:
            raise MissingFileError(
                f"{root}/annotations/instances_{split}*.json not found; expected COCO's layout "
                "(annotations/instances_train2017.json, train2017/, ...)"
            )
        images = root / found[0].stem.removeprefix("instances_")
        annotations, names = read_coco_boxes(found[0], images, opts["category"], _Problems(strict))
        splits.append(_readable(annotations, images, strict))
        categories.append(names)
    if categories[0] != categories[1]:
        raise DataError(
            f"{spec!r}: the train and val annotation files declare different categories "
            f"({categories[0]} vs {categories[1]})"
        )
    size = img_size or LARGE_SIZE
    return _splits(spec, *splits, channels, size, augment, categories=categories[0])


def build_detection_data(
    spec: str,
    channels: int = 3,
    img_size: int | None = None,
    strict: bool = False,
    augment: AugmentFactory = S3FDAugment,
) -> DetectionSplits:
    """The train and val splits named by `spec` (module docstring), for a `channels`-channel detector;
    training crops img_size x img_size (default per dataset) made by `augment(img_size, channels)`
    (default: S3FD's with its VGA anchors). `strict` fails on the first corrupt image or malformed
    annotation instead of skipping it with a warning."""
    if channels not in (1, 3):
        raise DataError(f"detection data is RGB or gray: channels must be 1 or 3, got {channels}")
    if img_size is not None and (img_size < 32 or img_size % 32):
        raise DataError(f"detection img_size must be a multiple of 32, >= 32; got {img_size}")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        name, _, options = arg.partition(",")
        if name not in SYNTHETIC_SETS:
            raise DataError(
                f"unknown synthetic detection set {name!r} in {spec!r}; expected synthetic:faces or "
                "synthetic:shapes-boxes"
            )
        return synthetic_splits(spec, name, options, channels, img_size, augment)
    if kind in ("widerface", "scut-head", "coco-boxes") and not arg.partition(",")[0]:
        raise DataError(f"data spec {spec!r} needs a folder: {kind}:DIR")
    if kind == "widerface":
        return widerface_splits(spec, arg, channels, img_size, strict, augment)
    if kind == "scut-head":
        return scut_splits(spec, arg, channels, img_size, strict, augment)
    if kind == "coco-boxes":
        return coco_splits(spec, arg, channels, img_size, strict, augment)
    raise DataError(f"unknown detection data spec {spec!r}; expected one of {SPEC_HELP}")
