"""WIDER FACE AP (leanvision.detection.evaluation): hand-computed cases, a literal reference of the official
evaluation loop, and COCO AP at IoU 0.5 where the two protocols coincide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanvision.detection.evaluation import few_faces_subsets, size_subsets, subsets_from_targets, wider_ap
from leanvision.errors import InvalidArgumentError


def reference_ap(predictions, ground_truth, subset, iou_thresh=0.5, thresh_num=1000):
    """The official eval loop, plainly: per image, per prediction, per threshold (numpy, Python loops)."""
    scores = [float(p[4]) for v in predictions.values() for p in v.tolist()]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    pr_curve = np.zeros((thresh_num, 2))
    count_face = 0
    for image_id, gt in ground_truth.items():
        gt = gt.numpy().astype(float)
        keep = subset[image_id].numpy()
        count_face += int(keep.sum())
        pred = predictions.get(image_id)
        if len(gt) == 0 or pred is None or len(pred) == 0:
            continue
        pred = pred.numpy().astype(float).copy()
        pred[:, 4] = (pred[:, 4] - low) / (high - low) if high > low else 1.0
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        recall_list = np.zeros(len(gt))
        proposal_list = np.ones(len(pred))
        pred_recall = np.zeros(len(pred))
        for h in range(len(pred)):
            overlaps = []
            for g in gt:
                iw = min(pred[h, 2], g[2]) - max(pred[h, 0], g[0]) + 1
                ih = min(pred[h, 3], g[3]) - max(pred[h, 1], g[1]) + 1
                inter = max(iw, 0) * max(ih, 0)
                area_p = (pred[h, 2] - pred[h, 0] + 1) * (pred[h, 3] - pred[h, 1] + 1)
                area_g = (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
                overlaps.append(inter / (area_p + area_g - inter))
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou_thresh:
                if not keep[best]:
                    recall_list[best] = -1
                    proposal_list[h] = -1
                elif recall_list[best] == 0:
                    recall_list[best] = 1
            pred_recall[h] = (recall_list == 1).sum()
        for t in range(thresh_num):
            thresh = 1 - (t + 1) / thresh_num
            above = np.where(pred[:, 4] >= thresh)[0]
            if len(above):
                r = above[-1]
                pr_curve[t, 0] += (proposal_list[: r + 1] == 1).sum()
                pr_curve[t, 1] += pred_recall[r]
    if count_face == 0:
        return 0.0
    precision = np.divide(pr_curve[:, 1], pr_curve[:, 0], out=np.zeros(thresh_num), where=pr_curve[:, 0] > 0)
    recall = pr_curve[:, 1] / count_face
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


FACES = torch.tensor([[0.0, 0, 20, 20], [40, 40, 60, 60], [100, 0, 130, 30], [0, 100, 50, 150]])


def det(boxes, scores):
    return torch.cat([torch.as_tensor(boxes, dtype=torch.float32), torch.tensor(scores)[:, None]], 1)


def everything(gt):
    return {"all": {k: torch.ones(len(v), dtype=torch.bool) for k, v in gt.items()}}


def test_perfect_none_and_k_of_n():
    gt = {"a": FACES}
    assert wider_ap({"a": det(FACES, [0.9, 0.8, 0.7, 0.6])}, gt, everything(gt))["all"] == pytest.approx(1.0)
    assert wider_ap({}, gt, everything(gt))["all"] == 0.0
    assert wider_ap({"a": det(FACES[:3], [0.9, 0.8, 0.7])}, gt, everything(gt))["all"] == pytest.approx(0.75)


def test_false_positive_above_or_below_the_faces():
    gt = {"a": FACES[:2]}
    miss = [[200.0, 200, 220, 220]]
    above = det(torch.cat([torch.tensor(miss), FACES[:2]]), [0.9, 0.5, 0.2])
    below = det(torch.cat([FACES[:2], torch.tensor(miss)]), [0.9, 0.5, 0.2])
    # above: precision 1/2 at recall 1/2, 2/3 at recall 1 -> envelope 2/3 over both steps
    assert wider_ap({"a": above}, gt, everything(gt))["all"] == pytest.approx(2 / 3)
    assert wider_ap({"a": below}, gt, everything(gt))["all"] == pytest.approx(1.0)


def test_detection_of_an_ignored_face_is_no_false_positive():
    gt = {"a": FACES[:2]}
    subset = {"s": {"a": torch.tensor([True, False])}}
    with_ignored = det(FACES[[1, 0]], [0.9, 0.5])
    assert wider_ap({"a": with_ignored}, gt, subset)["s"] == pytest.approx(1.0)
    assert wider_ap({"a": det(FACES[:1], [0.5])}, gt, subset)["s"] == pytest.approx(1.0)


def test_duplicate_on_a_found_face_is_a_false_positive():
    gt = {"a": FACES[:2]}
    preds = det(FACES[[0, 0, 1]], [0.9, 0.8, 0.7])  # recall 1/2 (p 1), 1/2 (p 1/2), 1 (p 2/3)
    assert wider_ap({"a": preds}, gt, everything(gt))["all"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_scores_are_normalised():
    gt = {"a": FACES, "b": FACES[:2]}
    preds = {
        "a": det(FACES[[0, 2]] + 1, [0.3, 0.1]),
        "b": det([[0.0, 0, 19, 19], [90, 90, 99, 99]], [0.2, 0.25]),
    }
    scaled = {k: torch.cat([v[:, :4], 7 * v[:, 4:] + 3], 1) for k, v in preds.items()}
    assert wider_ap(preds, gt, everything(gt)) == pytest.approx(wider_ap(scaled, gt, everything(gt)))


def test_matches_the_literal_official_loop_on_random_cases():
    gen = torch.Generator().manual_seed(0)
    gt, preds, subset = {}, {}, {}
    for i in range(30):
        m = int(torch.randint(0, 6, (1,), generator=gen))
        xy = torch.rand(m, 2, generator=gen) * 200
        boxes = torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=gen) * 60], 1).round()
        gt[f"img{i}"] = boxes
        subset[f"img{i}"] = torch.rand(m, generator=gen) > 0.3
        jitter = boxes.repeat(2, 1) + torch.randn(2 * m, 4, generator=gen) * 4
        noise_xy = torch.rand(3, 2, generator=gen) * 200
        noise = torch.cat([noise_xy, noise_xy + 20], 1)
        found = torch.cat([jitter[torch.rand(2 * m, generator=gen) > 0.4], noise])
        preds[f"img{i}"] = torch.cat([found, torch.rand(len(found), 1, generator=gen)], 1)
    subsets = {"s": subset, "all": everything(gt)["all"]}
    ours = wider_ap(preds, gt, subsets)
    assert 0.05 < ours["s"] < 0.95
    for name, masks in subsets.items():
        assert ours[name] == pytest.approx(reference_ap(preds, gt, masks), abs=1e-9)


def test_equals_coco_ap50_where_the_protocols_coincide():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # 10 faces, 8 found with distinct scores and 2 false positives: recall steps of 1/10 (on COCO's 101-point
    # grid) and boxes large enough that the +1-pixel IoU and COCO's IoU agree on every match.
    faces = torch.tensor([[i * 60.0, 0, i * 60 + 50, 50] for i in range(10)])
    found = torch.cat([faces[:8] + 1, torch.tensor([[0.0, 300, 50, 350], [100, 300, 150, 350]])])
    scores = [0.95, 0.9, 0.85, 0.6, 0.8, 0.75, 0.7, 0.65, 0.88, 0.5]
    ours = wider_ap({"a": det(found, scores)}, {"a": faces}, everything({"a": faces}))["all"]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 640, "height": 400}],
        "categories": [{"id": 1, "name": "face"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
            for i, b in enumerate(faces.tolist())
        ],
    }  # fmt: skip
    gt.createIndex()
    dets = gt.loadRes(
        [
            {"image_id": 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for b, s in zip(found.tolist(), scores)
        ]
    )
    coco = COCOeval(gt, dets, "bbox")
    coco.params.iouThrs = np.array([0.5])
    coco.params.areaRng, coco.params.areaRngLbl = [[0, 1e10]], ["all"]
    coco.evaluate()
    coco.accumulate()
    coco_ap = float(coco.eval["precision"][0, :, 0, 0, -1].mean())
    # COCO samples the envelope at 101 recall points: exact up to the recall steps' endpoints (1/101 each)
    assert ours == pytest.approx(coco_ap, abs=0.011)
    assert 0.7 < ours < 0.8


def test_size_few_faces_and_targets():
    gt = {"a": torch.tensor([[0.0, 0, 70, 80], [0, 0, 40, 33], [0, 0, 20, 10]]), "b": torch.zeros(0, 4)}
    sizes = size_subsets(gt)
    assert sizes["easy"]["a"].tolist() == [True, False, False]
    assert sizes["medium"]["a"].tolist() == [True, True, False]
    assert sizes["hard"]["b"].shape == (0,)
    few = few_faces_subsets(
        {"all": {"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}}, gt, 3
    )
    assert few["all (<= 3 faces)"]["a"].tolist() == [False] * 4
    assert few["all (<= 3 faces)"]["b"].tolist() == [True, True]
    targets = [{"image_id": "a", "boxes": gt["a"], "subsets": {"hard": sizes["hard"]["a"]}}]
    ground_truth, subsets = subsets_from_targets(targets)
    assert torch.equal(ground_truth["a"], gt["a"]) and subsets["hard"]["a"].tolist() == [True, True, False]


def test_bad_input():
    gt = {"a": FACES}
    with pytest.raises(InvalidArgumentError, match="'b', which has no ground truth"):
        wider_ap({"b": det(FACES, [1.0] * 4)}, gt, everything(gt))
    with pytest.raises(InvalidArgumentError, match=r"\[N, 5\]"):
        wider_ap({"a": FACES}, gt, everything(gt))
    with pytest.raises(InvalidArgumentError, match=r"needs a \[4\] bool mask"):
        wider_ap({}, gt, {"s": {"a": torch.ones(3, dtype=torch.bool)}})
