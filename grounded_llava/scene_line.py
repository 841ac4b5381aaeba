"""The scene line: what the detection head sees, written as text that the LLM reads before the question.

OSCAR feeds a detector's object tags to the language model as words, and the bottom-up features of
BUTD carry an attribute label (a colour) beside each object's class. A small LM does not learn to
read classes or count from region tokens (docs/EXPERIMENTS.md E25, E31), but it copies words from its
context. So the first human turn can open with one line, e.g.

    Seen 3 objects, left to right: circle red, cross blue, circle red. Kinds: circle 2, square no, cross 1.
    Colours: red 2, green no, blue 1.

Training writes it from the annotations (every instance of the image, after any flip), inference from
the head's detections above `scene_conf_threshold` and the attribute head (`modeling/attributes.py`).
The attribute part is left out for objects without one (e.g. COCO, which has no colours). Each value comes
after the word it belongs to ("circle 2", "cross blue"): a causal LM's state at "2" has read "circle",
so a copy head (`modeling/copy_head.py`) finds the number by the noun the question asks about. Nouns stay
singular: "circles" is two tokens ("circle", "s"), and the copy head's key reads the token before the value.
A small vocabulary (the head's kinds, the attribute's values: at most `MAX_VOCABULARY` each) is listed
whole, "no" for what is not seen, so that a count of an absent kind is a copy too (E37).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .conversation import IMAGE_TOKEN

MAX_LISTED = 12
"""Most objects named one by one (left to right); the counts always cover every object."""

MAX_VOCABULARY = 12
"""Most kinds (or attribute values) listed whole, seen or not; a larger vocabulary (COCO's 80 classes)
lists only what is seen."""


@dataclass(frozen=True)
class SeenObject:
    """One object of the line: its category name, its attribute value (None: unknown) and the x of its
    box centre (any frame: only the order counts)."""

    name: str
    attribute: str | None
    x_center: float


def _counted(seen: Sequence[str], vocabulary: Sequence[str]) -> str:
    """`circle 2, square no, cross 1`: every word of a small `vocabulary` in its order, then any other seen
    word in the order seen (a large or empty vocabulary: the seen words alone)."""
    counts = Counter(seen)
    words = list(vocabulary) if len(vocabulary) <= MAX_VOCABULARY else []
    words += [word for word in counts if word not in words]
    return ", ".join(f"{word} {counts[word] or 'no'}" for word in words)


def scene_line(
    objects: Sequence[SeenObject], *, kinds: Sequence[str] = (), attribute_values: Sequence[str] = ()
) -> str:
    """The line for `objects` (any order): the objects left to right, then counts by kind and attribute
    (`kinds`, `attribute_values`: the vocabularies listed whole when small, see `_counted`)."""
    ordered = sorted(objects, key=lambda o: o.x_center)
    if ordered:
        listed = ", ".join(f"{o.name} {o.attribute}" if o.attribute else o.name for o in ordered[:MAX_LISTED])
        noun = "object" if len(ordered) == 1 else "objects"
        parts = [f"Seen {len(ordered)} {noun}, left to right: {listed}."]
    else:
        parts = ["Seen no objects."]
    for header, seen, vocabulary in (
        ("Kinds", [o.name for o in ordered], kinds),
        ("Colours", [o.attribute for o in ordered if o.attribute], attribute_values),
    ):
        if counted := _counted(seen, vocabulary):
            parts.append(f"{header}: {counted}.")
    return " ".join(parts)


def with_scene_line(turns: list[dict[str, str]], line: str) -> list[dict[str, str]]:
    """A copy of LLaVA-format `turns` whose image turn reads `line` on its own line right after `<image>`."""
    out = [dict(turn) for turn in turns]
    for turn in out:
        if turn["from"] == "human" and IMAGE_TOKEN in turn["value"]:
            before, _, after = turn["value"].partition(IMAGE_TOKEN)
            turn["value"] = f"{before}{IMAGE_TOKEN}\n{line}\n{after.removeprefix(chr(10))}"
            return out
    raise ValueError(f"no human turn holds {IMAGE_TOKEN}: the scene line has nowhere to go")
