"""Reconcile the boxes written in the answer text with the detection head's boxes (DESIGN.md).

The head sees every instance with a calibrated score; the text names what the user asked for.
Each text box is matched to at most one head box and each head box is used at most once:
candidate pairs have IoU >= `iou_threshold` and, when the phrase names a category, the head box's
category equals it; pairs are taken greedily by decreasing IoU (ties: earlier text box, then
earlier head box). Matched -> the head's box and score (source "head"); unmatched -> the text box
and its token probability (source "text"). Agreement = matched / text boxes (None without boxes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grounded_llava.box_iou import pairwise_iou
from grounded_llava.codec import GroundedSpan
from grounded_llava.inference.detections import Detections
from grounded_llava.inference.results import GroundedSpanResult

# Plurals that adding "s"/"es" (or "y" -> "ies") does not make; enough for COCO-style names.
_IRREGULAR_PLURALS = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
}


@dataclass
class Reconciliation:
    """Output of `reconcile`.

    Attributes:
        spans: one result per text box, in text order (span by span, box by box); `head_index` says
            which detection each matched.
        agreement: matched text boxes / text boxes; None when there are no text boxes.
    """

    spans: list[GroundedSpanResult]
    agreement: float | None


def _forms(name: str) -> list[str]:
    """Singular and plural forms of a category name (the plural inflects the last word)."""
    words = name.lower().split()
    last = words[-1]
    plurals = {last + "s", last + "es"}
    if last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        plurals.add(last[:-1] + "ies")
    if last.endswith("f"):
        plurals.add(last[:-1] + "ves")
    if last.endswith("fe"):
        plurals.add(last[:-2] + "ves")
    if last in _IRREGULAR_PLURALS:
        plurals.add(_IRREGULAR_PLURALS[last])
    return [" ".join(words)] + [" ".join(words[:-1] + [p]) for p in sorted(plurals)]


def named_categories(text: str, category_names: Sequence[str]) -> list[int]:
    """The indices of the categories `text` names: a category name (or its plural) occurs in it as whole
    words, case-insensitive ("Is the star left of the crosses?" names "star" and "cross"; "starfish"
    names neither). The one reader of category names in text, for phrases and questions alike."""
    named = []
    for index, name in enumerate(category_names):
        if not name.strip():
            continue
        for form in _forms(name):
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in form.split()) + r"(?!\w)"
            if re.search(pattern, text, flags=re.IGNORECASE):
                named.append(index)
                break
    return named


def phrase_category(phrase: str, category_names: Sequence[str]) -> str | None:
    """The category a phrase names, or None.

    Of the categories the phrase names (`named_categories`: "two red circles" names "circle"), the longest
    name wins ("hot dog" over "dog"), ties go to the earlier category.
    """
    named = named_categories(phrase, category_names)
    if not named:
        return None
    return category_names[max(named, key=lambda i: (len(category_names[i]), -i))]


def phrase_category_index(phrase: str, category_names: Sequence[str]) -> int | None:
    """The index in `category_names` of the category `phrase` names (`phrase_category`), or None."""
    named = phrase_category(phrase, category_names)
    return None if named is None else list(category_names).index(named)


def reconcile(
    spans: Sequence[GroundedSpan],
    *,
    box_scores: Sequence[Sequence[float]],
    detections: Detections,
    masks: Sequence[Sequence[np.ndarray | None]] | None = None,
    iou_threshold: float = 0.5,
) -> Reconciliation:
    """Match every text box to the head's detections.

    Args:
        spans: parsed answer spans (`grounded_llava.codec.parse_grounded`), boxes xyxy original pixels.
        box_scores: `box_scores[i][j]` is the probability of the box tokens of `spans[i].boxes[j]`.
        detections: the head's detections for the same image (any device).
        masks: optional `masks[i][j]`, an (H, W) bool mask for `spans[i].boxes[j]` (None: no mask);
            when a box has none and it matched a head detection with masks, the head's mask is used.
        iou_threshold: the lowest IoU that counts as a match.
    Returns:
        `Reconciliation` with one `GroundedSpanResult` per text box.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if len(box_scores) != len(spans) or any(
        len(s) != len(span.boxes) for s, span in zip(box_scores, spans, strict=True)
    ):
        raise ValueError(
            f"box_scores must have one score per text box: spans have {[len(s.boxes) for s in spans]} boxes, "
            f"box_scores {[len(s) for s in box_scores]}"
        )
    if masks is not None and (
        len(masks) != len(spans)
        or any(len(m) != len(span.boxes) for m, span in zip(masks, spans, strict=True))
    ):
        raise ValueError(
            f"masks must have one entry per text box: spans have {[len(s.boxes) for s in spans]} boxes, "
            f"masks {[len(m) for m in masks]}"
        )
    head = detections.numpy()
    head_categories = head.categories
    # Flatten text boxes in text order.
    flat = [(i, j) for i, span in enumerate(spans) for j in range(len(span.boxes))]
    named = [phrase_category(span.phrase, head.category_names) for span in spans]
    text_boxes = np.array([spans[i].boxes[j] for i, j in flat], dtype=np.float64).reshape(-1, 4)
    iou = pairwise_iou(text_boxes, head.boxes)

    candidates = []
    for t, (i, _) in enumerate(flat):
        for h in range(len(head)):
            same_category = named[i] is None or head_categories[h] == named[i]
            if iou[t, h] >= iou_threshold and same_category:
                candidates.append((-iou[t, h], t, h))
    match: list[int | None] = [None] * len(flat)
    used: set[int] = set()
    for _, t, h in sorted(candidates):
        if match[t] is None and h not in used:
            match[t] = h
            used.add(h)

    results = []
    for t, (i, j) in enumerate(flat):
        h = match[t]
        mask = None if masks is None else masks[i][j]
        if h is None:
            box, score, category, source = text_boxes[t], box_scores[i][j], named[i], "text"
        else:
            box, score, category, source = head.boxes[h], head.scores[h], head_categories[h], "head"
            if mask is None and head.masks is not None:
                mask = head.masks[h]
        results.append(
            GroundedSpanResult(
                phrase=spans[i].phrase,
                box=box,
                mask=mask,
                score=float(score),
                category=category,
                source=source,
                head_index=h,
            )
        )
    agreement = sum(h is not None for h in match) / len(flat) if flat else None
    return Reconciliation(spans=results, agreement=agreement)
