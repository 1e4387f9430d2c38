"""Running detectors on images: detect_images (resizing, channels, S3FD's flip / multi-scale passes and box
voting, against a literal reference), the Haar baseline and `leanvision detect`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import leanvision
from leanvision.cli import app
from leanvision.cli.detect import write_image
from leanvision.deploy import fuse_for_inference
from leanvision.detection.data import read_image
from leanvision.detection.inference import QVGA_AREA, VGA_AREA, box_vote, detect_images, eval_area
from leanvision.errors import InvalidArgumentError, MissingFileError

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason="../shared/golden is not checked out")
HAAR_ASTRONAUT = [177.0, 66.0, 177.0 + 95, 66.0 + 95]  # notes: (x, y, w, h) = (177, 66, 95, 95), measured
runner = CliRunner()


class FixedBoxes(nn.Module):
    """A fake detector: the same boxes for every image of a batch, in its input's pixels (or, `relative`,
    in fractions of its width and height); it records the shape and mode of every batch it gets."""

    def __init__(self, boxes, scores, relative: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        self.boxes, self.scores = torch.tensor(boxes), torch.tensor(scores)
        self.relative, self.in_chans = relative, in_chans
        self.calls, self.inputs = [], []

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.calls.append((tuple(x.shape), self.training, torch.is_grad_enabled()))
        self.inputs.append(x)
        height, width = x.shape[2:]
        boxes = self.boxes * torch.tensor([width, height] * 2) if self.relative else self.boxes
        keep = self.scores > getattr(self, "score_thresh", -1.0)
        labels = torch.ones(int(keep.sum()), dtype=torch.int64)
        return [{"boxes": boxes[keep], "scores": self.scores[keep], "labels": labels} for _ in x]


def as_set(detections: dict[str, torch.Tensor]) -> list[tuple[float, ...]]:
    """Boxes and scores of a detection dict, rounded and sorted (order-free comparison)."""
    rows = torch.cat([detections["boxes"], detections["scores"][:, None]], 1).tolist()
    return sorted(tuple(round(v, 3) for v in row) for row in rows)


# ----------------------------------------------------------------------------------------------- box voting
def iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def reference_box_vote(boxes, scores, thresh, top_k):
    """Box voting as written in words: take the best remaining box and every remaining box overlapping it
    by IoU >= thresh, replace them with their score-weighted mean box and their max score; repeat."""
    remaining = sorted(zip(boxes.tolist(), scores.tolist()), key=lambda d: -d[1])  # stable, as argsort
    merged = []
    while remaining and len(merged) < top_k:
        top = remaining[0][0]
        group = [d for d in remaining if iou(top, d[0]) >= thresh]
        remaining = [d for d in remaining if iou(top, d[0]) < thresh]
        total = sum(score for _, score in group)
        box = [sum(b[k] * score for b, score in group) / total for k in range(4)]
        merged.append((box, max(score for _, score in group)))
    return merged


def clustered_boxes(n: int, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n boxes jittered around `clusters` random boxes (so groups overlap at many IoUs), random scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(clusters, 2, generator=g) * 400
    sizes = torch.rand(clusters, 2, generator=g) * 80 + 10
    pick = torch.randint(clusters, (n,), generator=g)
    xy = centres[pick] + torch.randn(n, 2, generator=g) * 6
    wh = sizes[pick] * (1 + 0.2 * torch.randn(n, 2, generator=g)).clamp(min=0.3)
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g)


@pytest.mark.parametrize("thresh, top_k", [(0.3, 750), (0.5, 750), (0.3, 7)])
def test_box_vote_equals_the_literal_reference(thresh, top_k):
    boxes, scores = clustered_boxes(300, 40, seed=int(thresh * 10) + top_k)
    scores[:20] = scores[20:40]  # ties: the first of equal scores leads
    merged_boxes, merged_scores = box_vote(boxes, scores, thresh, top_k)
    reference = reference_box_vote(boxes, scores, thresh, top_k)
    assert 7 <= len(reference) < 300 and len(merged_boxes) == len(reference)
    torch.testing.assert_close(merged_boxes, torch.tensor([b for b, _ in reference]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(merged_scores, torch.tensor([s for _, s in reference]))


def test_box_vote_small_cases():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    merged, scores = box_vote(boxes, torch.tensor([0.2, 0.6, 0.9]))
    # the two overlapping boxes (IoU 9/11) average with weights 0.6 and 0.2; the lone box is kept
    torch.testing.assert_close(merged, torch.tensor([[50.0, 50, 60, 60], [0.75, 0, 10.75, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6]))
    empty_boxes, empty_scores = box_vote(torch.zeros(0, 4), torch.zeros(0))
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


# ----------------------------------------------------------------------------------------- detect_images
def test_eval_area():
    assert eval_area(leanvision.create_model("rnnpool_face_m4")) == QVGA_AREA == (240, 320)
    assert eval_area(leanvision.create_model("rnnpool_face_qvga_mono")) == QVGA_AREA
    assert eval_area(leanvision.create_model("rnnpool_face_quant")) == VGA_AREA == (480, 640)


def test_resized_image_boxes_map_back():
    fake = FixedBoxes([[10.0, 20, 50, 60]], [0.8])
    big, small = torch.rand(3, 960, 1280), torch.rand(3, 200, 100)
    fake.train()
    out = detect_images(fake, [big, small, big.clone()])
    # 960x1280 has 4x the VGA area: shrunk by 0.5 to 480x640, the two together; 200x100 is not upscaled
    assert sorted(fake.calls) == [((1, 3, 200, 100), False, False), ((2, 3, 480, 640), False, False)]
    assert fake.training  # the caller's mode is restored
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[20.0, 40, 100, 120]]))
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[10.0, 20, 50, 60]]))
    assert out[2]["boxes"].tolist() == out[0]["boxes"].tolist()
    assert out[0]["scores"].tolist() == [pytest.approx(0.8)] and out[0]["labels"].tolist() == [1]
    assert out[0]["boxes"].dtype == torch.float32


def test_aspect_ratio_kept_and_boxes_clipped():
    fake = FixedBoxes([[0.5, 0.25, 1.2, 0.75], [-0.1, -0.1, 0.1, 0.1]], [0.9, 0.4], relative=True)
    (out,) = detect_images(fake, [torch.rand(3, 600, 1800)])
    scale = math.sqrt(480 * 640 / (600 * 1800))
    assert fake.calls[0][0] == (1, 3, round(600 * scale), round(1800 * scale))  # (320, 960)
    torch.testing.assert_close(out["boxes"], torch.tensor([[900.0, 150, 1800, 450], [0, 0, 180, 60]]))
    # 333x1000 rounds to 320x960: x and y scale back by their own factors, 1000/960 and 333/320
    (out,) = detect_images(fake, [torch.rand(3, 333, 1000)])
    assert fake.calls[1][0][2:] == (320, 960)
    torch.testing.assert_close(out["boxes"], torch.tensor([[500.0, 83.25, 1000, 249.75], [0, 0, 100, 33.3]]))


def test_channels_follow_the_detector():
    red = torch.zeros(3, 240, 320)
    red[0] = 1
    mono = FixedBoxes([[1.0, 1, 5, 5]], [0.5], in_chans=1)
    detect_images(mono, [red])
    assert mono.calls[0][0] == (1, 1, 240, 320)
    torch.testing.assert_close(mono.inputs[0], torch.full((1, 1, 240, 320), 0.299))
    rgb = FixedBoxes([[1.0, 1, 5, 5]], [0.5])
    gray = torch.rand(1, 48, 64)
    detect_images(rgb, [gray])
    torch.testing.assert_close(rgb.inputs[0], gray.expand(3, -1, -1)[None])


def test_score_thresh_overrides_the_models_own_for_the_call():
    fake = FixedBoxes([[0.0, 0, 5, 5], [10, 10, 20, 20]], [0.3, 0.7])
    fake.score_thresh = 0.1
    assert len(detect_images(fake, [torch.rand(3, 32, 32)])[0]["boxes"]) == 2
    (out,) = detect_images(fake, [torch.rand(3, 32, 32)], score_thresh=0.5)
    assert out["scores"].tolist() == [pytest.approx(0.7)] and fake.score_thresh == 0.1
    with pytest.raises(InvalidArgumentError, match="no score_thresh"):
        detect_images(FixedBoxes([[0.0, 0, 5, 5]], [0.3]), [torch.rand(3, 32, 32)], score_thresh=0.5)


def test_bad_images():
    fake = FixedBoxes([[0.0, 0, 5, 5]], [0.3])
    with pytest.raises(InvalidArgumentError, match=r"image 1: .*C = 1 or 3, got \[4, 8, 8\]"):
        detect_images(fake, [torch.rand(3, 8, 8), torch.rand(4, 8, 8)])
    with pytest.raises(InvalidArgumentError, match="0-1 float pixels, got torch.uint8"):
        detect_images(fake, [torch.zeros(3, 8, 8, dtype=torch.uint8)])


def test_flip_pass_maps_back_mirrored():
    fake = FixedBoxes([[10.0, 20, 50, 60]], [0.8])
    (out,) = detect_images(fake, [torch.rand(3, 480, 640)], flip=True, vote_thresh=1.01)  # no merging
    assert as_set(out) == [(10, 20, 50, 60, 0.8), (590, 20, 630, 60, 0.8)]
    assert torch.equal(fake.inputs[1], fake.inputs[0].flip(-1))


def test_multiscale_passes_map_back_and_keep_their_face_sizes():
    # tiny: 12x10 px in every input; big: 160x200; wide: 20x8
    fake = FixedBoxes([[10.0, 20, 22, 30], [100, 100, 260, 300], [300, 10, 320, 18]], [0.5, 0.9, 0.7])
    (out,) = detect_images(fake, [torch.rand(3, 480, 640)], multiscale=True, vote_thresh=1.01)
    assert [c[0][2:] for c in fake.calls] == [(480, 640), (240, 320), (720, 960), (960, 1280)]
    assert as_set(out) == sorted(
        [
            (10, 20, 22, 30, 0.5), (100, 100, 260, 300, 0.9), (300, 10, 320, 18, 0.7),  # all
            # 0.5x: big (clipped to the image) and wide (40x16 px: its longer side > 30); not tiny (24x20)
            (200, 200, 520, 480, 0.9), (600, 20, 640, 36, 0.7),
            (6.667, 13.333, 14.667, 20, 0.5), (200, 6.667, 213.333, 12, 0.7),  # 1.5x: not big (107x133)
            (5, 10, 11, 15, 0.5), (50, 50, 130, 150, 0.9), (150, 5, 160, 9, 0.7),  # 2x: all < 100 px
        ]
    )  # fmt: skip


def test_multiscale_sizes_are_measured_at_the_single_pass_scale():
    # a 960x1280 image runs at 0.5: big is 160x200 px there, 320x400 in the image
    fake = FixedBoxes([[10.0, 20, 22, 30], [100, 100, 260, 300]], [0.5, 0.9])
    (out,) = detect_images(fake, [torch.rand(3, 960, 1280)], multiscale=True, vote_thresh=1.01)
    assert [c[0][2:] for c in fake.calls] == [(480, 640), (240, 320), (720, 960), (960, 1280)]
    # kept: both at 1x; 0.5x only big (small is 24x20 at the single pass's scale); 1.5x only small (big is
    # 107x133 there); 2x both (big is 80x100 there: its shorter side < 100)
    assert len(out["boxes"]) == 6


def test_enlargement_is_capped_by_max_side():
    fake = FixedBoxes([[10.0, 20, 22, 30]], [0.5])
    detect_images(fake, [torch.rand(3, 480, 640)], multiscale=True, max_side=800)
    assert [c[0][2:] for c in fake.calls] == [(480, 640), (240, 320), (600, 800)]  # 1.5x and 2x -> 1.25x
    fake.calls.clear()
    detect_images(fake, [torch.rand(3, 480, 640)], multiscale=True, flip=True, max_side=640)
    assert [c[0][2:] for c in fake.calls] == [(480, 640), (480, 640), (240, 320)]  # no enlargement


def test_passes_of_one_face_vote_into_one_box():
    # symmetric about the vertical centre line, so the flipped pass finds the same box; the 0.5x pass keeps
    # it (> 30 px), the enlarged ones drop it (not < 100 px)
    fake = FixedBoxes([[0.25, 0.2, 0.75, 0.6]], [0.9], relative=True)
    (out,) = detect_images(fake, [torch.rand(3, 480, 640)], multiscale=True, flip=True)
    torch.testing.assert_close(out["boxes"], torch.tensor([[160.0, 96, 480, 288]]))
    assert out["scores"].tolist() == [pytest.approx(0.9)] and len(fake.calls) == 5


def test_a_real_detector_sees_the_resized_gray_image():
    model = leanvision.create_model("rnnpool_face_m4")
    image = torch.rand(3, 300, 400, generator=torch.Generator().manual_seed(0))
    (found,) = detect_images(model, [image])
    # by hand: gray, shrunk by sqrt(320 * 240 / (300 * 400)) = 0.8 to 240x320, boxes scaled back by 1.25
    gray = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    small = torch.nn.functional.interpolate(gray[None], size=(240, 320), mode="bilinear", antialias=True)
    with torch.no_grad():
        (expected,) = model.eval()(small)
    assert len(found["boxes"]) == len(expected["boxes"]) > 0
    boxes = (expected["boxes"] * 1.25).clamp(min=0)
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(max=400), boxes[:, 1::2].clamp(max=300)
    torch.testing.assert_close(found["boxes"], boxes)
    torch.testing.assert_close(found["scores"], expected["scores"])


# ----------------------------------------------------------------------------------------------- Haar
@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """skimage's astronaut (512x512 RGB, one face), uint8 [3, H, W]."""
    data = pytest.importorskip("skimage.data")
    return torch.from_numpy(data.astronaut()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def haar():
    pytest.importorskip("cv2")
    from leanvision.detection.haar import HaarCascade

    return HaarCascade()


def test_haar_finds_the_astronaut(haar, astronaut):
    gray = astronaut.float().mul(torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    color, mono = haar([astronaut.float() / 255, gray.round() / 255])
    for found in (color, mono):
        assert found["boxes"].dtype == torch.float32 and found["labels"].tolist() == [1]
        torch.testing.assert_close(found["boxes"], torch.tensor([HAAR_ASTRONAUT]), atol=1.0, rtol=0)
    assert color["scores"].item() == pytest.approx(5.83, abs=0.01)  # its level weight


def test_haar_no_face_and_bad_input(haar):
    data = pytest.importorskip("skimage.data")
    (found,) = haar([torch.from_numpy(data.camera()).float()[None] / 255])  # notes: Haar finds 0
    assert found["boxes"].shape == (0, 4) and found["scores"].shape == (0,)
    from leanvision.detection.haar import HaarCascade

    with pytest.raises(MissingFileError, match="no_such_cascade.xml"):
        HaarCascade("no_such_cascade.xml")
    with pytest.raises(InvalidArgumentError, match=r"got \[2, 8, 8\]"):
        haar([torch.rand(2, 8, 8)])


def test_haar_without_opencv_names_the_extra(monkeypatch):
    from leanvision.detection.haar import HaarCascade

    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    with pytest.raises(InvalidArgumentError, match=r"pip install 'leanvision\[detection\]'"):
        HaarCascade()


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def astronaut_png(tmp_path, astronaut) -> Path:
    path = tmp_path / "astronaut.png"
    write_image(astronaut, path)
    assert torch.equal(read_image(str(path)), astronaut)
    return path


def detect(*args: str):
    return runner.invoke(app, ["detect", *map(str, args)])


def read_outputs(out: Path, image: Path) -> list[dict]:
    """The detections.json entry of `image`, after checking its drawing and that boxes lie in it."""
    drawn = read_image(str(out / f"{image.stem}.png"))
    assert drawn.shape == (3, 512, 512)
    found = json.loads((out / "detections.json").read_text())[str(image)]
    for d in found:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 512 and 0 <= y1 <= y2 <= 512
    return found


def test_cli_haar(tmp_path, astronaut_png, haar):
    result = detect("haar", astronaut_png, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (found,) = read_outputs(tmp_path / "out", astronaut_png)
    assert found["box"] == pytest.approx(HAAR_ASTRONAUT, abs=1.0)
    assert "astronaut.png" in result.output and "all detections" in result.output


def test_cli_random_weights(tmp_path, astronaut_png):
    torch.manual_seed(0)
    result = detect("rnnpool_face_quant", astronaut_png, "--out", tmp_path / "out", "--random-weights")
    assert result.exit_code == 0, result.output
    found = read_outputs(tmp_path / "out", astronaut_png)
    assert found and all(d["score"] >= 0.5 for d in found)
    assert f"{len(found)}" in result.output


@pytest.fixture
def golden_quant(tmp_path) -> dict[str, Path]:
    """One set of weights in three files: EdgeML train.py's state_dict, ours, and a training run's last.pt."""
    if not GOLDEN.is_dir():
        pytest.skip("../shared/golden is not checked out")
    paths = {k: tmp_path / f"{k}.pt" for k in ("edgeml", "ours", "last")}
    torch.save(
        torch.load(GOLDEN / "edgeml_rpool_face_quant.pt", weights_only=True)["state_dict"], paths["edgeml"]
    )
    model = leanvision.create_model("rnnpool_face_quant", pretrained=paths["edgeml"])
    torch.save(model.state_dict(), paths["ours"])
    torch.save(
        {"model": model.state_dict(), "config": {"model": "rnnpool_face_quant"}, "epoch": 1}, paths["last"]
    )
    return paths


@needs_golden
def test_cli_checkpoints(tmp_path, astronaut_png, astronaut, golden_quant):
    model = leanvision.create_model("rnnpool_face_quant", pretrained=golden_quant["edgeml"])
    (expected,) = detect_images(fuse_for_inference(model), [astronaut.float() / 255])  # as the CLI runs it
    keep = expected["scores"] >= 0.6
    assert 0 < int(keep.sum()) < len(keep)
    for kind, path in golden_quant.items():
        out = tmp_path / kind
        result = detect(
            "rnnpool_face_quant", astronaut_png, "--checkpoint", path, "--out", out, "--threshold", 0.6
        )
        assert result.exit_code == 0, (kind, result.output)
        found = read_outputs(out, astronaut_png)
        assert [d["score"] for d in found] == [round(s, 4) for s in expected["scores"][keep].tolist()]
        boxes = torch.tensor([d["box"] for d in found])
        torch.testing.assert_close(boxes, expected["boxes"][keep], atol=0.01, rtol=0)


@needs_golden
def test_cli_checkpoint_of_another_detector(tmp_path, astronaut_png):
    result = detect(
        "rnnpool_face_quant", astronaut_png, "--out", tmp_path / "out",
        "--checkpoint", GOLDEN / "edgeml_rpool_face_qvga_monochrome.pt",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error:" in result.output and "not a rnnpool_face_quant checkpoint" in result.output
    assert "1 input channels" in result.output


def test_cli_image_errors(tmp_path, astronaut_png, astronaut):
    broken = tmp_path / "broken.png"
    png = astronaut_png.read_bytes()
    broken.write_bytes(png[: len(png) // 2])
    out = tmp_path / "out"
    for bad, message in ((tmp_path / "missing.jpg", "image file not found"), (broken, "cannot decode image")):
        result = detect("rnnpool_face_quant", astronaut_png, bad, "--out", out, "--random-weights")
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and message in result.output and str(bad) in result.output
    assert not out.exists()  # images are all read before anything is detected or written
    other = tmp_path / "other"
    other.mkdir()
    write_image(astronaut, other / "astronaut.png")
    result = detect("haar", astronaut_png, other / "astronaut.png", "--out", out)
    assert result.exit_code == 2 and "would both be drawn to" in result.output


def test_cli_model_errors(tmp_path, astronaut_png):
    out = str(tmp_path / "out")
    result = detect("rexnet_100", astronaut_png, "--out", out, "--random-weights")
    assert result.exit_code == 2 and "'rexnet_100' is not a face detector" in result.output
    assert "haar" in result.output and "rnnpool_face_quant" in result.output
    result = detect("rnnpool_face_quant", astronaut_png, "--out", out)
    assert result.exit_code == 2 and "needs --checkpoint FILE" in result.output
    assert "--random-weights" in result.output
    result = detect("haar", astronaut_png, "--out", out, "--checkpoint", "x.pt", "--flip")
    assert result.exit_code == 2 and "haar takes none of --checkpoint, --flip" in result.output
