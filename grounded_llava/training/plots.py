"""Loss curves from a metrics JSONL file (see `metrics_log`), drawn with matplotlib's Agg canvas.

One subplot per loss key (every key containing "loss", plus "total"), raw values as faint points,
an exponential moving average as a line (restarted at every stage, whose losses differ in scale),
and each stage boundary as a dashed vertical line labelled with the stage name.
Uses `Figure` + `FigureCanvasAgg` directly, so it never touches pyplot's global backend state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grounded_llava.training.metrics_log import read_metrics


def ema(values: list[float], *, smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it); `smoothing` in [0, 1).

    The first value is kept as is: ema[0] = values[0]; ema[t] = weighted mean with weights smoothing**k.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
    averaged, running, weight = [], 0.0, 0.0
    for value in values:
        running = smoothing * running + (1.0 - smoothing) * value
        weight = smoothing * weight + (1.0 - smoothing)
        averaged.append(running / weight)
    return averaged


def loss_keys(records: list[dict[str, Any]]) -> list[str]:
    """Keys holding a loss, in order of first appearance, the overall ones ("loss", "total*") last."""
    keys: list[str] = []
    for record in records:
        keys += [
            k for k, v in record.items() if ("loss" in k or k == "total") and k not in keys and _is_number(v)
        ]
    overall = [k for k in keys if k in ("loss", "total") or k.startswith("total")]
    return [k for k in keys if k not in overall] + overall


def stage_starts(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """`(first step, stage)` of every run of consecutive records with the same stage (records sorted by step)."""
    starts: list[tuple[int, str]] = []
    for record in records:
        stage = str(record.get("stage", ""))
        if not starts or starts[-1][1] != stage:
            starts.append((int(record["step"]), stage))
    return starts


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_loss_curves(
    jsonl_path: str | Path, png_path: str | Path, *, smoothing: float = 0.9, dpi: int = 110
) -> Path:
    """Draw every loss of `jsonl_path` against the step into `png_path` (parents created); returns it."""
    records = sorted(read_metrics(jsonl_path), key=lambda r: int(r["step"]))
    keys = loss_keys(records)
    if not keys:
        raise ValueError(f"{jsonl_path}: no loss metric (a key containing 'loss', or 'total') to plot")
    starts = stage_starts(records)
    stage_ends = [step for step, _ in starts[1:]] + [math.inf]

    figure = Figure(figsize=(9.0, 0.6 + 2.3 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        for (start, _), end in zip(starts, stage_ends, strict=True):
            points = [
                (int(r["step"]), float(r[key]))
                for r in records
                if start <= int(r["step"]) < end and _is_number(r.get(key)) and math.isfinite(r[key])
            ]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, "o", color="tab:blue", alpha=0.25, markersize=2.5, linestyle="none")
            ax.plot(steps, ema(list(values), smoothing=smoothing), color="tab:blue", linewidth=1.6)
        for step, _ in starts[1:]:
            ax.axvline(step, color="0.35", linestyle="--", linewidth=1.0)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    span = max(int(records[-1]["step"]) - int(records[0]["step"]), 1)
    # A label too close to the one before it goes one line higher, so short stages stay legible.
    raised = False
    for index, (step, stage) in enumerate(starts):
        raised = index > 0 and not raised and step - starts[index - 1][0] < 0.12 * span
        axes[0].annotate(
            stage,
            xy=(step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 14 if raised else 3),
            textcoords="offset points",
            fontsize=9,
            fontweight="bold",
            color="0.25",
            va="bottom",
        )
    axes[-1].set_xlabel("step")
    figure.suptitle(f"{Path(jsonl_path).name}  (points: raw, line: EMA smoothing={smoothing})", fontsize=10)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=dpi)
    return png_path
