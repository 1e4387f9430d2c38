"""Detection data: the generated faces, S3FD's augmentation on boxes, the WIDER / SCUT-HEAD / COCO readers
(tiny layouts written here), bad annotations and images, and training / evaluating through the engine."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leanvision.cli import app
from leanvision.detection.augment import S3FDAugment, SSDAugment
from leanvision.detection.data import build_detection_data, collate_detection
from leanvision.detection.synthetic_faces import HEIGHT, MAX_SIDE, MIN_SIDE, WIDTH, render
from leanvision.detection.task import DetectionTask, detection_ap, detection_task
from leanvision.engine.train import TrainConfig, train
from leanvision.errors import DataError, InvalidArgumentError, MissingFileError

runner = CliRunner()
SYNTHETIC = "synthetic:faces,train=24,val=8"


# -------------------------------------------------------------------------------------------- synthetic
def test_synthetic_faces_are_deterministic_and_boxed():
    image, boxes = render(3, "val", 5)
    again, same = render(3, "val", 5)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    assert np.array_equal(image, again) and np.array_equal(boxes, same)
    assert not np.array_equal(render(3, "train", 5)[0], image)  # the splits are different streams
    sides = []
    for i in range(40):
        _, boxes = render(0, "train", i)
        assert 1 <= len(boxes) <= 8
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= WIDTH).all() and (boxes[:, 3] <= HEIGHT).all()
        sides += (boxes[:, 2] - boxes[:, 0]).tolist()
    assert MIN_SIDE <= min(sides) < 16 and 64 < max(sides) <= MAX_SIDE  # every size bucket is present


def test_synthetic_splits_and_targets():
    data = build_detection_data(SYNTHETIC, channels=3)
    assert (len(data.train), len(data.val), data.image_size) == (24, 8, 320)
    assert data.subsets == ("easy", "medium", "hard")
    image, target = data.val[2]
    pixels, boxes = render(0, "val", 2)
    assert image.shape == (3, HEIGHT, WIDTH) and torch.equal(
        image, torch.from_numpy(pixels).permute(2, 0, 1) / 255
    )
    assert torch.equal(target["boxes"], torch.from_numpy(boxes)) and target["image_id"] == "val/2"
    side = torch.minimum(
        target["boxes"][:, 2] - target["boxes"][:, 0], target["boxes"][:, 3] - target["boxes"][:, 1]
    )
    for name, size in (("easy", 64), ("medium", 32), ("hard", 16)):
        assert torch.equal(target["subsets"][name], side >= size)
    crop, crop_target = data.train[0]
    assert crop.shape == (3, 320, 320) and crop.dtype == torch.float32 and 0 <= crop.min() <= crop.max() <= 1
    assert set(crop_target) == {"boxes", "labels"}
    gray = build_detection_data(SYNTHETIC, channels=1, img_size=256)
    assert gray.train[0][0].shape == (1, 256, 256) and gray.val[0][0].shape == (1, HEIGHT, WIDTH)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    torch.testing.assert_close(gray.val[2][0], (image * weights).sum(0, keepdim=True), atol=1e-5, rtol=0)


def test_spec_errors():
    for spec, message in (
        ("synthetic:cars", "expected synthetic:faces"),
        ("synthetic:faces,train=x", "bad option 'train=x'"),
        ("widerface:", "needs a folder"),
        ("faces:DIR", "unknown detection data spec"),
    ):
        with pytest.raises(DataError, match=message):
            build_detection_data(spec)
    with pytest.raises(DataError, match="multiple of 32"):
        build_detection_data(SYNTHETIC, img_size=100)


# ------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize(
    "augment",
    [S3FDAugment(160), SSDAugment(160), SSDAugment(160, zoom_out=True)],
    ids=["s3fd", "ssdlite", "ssd"],
)
def test_augmented_boxes_still_bound_their_objects(augment):
    """A white and a gray rectangle on black: after any crop, resize and flip, each kept box encloses
    its colour (its interior, 2 px in), is enclosed by something darker (a ring 2 px out), unless the
    crop cut the object, and keeps its label (the white one is brighter inside)."""
    image = torch.zeros(3, 120, 200, dtype=torch.uint8)
    objects, labels = torch.tensor([[30.0, 20, 70, 70], [120, 60, 136, 80]]), torch.tensor([1, 2])
    for (x1, y1, x2, y2), value in zip(objects.int().tolist(), (255, 140)):
        image[:, y1:y2, x1:x2] = value
    seen = 0
    for seed in range(60):
        torch.manual_seed(seed)
        out, boxes, out_labels = augment(image, objects, labels)
        assert out.shape == (3, 160, 160) and boxes.dtype == torch.float32 and len(out_labels) == len(boxes)
        gray = out.mean(0)
        brightness = {}
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), out_labels.tolist()):
            assert x2 - x1 >= augment.sanitize.transforms[1].min_size  # smaller objects are dropped
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
            inner = gray[round(y1) + 2 : round(y2) - 2, round(x1) + 2 : round(x2) - 2]
            assert inner.numel() == 0 or inner.min() > gray.max() * 0.5
            if inner.numel():
                brightness[label] = inner.mean()
            ring = [gray[max(0, round(y1) - 3), round(x1) + 2 : round(x2) - 2]] if y1 >= 3 else []
            ring += [gray[round(y1) + 2 : round(y2) - 2, round(x2) + 2]] if x2 <= 157 else []
            for edge in ring:
                assert edge.numel() == 0 or edge.max() < gray.max() * 0.5
            seen += 1
        if len(brightness) == 2:
            assert brightness[1] > brightness[2]
    assert seen > 40


def test_augmentation_without_faces_resizes():
    out, boxes, labels = S3FDAugment(64, channels=1)(
        torch.full((3, 50, 80), 128, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    )
    assert out.shape == (1, 64, 64) and boxes.shape == (0, 4) and labels.shape == (0,)


# ------------------------------------------------------------------------------------------ file datasets
def write_jpeg(path: Path, height: int = 60, width: int = 80) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def wider_layout(root: Path) -> None:
    """Two train and two val images; a 0-face image; a zero-area box; a malformed face line."""
    for split, names in (
        ("train", ["0--Parade/a.jpg", "0--Parade/b.jpg"]),
        ("val", ["1--Handshaking/c.jpg", "1--Handshaking/d.jpg"]),
    ):
        for name in names:
            write_jpeg(root / f"WIDER_{split}" / "images" / name)
    split = root / "wider_face_split"
    split.mkdir()
    (split / "wider_face_train_bbx_gt.txt").write_text(
        "0--Parade/a.jpg\n2\n10 10 20 30 0 0 0 0 0 0\n5 5 0 10 0 0 0 0 0 0\n"
        "0--Parade/b.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
    )
    (split / "wider_face_val_bbx_gt.txt").write_text(
        "1--Handshaking/c.jpg\n3\n1 2 40 40 0 0 0 0 0 0\n50 10 8 8 0 0 0 0 0 0\n60 30 10 90 0 0 0 0 0 0\n"
        "1--Handshaking/d.jpg\n2\n10 10 20 20 0 0 0 0 0 0\nten 10 20 20\n"
    )
    from scipy.io import savemat

    tools = root / "eval_tools" / "ground_truth"
    tools.mkdir(parents=True)
    keep = {"easy": ([1], [1]), "medium": ([1, 3], [1]), "hard": ([1, 2, 3], [1])}
    for subset, (c, d) in keep.items():
        files = np.empty((1, 1), dtype=object)
        files[0, 0] = np.array([[np.array(["c"])], [np.array(["d"])]], dtype=object)
        gts = np.empty((1, 1), dtype=object)
        gts[0, 0] = np.array(
            [[np.array(c, dtype=np.float64)[:, None]], [np.array(d, dtype=np.float64)[:, None]]], dtype=object
        )
        savemat(tools / f"wider_{subset}_val.mat", {"file_list": files, "gt_list": gts})


def test_widerface_layout(tmp_path):
    wider_layout(tmp_path)
    with pytest.warns(UserWarning) as caught:
        data = build_detection_data(f"widerface:{tmp_path}")
    messages = " ".join(str(w.message) for w in caught)
    assert "malformed annotation" in messages and "wider_face_val_bbx_gt.txt:9" in messages
    assert "zero-area" in messages
    assert data.image_size == 640 and data.subsets == ("easy", "medium", "hard")
    assert [len(a.boxes) for a in data.train.annotations] == [1, 0]
    image, target = data.val[0]
    assert image.shape == (3, 60, 80) and target["image_id"] == "1--Handshaking/c.jpg"
    expected = torch.tensor([[1.0, 2, 41, 42], [50, 10, 58, 18], [60, 30, 70, 60]])  # the last clipped to 60
    assert torch.equal(target["boxes"], expected)
    assert [target["subsets"][s].tolist() for s in ("easy", "medium", "hard")] == [
        [True, False, False], [True, False, True], [True, True, True],
    ]  # fmt: skip
    assert data.val[1][1]["boxes"].tolist() == [[10.0, 10, 30, 30]]
    with (
        pytest.raises(DataError, match="wider_face_val_bbx_gt.txt:9"),
        pytest.warns(UserWarning, match="zero"),
    ):
        build_detection_data(f"widerface:{tmp_path}", strict=True)


def test_widerface_missing_parts_are_named(tmp_path):
    with pytest.raises(MissingFileError, match="wider_face_train_bbx_gt.txt not found.*WIDERFACE"):
        build_detection_data(f"widerface:{tmp_path}")
    wider_layout(tmp_path)
    for mat in (tmp_path / "eval_tools" / "ground_truth").glob("*hard*"):
        mat.unlink()
    with (
        pytest.raises(MissingFileError, match="wider_hard_val.mat not found.*eval_tools"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        build_detection_data(f"widerface:{tmp_path}")


def voc_xml(boxes: list[list[int]]) -> str:
    objects = "".join(
        f"<object><name>person</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for a, b, c, d in boxes
    )
    return f"<annotation>{objects}</annotation>"


def test_scut_head_split_and_bad_files(tmp_path):
    part = tmp_path / "SCUT_HEAD_Part_B"
    (part / "Annotations").mkdir(parents=True)
    for i in range(10):
        (part / "Annotations" / f"PartB_{i:05d}.xml").write_text(voc_xml([[5, 5, 20 + i, 25]]))
        write_jpeg(part / "JPEGImages" / f"PartB_{i:05d}.jpg")
    (part / "Annotations" / "PartB_00010.xml").write_text("<annotation><object><bndbox><xmin>x")
    (part / "Annotations" / "PartB_00011.xml").write_text(voc_xml([[1, 1, 9, 9]]))
    (part / "JPEGImages" / "PartB_00011.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning) as caught:
        data = build_detection_data(f"scut-head:{tmp_path},seed=1", channels=1)
    messages = " ".join(str(w.message) for w in caught)
    assert "PartB_00010.xml" in messages and "PartB_00011.jpg" in messages
    assert (len(data.train), len(data.val), data.image_size) == (8, 2, 320)
    assert data.subsets == ("easy", "medium", "hard", "all")
    ids = {a.image_id for a in data.val.annotations}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ids == {a.image_id for a in build_detection_data(f"scut-head:{part},seed=1").val.annotations}
        assert ids != {a.image_id for a in build_detection_data(f"scut-head:{part},seed=2").val.annotations}
    image, target = data.val[0]
    assert image.shape == (1, 60, 80) and target["subsets"]["all"].all()
    with pytest.raises(DataError, match="PartB_00010.xml"):
        build_detection_data(f"scut-head:{part}", strict=True)
    with pytest.raises(MissingFileError, match="no SCUT-HEAD part.*SCUT-HEAD-Release"):
        build_detection_data(f"scut-head:{tmp_path / 'nothing'}")


def test_coco_boxes(tmp_path):
    for split in ("train2017", "val2017"):
        write_jpeg(tmp_path / split / "1.jpg")
        write_jpeg(tmp_path / split / "2.jpg")
    annotations = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": 1, "bbox": [10, 10, 20, 30], "category_id": 1, "iscrowd": 0},
            {"image_id": 1, "bbox": [0, 0, 50, 50], "category_id": 1, "iscrowd": 1},
            {"image_id": 2, "bbox": [5, 5, 10, 10], "category_id": 3},
            {"image_id": 7, "bbox": [5, 5, 10, 10], "category_id": 3},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(annotations))
    with pytest.warns(UserWarning, match="annotation 3 has no known image_id"):
        data = build_detection_data(f"coco-boxes:{tmp_path}")
    assert [a.boxes.tolist() for a in data.val.annotations] == [[[10.0, 10, 30, 40]], [[5.0, 5, 15, 15]]]
    with pytest.warns(UserWarning):
        people = build_detection_data(f"coco-boxes:{tmp_path},category=1")
    assert [len(a.boxes) for a in people.val.annotations] == [1, 0]
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{")
    with pytest.raises(DataError, match="not a COCO annotation file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_detection_data(f"coco-boxes:{tmp_path}")


# ------------------------------------------------------------------------------------------- the engine
def detection_config(out: Path, **overrides) -> TrainConfig:
    settings = dict(
        epochs=2,
        batch_size=8,
        lr=0.01,
        wd=5e-4,
        warmup_epochs=1,
        progress=False,
        out=str(out),
        task="detection",
    )
    return TrainConfig("rnnpool_face_m4", SYNTHETIC, **{**settings, **overrides})


def test_detection_training_runs_and_resumes_exactly(tmp_path):
    full = train(detection_config(tmp_path / "full"), task=DetectionTask())
    assert full.status == "completed" and [r["epoch"] for r in full.history] == [1, 2]
    row = full.history[-1]
    assert {"train_loss", "train_loss_box_reg", "train_loss_classifier", "val_ap", "val_ap_hard"} <= set(row)
    assert row["val_ap"] == row["val_ap_hard"] and 0 <= row["val_ap"] <= 1
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["config"]["task"] == "detection" and "best_val_ap" in summary
    stopped = train(
        detection_config(tmp_path / "part"), task=DetectionTask(), on_epoch_end=lambda r: r["epoch"] == 1
    )
    assert stopped.status == "stopped"
    resumed = train(detection_config(tmp_path / "part", resume=True), task=DetectionTask())
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in full.history]
    with pytest.raises(InvalidArgumentError, match="task"):
        train(detection_config(tmp_path / "full", resume=True, task="classification"))


def test_detection_task_refuses_classifiers(tmp_path):
    with pytest.raises(InvalidArgumentError, match="trains a face detector.*rnnpool_face_quant.*ssdlite_"):
        detection_task("rexnet_100")
    with pytest.raises(InvalidArgumentError, match="trains a face detector"):
        train(TrainConfig("rexnet_100", SYNTHETIC, out=str(tmp_path), task="detection"), task=DetectionTask())


def test_detection_ap_of_perfect_and_empty_detectors():
    data = build_detection_data(SYNTHETIC)

    def perfect(images):
        index = iter(perfect.targets)
        return [
            {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"]))}
            for t in (next(index) for _ in images)
        ]

    perfect.targets = [data.val[i][1] for i in range(len(data.val))]
    aps = detection_ap(perfect, data, batch_size=len(data.val), max_faces=3)
    assert aps["ap"] == aps["ap_hard"] == pytest.approx(1.0) and aps["images"] == 8
    assert "ap_hard (<= 3 faces)" in aps
    nothing = detection_ap(
        lambda ims: [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)} for _ in ims], data
    )
    assert nothing["ap"] == 0.0


def test_cli_train_and_eval_detection(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--task", "detection", "--model", "rnnpool_face_m4", "--data", SYNTHETIC, "--epochs", "1",
         "--batch-size", "8", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "val AP" in result.output
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["lr"], config["wd"], config["warmup_epochs"]) == (0.01, 5e-4, 1)  # detection defaults
    result = runner.invoke(
        app,
        ["eval", "--task", "detection", "--model", "rnnpool_face_m4", "--checkpoint", str(out / "last.pt"),
         "--data", SYNTHETIC, "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["ap"] == pytest.approx(json.loads((out / "summary.json").read_text())["val"]["ap"])
    result = runner.invoke(
        app,
        ["eval", "--task", "detection", "--model", "rnnpool_face_quant", "--checkpoint", str(out / "last.pt"),
         "--data", SYNTHETIC],
    )  # fmt: skip
    assert result.exit_code == 2 and "checkpoint of model 'rnnpool_face_m4'" in result.output


def test_cli_eval_haar_baseline():
    pytest.importorskip("cv2")
    result = runner.invoke(app, ["eval", "--task", "detection", "--baseline", "haar", "--data", SYNTHETIC])
    assert result.exit_code == 0, result.output
    for column in ("easy", "medium", "hard", "hard (<= 3 faces)"):
        assert column in result.output


def test_collate_keeps_lists():
    data = build_detection_data(SYNTHETIC)
    images, targets = collate_detection([data.val[0], data.val[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == "val/1"
