"""Inference: the `GroundedLlava` predictor, and its results (detections, grounded answers, overlays,
text/head reconciliation, RLE helpers).

`GroundedLlava` is imported lazily: the results layer loads without the model stack (peft, transformers).
"""

from grounded_llava.inference.detections import Detections
from grounded_llava.inference.images import load_image
from grounded_llava.inference.overlay import draw_overlay
from grounded_llava.inference.reconcile import Reconciliation, pairwise_iou, phrase_category, reconcile
from grounded_llava.inference.results import GroundedAnswer, GroundedSpanResult
from grounded_llava.inference.rle import mask_to_rle, rle_to_mask

__all__ = [
    "Detections",
    "GroundedAnswer",
    "GroundedLlava",
    "GroundedSpanResult",
    "Reconciliation",
    "draw_overlay",
    "load_image",
    "mask_to_rle",
    "pairwise_iou",
    "phrase_category",
    "reconcile",
    "rle_to_mask",
]


def __getattr__(name: str):
    if name == "GroundedLlava":
        from grounded_llava.inference.predictor import GroundedLlava

        return GroundedLlava
    raise AttributeError(f"module 'grounded_llava.inference' has no attribute {name!r}")
