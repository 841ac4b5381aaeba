"""bench/: the timing harness, the YOLO label conversion, and a smoke run of `bench/run.py --quick`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.detection import write_yolo_labels
from bench.timing import interleaved

REPO = Path(__file__).resolve().parents[1]
RATIO_KEYS = {"chat_latency_ratio", "train_step_ratio", "ground_step_ratio", "det_head_vs_yolov8n"}


def test_interleaved_alternates_order_and_drops_warmup():
    calls = []
    timing = interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {name: len(values) for name, values in timing.samples.items()} == {"a": 3, "b": 3}
    assert timing.to_dict()["repeats"] == 3 and timing.to_dict()["warmup"] == 1
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": lambda: None}, repeats=0)


def test_write_yolo_labels_converts_coco_boxes(tmp_path):
    coco = {
        "images": [
            {"id": 1, "file_name": "000001.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "000002.png", "width": 50, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 20, 50, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "circle"}, {"id": 4, "name": "star"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    write_yolo_labels(tmp_path, ["circle", "star"])  # star (id 4) -> class 1
    # box 1: centre (35, 40) / (200, 100) = (0.175, 0.4), size (0.25, 0.4); box 2 covers the image; crowd dropped
    assert (tmp_path / "labels" / "000001.txt").read_text().splitlines() == [
        "1 0.175000 0.400000 0.250000 0.400000",
        "0 0.500000 0.500000 1.000000 1.000000",
    ]
    assert (tmp_path / "labels" / "000002.txt").read_text() == ""


def test_quick_bench_writes_every_ratio(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["ratios"]) == RATIO_KEYS
    runs = report["benchmarks"]
    for key, run, num, den in [
        ("chat_latency_ratio", "chat_latency", "grounded_chat", "plain_generate"),
        ("train_step_ratio", "train_step", "grounded_step", "plain_lora_step"),
        ("ground_step_ratio", "ground_step", "grounded_step", "plain_lora_step"),
    ]:
        value, medians = report["ratios"][key], runs[run]["median_s"]
        assert math.isfinite(value) and value > 0
        assert value == pytest.approx(medians[num] / medians[den])
        assert all(len(samples) == runs[run]["repeats"] for samples in runs[run]["samples_s"].values())

    det = runs["det_head_vs_yolov8n"]
    ours, yolo = det["map50_95"]["ours"], det["map50_95"]["yolov8n"]
    assert 0.0 <= ours <= 1.0 and 0.0 <= yolo <= 1.0
    # seconds of training give mAP 0: the ratio is then undefined and stored as null, never inf/NaN
    assert report["ratios"]["det_head_vs_yolov8n"] == (ours / yolo if yolo > 0 else None)
    assert det["train_s"]["ours"] > 0 and det["train_s"]["yolov8n"] > 0 and det["ours_steps"] >= 1

    rss = runs["peak_rss"]
    assert 0 < rss["import_mb"] < rss["train_mb"] and rss["import_mb"] < rss["chat_mb"]
    assert report["peak_rss_mb"] == {"train": rss["train_mb"], "chat": rss["chat_mb"]}

    params = runs["llava15_7b_estimate"]["parameters"]
    # LoRA r=64 on q,k,v,o (4096 -> 4096), gate, up (4096 -> 11008), down (11008 -> 4096) in 32 layers
    assert params["lora"] == 64 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    # 5 + 100 grounding tokens, rows of embed_tokens and of the (untied) lm_head
    assert params["token_rows"] == 2 * 105 * 4096
    memory = runs["llava15_7b_estimate"]["memory_gib"]
    assert memory["weights_4bit"] < memory["weights_4bit_as_built"] < memory["weights_bf16"]
    assert all(math.isfinite(v) and v > 0 for v in memory.values())

    assert {"cpu", "cores", "torch", "transformers"} <= set(report["machine"])
    assert "det_head_vs_yolov8n" in (tmp_path / "bench.md").read_text()
    with Image.open(tmp_path / "bench.png") as image:
        assert image.size[0] > 0 and image.size[1] > 0
