"""Evaluation metrics as pure functions of plain predictions (boxes xyxy in original pixels, bool masks at
original size, strings, logits), and the metrics report. The model-running evaluator builds on these."""

from grounded_llava.evaluation.chat_metrics import chat_exact_match, mean_token_kl, token_kl
from grounded_llava.evaluation.coco_metrics import (
    ap_for_categories,
    coco_detection_metrics,
    detections_to_coco_results,
    mask_to_rle,
)
from grounded_llava.evaluation.forgetting import backward_transfer, forgetting
from grounded_llava.evaluation.grounding_metrics import (
    box_iou_pairs,
    rec_metrics,
    res_metrics,
    text_head_agreement,
)
from grounded_llava.evaluation.report import (
    METRIC_KEYS,
    OPTIONAL_METRIC_KEYS,
    coco_report_entries,
    empty_metrics,
    metrics_markdown,
    write_metrics,
)

__all__ = [
    "METRIC_KEYS",
    "OPTIONAL_METRIC_KEYS",
    "ap_for_categories",
    "backward_transfer",
    "box_iou_pairs",
    "chat_exact_match",
    "coco_detection_metrics",
    "coco_report_entries",
    "detections_to_coco_results",
    "empty_metrics",
    "forgetting",
    "mask_to_rle",
    "mean_token_kl",
    "metrics_markdown",
    "rec_metrics",
    "res_metrics",
    "text_head_agreement",
    "token_kl",
    "write_metrics",
]
