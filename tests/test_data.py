"""Dataset specs on generated data only: synthetic probes, idx.gz, CIFAR batches, image folders."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image_folder
from leanvision.engine import data as data_module
from leanvision.engine import synthetic
from leanvision.engine.data import (
    IMAGENET10_SYNSETS,
    build_dataset,
    fashion_mnist_installed,
    read_idx,
    spec_kind,
)


def test_synthetic_is_deterministic_and_prefix_stable():
    a_images, a_targets = synthetic.generate("multilines", 6, 32, seed=3)
    b_images, b_targets = synthetic.generate("multilines", 3, 32, seed=3)
    np.testing.assert_array_equal(a_images[:3], b_images)
    np.testing.assert_array_equal(a_targets[:3], b_targets)
    other, _ = synthetic.generate("multilines", 3, 32, seed=4)
    assert not np.array_equal(other, b_images)
    val, _ = synthetic.generate("multilines", 3, 32, seed=3, split="val")
    assert not np.array_equal(val, b_images)


@pytest.mark.parametrize("name,size", [("lines", 32), ("multilines", 32), ("shapes", 64)])
def test_synthetic_images_and_labels(name, size):
    images, targets = synthetic.generate(name, 40, size)
    assert images.shape == (40, size, size) and images.dtype == np.uint8
    strokes = images == 255
    assert strokes.any(axis=(1, 2)).all()  # every image has something drawn
    assert images[~strokes].max() < synthetic.NOISE_LEVELS  # the rest is background noise
    if name == "lines":
        assert targets.dtype == np.int64 and set(targets) <= set(range(9))
    else:
        count = targets.sum(1)
        assert targets.shape == (40, len(synthetic.SYNTHETIC[name])) and count.min() >= 1
        assert count.max() <= (3 if name == "multilines" else 5)


def test_line_orientation_matches_label():
    """The principal axis of the stroke pixels points at the labelled angle (y axis up)."""
    images, targets = synthetic.generate("lines", 30, 64)
    for image, label in zip(images, targets):
        ys, xs = np.nonzero(image == 255)
        coords = np.stack([xs - xs.mean(), -(ys - ys.mean())])
        direction = np.linalg.eigh(coords @ coords.T)[1][:, -1]
        angle = np.degrees(np.arctan2(direction[1], direction[0])) % 180
        error = min(abs(angle - 20 * label), 180 - abs(angle - 20 * label))
        assert error < 6, (label, angle)


def test_synthetic_spec_options_and_errors():
    data = build_dataset("synthetic:shapes,train=5,val=3,seed=2", img_size=32)
    assert (len(data.train), len(data.val), data.num_classes, data.channels) == (5, 3, 5, 1)
    assert data.multilabel and data.image_size == 32 and data.classes[0] == "circle"
    image, target = data.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and target.shape == (5,)
    assert build_dataset("synthetic:lines,train=2,val=2").image_size == 32
    with pytest.raises(ValueError, match="unknown synthetic dataset 'circles'"):
        build_dataset("synthetic:circles")
    with pytest.raises(ValueError, match="bad option 'n=5'.*keys"):
        build_dataset("synthetic:lines,n=5")
    with pytest.raises(ValueError, match="unknown data spec 'mnist'.*fashion-mnist"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="needs a folder: cifar10:DIR"):
        build_dataset("cifar10")


def test_fashion_mnist_reads_idx_files(fashion_dir):
    data = build_dataset(f"fashion-mnist:{fashion_dir}")
    assert (len(data.train), len(data.val), data.num_classes, data.image_size) == (6, 4, 10, 28)
    assert data.train.augment and not data.val.augment  # crop-and-flip on the training split only
    raw = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    image, target = data.val[1]
    torch.testing.assert_close(image[0], (torch.from_numpy(raw[1].copy()).float() / 255 - 0.2860) / 0.3530)
    assert target.item() == read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz")[1]
    assert data.classes[9] == "ankle boot"
    assert build_dataset(f"fashion-mnist:{fashion_dir}", img_size=32).train[0][0].shape == (1, 32, 32)


def test_fashion_mnist_subsets_and_installed(fashion_dir, tmp_path, monkeypatch):
    full = build_dataset(f"fashion-mnist:{fashion_dir}")
    part = build_dataset(f"fashion-mnist:{fashion_dir},train=4,val=2")
    assert (len(part.train), len(part.val)) == (4, 2)  # the first N images of each file
    torch.testing.assert_close(part.train.images, full.train.images[:4])
    assert part.val.targets.tolist() == [0, 1]
    assert len(build_dataset(f"fashion-mnist:{fashion_dir},val=100").val) == 4  # at most the file's images
    with pytest.raises(ValueError, match="need train >= 1 and val >= 1, got 0 and 10000"):
        build_dataset(f"fashion-mnist:{fashion_dir},train=0")
    with pytest.raises(ValueError, match="bad option 'seed=1'"):
        build_dataset(f"fashion-mnist:{fashion_dir},seed=1")
    assert fashion_mnist_installed(str(fashion_dir)) and not fashion_mnist_installed(str(tmp_path / "none"))
    specs = ("fashion-mnist,val=5", "fashion-mnist:/d,val=5", "synthetic:lines,seed=1")
    assert [spec_kind(s) for s in specs] == ["fashion-mnist", "fashion-mnist", "synthetic"]
    with pytest.raises(ValueError, match="unknown data spec 'fashion,val=5'"):
        spec_kind("fashion,val=5")
    # without DIR: FASHION_MNIST_DIR, where `make data` installs the files
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", str(fashion_dir))
    assert fashion_mnist_installed() and len(build_dataset("fashion-mnist,train=3").train) == 3


def test_fashion_mnist_missing_and_corrupt(tmp_path, fashion_dir):
    with pytest.raises(FileNotFoundError, match=f"not found in {tmp_path / 'none'}.*apt-get install"):
        build_dataset(f"fashion-mnist:{tmp_path / 'none'}")
    labels = fashion_dir / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is truncated or corrupt"):
        build_dataset(f"fashion-mnist:{fashion_dir}")


def _write_cifar(path, n: int, label_key: str) -> None:
    data = np.random.default_rng(n).integers(0, 256, (n, 3072)).astype(np.uint8)
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: list(range(n))}, f)


def test_cifar_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for i in range(1, 6):
        _write_cifar(base / f"data_batch_{i}", 2, "labels")
    _write_cifar(base / "test_batch", 3, "labels")
    data = build_dataset(f"cifar10:{tmp_path}")
    assert (len(data.train), len(data.val), data.num_classes, data.channels) == (10, 3, 10, 3)
    assert data.train.augment and not data.val.augment
    assert [data.val[i][1].item() for i in range(3)] == [0, 1, 2]
    cifar100 = tmp_path / "c100" / "cifar-100-python"
    cifar100.mkdir(parents=True)
    _write_cifar(cifar100 / "train", 4, "fine_labels")
    _write_cifar(cifar100 / "test", 2, "fine_labels")
    assert build_dataset(f"cifar100:{cifar100}", img_size=40).val[0][0].shape == (3, 40, 40)
    with pytest.raises(FileNotFoundError, match="cifar100.*not found.*download=True"):
        build_dataset(f"cifar100:{tmp_path}")


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({"data": print, "labels": []}))
    with pytest.raises(ValueError, match="data_batch_1 is not a readable CIFAR batch.*refusing"):
        build_dataset(f"cifar10:{tmp_path}")


def test_folder_dataset_skips_or_fails_on_corrupt_images(tmp_path):
    image_folder(tmp_path, ["cat", "dog"])
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 corrupt or missing image.*broken.png"):
        data = build_dataset(f"folder:{tmp_path}", img_size=16)
    assert data.classes == ("cat", "dog") and (len(data.train), len(data.val)) == (4, 4)
    image, target = data.val[3]
    assert image.shape == (3, 16, 16) and target.item() == 1
    with pytest.raises(ValueError, match="corrupt or missing image .*broken.png"):
        build_dataset(f"folder:{tmp_path}", strict=True)
    with pytest.raises(FileNotFoundError, match="expected DIR/train/CLASS"):
        build_dataset(f"folder:{tmp_path / 'train'}")


def test_folder_dataset_finds_truncated_images_before_training(tmp_path):
    """Issue 20, item 3: a truncated JPEG passes Image.verify; the scan decodes it and finds it."""
    image_folder(tmp_path, ["cat", "dog"])
    whole = tmp_path / "whole.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(whole)
    (tmp_path / "train" / "cat" / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipped 1 corrupt or missing image.*cut.jpg"):
        data = build_dataset(f"folder:{tmp_path}", img_size=16)
    assert len(data.train) == 4 and all(data.train[i][0].shape == (3, 16, 16) for i in range(4))
    with pytest.raises(ValueError, match="corrupt or missing image .*cut.jpg.*truncated"):
        build_dataset(f"folder:{tmp_path}", strict=True)


def test_folder_dataset_refuses_different_classes(tmp_path):
    """Issue 20, item 4: train/{a,b} and val/{a,c} would report val accuracy on class a alone."""
    image_folder(tmp_path, ["a", "b"])
    (tmp_path / "val" / "b").rename(tmp_path / "val" / "c")
    with pytest.raises(
        ValueError, match=r"same class folders; only in train/: \['b'\], only in val/: \['c'\]"
    ):
        build_dataset(f"folder:{tmp_path}")


def test_imagenet10_picks_table6_synsets(tmp_path):
    synsets = [s for s, _ in IMAGENET10_SYNSETS]
    image_folder(tmp_path, [s for s in synsets if s != "n02430045"] + ["n99999999"], per_class=1)
    with pytest.raises(FileNotFoundError, match="lacks .*train/n02430045.*ImageNet-22K"):
        build_dataset(f"imagenet10:{tmp_path}")
    image_folder(tmp_path / "full", synsets + ["n99999999"], per_class=1)
    data = build_dataset(f"imagenet10:{tmp_path / 'full'}", img_size=16)
    assert data.num_classes == 10 and len(data.train) == 10 and data.classes[4] == "deer"
    assert [data.val[i][1].item() for i in range(10)] == list(range(10))


def _meta_album(root, counts: dict[str, int], columns: str = "FILE_NAME,CATEGORY,SUPER_CATEGORY") -> None:
    """A tiny Meta-Album dataset folder: images/, labels.csv, info.json."""
    (root / "images").mkdir(parents=True)
    lines = [columns]
    for category, count in counts.items():
        for i in range(count):
            name = f"{category}_{i:03d}.png"
            Image.new("RGB", (8, 8), (i * 5 % 256, 0, 0)).save(root / "images" / name)
            lines.append(f"{name},{category},all")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "info.json").write_text('{"dataset_name": "tiny"}')


def test_metaalbum_split_is_per_class_seeded_and_disjoint(tmp_path):
    _meta_album(tmp_path / "SET" / "TINY_Micro", {"owl": 5, "cat": 4, "ant": 6})
    spec = f"metaalbum:{tmp_path / 'SET' / 'TINY_Micro'},per_class=2"
    data = build_dataset(spec, img_size=16)
    assert data.classes == ("ant", "cat", "owl") and (len(data.train), len(data.val)) == (6, 6)
    train, val = (set(split.samples) for split in (data.train, data.val))
    assert not train & val
    assert sorted(index for _, index in train) == [0, 0, 1, 1, 2, 2]
    assert all(path.name.startswith(data.classes[index]) for path, index in train | val)
    assert build_dataset(spec, img_size=16).train.samples == data.train.samples  # same seed, same split
    assert build_dataset(spec + ",seed=1", img_size=16).train.samples != data.train.samples
    image, _ = data.val[0]
    assert image.shape == (3, 16, 16)


def test_metaalbum_bad_folders_say_what_was_expected(tmp_path):
    _meta_album(tmp_path / "SET" / "TINY_Micro", {"owl": 3, "cat": 4})
    with pytest.raises(FileNotFoundError, match=r"holds a set of datasets, pass one: metaalbum:.*TINY_Micro"):
        build_dataset(f"metaalbum:{tmp_path / 'SET'}")
    with pytest.raises(ValueError, match="class 'owl' has 3 images; a 2/2 split needs 4"):
        build_dataset(f"metaalbum:{tmp_path / 'SET' / 'TINY_Micro'},per_class=2")
    _meta_album(tmp_path / "BAD", {"owl": 4}, columns="FILE,LABEL,SUPER")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['CATEGORY', 'FILE_NAME'\]"):
        build_dataset(f"metaalbum:{tmp_path / 'BAD'}")
