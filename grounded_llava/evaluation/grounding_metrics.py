"""Referring-expression metrics (REC boxes, RES masks), `find` answers and the text <-> head agreement rate.

One prediction per referring expression; a missing prediction (the model named no box, or no mask)
scores IoU 0 against a non-empty target instead of being skipped, so a model cannot gain by abstaining.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from grounded_llava.box_iou import box_iou_pairs, pairwise_iou


def rec_metrics(
    pred_boxes: Sequence[Sequence[float] | None] | np.ndarray,
    gt_boxes: Sequence[Sequence[float]] | np.ndarray,
) -> dict[str, float]:
    """Referring expression comprehension: one predicted box per expression against its target box.

    Args:
        pred_boxes: N rows, each a box (4,) xyxy original pixels, or None / a NaN row when the model
            gave no box (counts as IoU 0).
        gt_boxes: (N, 4) xyxy original pixels, finite, with x1 >= x0 and y1 >= y0.

    Returns:
        {"rec_acc50": fraction of expressions with IoU >= 0.5, "rec_miou": mean IoU}.
    """
    gt = np.asarray(gt_boxes, dtype=np.float64)
    if gt.ndim != 2 or gt.shape[1] != 4 or len(gt) == 0:
        raise ValueError(f"gt_boxes must be a non-empty (N, 4) xyxy array, got shape {gt.shape}")
    if len(pred_boxes) != len(gt):
        raise ValueError(f"pred_boxes has {len(pred_boxes)} rows but gt_boxes has {len(gt)}")
    bad = np.flatnonzero(~np.isfinite(gt).all(axis=1) | (gt[:, 2] < gt[:, 0]) | (gt[:, 3] < gt[:, 1]))
    if bad.size:
        raise ValueError(
            f"gt_boxes[{int(bad[0])}] = {gt[bad[0]].tolist()} is not a finite xyxy box with x1 >= x0, y1 >= y0"
        )
    pred = np.full((len(gt), 4), np.nan)
    for index, box in enumerate(pred_boxes):
        if box is None:
            continue
        box = np.asarray(box, dtype=np.float64)
        if box.shape != (4,):
            raise ValueError(f"pred_boxes[{index}] must be 4 numbers xyxy or None, got shape {box.shape}")
        pred[index] = box
    missing = ~np.isfinite(pred).all(axis=1)
    ious = np.zeros(len(gt))
    ious[~missing] = box_iou_pairs(pred[~missing], gt[~missing])
    return {"rec_acc50": float(np.mean(ious >= 0.5)), "rec_miou": float(np.mean(ious))}


def res_metrics(pred_masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Referring expression segmentation, with LISA's definitions.

    Args:
        pred_masks: N bool masks (H_i, W_i) at original image size, or None when the model gave no mask
            (treated as an empty mask).
        gt_masks: N bool masks (H_i, W_i), same sizes as the predictions.

    Returns:
        {"res_ciou": cumulative IoU = sum of intersections / sum of unions over all samples (large
        objects weigh more), "res_giou": mean of the per-sample IoUs (every sample weighs the same)}.
        A sample whose prediction and target are both empty has IoU 1.0 (a correct "no object"); it
        adds nothing to the cIoU sums, and cIoU is 1.0 when every union is empty.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"pred_masks has {len(pred_masks)} entries but gt_masks has {len(gt_masks)}")
    if len(gt_masks) == 0:
        raise ValueError("res_metrics needs at least one sample")
    intersections = np.zeros(len(gt_masks))
    unions = np.zeros(len(gt_masks))
    for index, (pred, gt) in enumerate(zip(pred_masks, gt_masks, strict=True)):
        gt = np.asarray(gt)
        if gt.ndim != 2:
            raise ValueError(f"gt_masks[{index}] must be a 2-D (H, W) mask, got shape {gt.shape}")
        gt = gt.astype(bool)
        pred = np.zeros_like(gt) if pred is None else np.asarray(pred).astype(bool)
        if pred.shape != gt.shape:
            raise ValueError(
                f"pred_masks[{index}] has shape {pred.shape} but gt_masks[{index}] has {gt.shape}"
            )
        intersections[index] = np.logical_and(pred, gt).sum()
        unions[index] = np.logical_or(pred, gt).sum()
    per_sample = np.divide(intersections, unions, out=np.ones_like(unions), where=unions > 0)
    total_union = unions.sum()
    ciou = intersections.sum() / total_union if total_union > 0 else 1.0
    return {"res_ciou": float(ciou), "res_giou": float(per_sample.mean())}


def text_head_agreement(matched_counts: Sequence[int], total_counts: Sequence[int]) -> float | None:
    """Share of text boxes that matched a detection-head box (DESIGN.md, "Reconciling text boxes").

    Args:
        matched_counts: per answer (or per batch), how many text boxes matched a head box.
        total_counts: per answer, how many text boxes there were; same length, >= matched.

    Returns:
        sum(matched) / sum(total), pooled over answers; None when there was no text box at all.
    """
    if len(matched_counts) != len(total_counts):
        raise ValueError(
            f"matched_counts has {len(matched_counts)} entries but total_counts has {len(total_counts)}"
        )
    for index, (matched, total) in enumerate(zip(matched_counts, total_counts, strict=True)):
        if not 0 <= matched <= total:
            raise ValueError(f"entry {index}: need 0 <= matched ({matched}) <= total ({total})")
    total = sum(total_counts)
    return sum(matched_counts) / total if total else None


FIND_IOU = 0.5


def find_metrics(
    pred_boxes: Sequence[np.ndarray], names_right: Sequence[bool], gt_boxes: Sequence[np.ndarray]
) -> dict[str, float]:
    """Answers to "Find all the X.": one question per (image, category present), its answer's boxes against
    every instance of that category in the image.

    Args:
        pred_boxes: per question, the answer's boxes (K, 4) xyxy original pixels in answer order (K may be 0).
        names_right: per question, whether the answer has a phrase and every phrase names the asked category.
        gt_boxes: per question, the category's instances (M, 4) xyxy original pixels, M >= 1.

    Returns:
        {"find_name_acc": share of answers that name the asked category, "find_precision50" / "find_recall50":
        answer boxes matched (greedily in answer order, IoU >= 0.5, each instance once) over all answer boxes /
        over all instances, pooled over the questions, "find_f1": their harmonic mean,
        "find_exact": share of answers that name the category and match every instance with no extra box}.
        Precision is 0 when no answer has a box.
    """
    if not len(pred_boxes) == len(names_right) == len(gt_boxes) or not gt_boxes:
        raise ValueError(
            f"find_metrics needs as many answers ({len(pred_boxes)}), name checks ({len(names_right)}) and "
            f"instance sets ({len(gt_boxes)}), at least one"
        )
    matched = predicted = instances = exact = 0
    for boxes, named, gt in zip(pred_boxes, names_right, gt_boxes, strict=True):
        boxes, gt = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
        if len(gt) == 0:
            raise ValueError("find_metrics: a question without an instance of its category")
        free = np.ones(len(gt), dtype=bool)
        for iou in pairwise_iou(boxes, gt):
            candidates = np.where(free & (iou >= FIND_IOU), iou, -1.0)
            if candidates.max() >= 0:
                free[candidates.argmax()] = False
        hits = int((~free).sum())
        matched, predicted, instances = matched + hits, predicted + len(boxes), instances + len(gt)
        exact += named and hits == len(gt) == len(boxes)
    precision, recall = (matched / predicted if predicted else 0.0), matched / instances
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "find_name_acc": float(np.mean(names_right)),
        "find_precision50": precision,
        "find_recall50": recall,
        "find_f1": f1,
        "find_exact": exact / len(gt_boxes),
    }
