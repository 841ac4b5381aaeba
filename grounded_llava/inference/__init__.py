"""Inference: the `GroundedLlava` predictor, and its results (detections, grounded answers, overlays,
text/head reconciliation, RLE helpers).

Every name is imported on first use: `infer.py` checks its arguments without loading torch, and the
results layer loads without the model stack (peft, transformers).
"""

from importlib import import_module

_EXPORTS = {
    "Detections": ".detections",
    "GroundedAnswer": ".results",
    "GroundedLlava": ".predictor",
    "GroundedSpanResult": ".results",
    "Reconciliation": ".reconcile",
    "draw_overlay": ".overlay",
    "load_image": ".images",
    "mask_to_rle": ".rle",
    "pairwise_iou": ".reconcile",
    "phrase_category": ".reconcile",
    "reconcile": ".reconcile",
    "rle_to_mask": ".rle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grounded_llava.inference' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
