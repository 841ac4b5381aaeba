"""Evaluation metrics as pure functions of plain predictions (boxes xyxy in original pixels, bool masks at
original size, strings, logits), and the metrics report. The model-running evaluator builds on these.

Every name is imported on first use: `python -m grounded_llava.evaluate --help` answers without torch.
"""

from grounded_llava._lazy import lazy_getattr

_EXPORTS = {
    "METRIC_KEYS": ".report",
    "OPTIONAL_METRIC_KEYS": ".report",
    "ap_for_categories": ".coco_metrics",
    "backward_transfer": ".forgetting_metrics",
    "box_iou_pairs": "grounded_llava.box_iou",
    "chat_exact_match": ".chat_metrics",
    "coco_detection_metrics": ".coco_metrics",
    "coco_report_entries": ".report",
    "detections_to_coco_results": ".coco_metrics",
    "empty_metrics": ".report",
    "find_metrics": ".grounding_metrics",
    "forgetting": ".forgetting_metrics",
    "mask_to_rle": "grounded_llava.rle",
    "mean_token_kl": ".chat_metrics",
    "metrics_markdown": ".report",
    "rec_metrics": ".grounding_metrics",
    "res_metrics": ".grounding_metrics",
    "text_head_agreement": ".grounding_metrics",
    "token_kl": ".chat_metrics",
    "write_metrics": ".report",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
