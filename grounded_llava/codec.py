"""Grounding tokens in text: encode boxes into `<p>phrase</p><box><loc_a>..</box><seg>` and parse them back.

Convention (DESIGN.md):
- `<p>phrase</p>` marks a grounded phrase, followed by one `<box>` group per instance:
  `<box><loc_x0><loc_y0><loc_x1><loc_y1></box>`, optionally followed by `<seg>` (asks for a mask).
- Coordinates are fractions of the ORIGINAL image (x / W, y / H) quantised into `num_bins` bins;
  decoding returns bin centres, so a round trip is exact to within half a bin.
- Parsing is lenient: a broken group is dropped and counted in `ParsedAnswer.num_dropped`, never raised.

This module is pure Python (no torch) so data tooling can use it without the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

P_OPEN, P_CLOSE = "<p>", "</p>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
SEG = "<seg>"
DEFAULT_NUM_BINS = 100

Box = tuple[float, float, float, float]
_TOKEN_RE = re.compile(r"<p>|</p>|<box>|</box>|<seg>|<loc_(\d+)>")
# Boxes may overshoot the image by float rounding (COCO has such boxes); more than this is an error.
_EDGE_TOLERANCE_PX = 1.0


def loc_token(index: int) -> str:
    return f"<loc_{index}>"


def grounding_tokens(num_bins: int) -> list[str]:
    """Every special token the codec emits, in a fixed order (their ids are assigned in this order)."""
    return [P_OPEN, P_CLOSE, BOX_OPEN, BOX_CLOSE, SEG] + [loc_token(i) for i in range(num_bins)]


def _check_box(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    width, height = image_size
    if len(box) != 4:
        raise ValueError(f"box {list(box)} must have 4 numbers x0, y0, x1, y1 (original pixels)")
    x0, y0, x1, y1 = (float(v) for v in box)
    tol = _EDGE_TOLERANCE_PX
    if not (x1 > x0 and y1 > y0):
        raise ValueError(
            f"box {list(box)} is empty or inverted: need x1 > x0 and y1 > y0 (xyxy, original pixels)"
        )
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise ValueError(f"box {list(box)} lies outside the image of size (W={width}, H={height})")
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def _to_bin(fraction: float, num_bins: int) -> int:
    return min(max(int(fraction * num_bins), 0), num_bins - 1)


def encode_box(
    box_xyxy_px: Sequence[float], image_size: tuple[int, int], num_bins: int = DEFAULT_NUM_BINS
) -> str:
    """One `<box><loc_..>x4</box>` group for a box in original pixels; `image_size` is (W, H)."""
    x0, y0, x1, y1 = _check_box(box_xyxy_px, image_size)
    width, height = image_size
    bins = [_to_bin(x0 / width, num_bins), _to_bin(y0 / height, num_bins)]
    bins += [_to_bin(x1 / width, num_bins), _to_bin(y1 / height, num_bins)]
    return BOX_OPEN + "".join(loc_token(b) for b in bins) + BOX_CLOSE


def encode_phrase(
    phrase: str,
    boxes_xyxy_px: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    seg: bool = False,
) -> str:
    """`<p>phrase</p>` followed by one box group per instance (and `<seg>` after each when `seg`)."""
    if not boxes_xyxy_px:
        raise ValueError(f"phrase {phrase!r} has no boxes: write it as plain text instead")
    if any(tok in phrase for tok in (P_OPEN, P_CLOSE, BOX_OPEN, BOX_CLOSE, SEG)) or "<loc_" in phrase:
        raise ValueError(f"phrase {phrase!r} contains a grounding token")
    groups = "".join(encode_box(b, image_size, num_bins) + (SEG if seg else "") for b in boxes_xyxy_px)
    return P_OPEN + phrase + P_CLOSE + groups


def encode_grounded(
    phrases: Sequence[str],
    boxes_xyxy_px: Sequence[Sequence[Sequence[float]]],
    image_size: tuple[int, int],
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    seg: bool | Sequence[bool] = False,
    separator: str = ", ",
) -> str:
    """Encode several grounded phrases, `boxes_xyxy_px[i]` being the instances of `phrases[i]`.

    Args:
        phrases: one string per grounded phrase.
        boxes_xyxy_px: per phrase, a list of (x0, y0, x1, y1) boxes in original-image pixels.
        image_size: (W, H) of the original image.
        seg: ask for a mask after every box (one flag for all phrases, or one per phrase).
    Returns:
        The phrases joined by `separator`, e.g. `<p>dog</p><box><loc_1><loc_2><loc_50><loc_60></box>`.
    """
    if len(phrases) != len(boxes_xyxy_px):
        raise ValueError(f"{len(phrases)} phrases but {len(boxes_xyxy_px)} box lists")
    seg_flags = [seg] * len(phrases) if isinstance(seg, bool) else list(seg)
    if len(seg_flags) != len(phrases):
        raise ValueError(f"{len(phrases)} phrases but {len(seg_flags)} seg flags")
    return separator.join(
        encode_phrase(p, b, image_size, num_bins=num_bins, seg=s)
        for p, b, s in zip(phrases, boxes_xyxy_px, seg_flags, strict=True)
    )


@dataclass
class GroundedSpan:
    """A phrase of the answer and its instances.

    `boxes`: list of (x0, y0, x1, y1) in original-image pixels (bin centres); `seg[i]` says whether
    box i was followed by `<seg>`; `start`/`end`: character offsets of the phrase in the clean text.
    """

    phrase: str
    boxes: list[Box] = field(default_factory=list)
    seg: list[bool] = field(default_factory=list)
    start: int = 0
    end: int = 0


@dataclass
class ParsedAnswer:
    """Result of `parse_grounded`: the clean text (tokens removed), the spans and how many groups were dropped."""

    text: str
    spans: list[GroundedSpan]
    num_dropped: int = 0


def _decode_box(bins: list[int], image_size: tuple[int, int], num_bins: int) -> Box:
    width, height = image_size
    centre = [(b + 0.5) / num_bins for b in bins]
    return (centre[0] * width, centre[1] * height, centre[2] * width, centre[3] * height)


def parse_grounded(
    text: str, image_size: tuple[int, int], *, num_bins: int = DEFAULT_NUM_BINS
) -> ParsedAnswer:
    """Parse generated text into clean text and grounded spans; never raises on malformed token sequences.

    Rules: a phrase must close (`</p>`) before any box token, and a box group is exactly four
    `<loc_k>` (k < num_bins, x1 >= x0, y1 >= y0) between `<box>` and `</box>`; anything else is a
    broken group: dropped and counted. Box groups with no phrase before them attach to a span
    with an empty phrase. `image_size` is (W, H) of the original image.
    """
    pieces: list[str] = []  # clean text
    spans: list[GroundedSpan] = []
    dropped = 0
    phrase_start: int | None = None  # clean-text offset where an open <p> began
    box_bins: list[int] | None = None  # loc bins of an open <box> group (None: no group open)
    box_ok = True
    current: GroundedSpan | None = None  # span that subsequent box groups attach to
    position = 0

    def clean_len() -> int:
        return sum(len(p) for p in pieces)

    def close_box_group_broken() -> None:
        nonlocal box_bins, dropped
        if box_bins is not None:
            dropped += 1
            box_bins = None

    for match in _TOKEN_RE.finditer(text):
        plain = text[position : match.start()]
        position = match.end()
        if plain:
            if box_bins is not None:  # text inside a box group breaks it
                close_box_group_broken()
            if phrase_start is None and plain.strip():
                current = None  # prose between groups ends the phrase's instance list
            pieces.append(plain)
        token = match.group(0)
        if token == P_OPEN:
            close_box_group_broken()
            if phrase_start is not None:  # nested/unclosed phrase: drop the earlier opening
                dropped += 1
            phrase_start = clean_len()
            current = None
        elif token == P_CLOSE:
            close_box_group_broken()
            if phrase_start is None:
                dropped += 1
                continue
            end = clean_len()
            phrase = "".join(pieces)[phrase_start:end]
            current = GroundedSpan(phrase=phrase.strip(), start=phrase_start, end=end)
            phrase_start = None
        elif token == BOX_OPEN:
            close_box_group_broken()
            if phrase_start is not None:  # box inside an open phrase: the phrase is broken
                dropped += 1
                phrase_start = None
            box_bins, box_ok = [], True
        elif token == BOX_CLOSE:
            if box_bins is None:
                dropped += 1
                continue
            bins, box_bins = box_bins, None
            if not box_ok or len(bins) != 4 or bins[2] < bins[0] or bins[3] < bins[1]:
                dropped += 1
                continue
            if current is None:
                current = GroundedSpan(phrase="", start=clean_len(), end=clean_len())
            if not current.boxes:
                spans.append(current)
            current.boxes.append(_decode_box(bins, image_size, num_bins))
            current.seg.append(False)
        elif token == SEG:
            if box_bins is not None:
                close_box_group_broken()
            elif current is not None and current.boxes and not current.seg[-1]:
                current.seg[-1] = True
            else:
                dropped += 1
        else:  # <loc_k>
            if box_bins is None:
                dropped += 1
                continue
            index = int(match.group(1))
            if index >= num_bins:
                box_ok = False
            box_bins.append(index)
    tail = text[position:]
    close_box_group_broken()
    if tail:
        pieces.append(tail)
    if phrase_start is not None:
        dropped += 1
    return ParsedAnswer(text="".join(pieces), spans=spans, num_dropped=dropped)
