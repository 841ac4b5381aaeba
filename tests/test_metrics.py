"""Evaluation metrics against hand-computed answers (pycocotools and torch are real)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from grounded_llava.evaluation import (
    METRIC_KEYS,
    OPTIONAL_METRIC_KEYS,
    ap_for_categories,
    backward_transfer,
    chat_exact_match,
    coco_detection_metrics,
    coco_report_entries,
    detections_to_coco_results,
    empty_metrics,
    find_metrics,
    forgetting,
    mask_to_rle,
    mean_token_kl,
    rec_metrics,
    res_metrics,
    text_head_agreement,
    token_kl,
    write_metrics,
)

COCO_TINY_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny" / "annotations_val.json"


def _rect_mask(height: int, width: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


@pytest.fixture
def tiny_gt() -> dict:
    """2 images, 2 categories: image 1 has a cat-1 box A (small) and a cat-2 box C (medium), image 2 a
    cat-1 box B (small). Masks are the filled boxes."""
    boxes = {1: (1, 1, [10, 10, 20, 20]), 2: (1, 2, [50, 30, 30, 40]), 3: (2, 1, [5, 5, 30, 30])}
    sizes = {1: (80, 100), 2: (60, 60)}  # image id -> (H, W)
    annotations = []
    for ann_id, (image_id, category_id, (x, y, w, h)) in boxes.items():
        mask = _rect_mask(*sizes[image_id], x, y, w, h)
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": float(w * h),
                "iscrowd": 0,
                "segmentation": mask_to_rle(mask),
            }
        )
    return {
        "images": [
            {"id": i, "height": hw[0], "width": hw[1], "file_name": f"{i}.png"} for i, hw in sizes.items()
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}],
        "annotations": annotations,
    }


def _perfect_results(gt: dict, *, with_masks: bool) -> list[dict]:
    images = {image["id"]: image for image in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        masks = [_rect_mask(image["height"], image["width"], x, y, w, h)] if with_masks else None
        results += detections_to_coco_results(
            image_id=ann["image_id"],
            boxes=np.array([[x, y, x + w, y + h]]),
            scores=[0.9],
            category_ids=[ann["category_id"]],
            masks=masks,
        )
    return results


# ---------------------------------------------------------------- COCO AP


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_give_ap_one(tiny_gt, iou_type, capsys):
    results = _perfect_results(tiny_gt, with_masks=iou_type == "segm")
    gt_before, results_before = copy.deepcopy(tiny_gt), copy.deepcopy(results)
    metrics = coco_detection_metrics(tiny_gt, results, iou_type=iou_type)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0) and metrics["APm"] == pytest.approx(1.0)
    assert "APl" not in metrics  # no large ground truth: left out, not -1
    assert all(isinstance(v, float) for v in metrics.values())
    assert tiny_gt == gt_before and results == results_before  # pycocotools worked on copies
    assert capsys.readouterr().out == ""  # its progress prints are silenced


def test_partial_ap_by_hand(tiny_gt):
    # Category 1 (2 GT: A in image 1, B in image 2): A found exactly (score .9), a false positive in
    # image 2 (score .5) that misses B. Ranked: TP, FP -> recall [.5, .5], precision [1, .5].
    # 101-point interpolation: precision 1 at recall .00-.50 (51 points), 0 above -> AP = 51/101 at every
    # IoU threshold. Category 2: C found exactly -> 1.0.
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.5},
        {"image_id": 1, "category_id": 2, "bbox": [50, 30, 30, 40], "score": 0.8},
    ]
    metrics = coco_detection_metrics(tiny_gt, results, iou_type="bbox", per_category=True)
    assert metrics["per_category"][1]["AP"] == pytest.approx(51 / 101)
    assert metrics["per_category"][1]["AP50"] == pytest.approx(51 / 101)
    assert metrics["per_category"][2] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    assert metrics["AP"] == pytest.approx((51 / 101 + 1.0) / 2)
    assert metrics["AR100"] == pytest.approx((0.5 + 1.0) / 2)

    assert ap_for_categories(tiny_gt, results, [1], "bbox")["AP"] == pytest.approx(51 / 101)
    assert ap_for_categories(tiny_gt, results, [2], "bbox") == pytest.approx(
        {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    )
    # Restricting images: on image 1 alone category 1 is perfect.
    assert coco_detection_metrics(tiny_gt, results, image_ids=[1], category_ids=[1])["AP"] == pytest.approx(
        1.0
    )


def test_text_boxes_scored_by_token_probability_rank_like_detections(tiny_gt):
    # A text box (token probability .3) that hits B ranks below the head's false positive (.5):
    # TP, FP, TP -> recall [.5, .5, 1], precision [1, 1/2, 2/3] -> interpolated 1 at recall .00-.50
    # (51 points) and 2/3 at .51-1.00 (50 points).
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.5},
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 30, 30], "score": 0.3},
    ]
    ap = ap_for_categories(tiny_gt, results, [1], "bbox")["AP"]
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)


def test_empty_results_give_zero(tiny_gt):
    for iou_type in ("bbox", "segm"):
        metrics = coco_detection_metrics(tiny_gt, [], iou_type=iou_type, per_category=True)
        assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AP75"] == 0.0
        assert metrics["per_category"] == {c: {"AP": 0.0, "AP50": 0.0, "AP75": 0.0} for c in (1, 2)}


def test_bad_inputs_raise_clear_errors(tiny_gt):
    with pytest.raises(ValueError, match=r"results\[0\].*image_id"):
        coco_detection_metrics(
            tiny_gt, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]
        )
    with pytest.raises(ValueError, match=r"results\[0\].*segmentation"):
        coco_detection_metrics(
            tiny_gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], iou_type="segm"
        )
    broken = copy.deepcopy(tiny_gt)
    del broken["annotations"][1]["bbox"]
    with pytest.raises(ValueError, match=r"gt.json: annotations\[1\] \(id=2\).*bbox"):
        coco_detection_metrics(broken, [], source="gt.json")
    no_cat2 = copy.deepcopy(tiny_gt)
    no_cat2["annotations"] = [a for a in no_cat2["annotations"] if a["category_id"] != 2]
    with pytest.raises(ValueError, match="undefined"):
        ap_for_categories(no_cat2, [], [2], "bbox")


def test_real_coco_ground_truth_as_results_scores_one():
    # Real COCO val annotations (polygons and crowd RLE) of 8 images, fed back as results.
    full = json.loads(COCO_TINY_VAL.read_text())
    image_ids = {image["id"] for image in full["images"][:8]}
    gt = {
        "images": [image for image in full["images"] if image["id"] in image_ids],
        "categories": full["categories"],
        "annotations": [ann for ann in full["annotations"] if ann["image_id"] in image_ids],
    }
    images = {image["id"]: image for image in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        image = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": mask_to_rle(mask_utils.decode(rle)),
            }
        )
    assert coco_detection_metrics(gt, results, iou_type="bbox")["AP"] == pytest.approx(1.0)
    assert coco_detection_metrics(gt, results, iou_type="segm")["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- REC / RES / agreement


def test_rec_metrics_by_hand():
    gt = np.array([[0, 0, 2, 1]] * 5, dtype=float)
    pred = [[1, 0, 3, 1], [0, 0, 1, 1], [0, 0, 2, 1], None, [np.nan] * 4]  # IoU 1/3, 1/2, 1, missing, missing
    metrics = rec_metrics(pred, gt)
    assert metrics["rec_acc50"] == pytest.approx(2 / 5)
    assert metrics["rec_miou"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 5)
    with pytest.raises(ValueError, match="rows"):
        rec_metrics(pred[:2], gt)


def test_res_ciou_and_giou_differ_by_hand():
    small_gt = _rect_mask(20, 20, 0, 0, 2, 2)  # 4 px, predicted exactly: IoU 1
    big_gt = _rect_mask(20, 20, 0, 0, 10, 10)  # 100 px, half predicted: IoU 1/2
    big_pred = _rect_mask(20, 20, 0, 0, 10, 5)
    metrics = res_metrics([small_gt.copy(), big_pred], [small_gt, big_gt])
    assert metrics["res_giou"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["res_ciou"] == pytest.approx((4 + 50) / (4 + 100))

    empty = np.zeros((20, 20), dtype=bool)
    # Missing prediction on the big mask -> IoU 0; an empty target with no prediction -> IoU 1.
    metrics = res_metrics([small_gt.copy(), None, None], [small_gt, big_gt, empty])
    assert metrics["res_giou"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert metrics["res_ciou"] == pytest.approx(4 / (4 + 100))
    with pytest.raises(ValueError, match=r"pred_masks\[0\]"):
        res_metrics([np.zeros((3, 3), dtype=bool)], [empty])


def test_find_metrics_by_hand():
    circles = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float)
    answers = [
        np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float),  # both circles: exact
        np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]),  # one circle twice (the 2nd IoU 0.82
        np.zeros((0, 4)),  # is not matched again: the first took it) and a stray box; no box at all
    ]
    metrics = find_metrics(answers, [True, True, False], [circles, circles, circles[:1]])
    assert metrics["find_name_acc"] == pytest.approx(2 / 3)
    assert metrics["find_precision50"] == pytest.approx(3 / 5)  # 2 + 1 matched of 5 boxes written
    assert metrics["find_recall50"] == pytest.approx(3 / 5)  # of 2 + 2 + 1 instances
    assert metrics["find_f1"] == pytest.approx(3 / 5)
    assert metrics["find_exact"] == pytest.approx(1 / 3)
    named_wrong = find_metrics(answers[:1], [False], [circles])
    assert named_wrong["find_recall50"] == 1.0 and named_wrong["find_exact"] == 0.0
    with pytest.raises(ValueError, match="as many answers"):
        find_metrics(answers, [True], [circles])


def test_text_head_agreement():
    assert text_head_agreement([1, 2, 0], [2, 2, 0]) == pytest.approx(3 / 4)
    assert text_head_agreement([0, 0], [0, 0]) is None
    with pytest.raises(ValueError, match="entry 1"):
        text_head_agreement([0, 3], [1, 2])


# ---------------------------------------------------------------- chat


def test_chat_exact_match_normalises_whitespace_only():
    predictions = ["a  dog\non the mat ", "A cat", "x"]
    references = [" a dog on the\tmat", "a cat", "y"]
    assert chat_exact_match(predictions, references) == pytest.approx(1 / 3)


def test_token_kl_identical_is_zero_and_hand_case():
    logits = torch.randn(2, 3, 7)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert mean_token_kl(logits, logits.clone(), mask) == pytest.approx(0.0, abs=1e-6)

    # Position 0: p = (.5, .5), q = (.25, .75). Position 1: p = (.75, .25), q = (.5, .5).
    # Position 2 is masked out and differs wildly, so it must not count.
    logits_p = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [50.0, -50.0]]])
    logits_q = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [-50.0, 50.0]]])
    mask = torch.tensor([[True, True, False]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert mean_token_kl(logits_p, logits_q, mask) == pytest.approx((kl0 + kl1) / 2, rel=1e-5)


def test_token_kl_is_stable_for_huge_logits():
    # softmax(1e4 * x) underflows to exact zeros; log_softmax keeps KL finite and shift-invariant.
    logits_p = torch.tensor([[[1e4, 0.0, -1e4]]])
    logits_q = torch.tensor([[[1e4 - 1.0, 0.0, -1e4]]])
    kl = token_kl(logits_p, logits_q)
    assert torch.isfinite(kl).all()
    # p is one-hot on token 0 (to float precision); KL = -log q0 = log(1 + e^{-(1e4 - 1)} + ...) ~ 0.
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    shifted = token_kl(logits_p + 123.0, logits_q - 77.0)
    assert torch.allclose(kl, shifted)
    with pytest.raises(ValueError, match="no position"):
        mean_token_kl(logits_p, logits_q, torch.zeros(1, 1, dtype=torch.bool))


# ---------------------------------------------------------------- forgetting


def test_backward_transfer_and_forgetting_by_hand():
    acc = [
        [0.5, 0.1, 0.0],
        [0.8, 0.9, 0.2],
        [0.6, 0.7, 0.95],
    ]
    # BWT = mean(0.6 - 0.5, 0.7 - 0.9) = mean(0.1, -0.2) = -0.05
    assert backward_transfer(acc) == pytest.approx(-0.05)
    # F = mean(max(0.5, 0.8) - 0.6, max(0.1, 0.9) - 0.7) = mean(0.2, 0.2) = 0.2
    assert forgetting(acc) == pytest.approx(0.2)

    with_gaps = [[0.8, None, None], [0.6, 0.9, None], [0.5, 0.7, 0.95]]
    assert backward_transfer(with_gaps) == pytest.approx(-0.25)  # mean(-0.3, -0.2)
    assert forgetting(with_gaps) == pytest.approx(0.25)  # mean(0.8 - 0.5, 0.9 - 0.7)
    assert backward_transfer([[0.7]]) is None and forgetting([[0.7]]) is None
    with pytest.raises(ValueError, match="row 1"):
        backward_transfer([[0.1, None], [0.2]])


# ---------------------------------------------------------------- report


def test_write_metrics(tmp_path, tiny_gt):
    metrics = empty_metrics()
    assert set(metrics) == set(METRIC_KEYS + OPTIONAL_METRIC_KEYS) and all(
        v is None for v in metrics.values()
    )
    bbox = coco_detection_metrics(tiny_gt, _perfect_results(tiny_gt, with_masks=False))
    metrics.update(coco_report_entries(bbox, "bbox"))
    metrics.update(rec_metrics([[0, 0, 1, 1], None, [0, 0, 2, 1]], [[0, 0, 2, 1]] * 3))
    json_path, md_path = write_metrics(metrics, tmp_path / "eval")

    text = json_path.read_text()
    written = json.loads(text)
    assert list(written) == sorted(written) and set(METRIC_KEYS) <= set(written)
    assert written["bbox_AP"] == pytest.approx(1.0) and written["segm_AP"] is None
    assert '"segm_AP": null' in text
    table = md_path.read_text()
    assert "| rec_acc50 | 0.667 |" in table and "| rec_miou | 0.500 |" in table
    assert "| chat_kl | n/a |" in table
    with pytest.raises(ValueError, match="chat_kl"):
        write_metrics({"chat_kl": float("nan")}, tmp_path)
