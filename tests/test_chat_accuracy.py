"""chat_accuracy / chat_description_f1: the pure matching functions on hand-written answers, and the
evaluator computing them from `--chat-data` alone (no `--reference`)."""

import json
from collections import Counter

import pytest

from grounded_llava.evaluation.chat_accuracy import (
    answer_fact,
    answer_is_correct,
    chat_accuracy_entries,
    description_triples,
    question_kind,
    triple_f1,
)
from grounded_llava.evaluation.runner import chat_questions

from .test_evaluate import checkpoint, cli, world  # noqa: F401  (module fixtures)

POSITION_H = "Is the red circle to the left or to the right of the blue star?"
POSITION_V = "Is the small square above or below the green hexagon?"
DESCRIBE = "Describe the scene."
SCENE = (
    "The image shows a small red circle, a large blue star and a medium red circle "
    "(from left to right) on a striped background."
)


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("How many shapes are there in the image?", "count"),
        ("How many red objects are there?", "count"),
        ("What colour is the star?", "colour"),
        ("what color is the star", "colour"),
        (POSITION_H, "position"),
        (POSITION_V, "position"),
        ("Is there a red circle?", "yes_no"),
        ("<image>\nDescribe the scene.", "description"),
        ("Describe the image briefly.", "other"),  # a caption question: no triples to compare
        ("Where is the red circle?", "other"),
        ("", "other"),
    ],
)
def test_question_kind_follows_the_templates(question, kind):
    assert question_kind(question) == kind


@pytest.mark.parametrize(
    ("question", "truth", "answer", "correct"),
    [
        # count: digits, number words, "no", singular and plural nouns
        ("How many circles are there?", "There are 3 circles.", "There are 3 circles.", True),
        ("How many circles are there?", "There are 3 circles.", "three circles", True),
        ("How many circles are there?", "There are 3 circles.", "There are 2 circles.", False),
        ("How many stars are there?", "There is 1 star.", "There is one star.", True),
        ("How many stars are there?", "There is 1 star.", "There are 2 stars.", False),
        ("How many stars are there?", "There are no stars.", "There are 0 stars.", True),
        ("How many stars are there?", "There are no stars.", "There are zero stars.", True),
        ("How many stars are there?", "There are no stars.", "There is 1 star.", False),
        ("How many red objects are there?", "There are 12 red objects.", "Twelve.", True),
        ("How many circles are there?", "There are 3 circles.", "Some circles.", False),  # no number
        # colour: the colour words, however phrased; hedging is wrong
        ("What colour is the star?", "The star is red.", "The star is red.", True),
        ("What colour is the star?", "The star is red.", "RED", True),
        ("What colour is the star?", "The star is red.", "The star is blue.", False),
        ("What colour is the star?", "The star is red.", "It is red or blue.", False),
        ("What colour is the star?", "The star is grey.", "gray", True),
        ("What colour is the star?", "The star is red.", "A star.", False),
        # position: the relation
        (POSITION_H, "The red circle is to the left of the blue star.", "It is left of the star.", True),
        (
            POSITION_H,
            "The red circle is to the left of the blue star.",
            "The red circle is to the right of the blue star.",
            False,
        ),
        (POSITION_V, "The small square is below the green hexagon.", "The small square is below it.", True),
        (POSITION_V, "The small square is below the green hexagon.", "above", False),
        (POSITION_V, "The small square is below the green hexagon.", "The square.", False),
        # yes/no: the leading word
        ("Is there a red circle?", "Yes, there is.", "yes", True),
        ("Is there a red circle?", "Yes, there is.", "No.", False),
        ("Is there a red circle?", "No.", "No, there is not.", True),
    ],
)
def test_answer_is_correct_compares_the_key_fact(question, truth, answer, correct):
    assert answer_is_correct(question, truth, answer) is correct


def test_unscored_questions_return_none():
    assert answer_is_correct(DESCRIBE, SCENE, SCENE) is None  # only in chat_description_f1
    assert answer_is_correct("Where is the red circle?", "Here.", "Here.") is None
    assert answer_is_correct("Is there a red circle?", "There is.", "Yes.") is None  # truth has no yes/no


def test_count_fact_is_the_first_number():
    assert answer_fact("count", "There are 3 circles and 2 squares.") == 3
    assert answer_fact("count", "There are no circles.") == 0


def test_description_triples_read_sizes_colours_and_shapes():
    assert description_triples(SCENE) == Counter(
        {("small", "red", "circle"): 1, ("large", "blue", "star"): 1, ("medium", "red", "circle"): 1}
    )
    assert description_triples("Two small red circles and a large white cross.") == Counter(
        {("small", "red", "circle"): 2, ("large", "white", "cross"): 1}
    )
    assert description_triples("The image shows only a flat background, with no shapes.") == Counter()
    assert description_triples("A red circle.") == Counter()  # no size: not a triple


def test_triple_f1_with_missing_and_extra_objects():
    truth = description_triples(SCENE)
    assert triple_f1(truth, truth) == 1.0
    missing = description_triples("The image shows a small red circle and a large blue star.")
    assert triple_f1(missing, truth) == pytest.approx(2 * 2 / (2 + 3))  # P = 1, R = 2/3
    extra = description_triples(SCENE + " Also a small green square.")
    assert triple_f1(extra, truth) == pytest.approx(2 * 3 / (4 + 3))  # P = 3/4, R = 1
    wrong = description_triples("A small blue circle.")
    assert triple_f1(wrong, truth) == 0.0
    assert triple_f1(Counter(), Counter()) == 1.0  # an empty scene described as empty
    assert triple_f1(missing, Counter()) == 0.0


def test_chat_accuracy_entries_average_over_scored_questions_and_descriptions():
    questions = ["How many circles are there?", "What colour is the star?", DESCRIBE, DESCRIBE, "Hi?"]
    truths = ["There are 2 circles.", "The star is red.", SCENE, "The image shows a small red circle.", "Hi."]
    answers = ["There are two circles.", "The star is blue.", SCENE, "A large red circle.", "Hi."]
    assert chat_accuracy_entries(questions, truths, answers) == {
        "chat_accuracy": 0.5,
        "chat_description_f1": 0.5,  # mean of 1 and 0
        "num_chat_accuracy_questions": 2.0,
        "num_chat_descriptions": 2.0,
    }
    assert chat_accuracy_entries(["Hi?"], ["Hi."], ["Hi."])["chat_accuracy"] is None
    with pytest.raises(ValueError, match="one entry each"):
        chat_accuracy_entries(questions, truths, answers[:-1])


# ---------------------------------------------------------------------------- the evaluator
def test_chat_questions_asks_every_human_turn(world):  # noqa: F811
    entries = json.loads((world / "chat.json").read_text())[:2]
    questions = chat_questions(world / "chat.json", world / "images", max_images=2)
    turns = [t["value"] for e in entries for t in e["conversations"]]
    assert questions.prompts == [t.replace("<image>\n", "") for t in turns[::2]]
    assert questions.truths == turns[1::2]
    assert len(set(questions.images)) == 2 and len(questions.images) == len(turns) // 2


def test_cli_chat_accuracy_without_reference(world, checkpoint, tmp_path, capsys):  # noqa: F811
    args = ["--tasks", "chat", "--chat-data", str(world / "chat.json"), "--max-images", "2"]
    assert cli(world, checkpoint, tmp_path, *args) == 0
    captured = capsys.readouterr()
    assert "chat_exact_match and chat_kl skipped: they need --reference" in captured.err
    assert "| chat_accuracy |" in captured.out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    num_turns = sum(len(e["conversations"]) // 2 for e in json.loads((world / "chat.json").read_text())[:2])
    assert metrics["num_chat_prompts"] == float(num_turns)
    assert 0.0 <= metrics["chat_accuracy"] <= 1.0 and 0.0 <= metrics["chat_description_f1"] <= 1.0
    assert metrics["num_chat_accuracy_questions"] + metrics["num_chat_descriptions"] == num_turns
    assert metrics["chat_exact_match"] is None and metrics["chat_kl"] is None
    assert "| chat_description_f1 |" in (tmp_path / "metrics.md").read_text()
