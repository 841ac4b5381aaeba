"""COCO geometry that would crash pycocotools is an invalid item, in the reader and in the COCO metrics.

A NaN polygon coordinate segfaults `frPyObjects` (exit 139), a huge one makes it rasterise an
enormous outline (OOM), `size: null` / `area: null` fail inside pycocotools. The reader (training and
evaluation) must flag them by field; `evaluate` must exit 2 with one line; `coco_detection_metrics`
must raise ValueError. Calls that could crash run in a subprocess, so a regression fails a test
instead of killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from grounded_llava.data.bad_data import DataError
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.evaluate import main as evaluate_main

from .test_data_coco import _save, _write_dataset

NAN, INF = float("nan"), float("inf")
SQUARE = [6, 4, 16, 4, 16, 10, 6, 10]

# (case, annotation update for annotation #0 (id 10, image 1), reason, text in the message)
CASES = [
    ("nan polygon", {"segmentation": [[NAN, *SQUARE[1:]]]}, "malformed_polygon", "#0 is nan, not finite"),
    ("inf polygon", {"segmentation": [[*SQUARE[:3], INF, *SQUARE[4:]]]}, "malformed_polygon", "not finite"),
    ("huge polygon", {"segmentation": [[*SQUARE[:4], 1e8, *SQUARE[5:]]]}, "polygon_outside_image", "(x = 1"),
    (
        "far outside",
        {"segmentation": [[*SQUARE[:5], -25, *SQUARE[6:]]]},
        "polygon_outside_image",
        "(y = -25)",
    ),
    ("rle size null", {"segmentation": {"size": None, "counts": "PX0"}}, "malformed_rle", "got None"),
    ("area null", {"area": None}, "bad_value", "field 'area': must be a finite number >= 0, got None"),
    ("area text", {"area": "12"}, "bad_value", "got '12'"),
    ("area nan", {"area": NAN}, "bad_value", "got nan"),
]
IDS = [case[0] for case in CASES]


def _bad_dataset(tmp_path, change):
    data = _write_dataset(tmp_path)
    data["annotations"][0].update(change)
    return _save(tmp_path, data)


@pytest.mark.parametrize(("case", "change", "reason", "message"), CASES, ids=IDS)
def test_reader_flags_bad_geometry_strict_and_skip(tmp_path, case, change, reason, message):
    ann_file = _bad_dataset(tmp_path, change)
    with pytest.raises(DataError) as error:
        load_coco_instances(ann_file, tmp_path / "images")
    text = str(error.value)
    assert "\n" not in text and "instances.json: annotation #0 (id 10" in text and message in text, text
    field = "area" if "area" in change else "segmentation"
    assert f"field '{field}'" in text
    loaded = load_coco_instances(ann_file, tmp_path / "images", on_bad_data="skip")
    assert loaded.report.counts == Counter({reason: 1})
    assert [r.image_id for r in loaded.images] == [2, 3]


def test_polygon_slightly_outside_the_image_is_kept(tmp_path):
    ann_file = _bad_dataset(tmp_path, {"segmentation": [[-3, -2, 40, -2, 40, 30, -3, 30]]})
    record = load_coco_instances(ann_file, tmp_path / "images").images[0]
    assert record.instances[0].decode_mask(record.image_size).all()  # pycocotools clips to the image


@pytest.mark.parametrize(("case", "change", "reason", "message"), CASES[::2], ids=IDS[::2])
def test_evaluate_exits_2_with_one_line_before_the_model_loads(
    tmp_path, capsys, case, change, reason, message
):
    ann_file = _bad_dataset(tmp_path, change)
    model = tmp_path / "no-model"  # a folder without a model: the data is read (and refused) first
    model.mkdir()
    args = ["--model", str(model), "--data", str(ann_file), "--images", str(tmp_path / "images")]
    assert evaluate_main([*args, "--out", str(tmp_path / "out"), "--tasks", "det,seg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate: error:") and message in err, err


METRICS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from grounded_llava.evaluation.coco_metrics import coco_detection_metrics
    # 2 GiB more address space than the imports took: a huge polygon gives MemoryError, not the OOM killer
    vm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
    limit = (vm_kib << 10) + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    gt = json.loads(sys.argv[1])
    results = [{"image_id": 1, "category_id": 1, "bbox": [6, 4, 10, 6], "score": 0.9}]
    try:
        coco_detection_metrics(gt, results, iou_type="bbox" if "area" in sys.argv[2] else "segm")
    except ValueError as error:
        print("ValueError:", error)
    """
)


@pytest.mark.parametrize(("case", "change", "reason", "message"), CASES, ids=IDS)
def test_coco_metrics_raise_value_error_not_crash(tmp_path, case, change, reason, message):
    data = _write_dataset(tmp_path)
    data["annotations"] = [{**data["annotations"][0], **change}]
    if "segmentation" not in change:
        data["annotations"][0].pop("segmentation")
    script = [sys.executable, "-c", METRICS_SCRIPT, json.dumps(data), case]
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    out = done.stdout.strip()
    assert out.startswith("ValueError: ground truth: annotations[0] (id=10): field ") and message in out, out
