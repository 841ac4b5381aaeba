"""Detections / GroundedAnswer results objects, overlay drawing and RLE helpers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounded_llava.inference import (
    Detections,
    GroundedAnswer,
    GroundedSpanResult,
    draw_overlay,
    mask_to_rle,
    rle_to_mask,
)
from grounded_llava.inference.overlay import wrap_text

W, H = 240, 120
NAMES = ["circle", "square", "triangle"]


def box_mask(box: list[float]) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def dets() -> Detections:
    boxes = [[10, 10, 50, 40], [100, 20, 140, 60], [60, 70, 90, 100]]
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float64),
        scores=torch.tensor([0.9, 0.5, 0.7]),
        class_ids=torch.tensor([0, 2, 1]),
        category_names=NAMES,
        image_size=(W, H),
        masks=np.stack([box_mask(b) for b in boxes]),
    )


def gray_image() -> np.ndarray:
    return np.full((H, W, 3), 128, dtype=np.uint8)


def assert_rows(sub: Detections, full: Detections, rows: list[int]) -> None:
    assert len(sub) == len(rows)
    assert torch.equal(sub.boxes, full.boxes[rows])
    assert torch.equal(sub.scores, full.scores[rows])
    assert torch.equal(sub.class_ids, full.class_ids[rows])
    assert torch.equal(sub.masks, full.masks[rows])
    assert sub.category_names == NAMES and sub.image_size == (W, H)


def test_fields_are_converted_to_documented_dtypes(dets):
    assert dets.boxes.dtype == torch.float32 and dets.boxes.shape == (3, 4)
    assert dets.class_ids.dtype == torch.int64
    assert isinstance(dets.masks, torch.Tensor) and dets.masks.dtype == torch.bool
    assert dets.categories == ["circle", "triangle", "square"]


@pytest.mark.parametrize(
    ("index", "rows"),
    [
        (1, [1]),
        (-1, [2]),
        (slice(1, None), [1, 2]),
        (torch.tensor([True, False, True]), [0, 2]),
        ([False, True, False], [1]),
        (np.array([True, True, False]), [0, 1]),
        (torch.tensor([2, 0]), [2, 0]),
        (np.array([1]), [1]),
        ([], []),
        (torch.tensor(2), [2]),
    ],
)
def test_indexing_filters_every_field_together(dets, index, rows):
    assert_rows(dets[index], dets, rows)


def test_indexing_numpy_backed_and_bad_indices(dets):
    data = dets.numpy()
    sub = data[np.array([False, True, True])]
    assert isinstance(sub.boxes, np.ndarray)
    np.testing.assert_array_equal(sub.class_ids, [2, 1])
    np.testing.assert_array_equal(sub.masks, data.masks[1:])
    np.testing.assert_array_equal(data[torch.tensor([0])].scores, np.float32([0.9]))
    with pytest.raises(IndexError, match="index 3 out of range for 3"):
        dets[3]
    with pytest.raises(IndexError, match=r"bool mask has shape \(2,\), expected \(3,\)"):
        dets[torch.tensor([True, False])]


def test_numpy_returns_a_copy_and_cpu_keeps_tensors(dets):
    data = dets.numpy()
    assert isinstance(data, Detections)
    for name, dtype in [
        ("boxes", np.float32),
        ("scores", np.float32),
        ("class_ids", np.int64),
        ("masks", bool),
    ]:
        value = getattr(data, name)
        assert isinstance(value, np.ndarray) and value.dtype == dtype, name
    data.boxes[0, 0] = -5.0
    data.masks[0, 0, 0] = True
    assert dets.boxes[0, 0].item() == 10.0 and not dets.masks[0, 0, 0]
    on_cpu = dets.cpu()
    assert isinstance(on_cpu.boxes, torch.Tensor) and on_cpu.boxes.device.type == "cpu"
    assert torch.equal(on_cpu.scores, dets.scores)
    assert data.cpu() is data
    assert isinstance(data.to("cpu").boxes, torch.Tensor)


def test_bad_fields_raise_naming_the_field():
    ok = {
        "boxes": [[0, 0, 5, 5]],
        "scores": [0.5],
        "class_ids": [0],
        "category_names": NAMES,
        "image_size": (W, H),
    }
    with pytest.raises(ValueError, match=r"Detections.class_ids must lie in \[0, 3\)"):
        Detections(**{**ok, "class_ids": [3]})
    with pytest.raises(ValueError, match=r"Detections.scores has shape \(2,\), expected \(1,\)"):
        Detections(**{**ok, "scores": [0.5, 0.6]})
    with pytest.raises(
        ValueError, match=r"Detections.masks has shape \(1, 5, 5\), expected \(N=1, H=120, W=240\)"
    ):
        Detections(**ok, masks=np.zeros((1, 5, 5), bool))
    with pytest.raises(ValueError, match="Detections.image_size"):
        Detections(**{**ok, "image_size": (0, 5)})
    assert len(Detections.empty(category_names=NAMES, image_size=(W, H))) == 0


def test_rle_round_trip_and_uncompressed_counts():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 11)) > 0.5, np.zeros((4, 3), bool), np.ones((5, 2), bool)):
        rle = mask_to_rle(mask)
        assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
        decoded = rle_to_mask(json.loads(json.dumps(rle)))
        assert decoded.dtype == bool
        np.testing.assert_array_equal(decoded, mask)
    # Uncompressed (column-major run lengths, as COCO crowd annotations): 2 zeros, 3 ones, 1 zero.
    np.testing.assert_array_equal(
        rle_to_mask({"size": [3, 2], "counts": [2, 3, 1]}), [[False, True], [False, True], [True, False]]
    )
    with pytest.raises(ValueError, match="must be 2-D"):
        mask_to_rle(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        rle_to_mask({"counts": "abc"})


def test_detections_to_json_schema(dets):
    records = dets.to_json()
    json.dumps(records)
    assert [set(r) for r in records] == [{"box", "score", "category", "mask_rle"}] * 3
    first = records[0]
    assert first["box"] == [10.0, 10.0, 50.0, 40.0] and all(type(v) is float for v in first["box"])
    assert type(first["score"]) is float and first["score"] == pytest.approx(0.9)
    assert [r["category"] for r in records] == ["circle", "triangle", "square"]
    np.testing.assert_array_equal(rle_to_mask(records[1]["mask_rle"]), box_mask([100, 20, 140, 60]))
    assert dets[[0]].numpy()._replace(masks=None).to_json()[0]["mask_rle"] is None
    assert "mask_rle" not in dets.to_json(masks=False)[0]


def make_answer(dets: Detections) -> GroundedAnswer:
    spans = [
        GroundedSpanResult(
            phrase="red circle",
            box=[10, 10, 50, 40],
            mask=box_mask([10, 10, 50, 40]),
            score=0.9,
            category="circle",
            source="head",
            head_index=0,
        ),
        GroundedSpanResult(
            phrase="blue thing", box=torch.tensor([150.0, 5, 200, 30]), score=0.4, source="text"
        ),
    ]
    return GroundedAnswer(
        text="A red circle and a blue thing.",
        raw_text="A <p>red circle</p><box>...</box> and a <p>blue thing</p><box>...</box>.",
        spans=spans,
        detections=dets,
        image_size=(W, H),
        agreement=0.5,
    )


def test_grounded_answer_to_json_exact_schema(dets):
    out = make_answer(dets).to_json()
    assert json.loads(json.dumps(out)) == out
    assert list(out) == ["text", "spans", "detections"]
    assert out["text"] == "A red circle and a blue thing."
    assert [list(s) for s in out["spans"]] == [["phrase", "box", "score", "category", "mask_rle"]] * 2
    # The detections carry masks (`masks_for_detections`): the JSON keeps them; without, it has no mask key.
    assert [list(d) for d in out["detections"]] == [["box", "score", "category", "mask_rle"]] * 3
    np.testing.assert_array_equal(rle_to_mask(out["detections"][1]["mask_rle"]), box_mask([100, 20, 140, 60]))
    maskless = make_answer(dets.numpy()._replace(masks=None)).to_json()
    assert [list(d) for d in maskless["detections"]] == [["box", "score", "category"]] * 3
    first, second = out["spans"]
    assert first["box"] == [10.0, 10.0, 50.0, 40.0] and first["category"] == "circle"
    assert set(first["mask_rle"]) == {"size", "counts"} and first["mask_rle"]["size"] == [H, W]
    assert isinstance(first["mask_rle"]["counts"], str)
    assert second == {
        "phrase": "blue thing",
        "box": [150.0, 5.0, 200.0, 30.0],
        "score": 0.4,
        "category": None,
        "mask_rle": None,
    }
    assert all(type(v) is float for s in out["spans"] for v in [*s["box"], s["score"]])


def test_grounded_answer_validation(dets):
    with pytest.raises(ValueError, match=r"spans\[0\] \('x'\) mask has shape \(3, 3\)"):
        GroundedAnswer(
            text="x",
            raw_text="x",
            detections=dets,
            image_size=(W, H),
            spans=[
                GroundedSpanResult(
                    phrase="x", box=[0, 0, 1, 1], mask=np.ones((3, 3), bool), score=1, source="text"
                )
            ],
        )
    with pytest.raises(ValueError, match="source must be 'head' or 'text'"):
        GroundedSpanResult(phrase="x", box=[0, 0, 1, 1], score=1.0, source="both")
    with pytest.raises(ValueError, match=r"detections.image_size \(240, 120\) != image_size \(10, 10\)"):
        GroundedAnswer(text="", raw_text="", detections=dets, image_size=(10, 10))


def coco_ground_truth() -> dict:
    # Two objects, COCO category ids 3 ("circle") and 7 ("square"), masks = their box regions.
    boxes = {1: [10, 10, 110, 110], 2: [130, 10, 230, 110]}
    annotations = [
        {
            "id": ann_id,
            "image_id": 42,
            "category_id": cat,
            "iscrowd": 0,
            "area": 10000.0,
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "segmentation": mask_to_rle(box_mask(b)),
        }
        for (ann_id, b), cat in zip(boxes.items(), [3, 7], strict=True)
    ]
    return {
        "images": [{"id": 42, "width": W, "height": H, "file_name": "x.png"}],
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}],
        "annotations": annotations,
    }


def coco_ap(results: list[dict], iou_type: str) -> float:
    gt = COCO()
    gt.dataset = coco_ground_truth()
    gt.createIndex()
    evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.mark.parametrize(
    ("second_box", "expected_ap"),
    [
        # Perfect predictions: AP 1.0.
        ([130, 10, 230, 110], 1.0),
        # Second box 100x72 inside its 100x100 GT: IoU 0.72 >= thresholds 0.50..0.70 (5 of 10) -> AP 0.5
        # for "square", 1.0 for "circle": mean 0.75. Masks follow the boxes, so segm scores the same.
        ([130, 10, 230, 82], 0.75),
    ],
)
def test_to_coco_scores_through_cocoeval(second_box, expected_ap):
    boxes = [[10, 10, 110, 110], second_box]
    dets = Detections(
        boxes=boxes,
        scores=[0.9, 0.8],
        class_ids=[1, 0],
        category_names=["square", "circle"],
        image_size=(W, H),
        masks=np.stack([box_mask(b) for b in boxes]),
    )
    results = dets.to_coco(42, {0: 7, 1: 3})
    assert results[0]["bbox"] == [10.0, 10.0, 100.0, 100.0] and results[0]["category_id"] == 3
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert coco_ap(results, "bbox") == pytest.approx(expected_ap)
    assert coco_ap(results, "segm") == pytest.approx(expected_ap)
    assert "segmentation" not in dets.numpy()._replace(masks=None).to_coco(42, [7, 3])[0]
    with pytest.raises(KeyError, match="no COCO id for class id 1 \\('circle'\\)"):
        dets.to_coco(42, [7])
    # As the README calls it: image id 0, COCO category id = class id + 1.
    assert [(r["image_id"], r["category_id"]) for r in dets.to_coco()] == [(0, 2), (0, 1)]


def test_plot_keeps_size_and_only_changes_pixels_near_boxes(dets, tmp_path):
    image = gray_image()
    plotted = dets.plot(image, font_size=10)
    assert plotted.shape == (H, W, 3) and plotted.dtype == np.uint8
    changed = (plotted != image).any(axis=2)
    # Inside the first box, away from outline and label: the mask blend (0.55 * 128 + 0.45 * red (230, 25, 75)).
    np.testing.assert_array_equal(plotted[30, 30], np.round(0.55 * 128 + 0.45 * np.array([230, 25, 75])))
    assert changed[10, 30] and changed[25, 10]  # the outline
    assert not changed[:, 180:].any() and not changed[105:, :55].any()  # far from every box and label
    saved = tmp_path / "sub" / "dets.png"
    assert dets.save(saved, Image.fromarray(image)) == saved
    with Image.open(saved) as reread:
        assert reread.size == (W, H)
        np.testing.assert_array_equal(np.asarray(reread), plotted)
    with pytest.raises(ValueError, match=r"image is \(W=10, H=10\) but Detections is for image_size"):
        dets.plot(np.zeros((10, 10, 3), np.uint8))


def test_answer_plot_puts_the_panel_below_the_image(dets, tmp_path):
    answer = make_answer(dets)
    image = gray_image()
    with_panel = answer.plot(image, font_size=10)
    without = answer.plot(image, panel=False, font_size=10)
    assert without.shape == (H, W, 3) and with_panel.shape[1:] == (W, 3) and with_panel.shape[0] > H
    np.testing.assert_array_equal(with_panel[:H], without)  # the panel hides nothing of the image
    panel = with_panel[H:]
    assert (panel[-2:] < 60).all() and (panel > 200).any()  # dark margin, white text
    bottom = slice(H - 10, H)
    assert not (without[bottom] != image[bottom]).any()  # no box reaches the bottom rows
    assert (without[12, 150:200] != image[12, 150:200]).any()  # the text-only span is drawn too
    path = answer.save(tmp_path / "answer.png", image)
    with Image.open(path) as reread:
        assert reread.size == (W, with_panel.shape[0])


def test_labels_of_overlapping_boxes_do_not_cover_each_other():
    """Two boxes with the same top-left corner: the second label moves (inside, below), not over the first."""
    image = gray_image()
    boxes = np.array([[40, 40, 120, 100], [40, 40, 110, 90]], np.float32)
    colors = [(230, 25, 75), (0, 130, 200)]
    both = draw_overlay(image, boxes=boxes, labels=["first", "second"], colors=colors, font_size=10)
    first_only = draw_overlay(image, boxes=boxes, labels=["first", ""], colors=colors, font_size=10)
    label_rows = slice(28, 40)  # the first label, above y = 40
    np.testing.assert_array_equal(both[label_rows], first_only[label_rows])
    blue = (both == np.array(colors[1])).all(axis=2)
    assert blue[41:100, 41:100].sum() > 100  # the second label's fill sits inside/below its box


def test_plot_draws_one_box_per_object(dets):
    """A head detection overlapping a span's box (IoU > 0.6) is the same object: not drawn twice."""
    answer = make_answer(dets)
    duplicate = dets._replace(
        boxes=torch.cat([dets.boxes, torch.tensor([[11.0, 11.0, 51.0, 41.0]], dtype=torch.float64)]),
        scores=torch.cat([dets.scores, torch.tensor([0.3])]),
        class_ids=torch.cat([dets.class_ids, torch.tensor([1])]),
        masks=None,
    )
    answer.detections = duplicate
    plotted = answer.plot(gray_image(), panel=False, font_size=10, masks=False)
    answer.detections = duplicate[: len(dets)]
    assert np.array_equal(plotted, answer.plot(gray_image(), panel=False, font_size=10, masks=False))


def test_draw_overlay_checks_lengths_and_wraps_text():
    with pytest.raises(ValueError, match="2 boxes but 1 labels and 2 colors"):
        draw_overlay(gray_image(), boxes=np.zeros((2, 4)), labels=["a"], colors=[(0, 0, 0)] * 2)
    font = ImageFont.load_default(size=12)
    text = "where are the circles? " * 6 + "Supercalifragilisticexpialidocious"
    lines = wrap_text(text, font=font, max_width=90)
    assert len(lines) > 6 and all(font.getlength(line) <= 90 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_a_confidence_threshold_keeps_the_spans_and_reindexes_their_detections(dets):
    answer = make_answer(dets)
    answer.spans[0].head_index = 2  # matched to the detection scored 0.7
    kept = answer.with_min_score(0.6)  # scores 0.9, 0.5, 0.7 -> rows 0 and 2
    np.testing.assert_allclose(kept.detections.numpy().scores, [0.9, 0.7])
    assert [s.phrase for s in kept.spans] == ["red circle", "blue thing"]
    assert kept.spans[0].head_index == 1 and kept.spans[1].head_index is None
    assert answer.spans[0].head_index == 2  # the answer itself is unchanged
    nothing = answer.with_min_score(1.01)
    assert len(nothing.detections) == 0 and nothing.spans[0].head_index is None
    assert nothing.to_json()["spans"] == answer.to_json()["spans"]
