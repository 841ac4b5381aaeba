"""Run every benchmark: `python bench/run.py --out DIR [--quick]` -> DIR/bench.json, bench.md, bench.png.

Benchmarks (docs/BENCHMARKS.md explains each):
    chat_latency_ratio    GroundedLlava.chat / plain LLaVA generate, same tiny model, same answer length
    train_step_ratio      grounded train step (LM + det + mask) / plain LoRA LLaVA step (LM), same batch
    ground_step_ratio     the same, as the default recipe's `ground` stage trains: the detector stays as the
                          `heads` stage left it (it runs for the proposals, no Detect loss, no gradient)
    det_head_vs_yolov8n   mAP50-95 of our Detect head / YOLOv8n, same data and training wall-clock budget
    peak_rss              peak RSS of a tiny training run and of one chat, each in a fresh process
    llava15_7b_estimate   parameters and memory of the 7B config, computed on the meta device
Timings are medians of interleaved repeats in one process (warm-up excluded), so that the ratios stay
meaningful on a loaded machine. `--quick` shrinks everything to seconds (for the smoke test): its
figures exercise the code, they measure nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_VERBOSE": "False",
    "YOLO_CONFIG_DIR": str(Path(tempfile.gettempdir()) / "grounded_llava_yolo"),
    "MPLCONFIGDIR": str(Path(tempfile.gettempdir()) / "grounded_llava_mpl"),
}.items():
    os.environ.setdefault(_name, _value)  # before torch / transformers / ultralytics are imported
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/run.py` puts bench/ on the path, not the repository


@dataclass
class Sizes:
    """How big each benchmark is; `QUICK` and `FULL` are the two presets."""

    chat_new_tokens: int
    chat_repeats: int
    step_batch_size: int
    step_repeats: int
    det_budget_s: float
    det_train_images: int
    det_val_images: int
    det_calibration_steps: int
    rss_train_steps: int
    rss_train_images: int
    rss_new_tokens: int


QUICK = Sizes(8, 3, 2, 3, 2.0, 16, 4, 2, 1, 8, 8)  # the heads stage keeps a few images for its eval
FULL = Sizes(32, 15, 4, 15, 240.0, 400, 100, 6, 4, 16, 32)


def run(out_dir: Path, *, quick: bool) -> dict:
    import torch
    from ultralytics.utils import NUM_THREADS

    from bench.detection import DetectionSettings, det_head_vs_yolov8n
    from bench.estimate_7b import estimate_llava15_7b
    from bench.latency import chat_latency
    from bench.memory import collect_children, start_children
    from bench.timing import machine_info
    from bench.train_step import train_step
    from grounded_llava import GroundedLlavaConfig

    # ultralytics sets this thread count for CPU training; everything else runs with the same.
    torch.set_num_threads(NUM_THREADS)
    sizes = QUICK if quick else FULL
    work_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=out_dir))
    started = time.perf_counter()
    report: dict = {"quick": quick, "machine": machine_info(), "benchmarks": {}}
    runs = report["benchmarks"]
    children = start_children(
        work_dir=work_dir / "peak_rss",
        train_steps=sizes.rss_train_steps,
        train_images=sizes.rss_train_images,
        new_tokens=sizes.rss_new_tokens,
    )
    if not quick:  # alone on the machine: nothing else of ours competes with the timed runs below
        runs["peak_rss"] = collect_children(children)
    tiny = GroundedLlavaConfig.from_yaml(REPO / "configs" / "tiny.yaml")
    runs["chat_latency"] = chat_latency(
        config=tiny, new_tokens=sizes.chat_new_tokens, repeats=sizes.chat_repeats
    )
    runs["train_step"] = train_step(
        config=GroundedLlavaConfig.from_yaml(REPO / "configs" / "tiny.yaml"),
        work_dir=work_dir,
        batch_size=sizes.step_batch_size,
        repeats=sizes.step_repeats,
    )
    runs["ground_step"] = train_step(
        config=GroundedLlavaConfig.from_yaml(REPO / "configs" / "tiny.yaml"),
        work_dir=work_dir,
        batch_size=sizes.step_batch_size,
        repeats=sizes.step_repeats,
        train_detector=False,
    )
    runs["llava15_7b_estimate"] = estimate_llava15_7b()
    runs["det_head_vs_yolov8n"] = det_head_vs_yolov8n(
        DetectionSettings(
            budget_s=sizes.det_budget_s,
            train_images=sizes.det_train_images,
            val_images=sizes.det_val_images,
            calibration_steps=sizes.det_calibration_steps,
        ),
        work_dir / "detection",
    )
    if quick:
        runs["peak_rss"] = collect_children(children)
    report["ratios"] = {
        "chat_latency_ratio": runs["chat_latency"]["ratio"],
        "train_step_ratio": runs["train_step"]["ratio"],
        "ground_step_ratio": runs["ground_step"]["ratio"],
        "det_head_vs_yolov8n": runs["det_head_vs_yolov8n"]["ratio"],
    }
    report["peak_rss_mb"] = {"train": runs["peak_rss"]["train_mb"], "chat": runs["peak_rss"]["chat_mb"]}
    report["work_dir"] = str(work_dir)
    report["total_s"] = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (bench.json, bench.md, bench.png)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds-sized benchmarks (smoke test)")
    args = parser.parse_args(argv)
    from bench.report import bar_plot, markdown

    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out, quick=args.quick)
    for name, value in report["ratios"].items():
        if value is not None and not math.isfinite(value):
            raise RuntimeError(f"{name} is not finite: {value}")
    (args.out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "bench.md").write_text(markdown(report))
    bar_plot(report, args.out / "bench.png")
    print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
