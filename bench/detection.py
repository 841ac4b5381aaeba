"""`det_head_vs_yolov8n`: our Detect head (trained by `Trainer`'s `heads` stage) vs YOLOv8n from scratch.

Both train on the SAME synthetic training world for the same CPU wall-clock budget and are scored
on the same validation world by the same code: predictions -> COCO results (xyxy original pixels,
confidence >= 0.001, NMS IoU 0.6, at most 100 per image) -> pycocotools mAP50-95
(`coco_detection_metrics`).

- ours: the shipped default's model (`configs/tiny_shapes.yaml`) through `Trainer`, one `heads` stage as
  that config's first stage trains it (no LLM in the loop: vision tower at a lower lr, spatial prior,
  neck, Detect head, SAM decoder on every box and instance mask, flips and zoom-out). `Trainer` trains
  for a number of steps, so the budget is turned into steps from the throughput of a short
  calibration run of the same stage.
- YOLOv8n: ultralytics `YOLO("yolov8n.yaml")` (architecture only, no pretrained weights), its own
  training recipe, stopped by ultralytics' `time=` limit set to the seconds OUR loop actually took
  (the calibration predicts steps, the load of the machine decides their time); the labels are the
  world's COCO boxes written as YOLO txt files beside its images.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from grounded_llava import GroundedLlavaConfig
from grounded_llava.data import SHAPE_IDS, generate_world
from grounded_llava.evaluation import coco_detection_metrics, detections_to_coco_results
from grounded_llava.inference.predictor import GroundedLlava
from grounded_llava.training.config import LoopConfig, SourceConfig, StageConfig, TrainConfig
from grounded_llava.training.data_sources import ensure_synthetic_world
from grounded_llava.training.metrics_log import read_metrics
from grounded_llava.training.trainer import Trainer

CATEGORIES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
CONF_THRESHOLD = 0.001
NMS_IOU = 0.6
MAX_DET = 100


@dataclass
class DetectionSettings:
    """Sizes of the comparison. `budget_s`: target training seconds of our loop (turned into steps by a
    calibration run); YOLOv8n then gets the seconds our loop really took."""

    budget_s: float
    train_images: int
    val_images: int
    image_size: int = 224
    batch_size: int = 8
    """Our Trainer's batch (as configs/tiny_shapes.yaml); YOLO uses `yolo_batch`."""
    yolo_batch: int = 16
    calibration_steps: int = 5
    lr: float = 2e-3


def write_yolo_labels(world_dir: Path, categories: list[str]) -> None:
    """`labels/<image stem>.txt` beside `images/`: one `class cx cy w h` line per box (fractions of the image)."""
    coco = json.loads((world_dir / "annotations.json").read_text())
    class_of = {SHAPE_IDS[name]: index for index, name in enumerate(categories)}
    lines: dict[int, list[str]] = {image["id"]: [] for image in coco["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        cls = class_of[ann["category_id"]]
        lines[ann["image_id"]].append(
            f"{cls} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}"
        )
    labels = world_dir / "labels"
    labels.mkdir(exist_ok=True)
    for image in coco["images"]:
        stem = Path(image["file_name"]).stem
        (labels / f"{stem}.txt").write_text("".join(line + "\n" for line in lines[image["id"]]))


def _val_images(val_dir: Path) -> tuple[dict, list[tuple[int, Path]]]:
    gt = json.loads((val_dir / "annotations.json").read_text())
    return gt, [(image["id"], val_dir / "images" / image["file_name"]) for image in gt["images"]]


# ---------------------------------------------------------------------------------------------- ours
def _train_config(
    settings: DetectionSettings, train_source: SourceConfig, max_steps: int, *, log_every: int
) -> TrainConfig:
    model = GroundedLlavaConfig.from_yaml(
        Path(__file__).resolve().parents[1] / "configs" / "tiny_shapes.yaml"
    )
    stage = StageConfig(name="heads", kind="heads", data=[train_source], lr=settings.lr, train_vision=True)
    loop = LoopConfig(
        max_steps=max_steps,
        batch_size=settings.batch_size,
        save_every=10**9,  # no intermediate checkpoints inside the budget
        log_every=log_every,
        eval_samples=settings.batch_size,
    )
    return TrainConfig(model=model, stages=[stage], train=loop)


def _train_records(run_dir: Path) -> list[dict]:
    """The logged training steps of a finished run (evaluation records carry no `samples_per_s`)."""
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "samples_per_s" in r]


def _steps_per_second(calibration_dir: Path) -> float:
    """Step rate of a calibration run logged at every step, from the log times after the first (warm-up) step."""
    records = _train_records(calibration_dir)
    if len(records) < 2:
        raise RuntimeError(f"{calibration_dir}: a calibration run needs at least 2 logged steps")
    return (records[-1]["step"] - records[0]["step"]) / (records[-1]["time"] - records[0]["time"])


def train_ours(settings: DetectionSettings, train_source: SourceConfig, work_dir: Path) -> dict:
    """Calibrate the step rate, then train the `heads` stage for the steps that fit the budget."""
    calibration = work_dir / "ours_calibration"
    steps = settings.calibration_steps
    Trainer(_train_config(settings, train_source, steps, log_every=1), calibration).run()
    steps = max(1, round(settings.budget_s * _steps_per_second(calibration)))
    run_dir = work_dir / "ours"
    started = time.perf_counter()
    final = Trainer(_train_config(settings, train_source, steps, log_every=steps), run_dir).run()
    wall = time.perf_counter() - started
    # The one logged record covers the whole loop: samples / (loop seconds).
    train_s = steps * settings.batch_size / _train_records(run_dir)[-1]["samples_per_s"]
    return {"checkpoint": final, "steps": steps, "train_s": train_s, "wall_s": wall}


def predict_ours(checkpoint: Path, val_dir: Path) -> list[dict]:
    predictor = GroundedLlava.from_pretrained(checkpoint, device="cpu")
    predictor.model.config.heads.conf_threshold = CONF_THRESHOLD
    predictor.model.config.heads.nms_iou = NMS_IOU
    category_ids = [SHAPE_IDS[name] for name in predictor.categories]
    _, images = _val_images(val_dir)
    results = []
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        for (image_id, _), found in zip(chunk, predictor.detect([path for _, path in chunk]), strict=True):
            results += detections_to_coco_results(
                image_id=image_id,
                boxes=found.boxes,
                scores=found.scores,
                category_ids=[category_ids[int(c)] for c in found.class_ids],
            )
    return results


# ---------------------------------------------------------------------------------------------- YOLO
@contextlib.contextmanager
def _keeps_detect_layout():
    """Restore ultralytics' class attribute `Detect.legacy` on exit.

    Parsing a YOLOv8 YAML sets `Detect.legacy = True` on the CLASS (v8 compatibility); every `Detect`
    built afterwards in the process, our head included, would get the old layout and no longer load
    its checkpoint.
    """
    from ultralytics.nn.modules.head import Detect

    saved = Detect.legacy
    try:
        yield
    finally:
        Detect.legacy = saved


@_keeps_detect_layout()
def train_yolo(
    settings: DetectionSettings, train_dir: Path, val_dir: Path, work_dir: Path, *, seconds: float
) -> dict:
    """YOLOv8n from its architecture YAML, trained by ultralytics for `seconds` on the CPU."""
    from ultralytics import YOLO

    data = work_dir / "yolo_data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "train": str(train_dir / "images"),
                "val": str(val_dir / "images"),
                "names": dict(enumerate(CATEGORIES)),
            }
        )
    )
    model = YOLO("yolov8n.yaml")
    batch_starts: list[float] = []
    loop_ends: list[float] = []  # after each batch, and at each epoch's end (before its validation): a
    # batch stopped by `time` breaks out of the loop before its own `on_train_batch_end`
    model.add_callback("on_train_batch_start", lambda trainer: batch_starts.append(time.time()))
    model.add_callback("on_train_batch_end", lambda trainer: loop_ends.append(time.time()))
    model.add_callback("on_train_epoch_end", lambda trainer: loop_ends.append(time.time()))
    started = time.perf_counter()
    model.train(
        data=str(data),
        time=seconds / 3600,
        epochs=1000,  # `time` re-plans the epochs after the first one
        imgsz=settings.image_size,
        batch=settings.yolo_batch,
        device="cpu",
        workers=0,
        amp=False,
        plots=False,
        val=False,
        project=str(work_dir),
        name="yolov8n",
        exist_ok=True,
        seed=0,
        verbose=False,
    )
    wall = time.perf_counter() - started
    trainer = model.trainer
    return {
        "weights": Path(trainer.last),
        "epochs_run": int(trainer.epoch) + 1,
        "batches": len(batch_starts),
        # Start of training to the end of its last batch: ultralytics' own clock, validation excluded.
        "train_s": loop_ends[-1] - trainer.train_time_start,
        "wall_s": wall,
        "ultralytics_val_map50_95": float(trainer.metrics.get("metrics/mAP50-95(B)", float("nan"))),
    }


@_keeps_detect_layout()
def predict_yolo(weights: Path, val_dir: Path, image_size: int) -> list[dict]:
    from ultralytics import YOLO

    model = YOLO(str(weights))
    category_ids = [SHAPE_IDS[name] for name in CATEGORIES]
    _, images = _val_images(val_dir)
    results = []
    for image_id, path in images:
        (prediction,) = model.predict(
            str(path), imgsz=image_size, conf=CONF_THRESHOLD, iou=NMS_IOU, max_det=MAX_DET,
            device="cpu", verbose=False,
        )  # fmt: skip
        boxes = prediction.boxes
        results += detections_to_coco_results(
            image_id=image_id,
            boxes=boxes.xyxy.numpy(),
            scores=boxes.conf.numpy(),
            category_ids=[category_ids[int(c)] for c in boxes.cls],
        )
    return results


# ---------------------------------------------------------------------------------------------- both
def det_head_vs_yolov8n(settings: DetectionSettings, work_dir: Path) -> dict:
    """Train both detectors on one world, score both on another; returns both mAPs and their ratio."""
    work_dir = work_dir.resolve()  # ultralytics resolves a relative dataset path against its own folder
    work_dir.mkdir(parents=True, exist_ok=True)
    train_source = SourceConfig(
        kind="synthetic",
        dir=str((work_dir / "world_train").resolve()),
        num_images=settings.train_images,
        seed=11,
        image_size=settings.image_size,
        categories=list(CATEGORIES),
    )
    train_dir, val_dir = Path(train_source.dir), work_dir / "world_val"
    ensure_synthetic_world(train_source, train_dir)
    generate_world(
        val_dir,
        num_images=settings.val_images,
        seed=12,
        image_size=settings.image_size,
        categories=CATEGORIES,
    )
    write_yolo_labels(train_dir, CATEGORIES)
    write_yolo_labels(val_dir, CATEGORIES)

    ours = train_ours(settings, train_source, work_dir)
    yolo = train_yolo(settings, train_dir, val_dir, work_dir, seconds=ours["train_s"])
    gt, _ = _val_images(val_dir)
    maps = {
        "ours": coco_detection_metrics(gt, predict_ours(ours["checkpoint"], val_dir)),
        "yolov8n": coco_detection_metrics(gt, predict_yolo(yolo["weights"], val_dir, settings.image_size)),
    }
    ours_ap, yolo_ap = maps["ours"]["AP"], maps["yolov8n"]["AP"]
    return {
        "ratio": ours_ap / yolo_ap if yolo_ap > 0 else None,
        "map50_95": {"ours": ours_ap, "yolov8n": yolo_ap},
        "map50": {"ours": maps["ours"]["AP50"], "yolov8n": maps["yolov8n"]["AP50"]},
        "budget_s": settings.budget_s,
        "train_s": {"ours": ours["train_s"], "yolov8n": yolo["train_s"]},
        "wall_s": {"ours": ours["wall_s"], "yolov8n": yolo["wall_s"]},
        "ours_steps": ours["steps"],
        "ours_batch_size": settings.batch_size,
        "yolov8n_epochs": yolo["epochs_run"],
        "yolov8n_batches": yolo["batches"],
        "yolov8n_batch_size": settings.yolo_batch,
        "yolov8n_ultralytics_val_map50_95": yolo["ultralytics_val_map50_95"],
        "train_images": settings.train_images,
        "val_images": settings.val_images,
        "image_size": settings.image_size,
        "categories": CATEGORIES,
        "torch_threads": torch.get_num_threads(),
    }
