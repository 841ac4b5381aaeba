"""The evaluation report: a flat dict of metric name -> float | None, written as JSON and markdown.

None means "that task was not run" (JSON null, "n/a" in the table), never "zero".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The contract: every report has these keys (None when the task was not run).
METRIC_KEYS: tuple[str, ...] = (
    "bbox_AP",
    "bbox_AP50",
    "segm_AP",
    "segm_AP50",
    "rec_acc50",
    "rec_miou",
    "res_ciou",
    "res_giou",
    "chat_exact_match",
    "chat_kl",
    "chat_accuracy",
    "chat_description_f1",
    "text_head_agreement",
)
# Reported when available; also part of `empty_metrics()`.
OPTIONAL_METRIC_KEYS: tuple[str, ...] = (
    "bbox_AP75",
    "segm_AP75",
    "bwt",
    "find_name_acc",
    "find_precision50",
    "find_recall50",
    "find_f1",
    "find_exact",
)


def empty_metrics() -> dict[str, float | None]:
    """Every contract and optional key, all None; fill in what was evaluated."""
    return dict.fromkeys(METRIC_KEYS + OPTIONAL_METRIC_KEYS)


def coco_report_entries(coco_metrics: Mapping[str, Any], iou_type: str) -> dict[str, float]:
    """`{"AP", "AP50", "AP75"}` of `coco_detection_metrics` as report keys `{iou_type}_AP...`."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    return {f"{iou_type}_{name}": float(coco_metrics[name]) for name in ("AP", "AP50", "AP75")}


def _checked(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """`empty_metrics()` updated with `metrics`, every value a finite float or None."""
    report = empty_metrics()
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"metric names must be strings, got {key!r}")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metric {key!r} must be a finite number or None, got {value!r}")
            value = float(value)
        report[key] = value
    return report


def _ordered_keys(report: Mapping[str, Any]) -> list[str]:
    known = METRIC_KEYS + OPTIONAL_METRIC_KEYS
    return list(known) + sorted(key for key in report if key not in known)


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A two-column markdown table (contract keys first, then optional, then any extra keys sorted);
    values with 3 decimals, "n/a" for None."""
    report = _checked(metrics)
    lines = ["| metric | value |", "| --- | --- |"]
    for key in _ordered_keys(report):
        value = report[key]
        lines.append(f"| {key} | {'n/a' if value is None else f'{value:.3f}'} |")
    return "\n".join(lines) + "\n"


REPORT_FILES = ("metrics.json", "metrics.md")
"""What `write_metrics` writes into its folder."""


def write_metrics(metrics: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `metrics.json` (sorted keys, null for tasks not run) and `metrics.md` into `out_dir`.

    Args:
        metrics: metric name -> finite number or None; missing contract keys are written as null, extra
            keys (e.g. old/new-class AP) are kept.
        out_dir: created if needed.

    Returns:
        (path of metrics.json, path of metrics.md).
    """
    report = _checked(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = (out_dir / name for name in REPORT_FILES)
    json_path.write_text(json.dumps(report, sort_keys=True, indent=2, allow_nan=False) + "\n")
    md_path.write_text(metrics_markdown(report))
    return json_path, md_path
