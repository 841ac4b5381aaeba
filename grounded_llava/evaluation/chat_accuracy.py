"""Chat accuracy against ground-truth answers: pure functions on plain text (no model).

The synthetic world's chat questions (`grounded_llava/data/synthetic_language.py`, `chat_turns`) come from
a few templates, each with one key fact in its answer. A question is classified by its template
(`question_kind`), the key fact is extracted from the ground-truth answer and from the model's answer
(`answer_fact`), and the two facts are compared (`answer_is_correct`). Text is normalised first: lower
case, every run of characters other than a-z / 0-9 is a word break (`words`). Answers should be plain
text (`GroundedAnswer.text`, grounding tokens removed).

| kind | question template | key fact |
| --- | --- | --- |
| `count` | "How many ...?" | the first number: digits, a number word ("zero" .. "twenty"), "no"/"none" = 0 |
| `colour` | "What colour/color is ...?" | the set of colour words (`COLOUR_WORDS`; "grey" = "gray") |
| `position` | "Is ... to the left or to the right of ...?", "Is ... above or below ...?" | the set of relations: "left of" ("left"), "right of" ("right"), "above", "below" ("below", "under", "beneath") |
| `yes_no` | any other question starting with "is", "are", "does", "can", ... | the first word, when it is "yes" or "no" |
| `description` | "Describe the scene." | the multiset of (size, colour, shape) triples (`description_triples`) |
| `other` | anything else | none: not scored |

A model answer is correct when its fact equals the ground truth's (a set differs when the model hedges,
e.g. "red or blue"); an answer without a fact is wrong. A question whose ground truth has no fact is not
scored. `chat_accuracy` is the share of correct answers over the scored count / colour / position /
yes-no questions; description questions only count into `chat_description_f1`, the MEAN over description
questions of the per-question F1 of their triples (each question weighs the same, whatever its number of
objects; both empty = 1).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from grounded_llava.data.phrasing import pluralize
from grounded_llava.data.shape_words import COLORS, SHAPES, SIZES

QuestionKind = Literal["count", "colour", "position", "yes_no", "description", "other"]
Fact = int | str | frozenset[str] | Counter
Triple = tuple[str, str, str]

_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_TEENS = (
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
NUMBER_WORDS: dict[str, int] = {w: v for v, w in enumerate((*_UNITS, *_TEENS, "twenty"))} | {
    "no": 0,
    "none": 0,
}
# The synthetic world's colours and other basic colour terms; synonyms map to one name.
COLOUR_WORDS: dict[str, str] = (
    {c: c for c in COLORS}
    | {c: c for c in ("black", "gray", "brown", "pink", "magenta", "violet", "gold", "silver", "beige")}
    | {"grey": "gray"}
)
SIZE_WORDS: frozenset[str] = frozenset(SIZES)
# Singular and plural shape names -> the singular.
SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES} | {pluralize(s): s for s in SHAPES}
RELATION_WORDS: dict[str, str] = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}
_AUXILIARIES = frozenset(
    ("is", "are", "was", "were", "do", "does", "did", "can", "could", "has", "have", "had", "will", "would")
    + ("should", "shall", "may", "might", "must")
)
_POSITION_RE = re.compile(
    r"\b(left or (to the )?right|right or (to the )?left|above or below|below or above)\b"
)


def words(text: str) -> list[str]:
    """Lower-case words: runs of a-z / 0-9 ("The star is red." -> ["the", "star", "is", "red"])."""
    return re.findall(r"[a-z0-9]+", text.lower())


def question_kind(question: str) -> QuestionKind:
    """The template of a question (see the module docstring), from its words alone (`<image>` ignored)."""
    tokens = words(question.replace("<image>", " "))
    text = " ".join(tokens)
    if not tokens:
        return "other"
    if tokens[:2] == ["how", "many"]:
        return "count"
    if tokens[0] in ("what", "which") and len(tokens) > 1 and tokens[1] in ("colour", "color"):
        return "colour"
    if text.startswith("describe the scene"):
        return "description"
    if tokens[0] in _AUXILIARIES:
        return "position" if _POSITION_RE.search(text) else "yes_no"
    return "other"


def _number(token: str) -> int | None:
    return int(token) if token.isdigit() else NUMBER_WORDS.get(token)


def description_triples(text: str) -> Counter[Triple]:
    """The (size, colour, shape) triples a description mentions, as a multiset.

    A triple is a size word, a colour word and a shape name (singular or plural) in a row ("a small red
    circle"). A number just before it repeats it ("two small red circles" -> 2 x ("small", "red",
    "circle")). Anything else (e.g. "a red circle", without a size) is not a triple.
    """
    tokens = words(text)
    triples: Counter[Triple] = Counter()
    for i in range(len(tokens) - 2):
        size, colour, shape = tokens[i : i + 3]
        if size in SIZE_WORDS and colour in COLOUR_WORDS and shape in SHAPE_WORDS:
            count = _number(tokens[i - 1]) if i > 0 else None
            triples[(size, COLOUR_WORDS[colour], SHAPE_WORDS[shape])] += 1 if count is None else count
    return triples


def triple_f1(predicted: Counter[Triple], truth: Counter[Triple]) -> float:
    """Multiset F1 = 2 |P & G| / (|P| + |G|) (precision and recall's harmonic mean); 1.0 when both are empty."""
    total = sum(predicted.values()) + sum(truth.values())
    if total == 0:
        return 1.0
    return 2 * sum((predicted & truth).values()) / total


def answer_fact(kind: QuestionKind, answer: str) -> Fact | None:
    """The key fact of an answer to a `kind` question (module docstring); None when it has none."""
    tokens = words(answer)
    if kind == "count":
        return next((n for t in tokens if (n := _number(t)) is not None), None)
    if kind == "colour":
        return frozenset(COLOUR_WORDS[t] for t in tokens if t in COLOUR_WORDS) or None
    if kind == "position":
        return frozenset(RELATION_WORDS[t] for t in tokens if t in RELATION_WORDS) or None
    if kind == "yes_no":
        return tokens[0] if tokens and tokens[0] in ("yes", "no") else None
    if kind == "description":
        return description_triples(answer)
    return None


def answer_is_correct(question: str, truth: str, answer: str) -> bool | None:
    """Whether `answer` states the key fact of the ground-truth answer `truth` to `question`.

    None when the question is not scored by `chat_accuracy`: a description or `other` question, or a
    ground truth without a fact. Case, punctuation and wording around the fact do not matter: "There are
    3 circles." == "three circles", "There are no stars." == "0 stars".
    """
    kind = question_kind(question)
    if kind in ("description", "other"):
        return None
    expected = answer_fact(kind, truth)
    if expected is None:
        return None
    return answer_fact(kind, answer) == expected


def chat_accuracy_entries(
    questions: Sequence[str], truths: Sequence[str], answers: Sequence[str]
) -> dict[str, float | None]:
    """Report entries of N questions, their ground-truth answers and the model's (plain-text) answers.

    Returns:
        `chat_accuracy` (correct / scored count, colour, position and yes-no questions; None when none
        is scored), `chat_description_f1` (mean triple F1 over description questions; None when there is
        none), and the counts they average over, `num_chat_accuracy_questions` and `num_chat_descriptions`.
    """
    if not len(questions) == len(truths) == len(answers):
        raise ValueError(
            f"questions, truths and answers must have one entry each, got {len(questions)}, "
            f"{len(truths)} and {len(answers)}"
        )
    correct: list[bool] = []
    f1: list[float] = []
    for question, truth, answer in zip(questions, truths, answers, strict=True):
        if question_kind(question) == "description":
            f1.append(triple_f1(description_triples(answer), description_triples(truth)))
        elif (verdict := answer_is_correct(question, truth, answer)) is not None:
            correct.append(verdict)
    return {
        "chat_accuracy": sum(correct) / len(correct) if correct else None,
        "chat_description_f1": sum(f1) / len(f1) if f1 else None,
        "num_chat_accuracy_questions": float(len(correct)),
        "num_chat_descriptions": float(len(f1)),
    }
