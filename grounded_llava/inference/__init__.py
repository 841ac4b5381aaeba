"""Inference: the `GroundedLlava` predictor, and its results (detections, grounded answers, overlays,
text/head reconciliation, RLE helpers).

Every name is imported on first use: `infer.py` checks its arguments without loading torch, and the
results layer loads without the model stack (peft, transformers).
"""

from grounded_llava._lazy import lazy_getattr

_EXPORTS = {
    "Detections": ".detections",
    "GroundedAnswer": ".results",
    "GroundedLlava": ".predictor",
    "GroundedSpanResult": ".results",
    "Reconciliation": ".reconciliation",
    "draw_overlay": ".overlay",
    "load_image": ".images",
    "mask_to_rle": "grounded_llava.rle",
    "pairwise_iou": "grounded_llava.box_iou",
    "phrase_category": ".reconciliation",
    "reconcile": ".reconciliation",
    "rle_to_mask": "grounded_llava.rle",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
