"""Grounded task generation: answers parse back to their source boxes, masks align with <seg>, determinism."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounded_llava.codec import SEG, parse_grounded
from grounded_llava.data.bad_data import BadDataReport
from grounded_llava.data.coco import CocoInstances, ImageRecord, InstanceRecord, load_coco_instances
from grounded_llava.data.phrasing import flip_text_left_right, pluralize
from grounded_llava.data.tasks import TASK_NAMES, TaskConfig, build_task_samples, make_task_sample

CATEGORIES = ["person", "dog", "bus", "knife"]
COCO_TINY = Path("/work/shared/data/coco_tiny")


def _instance(ann_id, name, box, *, crowd=False, polygon=True, expressions=()):
    x0, y0, x1, y1 = box
    segm = [[x0, y0, x1, y0, x1, y1, x0, y1]] if polygon else None
    return InstanceRecord(
        ann_id=ann_id,
        category_id=CATEGORIES.index(name) + 1,
        category_name=name,
        box_xyxy=box,
        iscrowd=crowd,
        segmentation=segm,
        referring_expressions=list(expressions),
    )


def _record(width, height, instances):
    return ImageRecord(
        image_id=1, file_name="x.jpg", path=Path("x.jpg"), width=width, height=height, instances=instances
    )


@st.composite
def records(draw):
    width, height = draw(st.integers(8, 900)), draw(st.integers(8, 900))
    instances = []
    for ann_id in range(draw(st.integers(0, 7))):
        x0 = draw(st.floats(0, width - 2))
        y0 = draw(st.floats(0, height - 2))
        x1 = draw(st.floats(x0 + 1, width))
        y1 = draw(st.floats(y0 + 1, height))
        name = draw(st.sampled_from(CATEGORIES))
        crowd = draw(st.booleans()) and draw(st.booleans())
        expressions = [f"the {name} number {ann_id}"] if draw(st.booleans()) else []
        instances.append(
            _instance(
                ann_id,
                name,
                (x0, y0, x1, y1),
                crowd=crowd,
                polygon=draw(st.booleans()),
                expressions=expressions,
            )
        )
    return _record(width, height, instances)


def _close(a, b, image_size, num_bins):
    width, height = image_size
    tol = (width / num_bins, height / num_bins, width / num_bins, height / num_bins)
    return all(abs(u - v) <= t + 1e-6 for u, v, t in zip(a, b, tol, strict=True))


@settings(max_examples=60, deadline=None, database=None)
@given(
    record=records(),
    task=st.sampled_from(TASK_NAMES),
    seed=st.integers(0, 10_000),
    num_bins=st.sampled_from([32, 100]),
)
def test_answers_parse_back_to_their_source_boxes(record, task, seed, num_bins):
    config = TaskConfig(num_bins=num_bins, max_boxes=3)
    sample = make_task_sample(
        record, task=task, category_names=CATEGORIES, rng=random.Random(seed), config=config
    )
    if sample is None:
        return
    size = record.image_size
    questions = [turn["value"] for turn in sample.conversation[0::2]]
    answers = [turn["value"] for turn in sample.conversation[1::2]]
    assert questions[0].startswith("<image>\n") and not any("<image>" in q for q in questions[1:])
    assert len(answers) == 1 or (task == "refer_all" and len(answers) <= config.max_turns)
    non_crowd = record.non_crowd()
    assert sample.has_det_targets and sample.det_categories == [i.category_name for i in non_crowd]
    np.testing.assert_allclose(
        sample.det_boxes, np.array([i.box_xyxy for i in non_crowd]).reshape(-1, 4), atol=1e-3
    )
    for question, answer in zip(questions, answers, strict=True):
        parsed = parse_grounded(answer, size, num_bins=num_bins)
        assert parsed.num_dropped == 0
        for span in parsed.spans:
            if task in ("refer", "refer_all"):
                sources = [i for i in non_crowd if span.phrase in i.referring_expressions]
            else:
                sources = [
                    i for i in non_crowd if span.phrase in (i.category_name, pluralize(i.category_name))
                ]
            assert len(span.boxes) <= config.max_boxes
            for box in span.boxes:
                assert any(_close(box, s.box_xyxy, size, num_bins) for s in sources), (span, sources)
        total = sum(len(span.boxes) for span in parsed.spans)
        if task == "detect":
            assert total == min(len(non_crowd), config.max_boxes)
        if task in ("find", "segment") or (task == "count" and parsed.spans):
            name = parsed.spans[0].phrase
            members = [i for i in non_crowd if name in (i.category_name, pluralize(i.category_name))]
            assert total == min(len(members), config.max_boxes)
            assert not any(
                i.iscrowd and i.category_name == members[0].category_name for i in record.instances
            )
        if task == "region_caption":
            (span,) = parse_grounded(question, size, num_bins=num_bins).spans
            assert any(_close(span.boxes[0], i.box_xyxy, size, num_bins) for i in non_crowd)
    assert sum(answer.count(SEG) for answer in answers) == len(sample.seg_masks)
    assert all(m.dtype == bool and m.shape == (record.height, record.width) for m in sample.seg_masks)


def test_refer_all_asks_every_expression_once_up_to_max_turns():
    record = _record(
        200,
        100,
        [
            _instance(1, "dog", (10.0, 20.0, 50.0, 60.0), expressions=["the dog", "the left animal"]),
            _instance(2, "bus", (100.0, 0.0, 190.0, 90.0), expressions=["the bus"]),
        ],
    )
    sample = make_task_sample(
        record, task="refer_all", category_names=CATEGORIES, rng=random.Random(0), config=TaskConfig()
    )
    phrases = [
        span.phrase
        for turn in sample.conversation[1::2]
        for span in parse_grounded(turn["value"], record.image_size).spans
    ]
    assert sorted(phrases) == ["the bus", "the dog", "the left animal"]
    capped = make_task_sample(
        record,
        task="refer_all",
        category_names=CATEGORIES,
        rng=random.Random(0),
        config=TaskConfig(max_turns=2),
    )
    assert len(capped.conversation) == 4


def test_hand_computed_find_answer_and_masks():
    # W=200, H=100: box (10, 20, 50, 60) -> bins (10/200*100, 20/100*100, 50/200*100, 60/100*100) = (5, 20, 25, 60)
    record = _record(
        200, 100, [_instance(1, "dog", (10.0, 20.0, 50.0, 60.0)), _instance(2, "bus", (0.0, 0.0, 9.0, 9.0))]
    )
    config = TaskConfig()
    for seed in range(20):
        sample = make_task_sample(
            record, task="segment", category_names=CATEGORIES, rng=random.Random(seed), config=config
        )
        if "<p>dog</p>" in sample.conversation[1]["value"]:
            break
    assert "<p>dog</p><box><loc_5><loc_20><loc_25><loc_60></box><seg>" in sample.conversation[1]["value"]
    (mask,) = sample.seg_masks
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (10, 20, 49, 59)


def test_crowd_regions_are_never_targets():
    record = _record(
        100,
        100,
        [
            _instance(1, "person", (0.0, 0.0, 50.0, 50.0), crowd=True),
            _instance(2, "person", (60.0, 60.0, 90.0, 90.0)),
        ]
        + [_instance(3, "dog", (10.0, 60.0, 30.0, 90.0))],
    )
    config = TaskConfig(absent_prob=0.0)
    for seed in range(30):
        for task in ("find", "segment", "count", "exists"):
            sample = make_task_sample(
                record, task=task, category_names=CATEGORIES, rng=random.Random(seed), config=config
            )
            assert (
                "person" not in sample.conversation[1]["value"]
                and "people" not in sample.conversation[1]["value"]
            )
        sample = make_task_sample(
            record, task="detect", category_names=CATEGORIES, rng=random.Random(seed), config=config
        )
        assert sample.det_categories == ["person", "dog"]
        assert (
            sum(len(s.boxes) for s in parse_grounded(sample.conversation[1]["value"], (100, 100)).spans) == 2
        )


def test_absent_categories_get_plain_answers():
    record = _record(100, 100, [_instance(1, "dog", (10.0, 10.0, 30.0, 30.0))])
    config = TaskConfig(absent_prob=1.0)
    exists = make_task_sample(
        record, task="exists", category_names=CATEGORIES, rng=random.Random(0), config=config
    )
    count = make_task_sample(
        record, task="count", category_names=CATEGORIES, rng=random.Random(0), config=config
    )
    for sample in (exists, count):
        assert "<" not in sample.conversation[1]["value"] and "dog" not in sample.conversation[1]["value"]
    assert exists.conversation[1]["value"].startswith("No")


def test_max_boxes_caps_the_answer_but_count_says_the_truth():
    instances = [_instance(i, "dog", (i * 3.0, 0.0, i * 3.0 + 2.0, 10.0)) for i in range(30)]
    record = _record(100, 20, instances)
    config = TaskConfig(max_boxes=5, absent_prob=0.0)
    sample = make_task_sample(
        record, task="count", category_names=CATEGORIES, rng=random.Random(0), config=config
    )
    answer = sample.conversation[1]["value"]
    assert "30" in answer and answer.count("<box>") == 5
    assert len(sample.det_boxes) == 30


def test_refer_uses_the_expression_and_unsupported_tasks_return_none():
    record = _record(
        100, 100, [_instance(1, "dog", (10.0, 10.0, 30.0, 30.0), expressions=["the dog on the left"])]
    )
    sample = make_task_sample(
        record, task="refer", category_names=CATEGORIES, rng=random.Random(0), config=TaskConfig()
    )
    assert "<p>the dog on the left</p><box>" in sample.conversation[1]["value"]
    assert len(sample.seg_masks) == 1
    empty = _record(100, 100, [])
    assert (
        make_task_sample(
            empty, task="refer", category_names=CATEGORIES, rng=random.Random(0), config=TaskConfig()
        )
        is None
    )


def _dataset(records_):
    return CocoInstances(
        source=Path("mem.json"), categories=[], images=records_, report=BadDataReport(source="mem")
    )


def test_build_is_deterministic_and_independent_of_other_images():
    a = _record(
        100,
        100,
        [_instance(1, "dog", (10.0, 10.0, 30.0, 30.0)), _instance(2, "bus", (40.0, 40.0, 90.0, 80.0))],
    )
    b = _record(100, 100, [_instance(3, "knife", (5.0, 5.0, 15.0, 50.0))])
    b.image_id = 2
    first = build_task_samples(_dataset([a, b]), config=TaskConfig(), seed=3, samples_per_image=4)
    again = build_task_samples(_dataset([a, b]), config=TaskConfig(), seed=3, samples_per_image=4)
    alone = build_task_samples(_dataset([b]), config=TaskConfig(), seed=3, samples_per_image=4)
    assert [s.conversation for s in first] == [s.conversation for s in again]
    assert [s.conversation for s in first[4:]] == [s.conversation for s in alone]
    other = build_task_samples(_dataset([a, b]), config=TaskConfig(), seed=4, samples_per_image=4)
    assert [s.conversation for s in first] != [s.conversation for s in other]


@pytest.mark.skipif(not COCO_TINY.is_dir(), reason="coco_tiny not present")
def test_every_task_on_real_coco_parses_cleanly():
    data = load_coco_instances(COCO_TINY / "annotations_val.json", COCO_TINY / "images", image_check="none")
    data.images = data.images[:12]
    for task in TASK_NAMES:
        config = TaskConfig(weights={task: 1.0})
        for sample in build_task_samples(data, config=config, seed=0):
            answer = sample.conversation[1]["value"]
            assert parse_grounded(answer, sample.image_size).num_dropped == 0
            assert answer.count(SEG) == len(sample.seg_masks)


def test_task_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown task"):
        TaskConfig(weights={"dance": 1.0})
    with pytest.raises(ValueError, match="at least one > 0"):
        TaskConfig(weights={"detect": 0.0})
    with pytest.raises(ValueError, match="max_boxes"):
        TaskConfig(max_boxes=0)


@pytest.mark.parametrize(
    ("text", "flipped"),
    [
        ("the circle left of the star", "the circle right of the star"),
        ("The leftmost square and the Rightmost one", "The rightmost square and the Leftmost one"),
        ("LEFT or right?", "RIGHT or left?"),
        ("leftover copyright upright", "leftover copyright upright"),
        (
            "<p>the left dog</p><box><loc_1><loc_2><loc_3><loc_4></box>",
            "<p>the right dog</p><box><loc_1><loc_2><loc_3><loc_4></box>",
        ),
    ],
)
def test_flip_text_left_right(text, flipped):
    assert flip_text_left_right(text) == flipped
    assert flip_text_left_right(flipped) == text


@pytest.mark.parametrize(
    ("name", "plural"),
    [
        ("person", "people"),
        ("bus", "buses"),
        ("knife", "knives"),
        ("traffic light", "traffic lights"),
        ("sheep", "sheep"),
        ("toothbrush", "toothbrushes"),
        ("pony", "ponies"),
    ],
)
def test_pluralize(name, plural):
    assert pluralize(name) == plural
