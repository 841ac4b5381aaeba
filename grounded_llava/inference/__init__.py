"""Inference results: detections, grounded answers, overlays, text/head reconciliation and RLE helpers."""

from grounded_llava.inference.overlay import draw_overlay
from grounded_llava.inference.reconcile import Reconciliation, pairwise_iou, phrase_category, reconcile
from grounded_llava.inference.results import Detections, GroundedAnswer, GroundedSpanResult
from grounded_llava.inference.rle import mask_to_rle, rle_to_mask

__all__ = [
    "Detections",
    "GroundedAnswer",
    "GroundedSpanResult",
    "Reconciliation",
    "draw_overlay",
    "mask_to_rle",
    "pairwise_iou",
    "phrase_category",
    "reconcile",
    "rle_to_mask",
]
