"""Datasets that exist offline, named by `--data` specs.

| spec | what |
|---|---|
| `synthetic:lines`, `synthetic:multilines`, `synthetic:shapes` | RNNPool Appendix C.1 probes (generated) |
| `fashion-mnist[:DIR]` | the original idx(.gz) files; default DIR /usr/share/datasets/fashion-mnist |
| `cifar10:DIR`, `cifar100:DIR` | torchvision's on-disk format (cifar-10-batches-py / cifar-100-python) |
| `folder:DIR` | ImageFolder layout: DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg |
| `imagenet10:DIR` | ImageNet-10 (RNNPool Table 6) from an ImageNet folder with train/ and val/ by synset |
| `metaalbum:DIR` | one Meta-Album dataset (images/, labels.csv, info.json): a seeded 20/20 split per class |

Synthetic specs take options after commas: `synthetic:shapes,train=4000,val=1000,seed=1` (defaults 10000,
2000, 0). Their image size is `img_size` (default 32 for the lines sets, 64 for shapes, as in Table 7).
Fashion-MNIST takes `train` and `val`, the first N images of its training and test files (both are in
random class order): `fashion-mnist,train=8000,val=2000`, `fashion-mnist:DIR,train=8000`.
Meta-Album takes `seed`, `per_class` (default 20, the Micro protocol) and `holdout` (default 0):
`metaalbum:DIR,seed=2`. `holdout=V` validates on V images per class held out of the training part (the
test part is then not used): for model selection without touching the test images. A set folder (whose
subfolders are Meta-Album datasets) is not one dataset: `metaalbum_datasets` lists its datasets' specs.
"""

from __future__ import annotations

import csv
import gzip
import math
import pickle
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leanvision.engine import synthetic
from leanvision.errors import DataError, MissingFileError
from leanvision.models.registry import IMAGENET_MEAN, IMAGENET_STD

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IMAGENET10_SYNSETS = (
    ("n02690373", "airliner"),
    ("n04285008", "sports car"),
    ("n01560419", "bulbul"),
    ("n02124075", "Egyptian cat"),
    ("n02430045", "deer"),
    ("n02099601", "golden retriever"),
    ("n01641577", "bullfrog"),
    ("n03538406", "horse cart"),
    ("n03673027", "ocean liner"),
    ("n04467665", "trailer truck"),
)
CIFAR = {  # spec -> folder, train files, test files, label key, mean, std
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPEC_HELP = (
    "synthetic:lines|multilines|shapes, fashion-mnist[:DIR], cifar10:DIR, cifar100:DIR, folder:DIR, "
    "imagenet10:IMAGENET_DIR, metaalbum:DIR"
)
SPEC_KINDS = ("synthetic", "fashion-mnist", "cifar10", "cifar100", "folder", "imagenet10", "metaalbum")
METAALBUM_PER_CLASS = 20


@dataclass
class DataSplits:
    """A dataset's train and validation splits and what a model needs to know about them."""

    spec: str
    train: Dataset
    val: Dataset
    num_classes: int
    channels: int
    image_size: int
    multilabel: bool = False
    classes: tuple[str, ...] = ()


class TensorImages(Dataset):
    """uint8 images [N, C, H, W] in memory -> normalised float images; optional crop-and-flip augmentation.

    `augment` pads by 1/8 of the size and crops back at a random offset, and flips half of the images
    horizontally (CIFAR's standard training augmentation), drawing from torch's global RNG.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(targets):
            raise DataError(f"expected uint8 images [N, C, H, W] and N targets, got {list(images.shape)}")
        self.images, self.targets, self.augment = images, targets, augment
        self.mean = torch.tensor(mean).view(-1, 1, 1) * 255
        self.std = torch.tensor(std).view(-1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float()
        if self.augment:
            size = image.shape[-1]
            pad = size // 8
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = torch.nn.functional.pad(image, (pad, pad, pad, pad))[:, dy : dy + size, dx : dx + size]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - self.mean) / self.std, self.targets[index]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 images [N, C, H, W] to size x size, in chunks."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    chunks = [
        torch.nn.functional.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True)
        for c in images.split(4096)
    ]
    return torch.cat(chunks).round().clamp(0, 255).to(torch.uint8)


def parse_options(spec: str, text: str, allowed: dict[str, int]) -> dict[str, int]:
    options = dict(allowed)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in allowed or not value.lstrip("-").isdigit():
            raise DataError(
                f"bad option {item!r} in {spec!r}: expected key=integer with keys {sorted(allowed)}"
            )
        options[key] = int(value)
    return options


def synthetic_splits(spec: str, name: str, options: str, img_size: int | None) -> DataSplits:
    if name not in synthetic.SYNTHETIC:
        raise DataError(
            f"unknown synthetic dataset {name!r} in {spec!r}; expected one of {sorted(synthetic.SYNTHETIC)}"
        )
    opts = parse_options(spec, options, {"train": 10000, "val": 2000, "seed": 0})
    size = img_size or (64 if name == "shapes" else 32)
    multilabel = synthetic.MULTILABEL[name]
    splits = []
    for split in synthetic.SPLITS:
        images, targets = synthetic.generate(name, opts[split], size, opts["seed"], split)
        splits.append(
            TensorImages(torch.from_numpy(images)[:, None], torch.from_numpy(targets), (0.5,), (0.5,))
        )
    classes = tuple(f"{c}deg" if isinstance(c, int) else c for c in synthetic.SYNTHETIC[name])
    return DataSplits(spec, *splits, len(classes), 1, size, multilabel, classes)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format, gzipped or not) as a uint8 array; a malformed one names the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable idx file: {err}") from err
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number {data[:4].hex()})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated: {len(data)} bytes, its header alone takes {offset}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - offset != math.prod(dims):
        raise DataError(
            f"{path} is truncated or corrupt: header says {dims} ({math.prod(dims)} bytes), found "
            f"{len(data) - offset} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise MissingFileError(
        f"fashion-mnist: {name}.gz not found in {root}. Install it with `apt-get install "
        f"dataset-fashion-mnist` (or `make data`), or pass fashion-mnist:DIR with the four idx files"
    )


def fashion_mnist_installed(root: str | None = None) -> bool:
    """Whether `root` (default FASHION_MNIST_DIR, where `make data` puts them) holds the four idx files."""
    try:
        for prefix in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                _find(Path(root or FASHION_MNIST_DIR), f"{prefix}-{kind}-ubyte")
    except MissingFileError:
        return False
    return True


def fashion_mnist_splits(spec: str, img_size: int | None) -> DataSplits:
    """`fashion-mnist[:DIR][,train=N,val=N]`: at most the first N images of each file (default all)."""
    head, _, options = spec.partition(",")
    opts = parse_options(spec, options, {"train": 60000, "val": 10000})
    if min(opts.values()) < 1:
        raise DataError(f"{spec}: need train >= 1 and val >= 1, got {opts['train']} and {opts['val']}")
    base = Path(head.partition(":")[2] or FASHION_MNIST_DIR)
    splits = []
    for prefix, augment, count in (("train", True, opts["train"]), ("t10k", False, opts["val"])):
        images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
        labels_file = _find(base, f"{prefix}-labels-idx1-ubyte")
        labels = read_idx(labels_file)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(
                f"fashion-mnist {prefix}: images {images.shape} and labels {labels.shape} do not match "
                "(expected images [N, H, W] and N labels)"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(
                f"{labels_file} holds label {labels.max()}; Fashion-MNIST's are 0..9 (10 classes)"
            )
        images, labels = images[:count], labels[:count]
        tensor = _resize(torch.from_numpy(images.copy())[:, None], img_size or images.shape[-1])
        targets = torch.from_numpy(labels.astype(np.int64))
        splits.append(TensorImages(tensor, targets, (0.2860,), (0.3530,), augment))
    return DataSplits(spec, *splits, 10, 1, splits[0].images.shape[-1], False, FASHION_MNIST_CLASSES)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (what the CIFAR batch files hold)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise DataError(f"{path} is not a readable CIFAR batch file: {err}") from err
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def cifar_splits(spec: str, kind: str, root: str, img_size: int | None) -> DataSplits:
    folder, train_files, test_files, label_key, mean, std = CIFAR[kind]
    base = Path(root)
    base = base if (base / train_files[0]).is_file() else base / folder
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise MissingFileError(
            f"{kind}: {missing} not found in {base}. Download it once with "
            f"torchvision.datasets.{kind.upper()}('{root}', download=True) and pass {kind}:{root}"
        )
    splits = []
    for files, augment in ((train_files, True), (test_files, False)):
        data, labels = zip(*(_read_cifar_batch(base / f, label_key) for f in files))
        images = _resize(torch.from_numpy(np.concatenate(data)), img_size or 32)
        splits.append(TensorImages(images, torch.from_numpy(np.concatenate(labels)), mean, std, augment))
    num_classes = 10 if kind == "cifar10" else 100
    return DataSplits(spec, *splits, num_classes, 3, splits[0].images.shape[-1])


class ImageFiles(Dataset):
    """Images on disk with class indices; files that PIL cannot read were dropped when scanning."""

    def __init__(self, samples: list[tuple[Path, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                pixels = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # changed on disk since the scan
            raise DataError(f"cannot decode image {path}: {err}") from err
        return self.transform(pixels), torch.tensor(target)


def scan_images(root: Path, classes: list[str], strict: bool) -> list[tuple[Path, int]]:
    """(path, class index) of every readable image in root/CLASS/; corrupt ones are counted or raise."""
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    samples = readable_images(samples, root, strict)
    if not samples:
        raise DataError(f"no readable images under {root}/{{{','.join(classes[:3])}...}}")
    return samples


def readable_images(samples: list[tuple[Path, int]], root: Path, strict: bool) -> list[tuple[Path, int]]:
    """The samples whose image PIL can decode to the end; the others (missing, corrupt or truncated files)
    are counted in a warning, or raise if `strict`. Each file is decoded once (JPEGs at reduced scale,
    which still reads all their data): `Image.verify` would miss a truncated JPEG, which then fails in
    the middle of an epoch."""
    from PIL import Image, UnidentifiedImageError

    readable, bad = [], []
    for path, index in samples:
        try:
            with Image.open(path) as image:
                image.draft(image.mode, (64, 64))
                image.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            if strict:
                raise DataError(f"corrupt or missing image {path}: {err}") from err
            bad.append(path)
            continue
        readable.append((path, index))
    if bad:
        warnings.warn(
            f"skipped {len(bad)} corrupt or missing image(s) under {root} (first: {bad[0]}); "
            "pass strict=True (--strict) to fail instead",
            stacklevel=2,
        )
    return readable


def _folder_transforms(size: int, train: bool):
    from torchvision.transforms import v2

    resize = (
        [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        if train
        else [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    )
    return v2.Compose(
        [
            v2.ToImage(),
            *resize,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def folder_splits(
    spec: str, root: str, img_size: int | None, strict: bool, synsets: tuple[tuple[str, str], ...] = ()
) -> DataSplits:
    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise MissingFileError(
                f"{spec}: {base / split} is not a folder "
                "(expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg)"
            )
    if synsets:
        classes = [s for s, _ in synsets]
        missing = [
            f"{split}/{s}" for split in ("train", "val") for s in classes if not (base / split / s).is_dir()
        ]
        if missing:
            raise MissingFileError(
                f"imagenet10: {base} lacks {missing}. ImageNet-10 (RNNPool Table 6) needs train/ and val/ "
                "folders per synset; n02430045 (deer) is not in ImageNet-1K: "
                "the paper took it from ImageNet-22K"
            )
        names = tuple(n for _, n in synsets)
    else:
        classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{spec}: no class folders in {base / 'train'}")
        val_classes = sorted(p.name for p in (base / "val").iterdir() if p.is_dir())
        if val_classes != classes:
            only = {
                split: sorted(set(mine) - set(other))
                for split, mine, other in (("train", classes, val_classes), ("val", val_classes, classes))
            }
            raise DataError(
                f"{spec}: train/ and val/ must hold the same class folders; only in train/: "
                f"{only['train']}, only in val/: {only['val']}"
            )
        names = tuple(classes)
    size = img_size or 224
    splits = [
        ImageFiles(scan_images(base / split, classes, strict), _folder_transforms(size, split == "train"))
        for split in ("train", "val")
    ]
    return DataSplits(spec, *splits, len(classes), 3, size, False, names)


def _read_metaalbum_labels(labels: Path) -> list[tuple[str, str]]:
    """(file name, category) of every row of a Meta-Album labels.csv; a malformed file names its fault."""
    rows = []
    try:
        with labels.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"FILE_NAME", "CATEGORY"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(
                    f"{labels}: missing column(s) {sorted(missing)}; expected FILE_NAME and CATEGORY, "
                    f"got {reader.fieldnames}"
                )
            for row in reader:
                file, category = row["FILE_NAME"], row["CATEGORY"]
                if not file or not category:  # None when the row is short, "" when a cell is empty
                    raise DataError(
                        f"{labels}, line {reader.line_num}: empty FILE_NAME or CATEGORY in {row}; every row "
                        "needs both"
                    )
                rows.append((file, category))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{labels} is not a UTF-8 CSV file of FILE_NAME and CATEGORY columns: {err}") from err
    if not rows:
        raise DataError(f"{labels} has a header but no rows (expected one row per image)")
    return rows


def _dataset_folders(root: Path) -> list[Path]:
    """The subfolders of `root` that hold a labels.csv (the datasets of a Meta-Album set), sorted."""
    return sorted(p for p in root.iterdir() if (p / "labels.csv").is_file()) if root.is_dir() else []


def metaalbum_datasets(spec: str) -> list[str]:
    """The specs of the Meta-Album datasets `spec` names: itself for a dataset folder, one per dataset
    (sorted by folder name, same options) for a set folder, whose subfolders hold labels.csv."""
    kind, _, arg = spec.partition(":")
    if kind != "metaalbum" or not arg:
        raise DataError(f"expected a Meta-Album spec metaalbum:DIR[,options], got {spec!r}")
    root_text, comma, options = arg.partition(",")
    root = Path(root_text)
    if (root / "labels.csv").is_file():
        return [spec]
    datasets = _dataset_folders(root)
    if not datasets:
        raise MissingFileError(
            f"{spec}: no Meta-Album dataset in {root} (expected DIR/labels.csv for a dataset, or "
            "DIR/<DATASET>/labels.csv for a set)"
        )
    return [f"metaalbum:{path}{comma}{options}" for path in datasets]


def metaalbum_splits(spec: str, arg: str, img_size: int | None, strict: bool) -> DataSplits:
    """One Meta-Album dataset: DIR/images/, DIR/labels.csv (FILE_NAME, CATEGORY, ...), DIR/info.json.

    Per class, a seeded permutation of its files (sorted by name) gives `per_class` training images and
    the next `per_class` test images (the validation split): the same split for the same seed, on any
    machine. With `holdout` V > 0, the last V of the training images are the validation split instead.
    """
    root_text, _, options = arg.partition(",")
    opts = parse_options(spec, options, {"seed": 0, "per_class": METAALBUM_PER_CLASS, "holdout": 0})
    root, per_class, holdout = Path(root_text), opts["per_class"], opts["holdout"]
    if per_class < 1 or not 0 <= holdout < per_class:
        raise DataError(
            f"{spec}: need per_class >= 1 and 0 <= holdout < per_class, got {per_class}, {holdout}"
        )
    labels = root / "labels.csv"
    if not labels.is_file():
        inside = _dataset_folders(root)
        hint = (
            f"; {root} holds a set of datasets, pass one: metaalbum:{inside[0]} (`leanvision rrr run` "
            "takes a whole set)"
            if inside
            else ""
        )
        raise MissingFileError(
            f"{spec}: {labels} not found (expected DIR/images/, DIR/labels.csv, DIR/info.json){hint}"
        )
    rows = _read_metaalbum_labels(labels)
    classes = sorted({category for _, category in rows})
    rng = np.random.default_rng(opts["seed"])
    splits: tuple[list, list] = ([], [])
    cut, stop = (per_class - holdout, per_class) if holdout else (per_class, 2 * per_class)
    for index, name in enumerate(classes):
        files = sorted(file for file, category in rows if category == name)
        if len(files) < 2 * per_class:
            raise DataError(
                f"{labels}: class {name!r} has {len(files)} images; a {per_class}/{per_class} split needs "
                f"{2 * per_class}"
            )
        order = rng.permutation(len(files))
        for split, chosen in zip(splits, (order[:cut], order[cut:stop])):
            split.extend((root / "images" / files[i], index) for i in chosen)
    size = img_size or 128
    train, val = (
        ImageFiles(readable_images(samples, root, strict), _folder_transforms(size, training))
        for samples, training in zip(splits, (True, False))
    )
    return DataSplits(spec, train, val, len(classes), 3, size, False, tuple(classes))


def spec_kind(spec: str) -> str:
    """The kind of `spec` (one of SPEC_KINDS), before its folder and options; an unknown one raises."""
    kind = spec.partition(",")[0].partition(":")[0]
    if kind not in SPEC_KINDS:
        raise DataError(f"unknown data spec {spec!r}; expected one of {SPEC_HELP}")
    return kind


def build_dataset(spec: str, img_size: int | None = None, strict: bool = False) -> DataSplits:
    """The train and val splits named by `spec` (see the module docstring), images img_size x img_size.

    `img_size` None keeps a dataset's own size (28 for Fashion-MNIST, 32 for CIFAR, 224 for folders).
    `strict` fails on the first corrupt image file instead of skipping it with a warning.
    """
    if img_size is not None and img_size < 16:
        raise DataError(f"img_size must be >= 16, got {img_size}")
    kind, arg = spec_kind(spec), spec.partition(":")[2]
    if kind == "synthetic":
        name, _, options = arg.partition(",")
        return synthetic_splits(spec, name, options, img_size)
    if kind == "fashion-mnist":
        return fashion_mnist_splits(spec, img_size)
    if kind in ("cifar10", "cifar100", "folder", "imagenet10", "metaalbum") and not arg:
        raise DataError(f"data spec {spec!r} needs a folder: {kind}:DIR")
    if kind in CIFAR:
        return cifar_splits(spec, kind, arg, img_size)
    if kind == "folder":
        return folder_splits(spec, arg, img_size, strict)
    if kind == "imagenet10":
        return folder_splits(spec, arg, img_size, strict, IMAGENET10_SYNSETS)
    return metaalbum_splits(spec, arg, img_size, strict)
