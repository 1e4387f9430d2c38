"""S3FD priors, box coding, scale-compensation matching and the multibox loss of the RNNPool-Face detectors.

The library's matching and loss are vectorised over the batch; the references here are literal (one image,
one face, one prior at a time, in Python floats), written from EdgeML's algorithm (shared notes 1.3).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from leanvision.errors import InvalidArgumentError
from leanvision.models.face.loss import multibox_loss, target_boxes
from leanvision.models.face.matching import match_priors
from leanvision.models.face.priors import decode, encode, prior_boxes

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
VGA = dict(steps=(4, 8, 16, 32, 64, 128), anchor_sizes=(16, 32, 64, 128, 256, 512))
QVGA = dict(steps=(8, 8, 16, 16), anchor_sizes=(8, 16, 32, 48))
VGA_MAPS_640x480 = [(120, 160), (60, 80), (30, 40), (15, 20), (8, 10), (4, 5)]
QVGA_MAPS_320x240 = [(30, 40), (30, 40), (15, 20), (15, 20)]


def test_prior_counts_and_values():
    vga = prior_boxes(VGA_MAPS_640x480, (480, 640), **VGA)
    qvga = prior_boxes(QVGA_MAPS_320x240, (240, 320), **QVGA)
    assert (len(vga), len(qvga)) == (25_600, 3_000)  # 3000 x (4 + 2) = the C reference's OUTPUT_SIZE 18000
    torch.testing.assert_close(vga[0], torch.tensor([2 / 640, 2 / 480, 16 / 640, 16 / 480]))
    torch.testing.assert_close(vga[1], torch.tensor([6 / 640, 2 / 480, 16 / 640, 16 / 480]))  # row-major
    torch.testing.assert_close(
        vga[-1], torch.tensor([4.5 * 128 / 640, 3.5 * 128 / 480, 512 / 640, 512 / 480])
    )
    torch.testing.assert_close(qvga[1200], torch.tensor([4 / 320, 4 / 240, 16 / 320, 16 / 240]))  # 2nd map
    for name, ours in (("quant", vga), ("qvga_monochrome", qvga)):
        path = GOLDEN / f"edgeml_rpool_face_{name}.pt"
        if path.is_file():
            torch.testing.assert_close(ours, torch.load(path, weights_only=True)["priors"], rtol=0, atol=1e-6)


def test_priors_are_made_once_and_again_when_changed_in_place():
    first = prior_boxes(QVGA_MAPS_320x240, (240, 320), **QVGA)
    assert prior_boxes(QVGA_MAPS_320x240, (240, 320), **QVGA) is first  # no copy per call
    first.zero_()
    again = prior_boxes(QVGA_MAPS_320x240, (240, 320), **QVGA)
    assert again.abs().sum() > 0 and again is not first
    torch.testing.assert_close(again[1200], torch.tensor([4 / 320, 4 / 240, 16 / 320, 16 / 240]))


def test_encode_decode():
    g = torch.Generator().manual_seed(0)
    priors = torch.cat([torch.rand(50, 2, generator=g), torch.rand(50, 2, generator=g) * 0.5 + 0.01], 1)
    corner = torch.rand(50, 2, generator=g)
    boxes = torch.cat([corner, corner + torch.rand(50, 2, generator=g) * 0.5 + 0.01], 1)
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes, rtol=1e-5, atol=1e-6)
    loc = torch.randn(50, 4, generator=g)
    torch.testing.assert_close(encode(decode(loc, priors), priors), loc, rtol=1e-4, atol=1e-4)
    # by hand: a prior (cx 0.5, cy 0.5, w 0.2, h 0.4) and boxes around it
    prior = torch.tensor([0.5, 0.5, 0.2, 0.4])
    same, shifted, doubled = torch.tensor(
        [[0.4, 0.3, 0.6, 0.7], [0.42, 0.3, 0.62, 0.7], [0.3, 0.1, 0.7, 0.9]]
    )
    torch.testing.assert_close(encode(same, prior), torch.zeros(4))
    torch.testing.assert_close(encode(shifted, prior), torch.tensor([1.0, 0, 0, 0]))  # 0.02 = 0.1 * w
    torch.testing.assert_close(
        encode(doubled, prior), torch.tensor([0, 0, math.log(2) / 0.2, math.log(2) / 0.2])
    )


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_match(faces, priors, thresholds=(0.1, 0.35, 0.5)):
    """EdgeML's `match` for one image, literally: labels and the matched face of each prior, and what the
    case exercised (faces forced onto a prior of IoU < 0.35, priors added by stage 2)."""
    low, positive, high = thresholds
    corners = [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h in priors]
    if not faces:
        return [0] * len(priors), [None] * len(priors), (0, 0)
    overlaps = [[iou(face, prior) for prior in corners] for face in faces]
    best_face, best_face_iou = [], []
    for p in range(len(priors)):
        j = max(range(len(faces)), key=lambda j: overlaps[j][p])
        best_face.append(j)
        best_face_iou.append(overlaps[j][p])
    for j, row in enumerate(overlaps):  # each face's best prior is forced to it; the last face wins
        p = row.index(max(row))
        best_face[p], best_face_iou[p] = j, 2.0
    labels = [int(v >= positive) for v in best_face_iou]
    best_prior_iou = [max(row) for row in overlaps]
    n = (sum(v >= positive for v in best_prior_iou) + sum(v >= high for v in best_prior_iou)) // 2
    candidates = [p for p in range(len(priors)) if low < best_face_iou[p] < positive]
    added = sorted(candidates, key=lambda p: -best_face_iou[p])[:n]
    for p in added:
        labels[p] = 1
    forced = sum(v < positive for v in best_prior_iou)
    return labels, [faces[j] for j in best_face], (forced, len(added))


def padded(faces_per_image: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    most = max(1, max(len(f) for f in faces_per_image))
    boxes = torch.zeros(len(faces_per_image), most, 4)
    valid = torch.zeros(len(faces_per_image), most, dtype=torch.bool)
    for i, faces in enumerate(faces_per_image):
        if faces:
            boxes[i, : len(faces)], valid[i, : len(faces)] = torch.tensor(faces), True
    return boxes, valid


def small_priors() -> torch.Tensor:
    """A small S3FD-like pyramid on a unit image: 8x8 at size 0.1, 4x4 at 0.25, 2x2 at 0.5."""
    return prior_boxes([(8, 8), (4, 4), (2, 2)], (1, 1), (1 / 8, 1 / 4, 1 / 2), (0.1, 0.25, 0.5))


def random_faces(rng: random.Random, count: int) -> list[list[float]]:
    faces = []
    for _ in range(count):
        w = rng.uniform(0.04, 0.5)
        h = w * rng.uniform(0.7, 1.4)
        x, y = rng.uniform(-0.05, 1.0 - w / 2), rng.uniform(-0.05, 1.0 - h / 2)
        faces.append([x, y, x + w, y + h])
    return faces


def random_batches(seeds: range):
    for seed in seeds:
        rng = random.Random(seed)
        yield seed, [random_faces(rng, rng.choice([0, 1, 2, 3, 6])) for _ in range(4)]


def test_matching_equals_the_literal_reference():
    priors = small_priors()
    exercised = torch.zeros(2, dtype=torch.int64)
    for _, faces_per_image in random_batches(range(40)):
        labels, matched = match_priors(*padded(faces_per_image), priors)
        for i, faces in enumerate(faces_per_image):
            expected, expected_boxes, counts = reference_match(faces, priors.tolist())
            assert labels[i].tolist() == expected
            positives = [p for p, label in enumerate(expected) if label]
            expected_matched = torch.tensor([expected_boxes[p] for p in positives]).reshape(-1, 4)
            torch.testing.assert_close(matched[i, positives], expected_matched)
            exercised += torch.tensor(counts)
    assert (exercised > 10).all()  # both the forced matches and stage 2


def prior_at(face: list[float], dx: float) -> list[float]:
    """The prior of the face's size, shifted right by dx."""
    return [(face[0] + face[2]) / 2 + dx, (face[1] + face[3]) / 2, face[2] - face[0], face[3] - face[1]]


def test_matching_by_hand():
    face = [0.2, 0.2, 0.4, 0.4]
    # a 0.2-wide prior shifted by dx overlaps it by (0.2 - dx) / (0.2 + dx)
    shifts = [0.0, 0.1, 0.12, 0.15, 0.18, 0.05]  # IoU 1, 1/3, 0.25, 0.143, 0.053, 0.6
    priors = torch.tensor([prior_at(face, dx) for dx in shifts])
    labels, matched = match_priors(*padded([[face]]), priors)
    # IoU >= 0.35: priors 0 and 5; N = (1 + 1) // 2 = 1 more from (0.1, 0.35): prior 1 (1/3)
    assert labels.tolist() == [[1, 1, 0, 0, 0, 1]]
    torch.testing.assert_close(matched[0], torch.tensor([face] * 6))

    # best IoU 0.43 (>= 0.35, < 0.5): N = (1 + 0) // 2 = 0, so no stage 2
    labels, _ = match_priors(
        *padded([[face]]), torch.tensor([prior_at(face, dx) for dx in (0.08, 0.1, 0.12)])
    )
    assert labels.tolist() == [[1, 0, 0]]  # IoU 0.43, 1/3, 0.25

    # a face whose best prior overlaps it by 0.25 only gets that prior anyway (and N = 0)
    labels, _ = match_priors(*padded([[face]]), priors[2:5])
    assert labels.tolist() == [[1, 0, 0]]

    # two faces matched exactly: N = (2 + 2) // 2 = 2 of the three candidates, by IoU, of either face
    other = [0.6, 0.6, 0.8, 0.8]
    two = torch.tensor([prior_at(face, 0), prior_at(face, 0.12), prior_at(other, 0), prior_at(other, 0.1)])
    two = torch.cat([two, torch.tensor([prior_at(other, 0.15)])])
    labels, matched = match_priors(*padded([[face, other]]), two)
    assert labels.tolist() == [[1, 1, 1, 1, 0]]  # IoU 1, 0.25, 1, 1/3, 0.143
    torch.testing.assert_close(matched[0], torch.tensor([face, face, other, other, other]))


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reference_loss(loc, conf, priors, faces_per_image, ratio=3):
    """EdgeML's MultiBoxLoss, literally: per image, smooth-L1 of the positives' offsets, cross-entropy of
    the positives and of the `ratio` x #positives negatives of highest cross-entropy; both sums over the
    batch divided by its number of positives."""
    loss_box = loss_cls = 0.0
    total = 0
    for b, faces in enumerate(faces_per_image):
        labels, matched, _ = reference_match(faces, priors)
        ce = [
            math.log(sum(math.exp(v) for v in conf[b][p])) - conf[b][p][labels[p]] for p in range(len(priors))
        ]
        positives = [p for p in range(len(priors)) if labels[p]]
        for p in positives:
            (cx, cy, w, h), (x1, y1, x2, y2) = priors[p], matched[p]
            target = [
                ((x1 + x2) / 2 - cx) / (0.1 * w),
                ((y1 + y2) / 2 - cy) / (0.1 * h),
                math.log((x2 - x1) / w) / 0.2,
                math.log((y2 - y1) / h) / 0.2,
            ]
            loss_box += sum(smooth_l1(loc[b][p][d] - target[d]) for d in range(4))
        negatives = sorted((p for p in range(len(priors)) if not labels[p]), key=lambda p: -ce[p])
        negatives = negatives[: min(ratio * len(positives), len(priors) - 1)]
        loss_cls += sum(ce[p] for p in positives + negatives)
        total += len(positives)
    return loss_box / max(total, 1), loss_cls / max(total, 1)


def test_loss_equals_the_literal_reference():
    priors = small_priors()
    for seed, faces_per_image in random_batches(range(12)):
        g = torch.Generator().manual_seed(seed)
        loc = torch.randn(4, len(priors), 4, generator=g)
        conf = torch.randn(4, len(priors), 2, generator=g) * 2
        losses = multibox_loss(loc, conf, priors, *padded(faces_per_image))
        box, cls = reference_loss(loc.tolist(), conf.tolist(), priors.tolist(), faces_per_image)
        assert losses["loss_box_reg"].item() == pytest.approx(box, rel=1e-4, abs=1e-6)
        assert losses["loss_classifier"].item() == pytest.approx(cls, rel=1e-4)


def test_loss_by_hand():
    face = [0.2, 0.2, 0.4, 0.4]
    far = [[0.9, 0.9, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]]
    priors = torch.tensor([prior_at(face, 0.0), *far, [0.7, 0.1, 0.1, 0.1]])  # one positive, five negatives
    loc = torch.zeros(1, 6, 4)
    loc[0, 0, 0] = 0.5  # smooth-L1 0.125 against the target 0
    loc[0, 1:, :] = 9.0  # negatives' offsets do not count
    conf = torch.zeros(1, 6, 2)
    conf[0, 1:, 1] = torch.tensor([2.0, -1.0, 1.0, 0.0, -2.0])  # face logits of the negatives
    losses = multibox_loss(loc, conf, priors, *padded([[face]]))
    softplus = [math.log1p(math.exp(a)) for a in (2.0, 1.0, 0.0)]  # the 3 hardest negatives' cross-entropy
    assert losses["loss_box_reg"].item() == pytest.approx(0.125)
    assert losses["loss_classifier"].item() == pytest.approx(math.log(2) + sum(softplus))

    # an image without faces adds nothing (no positives, so no mined negatives); two copies of the image
    # give twice the sums over twice the positives
    batch = multibox_loss(
        torch.cat([loc, torch.randn(2, 6, 4)]),
        torch.cat([conf, torch.randn(2, 6, 2)]),
        priors,
        *padded([[face], [], []]),
    )
    assert batch["loss_box_reg"].item() == pytest.approx(0.125)
    assert batch["loss_classifier"].item() == pytest.approx(losses["loss_classifier"].item())
    twice = multibox_loss(loc.expand(2, -1, -1), conf.expand(2, -1, -1), priors, *padded([[face], [face]]))
    assert twice["loss_classifier"].item() == pytest.approx(losses["loss_classifier"].item())
    nothing = multibox_loss(loc, conf, priors, *padded([[]]))
    assert nothing["loss_box_reg"].item() == nothing["loss_classifier"].item() == 0.0


def test_target_boxes():
    targets = [
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 200.0, 100.0]])},
        {"boxes": torch.zeros(0, 4)},
    ]
    boxes, valid = target_boxes(targets, (100, 200), torch.device("cpu"))
    torch.testing.assert_close(boxes[0], torch.tensor([[0.1, 0.1, 0.3, 0.5], [0.0, 0.0, 1.0, 1.0]]))
    assert valid.tolist() == [[True, True], [False, False]]
    boxes, valid = target_boxes([{"boxes": torch.zeros(0, 4)}], (100, 200), torch.device("cpu"))
    assert boxes.shape == (1, 1, 4) and not valid.any()
    with pytest.raises(InvalidArgumentError, match="target 0, box 0: .* zero or negative area"):
        target_boxes([{"boxes": torch.tensor([[5.0, 9.0, 8.0, 9.0]])}], (100, 200), torch.device("cpu"))
    with pytest.raises(InvalidArgumentError, match="target 0 needs 'boxes'"):
        target_boxes([{"labels": torch.ones(1)}], (100, 200), torch.device("cpu"))
