"""The synthetic `chat` task: it states the scene, balances present and absent subjects, and boxes what its
colour and position answers name."""

from __future__ import annotations

import random
import re

from grounded_llava.codec import parse_grounded
from grounded_llava.data.coco import ImageRecord
from grounded_llava.data.tasks import TaskConfig, make_task_sample

from .test_data_tasks import CATEGORIES, _close, _instance, _record


def _attributed(ann_id, shape, color, box):
    instance = _instance(ann_id, "dog", box)
    instance.attributes = {"shape": shape, "color": color, "size": "small"}
    instance.area = (box[2] - box[0]) * (box[3] - box[1])
    return instance


SCENE_SHAPES = ["circle", "square", "star"]


def _scene(*objects: tuple[str, str, tuple[float, float, float, float]]) -> ImageRecord:
    """A 200x100 image of synthetic objects (shape, colour, box xyxy), ids from 1."""
    return _record(200, 100, [_attributed(k, *spec) for k, spec in enumerate(objects, start=1)])


def test_chat_task_states_the_scene_and_balances_present_and_absent_subjects():
    shapes = SCENE_SHAPES
    record = _scene(
        ("circle", "red", (10.0, 20.0, 50.0, 60.0)),
        ("circle", "blue", (100.0, 0.0, 140.0, 40.0)),
        ("star", "red", (150.0, 50.0, 190.0, 90.0)),
    )
    truth = {"circles": 2, "squares": 0, "stars": 1, "red": 2, "blue": 1}
    count_number = {"no": 0, "1": 1, "2": 2}

    def counted_subjects(absent_prob):
        subjects = []
        for seed in range(40):
            config = TaskConfig(absent_prob=absent_prob)
            sample = make_task_sample(
                record, task="chat", category_names=shapes, rng=random.Random(seed), config=config
            )
            turns = sample.conversation
            assert (
                sample.task == "chat"
                and 2 <= len(turns) // 2 <= 4
                and turns[0]["value"].startswith("<image>\n")
            )
            for question, answer in zip(turns[0::2], turns[1::2], strict=True):
                words = question["value"].split()
                if words[:2] == ["How", "many"] and words[2] != "shapes":  # a shape or colour count
                    subject = words[2]
                    assert count_number[answer["value"].split()[2]] == truth.get(subject, 0), (
                        question,
                        answer,
                    )
                    subjects.append(subject)
                if question["value"] == "What colour is the star?":
                    assert answer["value"] == "The star is red."
        return subjects

    present = counted_subjects(0.0)
    assert present and set(present) <= {"circles", "stars", "red", "blue"}
    absent = counted_subjects(1.0)
    assert absent and not set(absent) & {"circles", "stars", "red", "blue"}


def test_chat_task_needs_the_synthetic_attributes():
    record = _record(200, 100, [_instance(1, "dog", (10.0, 20.0, 50.0, 60.0))])
    sample = make_task_sample(
        record, task="chat", category_names=CATEGORIES, rng=random.Random(0), config=TaskConfig()
    )
    assert sample is None


def test_grounded_chat_boxes_the_objects_its_colour_and_position_answers_name():
    shapes = SCENE_SHAPES
    record = _scene(("circle", "red", (10.0, 20.0, 50.0, 60.0)), ("star", "blue", (150.0, 50.0, 190.0, 90.0)))
    by_shape = {i.attributes["shape"]: i.box_xyxy for i in record.instances}
    grounded_kinds = set()
    for seed in range(30):
        config = TaskConfig(chat_draws=4, chat_grounded=True)
        sample = make_task_sample(
            record, task="chat", category_names=shapes, rng=random.Random(seed), config=config
        )
        for question, answer in zip(sample.conversation[0::2], sample.conversation[1::2], strict=True):
            spans = parse_grounded(answer["value"], record.image_size, num_bins=config.num_bins).spans
            asked = question["value"].removeprefix("<image>\n")
            if asked.startswith("What colour"):
                (span,) = spans
                assert answer["value"].endswith(f"</box> is {'red' if span.phrase == 'circle' else 'blue'}.")
                grounded_kinds.add("colour")
            elif asked.startswith("Is the"):
                named = re.match(
                    r"Is the (.+?) (?:to the left or to the right of|above or below) the (.+)\?",
                    asked,
                )
                assert [s.phrase for s in spans] == list(named.groups())
                grounded_kinds.add("position")
            else:
                assert not spans
            for span in spans:
                assert _close(
                    span.boxes[0], by_shape[span.phrase.split()[-1]], record.image_size, config.num_bins
                )
    assert grounded_kinds == {"colour", "position"}
