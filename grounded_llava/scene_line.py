"""The scene line: what the detection head sees, written as text that the LLM reads before the question.

OSCAR feeds a detector's object tags to the language model as words, and the bottom-up features of
BUTD carry an attribute label (a colour) beside each object's class. A small LM does not learn to
read classes or count from region tokens (docs/EXPERIMENTS.md E25, E31), but it copies words from its
context. So the first human turn can open with one line, e.g.

    Seen 3 objects, left to right: circle red, cross blue, circle red. Kinds: circles 2, cross 1. Colours: red 2, blue 1.

Training writes it from the annotations (every instance of the image, after any flip), inference from
the head's detections above `scene_conf_threshold` and the attribute head (`modeling/attributes.py`).
The attribute part is left out for objects without one (e.g. COCO, which has no colours). Each value comes
after the word it belongs to ("circles 2", "cross blue"): a causal LM's state at "2" has read "circles",
so a copy head (`modeling/copy_head.py`) finds the number by the noun the question asks about.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .conversation import IMAGE_TOKEN
from .data.phrasing import pluralize

MAX_LISTED = 12
"""Most objects named one by one (left to right); the counts always cover every object."""


@dataclass(frozen=True)
class SeenObject:
    """One object of the line: its category name, its attribute value (None: unknown) and the x of its
    box centre (any frame: only the order counts)."""

    name: str
    attribute: str | None
    x_center: float


def _counted(counts: Counter, *, nouns: bool = True) -> str:
    """`circles 2, cross 1` (nouns) or `red 2, blue 1` (adjectives), in the order of `counts`."""
    return ", ".join(f"{pluralize(name) if nouns and n != 1 else name} {n}" for name, n in counts.items())


def scene_line(objects: Sequence[SeenObject]) -> str:
    """The line for `objects` (any order): the objects left to right, then counts by kind and attribute."""
    if not objects:
        return "Seen no objects."
    ordered = sorted(objects, key=lambda o: o.x_center)
    listed = ", ".join(f"{o.name} {o.attribute}" if o.attribute else o.name for o in ordered[:MAX_LISTED])
    noun = "object" if len(ordered) == 1 else "objects"
    parts = [
        f"Seen {len(ordered)} {noun}, left to right: {listed}.",
        f"Kinds: {_counted(Counter(o.name for o in ordered))}.",
    ]
    attributes = Counter(o.attribute for o in ordered if o.attribute)
    if attributes:
        parts.append(f"Colours: {_counted(attributes, nouns=False)}.")
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
