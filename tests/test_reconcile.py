"""Reconciling the answer's text boxes with the detection head (hand-computed IoUs and matches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_llava.codec import GroundedSpan, encode_grounded, parse_grounded
from grounded_llava.inference import Detections, GroundedAnswer, pairwise_iou, phrase_category, reconcile
from grounded_llava.inference.reconciliation import named_categories

W, H = 100, 100
NAMES = ["circle", "square", "hot dog", "dog", "person", "bus"]


def head(boxes, scores, class_ids, masks=None) -> Detections:
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        class_ids=torch.tensor(class_ids, dtype=torch.int64),
        category_names=NAMES,
        image_size=(W, H),
        masks=masks,
    )


def test_pairwise_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    # overlap 50 / union 150; identical; disjoint; 50 / 100.
    np.testing.assert_allclose(pairwise_iou(a, b), [[1 / 3, 1.0, 0.0, 0.5]] * 2)
    assert pairwise_iou(np.zeros((0, 4)), b).shape == (0, 4)


@pytest.mark.parametrize(
    ("phrase", "category"),
    [
        ("the red circle", "circle"),
        ("two red Circles", "circle"),
        ("a CIRCLE", "circle"),
        ("the hot dog", "hot dog"),  # longest match wins over "dog"
        ("hot   dogs", "hot dog"),
        ("the dogs", "dog"),
        ("three people", "person"),
        ("buses", "bus"),
        ("encircled area", None),  # whole words only
        ("squared", None),
        ("the blue thing", None),
        ("", None),
    ],
)
def test_phrase_category(phrase, category):
    assert phrase_category(phrase, NAMES) == category


def test_named_categories_lists_every_category_a_question_names():
    assert [NAMES[i] for i in named_categories("Is the hot dog left of the buses?", NAMES)] == [
        "hot dog",
        "dog",
        "bus",
    ]
    assert named_categories("Where is the encircled area?", NAMES) == []


def test_two_of_three_text_boxes_match():
    spans = [
        GroundedSpan(phrase="red circle", boxes=[(0, 0, 10, 10), (50, 50, 70, 70)]),
        GroundedSpan(phrase="blue thing", boxes=[(30, 0, 40, 10)]),
    ]
    detections = head(
        boxes=[[0, 0, 10, 8], [30, 0, 40, 12], [80, 80, 90, 90]],
        scores=[0.9, 0.6, 0.3],
        class_ids=[0, 1, 0],
    )
    result = reconcile(spans, box_scores=[[0.7, 0.55], [0.4]], detections=detections)
    # (0,0,10,10) vs head 0: IoU 80/100 = 0.8, same category -> head box and score.
    # (50,50,70,70): no overlap with any head box -> text box, token probability.
    # "blue thing" names no category; vs head 1 (a square): IoU 100/120 = 0.833 -> matched.
    assert result.agreement == pytest.approx(2 / 3)
    first, second, third = result.spans
    np.testing.assert_array_equal(first.box, [0, 0, 10, 8])
    assert (first.score, first.source, first.category, first.head_index) == (
        pytest.approx(0.9),
        "head",
        "circle",
        0,
    )
    np.testing.assert_array_equal(second.box, [50, 50, 70, 70])
    assert (second.score, second.source, second.category, second.head_index) == (0.55, "text", "circle", None)
    np.testing.assert_array_equal(third.box, [30, 0, 40, 12])
    assert (third.phrase, third.source, third.category, third.score) == (
        "blue thing",
        "head",
        "square",
        pytest.approx(0.6),
    )


def test_category_named_by_the_phrase_must_agree():
    spans = [GroundedSpan(phrase="the square", boxes=[(0, 0, 10, 10)])]
    # A circle box with IoU 0.9 and a square box with IoU 0.6 (60 / 100): only the square may match.
    detections = head(boxes=[[0, 0, 10, 9], [0, 0, 10, 6]], scores=[0.95, 0.5], class_ids=[0, 1])
    result = reconcile(spans, box_scores=[[0.3]], detections=detections)
    assert result.spans[0].head_index == 1 and result.spans[0].score == pytest.approx(0.5)
    assert result.agreement == 1.0
    only_circle = reconcile(spans, box_scores=[[0.3]], detections=detections[[0]])
    assert only_circle.spans[0].source == "text" and only_circle.spans[0].category == "square"
    assert only_circle.agreement == 0.0


def test_greedy_by_iou_and_each_head_box_used_once():
    # Text box 0 has IoU 0.8 with head 0, text box 1 IoU 1.0: box 1 takes it although it comes later.
    spans = [GroundedSpan(phrase="circles", boxes=[(0, 0, 10, 8), (0, 0, 10, 10)])]
    detections = head(boxes=[[0, 0, 10, 10], [20, 0, 30, 10]], scores=[0.9, 0.8], class_ids=[0, 0])
    result = reconcile(spans, box_scores=[[0.6, 0.5]], detections=detections)
    assert [s.head_index for s in result.spans] == [None, 0]
    assert [s.source for s in result.spans] == ["text", "head"]
    assert result.agreement == 0.5


def test_threshold_is_inclusive_and_configurable():
    spans = [GroundedSpan(phrase="circle", boxes=[(0, 0, 10, 10)])]
    detections = head(boxes=[[0, 0, 10, 5]], scores=[0.9], class_ids=[0])  # IoU exactly 0.5
    assert reconcile(spans, box_scores=[[0.2]], detections=detections).agreement == 1.0
    strict = reconcile(spans, box_scores=[[0.2]], detections=detections, iou_threshold=0.51)
    assert strict.agreement == 0.0 and strict.spans[0].score == pytest.approx(0.2)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        reconcile(spans, box_scores=[[0.2]], detections=detections, iou_threshold=0.0)


def test_masks_text_mask_first_then_head_mask():
    head_masks = np.zeros((2, H, W), dtype=bool)
    head_masks[0, :10, :10] = True
    head_masks[1, 50:60, 50:60] = True
    detections = head(
        boxes=[[0, 0, 10, 10], [50, 50, 60, 60]], scores=[0.9, 0.8], class_ids=[0, 1], masks=head_masks
    )
    text_mask = np.zeros((H, W), dtype=bool)
    text_mask[1:9, 1:9] = True
    spans = [
        GroundedSpan(phrase="circle", boxes=[(0, 0, 10, 10)]),
        GroundedSpan(phrase="square", boxes=[(50, 50, 60, 60), (80, 80, 90, 90)]),
    ]
    result = reconcile(
        spans, box_scores=[[0.5], [0.5, 0.5]], detections=detections, masks=[[text_mask], [None, None]]
    )
    np.testing.assert_array_equal(result.spans[0].mask, text_mask)
    np.testing.assert_array_equal(result.spans[1].mask, head_masks[1])
    assert result.spans[2].mask is None


def test_no_text_boxes_and_bad_lengths():
    detections = head(boxes=[[0, 0, 10, 10]], scores=[0.9], class_ids=[0])
    empty = reconcile([], box_scores=[], detections=detections)
    assert empty.spans == [] and empty.agreement is None
    spans = [GroundedSpan(phrase="circle", boxes=[(0, 0, 10, 10), (5, 5, 9, 9)])]
    with pytest.raises(ValueError, match=r"one score per text box: spans have \[2\] boxes, box_scores \[1\]"):
        reconcile(spans, box_scores=[[0.5]], detections=detections)
    with pytest.raises(ValueError, match=r"masks must have one entry per text box"):
        reconcile(spans, box_scores=[[0.5, 0.5]], detections=detections, masks=[[None]])
    no_head = reconcile(spans, box_scores=[[0.5, 0.4]], detections=detections[[]])
    assert [s.source for s in no_head.spans] == ["text", "text"] and no_head.agreement == 0.0


def test_parsed_answer_to_grounded_answer_json():
    raw = "I see " + encode_grounded(["two dogs"], [[(10, 10, 30, 30), (60, 60, 90, 90)]], (W, H)) + "."
    parsed = parse_grounded(raw, (W, H))
    detections = head(boxes=[[10, 10, 30, 30], [0, 50, 20, 70]], scores=[0.8, 0.7], class_ids=[3, 3])
    result = reconcile(parsed.spans, box_scores=[[0.6, 0.45]], detections=detections)
    answer = GroundedAnswer(
        text=parsed.text,
        raw_text=raw,
        spans=result.spans,
        detections=detections,
        image_size=(W, H),
        agreement=result.agreement,
        num_dropped_groups=parsed.num_dropped,
    )
    out = answer.to_json()
    assert out["text"] == "I see two dogs."
    # Bins of 1 px on a 100 px image: decoded boxes are bin centres (x + 0.5). The first is the head's
    # box (IoU 19.5^2 / (800 - 19.5^2) = 0.906), the second matches nothing (text box, probability 0.45).
    assert [s["box"] for s in out["spans"]] == [[10.0, 10.0, 30.0, 30.0], [60.5, 60.5, 90.5, 90.5]]
    assert [s["score"] for s in out["spans"]] == [pytest.approx(0.8), 0.45]
    assert [s["category"] for s in out["spans"]] == ["dog", "dog"]
    assert answer.agreement == 0.5 and len(out["detections"]) == 2
