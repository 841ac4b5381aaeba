"""Words about a synthetic shapes scene: referring expressions that single out one object, and chat Q&A.

An expression is only emitted when it matches exactly one object of the image, by construction:
- attributes: "the circle", "the red circle", "the small red circle", "the small circle", "the red object";
- extremes within a group of >= 2 (with a clear margin): "the leftmost circle", "the largest red object",
  "the topmost object", ...;
- relations to an anchor that is itself unique: "the small red circle left of the blue star", where
  every other object the first part describes is clearly NOT left of the anchor.
Positions and sizes use what is visible: the visible-mask box and area.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from grounded_llava.data.phrasing import pluralize, with_article

_EXTREME_MARGIN = 0.05  # of the image side: "leftmost" needs this gap to the next one
_SIZE_RATIO = 1.5  # "largest" needs this ratio of visible areas to the next one
_MAX_RELATIONAL = 2  # relational expressions kept per object (there can be many)


@dataclass(frozen=True)
class SceneObject:
    """One visible object: attributes, visible box (x0, y0, x1, y1) in pixels, visible area in pixels."""

    shape: str
    color: str
    size: str
    box_xyxy: tuple[float, float, float, float]
    area: int

    @property
    def cx(self) -> float:
        return (self.box_xyxy[0] + self.box_xyxy[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box_xyxy[1] + self.box_xyxy[3]) / 2


# Attribute descriptors: which attributes a phrase uses and how it reads.
_DESCRIPTORS: tuple[tuple[tuple[str, ...], Callable[[SceneObject], str]], ...] = (
    (("shape",), lambda o: o.shape),
    (("color", "shape"), lambda o: f"{o.color} {o.shape}"),
    (("size", "color", "shape"), lambda o: f"{o.size} {o.color} {o.shape}"),
    (("size", "shape"), lambda o: f"{o.size} {o.shape}"),
    (("color",), lambda o: f"{o.color} object"),
)

# Relations: (words, clearly holds, clearly does not hold) for object a and anchor b.
_RELATIONS: tuple[tuple[str, Callable, Callable], ...] = (
    ("left of", lambda a, b: a.box_xyxy[2] <= b.box_xyxy[0], lambda a, b: a.cx >= b.cx),
    ("right of", lambda a, b: a.box_xyxy[0] >= b.box_xyxy[2], lambda a, b: a.cx <= b.cx),
    ("above", lambda a, b: a.box_xyxy[3] <= b.box_xyxy[1], lambda a, b: a.cy >= b.cy),
    ("below", lambda a, b: a.box_xyxy[1] >= b.box_xyxy[3], lambda a, b: a.cy <= b.cy),
)

# Extremes: (word, key to maximise, whether the margin is positional); "largest" compares log areas.
_EXTREMES: tuple[tuple[str, Callable[[SceneObject], float], bool], ...] = (
    ("leftmost", lambda o: -o.cx, True),
    ("rightmost", lambda o: o.cx, True),
    ("topmost", lambda o: -o.cy, True),
    ("bottommost", lambda o: o.cy, True),
    ("largest", lambda o: math.log(o.area), False),
    ("smallest", lambda o: -math.log(o.area), False),
)


def _matches(obj: SceneObject, ref: SceneObject, attrs: tuple[str, ...]) -> bool:
    return all(getattr(obj, a) == getattr(ref, a) for a in attrs)


def unique_descriptors(objects: Sequence[SceneObject], index: int) -> list[str]:
    """Attribute phrases ("red circle", ...) that describe only `objects[index]`, shortest first."""
    me = objects[index]
    return [words(me) for attrs, words in _DESCRIPTORS if sum(_matches(o, me, attrs) for o in objects) == 1]


def _extreme_expressions(objects: Sequence[SceneObject], index: int, image_side: int) -> list[str]:
    me = objects[index]
    groups = [
        (("shape",), me.shape),
        (("color", "shape"), f"{me.color} {me.shape}"),
        (("color",), f"{me.color} object"),
    ]
    groups.append(((), "object"))
    found = []
    for attrs, noun in groups:
        others = [o for o in objects if o is not me and _matches(o, me, attrs)]
        if not others:  # a group of one: the plain descriptor already singles it out
            continue
        for word, key, positional in _EXTREMES:
            margin = _EXTREME_MARGIN * image_side if positional else math.log(_SIZE_RATIO)
            if key(me) > max(key(o) for o in others) + margin:
                found.append(f"the {word} {noun}")
    return found


def _relational_expressions(objects: Sequence[SceneObject], index: int) -> list[str]:
    me = objects[index]
    found = []
    for anchor_index, anchor in enumerate(objects):
        anchor_words = unique_descriptors(objects, anchor_index)
        if anchor_index == index or not anchor_words:
            continue
        for attrs, words in _DESCRIPTORS:
            rivals = [o for o in objects if o is not me and o is not anchor and _matches(o, me, attrs)]
            for relation, holds, fails in _RELATIONS:
                if holds(me, anchor) and all(fails(o, anchor) for o in rivals):
                    found.append(f"the {words(me)} {relation} the {anchor_words[0]}")
    return found


def referring_expressions(
    objects: Sequence[SceneObject], *, image_side: int, rng: random.Random
) -> list[list[str]]:
    """For each object, the expressions that single it out (attributes, extremes, <= 2 relations)."""
    result = []
    for index in range(len(objects)):
        expressions = [f"the {words}" for words in unique_descriptors(objects, index)]
        expressions += _extreme_expressions(objects, index, image_side)
        relational = _relational_expressions(objects, index)
        expressions += rng.sample(relational, min(_MAX_RELATIONAL, len(relational)))
        result.append(expressions)
    return result


def _count_answer(n: int, noun: str) -> str:
    """The number first ("I count 2 circles."): a small LM that says "There is" or "There are" has
    decided on the number before it writes it (docs/EXPERIMENTS.md E27, E36)."""
    return f"I count {n or 'no'} {noun if n == 1 else pluralize(noun)}."


def describe_scene(objects: Sequence[SceneObject], background: str) -> str:
    if not objects:
        return f"The image shows only a {background} background, with no shapes."
    ordered = sorted(objects, key=lambda o: o.cx)
    names = [with_article(f"{o.size} {o.color} {o.shape}") for o in ordered]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The image shows {listing} (from left to right) on a {background} background."


Ground = Callable[[str, SceneObject], str]
"""Renders a phrase about an object in an answer: `grounded_phrase` ("<p>cross</p><box>..</box>") or plain."""


def _plain(words: str, obj: SceneObject) -> str:
    return words


def _position_question(
    objects: Sequence[SceneObject], rng: random.Random, ground: Ground | None
) -> tuple[str, str] | None:
    """ "Is the red circle to the left or to the right of the blue star?" for a random clear pair:
    "The red circle is to the left of the blue star.", each object `ground`ed when given."""
    named = [(o, words[0]) for i, o in enumerate(objects) if (words := unique_descriptors(objects, i))]
    pairs = [(a, b) for a in named for b in named if a[0] is not b[0]]
    for (a, a_words), (b, b_words) in rng.sample(pairs, len(pairs)):
        horizontal = f"Is the {a_words} to the left or to the right of the {b_words}?"
        vertical = f"Is the {a_words} above or below the {b_words}?"
        for question, answer_words, (_, holds, _) in zip(
            (horizontal, horizontal, vertical, vertical),
            ("to the left of", "to the right of", "above", "below"),
            _RELATIONS,
            strict=True,
        ):
            if holds(a, b):
                ground = ground or _plain
                return question, f"The {ground(a_words, a)} is {answer_words} the {ground(b_words, b)}."
    return None


def _subject(options: Sequence[str], present: set[str], rng: random.Random, absent_prob: float | None) -> str:
    """A shape or colour to ask "How many ...?" about: uniform over `options` when `absent_prob` is None,
    else one absent from the scene with probability `absent_prob` (when there is one), a present one
    otherwise (training data in which reading the image pays; the worlds' chat.json stays uniform)."""
    if absent_prob is None:
        return rng.choice(list(options))
    here = [o for o in options if o in present]
    away = [o for o in options if o not in present]
    if away and (not here or rng.random() < absent_prob):
        return rng.choice(away)
    return rng.choice(here)


def chat_turns(
    objects: Sequence[SceneObject],
    *,
    background: str | None,
    shapes: Sequence[str],
    colors: Sequence[str],
    rng: random.Random,
    absent_prob: float | None = None,
    ground: Ground | None = None,
) -> list[tuple[str, str]]:
    """Question/answer pairs the scene answers (count, colour, position, description), 2-4 of them.

    `background` None leaves the description out; `absent_prob` (see `_subject`) balances the subjects of
    the shape and colour counts between present and absent ones (None: uniform over `shapes`/`colors`);
    `ground` grounds the objects that colour and position answers name ("The <p>cross</p><box>..</box>
    is green."; the feedback of their region then lets the LM read them, docs/EXPERIMENTS.md E26).
    """
    qa = [("How many shapes are there in the image?", _count_answer(len(objects), "shape"))]
    shape = _subject(shapes, {o.shape for o in objects}, rng, absent_prob)
    qa.append(
        (
            f"How many {pluralize(shape)} are there?",
            _count_answer(sum(o.shape == shape for o in objects), shape),
        )
    )
    color = _subject(colors, {o.color for o in objects}, rng, absent_prob)
    qa.append(
        (
            f"How many {color} objects are there?",
            _count_answer(sum(o.color == color for o in objects), f"{color} object"),
        )
    )
    lone = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if lone:
        obj = rng.choice(lone)
        qa.append(
            (f"What colour is the {obj.shape}?", f"The {(ground or _plain)(obj.shape, obj)} is {obj.color}.")
        )
    position = _position_question(objects, rng, ground)
    if position is not None:
        qa.append(position)
    if background is not None:
        qa.append(("Describe the scene.", describe_scene(objects, background)))
    return rng.sample(qa, rng.randint(2, min(4, len(qa))))
