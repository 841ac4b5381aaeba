"""English for the task generators: question/answer templates, plurals, articles, left/right flips.

Templates are plain `str.format` strings; `{name}` is a category (or attribute) phrase in singular,
`{names}` its plural, `{a_name}` with an article, `{expr}` a referring expression, `{box}` a box group.
Answers that carry grounding tokens are assembled in `tasks.py`; the templates here hold only words.
"""

from __future__ import annotations

import re

QUESTIONS: dict[str, tuple[str, ...]] = {
    "detect": (
        "Detect every object in the image.",
        "Find all the objects in this picture and give their boxes.",
        "What objects are in the image? Locate each of them.",
        "List everything you can see, with boxes.",
    ),
    "find": (
        "Find all the {names} in the image.",
        "Where are the {names}?",
        "Locate every {name} in this picture.",
        "Show me all the {names}.",
    ),
    "segment": (
        "Segment the {names}.",
        "Give the masks of all the {names} in the image.",
        "Please segment every {name}.",
        "Outline each {name} in this picture.",
    ),
    "count": (
        "How many {names} are there?",
        "How many {names} are in the image?",
        "Count the {names} in this picture.",
        "What is the number of {names} here?",
    ),
    "exists": (
        "Is there {a_name} in the image?",
        "Do you see {a_name} here?",
        "Does this picture contain {a_name}?",
        "Can you find {a_name} in the image?",
    ),
    "refer": (
        "Where is {expr}?",
        "Locate {expr}.",
        "Find {expr} in the image.",
        "Show me {expr}.",
    ),
    "region_caption": (
        "What is in {box}?",
        "What object is at {box}?",
        "Describe the region {box} in a few words.",
        "What do you see in {box}?",
    ),
}

# Answer sentences around the grounded phrase `{g}` (already encoded by the codec).
DETECT_ANSWERS = ("The image contains {g}.", "I can see {g}.", "Here are the objects: {g}.")
DETECT_EMPTY = ("I don't see any of the known objects in this image.", "There are no known objects here.")
FIND_ANSWERS = ("{g}", "Here they are: {g}.", "I found {g}.")
COUNT_ONE = ("There is 1 {g}.", "I count 1 {g}.")
COUNT_MANY = ("There are {n} {g}.", "I count {n} {g}.")
COUNT_NONE = ("There are no {names}.", "I count 0 {names}: there are none in the image.")
EXISTS_YES = ("Yes, there is {g}.", "Yes: {g}.")
EXISTS_NO = ("No, there is no {name}.", "No, I don't see any {names} in the image.")
REFER_ANSWERS = ("{g}", "It is here: {g}.", "{g} is here.")
REGION_ANSWERS = ("{A_desc}.", "It is {a_desc}.", "That is {a_desc}.")

_IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "broccoli": "broccoli",
    "cross": "crosses",
}


def pluralize(name: str) -> str:
    """English plural of a (possibly multi-word) noun phrase: the last word is inflected."""
    head, _, last = name.rpartition(" ")
    lower = last.lower()
    if lower in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def with_article(phrase: str) -> str:
    """`a`/`an` + phrase (by the first letter; good enough for category names)."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


_FLIP_RE = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def _flip_word(match: re.Match) -> str:
    word = match.group(1)
    swapped = "right" if word.lower() == "left" else "left"
    if word.isupper():
        swapped = swapped.upper()
    elif word[0].isupper():
        swapped = swapped.capitalize()
    return swapped + (match.group(2) or "")


def flip_text_left_right(text: str) -> str:
    """Swap the words left/right (and leftmost/rightmost), keeping case, for a horizontally flipped image.

    Whole words only (`leftover`, `copyright`, `upright` are untouched); grounding tokens are left as
    they are (flip the boxes separately).
    """
    return _FLIP_RE.sub(_flip_word, text)
