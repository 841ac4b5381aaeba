"""COCO reader: agreement with pycocotools on the real excerpt, masks, and every bad-data case."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from grounded_llava.data.bad_data import DataError
from grounded_llava.data.coco import load_coco_instances

COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny"
if not COCO_TINY.is_dir():
    COCO_TINY = Path("/work/shared/data/coco_tiny")
needs_coco = pytest.mark.skipif(not COCO_TINY.is_dir(), reason="shared/data/coco_tiny not present")


@needs_coco
@pytest.mark.parametrize("split", ["train", "val"])
def test_records_match_pycocotools(split):
    ann_file = COCO_TINY / f"annotations_{split}.json"
    data = load_coco_instances(ann_file, COCO_TINY / "images", image_check="header")
    reference = COCO(str(ann_file))
    assert data.report.num_problems == 0
    assert len(data.images) == len(reference.getImgIds()) == 80
    assert [(c.id, c.name) for c in data.categories] == [
        (c["id"], c["name"]) for c in reference.loadCats(sorted(reference.getCatIds()))
    ]
    for record in data.images:
        ann_ids = reference.getAnnIds(imgIds=[record.image_id])
        assert [i.ann_id for i in record.instances] == ann_ids
        assert (record.width, record.height) == (
            reference.imgs[record.image_id]["width"],
            reference.imgs[record.image_id]["height"],
        )
    crowd = sum(i.iscrowd for r in data.images for i in r.instances)
    assert crowd == {"train": 6, "val": 11}[split]  # SOURCE.md counts


@needs_coco
def test_boxes_and_masks_on_real_coco():
    ann_file = COCO_TINY / "annotations_train.json"
    data = load_coco_instances(ann_file, COCO_TINY / "images", image_check="none")
    reference = COCO(str(ann_file))
    first = reference.anns[data.images[0].instances[0].ann_id]
    x, y, w, h = first["bbox"]
    assert data.images[0].instances[0].box_xyxy == pytest.approx((x, y, x + w, y + h))
    checked_crowd = 0
    for record in data.images[:25]:
        for inst in record.instances:
            mask = inst.decode_mask(record.image_size)
            assert mask.dtype == bool and mask.shape == (record.height, record.width)
            np.testing.assert_array_equal(mask, reference.annToMask(reference.anns[inst.ann_id]).astype(bool))
            ys, xs = np.nonzero(mask)
            mask_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert np.abs(np.subtract(mask_box, inst.box_xyxy)).max() <= 4  # polygon rasterisation
            checked_crowd += inst.iscrowd
    assert checked_crowd >= 1  # the crowd (uncompressed RLE) path was exercised


# ---------- a tiny dataset written into tmp_path, and its corruptions ----------


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def _write_dataset(root: Path) -> dict:
    images_dir = root / "images"
    images_dir.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (32, 24), (10, 20, 30)).save(images_dir / name)
    square = np.zeros((24, 32), dtype=np.uint8)
    square[4:10, 6:16] = 1  # rows 4..9, cols 6..15: bbox xywh [6, 4, 10, 6]
    compressed = mask_utils.encode(np.asfortranarray(square))
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 24},
            {"id": 3, "file_name": "c.png", "width": 32, "height": 24},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 1,
                "bbox": [6, 4, 10, 6],
                "iscrowd": 0,
                "segmentation": [[6, 4, 16, 4, 16, 10, 6, 10]],
            },
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {
                "id": 20,
                "image_id": 2,
                "category_id": 1,
                "bbox": [6, 4, 10, 6],
                "iscrowd": 0,
                "segmentation": {"size": [24, 32], "counts": compressed["counts"].decode()},
            },
            {
                "id": 30,
                "image_id": 3,
                "category_id": 2,
                "bbox": [6, 4, 10, 6],
                "iscrowd": 1,
                "segmentation": {"size": [24, 32], "counts": _uncompressed_counts(square)},
            },
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
    }


def _save(root: Path, data: dict) -> Path:
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_tiny_dataset_reads_every_segmentation_form(tmp_path):
    data = load_coco_instances(_save(tmp_path, _write_dataset(tmp_path)), tmp_path / "images")
    assert [r.image_id for r in data.images] == [1, 2, 3]
    expected = np.zeros((24, 32), dtype=bool)
    expected[4:10, 6:16] = True
    polygon, no_segm = data.images[0].instances
    # a polygon covers pixel centres inside it, i.e. the 10x6 square (pycocotools rasterisation)
    assert polygon.decode_mask((32, 24)).sum() == pytest.approx(60, abs=12)
    assert no_segm.decode_mask((32, 24)) is None and not no_segm.has_mask
    np.testing.assert_array_equal(data.images[1].instances[0].decode_mask((32, 24)), expected)
    crowd = data.images[2].instances[0]
    assert crowd.iscrowd
    np.testing.assert_array_equal(crowd.decode_mask((32, 24)), expected)
    assert polygon.box_xyxy == (6.0, 4.0, 16.0, 10.0)
    assert data.images[2].non_crowd() == []


def _truncate(root: Path) -> None:
    png = (root / "images" / "b.png").read_bytes()
    (root / "images" / "b.png").write_bytes(png[: len(png) // 2])


def _garbage(root: Path) -> None:
    (root / "images" / "b.png").write_bytes(b"this is not an image")


def _ann(index):
    return lambda d: d["annotations"][index]


# (case, mutation of the JSON dict, optional file mutation, reason counted, id named, image dropped)
CASES = [
    (
        "missing file",
        lambda d: d["images"][1].update(file_name="gone.png"),
        None,
        "missing_image_file",
        "id 2",
        2,
    ),
    ("garbage image", lambda d: None, _garbage, "corrupt_image", "id 2", 2),
    ("truncated image", lambda d: None, _truncate, "corrupt_image", "id 2", 2),
    (
        "escapes root",
        lambda d: d["images"][1].update(file_name="../b.png"),
        None,
        "path_escapes_root",
        "id 2",
        2,
    ),
    (
        "absolute path",
        lambda d: d["images"][1].update(file_name="/etc/b.png"),
        None,
        "path_escapes_root",
        "id 2",
        2,
    ),
    ("size mismatch", lambda d: d["images"][1].update(width=64), None, "image_size_mismatch", "id 2", 2),
    ("image key missing", lambda d: d["images"][1].pop("file_name"), None, "missing_key", "id 2", 2),
    ("zero width box", lambda d: d["annotations"][2].update(bbox=[6, 4, 0, 6]), None, "bad_bbox", "id 20", 2),
    (
        "negative height box",
        lambda d: d["annotations"][2].update(bbox=[6, 4, 5, -1]),
        None,
        "bad_bbox",
        "id 20",
        2,
    ),
    (
        "box outside",
        lambda d: d["annotations"][2].update(bbox=[25, 4, 10, 6]),
        None,
        "bbox_outside_image",
        "id 20",
        2,
    ),
    (
        "unknown category",
        lambda d: d["annotations"][2].update(category_id=99),
        None,
        "unknown_category_id",
        "id 20",
        2,
    ),
    (
        "odd polygon",
        lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 1, 5, 5, 1]]),
        None,
        "malformed_polygon",
        "id 10",
        1,
    ),
    (
        "short polygon",
        lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 1]]),
        None,
        "malformed_polygon",
        "id 10",
        1,
    ),
    (
        "rle too short",
        lambda d: d["annotations"][2]["segmentation"].update(counts=[7, 2, 3]),
        None,
        "malformed_rle",
        "id 20",
        2,
    ),
    (
        "rle wrong size",
        lambda d: d["annotations"][2]["segmentation"].update(size=[10, 10]),
        None,
        "malformed_rle",
        "id 20",
        2,
    ),
    ("annotation key missing", lambda d: d["annotations"][2].pop("bbox"), None, "missing_key", "id 20", 2),
    (
        "unknown image",
        lambda d: d["annotations"][2].update(image_id=77),
        None,
        "unknown_image_id",
        "id 20",
        None,
    ),
    (
        "duplicate annotation id",
        lambda d: d["annotations"][2].update(id=10),
        None,
        "duplicate_id",
        "id 10",
        2,
    ),
]


@pytest.mark.parametrize(
    ("case", "mutate", "mutate_files", "reason", "named_id", "dropped"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_data_strict_and_skip(tmp_path, case, mutate, mutate_files, reason, named_id, dropped):
    data = _write_dataset(tmp_path)
    mutate(data)
    if mutate_files:
        mutate_files(tmp_path)
    ann_file = _save(tmp_path, data)
    with pytest.raises(DataError) as error:
        load_coco_instances(ann_file, tmp_path / "images")
    assert "instances.json" in str(error.value) and named_id in str(error.value)

    loaded = load_coco_instances(ann_file, tmp_path / "images", on_bad_data="skip")
    assert loaded.report.counts == Counter({reason: 1})
    assert named_id in loaded.report.examples[0]
    kept = [r.image_id for r in loaded.images]
    assert kept == [i for i in (1, 2, 3) if i != dropped]
    assert loaded.report.images_skipped == (dropped is not None)


def test_box_within_one_pixel_is_clipped_not_rejected(tmp_path):
    data = _write_dataset(tmp_path)
    data["annotations"][2]["bbox"] = [-0.5, 0, 32.8, 24.4]
    loaded = load_coco_instances(_save(tmp_path, data), tmp_path / "images")
    assert loaded.images[1].instances[0].box_xyxy == (0.0, 0.0, 32.0, 24.0)


def test_header_check_misses_truncation_that_decode_catches(tmp_path):
    data = _write_dataset(tmp_path)
    _truncate(tmp_path)
    ann_file = _save(tmp_path, data)
    assert len(load_coco_instances(ann_file, tmp_path / "images", image_check="none").images) == 3
    with pytest.raises(DataError, match="cannot read image"):
        load_coco_instances(ann_file, tmp_path / "images", image_check="decode")


def test_skip_logs_a_warning_and_keeps_counts_per_reason(tmp_path, caplog):
    data = _write_dataset(tmp_path)
    bad = copy.deepcopy(data["annotations"][2])
    data["annotations"][2]["category_id"] = 99
    data["annotations"].append({**bad, "id": 40, "image_id": 3, "bbox": [0, 0, -1, 2]})
    with caplog.at_level("WARNING"):
        loaded = load_coco_instances(_save(tmp_path, data), tmp_path / "images", on_bad_data="skip")
    assert loaded.report.counts == Counter({"unknown_category_id": 1, "bad_bbox": 1})
    assert [r.image_id for r in loaded.images] == [1]
    assert loaded.report.annotations_skipped == 3  # the two bad ones and the crowd region of image 3
    assert "unknown_category_id=1" in caplog.text and "bad_bbox=1" in caplog.text


def test_missing_top_level_key_always_raises(tmp_path):
    data = _write_dataset(tmp_path)
    del data["categories"]
    with pytest.raises(DataError, match="'categories'"):
        load_coco_instances(_save(tmp_path, data), tmp_path / "images", on_bad_data="skip")


@pytest.mark.parametrize("on_bad_data", ["strict", "skip"])
def test_duplicate_category_name_raises_naming_both_ids(tmp_path, on_bad_data):
    data = _write_dataset(tmp_path)
    data["categories"].append({"id": 7, "name": "dog"})
    with pytest.raises(DataError) as error:
        load_coco_instances(_save(tmp_path, data), tmp_path / "images", on_bad_data=on_bad_data)
    assert (
        "instances.json: category #2 (id 7): field 'name': 'dog' is the name of category ids 1 and 7"
        in str(error.value)
    )
