"""The `find` evaluation task's wiring (`evaluation/tasks.py`): one question per category an image shows,
in the training template; answers built from the ground truth score 1.0, wrong names and missing boxes less.
The metric itself has its known-answer test in test_metrics.py."""

import numpy as np
import pytest

from grounded_llava.data.synthetic import generate_world
from grounded_llava.evaluation.tasks import find_entries, find_questions, load_eval_data, map_categories
from grounded_llava.inference import Detections, GroundedAnswer, GroundedSpanResult

MODEL_CATEGORIES = ["circle", "square", "cross"]  # the world also has stars, which the model does not know


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    categories = [*MODEL_CATEGORIES, "star"]
    generate_world(root, num_images=6, seed=3, image_size=64, categories=categories, max_objects=4)
    return load_eval_data(root / "annotations.json", root / "images", max_images=None)


def _answer(question, phrase, boxes):
    spans = [GroundedSpanResult(phrase=phrase, box=box, mask=None, score=0.5, source="head") for box in boxes]
    empty = Detections.empty(category_names=MODEL_CATEGORIES, image_size=question.image.image_size)
    size = question.image.image_size
    return GroundedAnswer(text=phrase, raw_text=phrase, spans=spans, detections=empty, image_size=size)


def test_ground_truth_answers_score_one_and_wrong_names_or_missing_boxes_less(data):
    categories = map_categories(MODEL_CATEGORIES, data.categories, source="test")
    questions = find_questions(data.records, categories)
    shown = {(r.image_id, i.category_name) for r in data.records for i in r.non_crowd()}
    assert {(q.image.image_id, q.category) for q in questions} == {(i, c) for i, c in shown if c != "star"}
    assert "Find all the crosses in the image." in {q.prompt for q in questions}
    perfect = [
        _answer(q, f"the {q.category}s", [np.array(i.box_xyxy) for i in q.instances]) for q in questions
    ]
    assert find_entries(perfect, questions, categories) == {
        "find_name_acc": 1.0, "find_precision50": 1.0, "find_recall50": 1.0, "find_f1": 1.0, "find_exact": 1.0
    }  # fmt: skip
    wrong = next(n for n in MODEL_CATEGORIES if n != questions[0].category)
    misnamed = [
        _answer(questions[0], wrong, [np.array(i.box_xyxy) for i in questions[0].instances]),
        *perfect[1:],
    ]
    assert find_entries(misnamed, questions, categories)["find_name_acc"] == pytest.approx(
        1 - 1 / len(questions)
    )
    assert find_entries(misnamed, questions, categories)["find_recall50"] == 1.0  # the boxes are still right
    empty = [_answer(questions[0], "", []), *perfect[1:]]
    entries = find_entries(empty, questions, categories)
    assert entries["find_exact"] == pytest.approx(1 - 1 / len(questions)) and entries["find_recall50"] < 1.0
