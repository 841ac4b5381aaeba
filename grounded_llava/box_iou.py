"""Intersection over union of xyxy boxes (numpy, float64): the one IoU of the package's plain-array code
(evaluation, reconciliation, drawing). Torch code on the model's side uses torchvision's `box_iou`."""

from __future__ import annotations

import numpy as np


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable (..., 4) xyxy boxes; an inverted box has area 0; 0 where the union is empty."""
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0, None)
    inter = inter_w * inter_h
    area_a = np.clip(a[..., 2] - a[..., 0], 0.0, None) * np.clip(a[..., 3] - a[..., 1], 0.0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0.0, None) * np.clip(b[..., 3] - b[..., 1], 0.0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou_pairs(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of row i of `boxes_a` with row i of `boxes_b`: two (N, 4) xyxy arrays, same frame -> (N,)."""
    a = np.asarray(boxes_a, dtype=np.float64)
    b = np.asarray(boxes_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(
            f"box_iou_pairs needs two (N, 4) arrays of the same shape, got {a.shape} and {b.shape}"
        )
    return _iou(a, b)


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair: (N, 4) and (M, 4) xyxy boxes (same frame) -> (N, M)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    return _iou(a[:, None], b[None])
