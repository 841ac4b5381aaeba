"""Grounding tokens in text: encode boxes into `<p>phrase</p><box><loc_a>..</box><seg>` and parse them back.

Convention (DESIGN.md):
- `<p>phrase</p>` marks a grounded phrase, followed by one `<box>` group per instance:
  `<box><loc_x0><loc_y0><loc_x1><loc_y1></box>`, optionally followed by `<seg>` (asks for a mask).
- Coordinates are fractions of the ORIGINAL image (x / W, y / H) quantised into `num_bins` bins;
  decoding returns bin centres, so a round trip is exact to within half a bin.
- Parsing is lenient: a broken group is dropped and counted in `ParsedAnswer.num_dropped`, never raised.
  The grammar itself is read by `grounded_llava.grammar` (shared with the token-id readers).

This module is pure Python (no torch) so data tooling can use it without the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .grammar import BOX_CLOSE, BOX_OPEN, P_CLOSE, P_OPEN, SEG, TEXT, lex_text, parse

__all__ = [
    "BOX_CLOSE",
    "BOX_OPEN",
    "DEFAULT_NUM_BINS",
    "P_CLOSE",
    "P_OPEN",
    "SEG",
    "Box",
    "GroundedSpan",
    "ParsedAnswer",
    "decode_bins",
    "encode_box",
    "encode_grounded",
    "encode_phrase",
    "grounding_tokens",
    "loc_token",
    "parse_grounded",
]

DEFAULT_NUM_BINS = 100

Box = tuple[float, float, float, float]
# Boxes may overshoot the image by float rounding (COCO has such boxes); more than this is an error.
_EDGE_TOLERANCE_PX = 1.0


def loc_token(index: int) -> str:
    return f"<loc_{index}>"


def grounding_tokens(num_bins: int) -> list[str]:
    """Every special token the codec emits, in a fixed order (their ids are assigned in this order)."""
    return [P_OPEN, P_CLOSE, BOX_OPEN, BOX_CLOSE, SEG] + [loc_token(i) for i in range(num_bins)]


def _check_box(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    width, height = image_size
    if not (width > 0 and height > 0):
        raise ValueError(f"image size (W={width}, H={height}) must be positive")
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


def box_bins(
    box_xyxy_px: Sequence[float], image_size: tuple[int, int], num_bins: int = DEFAULT_NUM_BINS
) -> list[int]:
    """The four loc bins [x0, y0, x1, y1] of a box in original pixels; `image_size` is (W, H)."""
    x0, y0, x1, y1 = _check_box(box_xyxy_px, image_size)
    width, height = image_size
    bins = [_to_bin(x0 / width, num_bins), _to_bin(y0 / height, num_bins)]
    return bins + [_to_bin(x1 / width, num_bins), _to_bin(y1 / height, num_bins)]


def encode_box(
    box_xyxy_px: Sequence[float], image_size: tuple[int, int], num_bins: int = DEFAULT_NUM_BINS
) -> str:
    """One `<box><loc_..>x4</box>` group for a box in original pixels; `image_size` is (W, H)."""
    bins = box_bins(box_xyxy_px, image_size, num_bins)
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


def decode_bins(bins: Sequence[int], image_size: tuple[int, int], num_bins: int) -> Box:
    """Four (x0, y0, x1, y1) bins -> box in original pixels (bin centres); `image_size` is (W, H)."""
    width, height = image_size
    centre = [(b + 0.5) / num_bins for b in bins]
    return (centre[0] * width, centre[1] * height, centre[2] * width, centre[3] * height)


def parse_grounded(
    text: str, image_size: tuple[int, int], *, num_bins: int = DEFAULT_NUM_BINS
) -> ParsedAnswer:
    """Parse generated text into clean text and grounded spans; never raises, linear in len(text).

    The rules are `grounded_llava.grammar`'s: a box group is exactly four `<loc_k>` (k < num_bins,
    x1 >= x0, y1 >= y0) between `<box>` and `</box>`, `<seg>` right after its `</box>`; a broken
    group, stray token or unclosed phrase is dropped and counted. Box groups with no phrase before
    them attach to a span with an empty phrase. `image_size` is (W, H) of the original image.
    """
    tokens = lex_text(text, num_bins)
    parsed = parse(tokens)
    # Clean text = the TEXT tokens; `clean_at[p]`: its length before source position p.
    pieces: list[str] = []
    clean_at: dict[int, int] = {}
    length = 0
    for token in tokens:
        clean_at[token.start] = length
        if token.kind == TEXT:
            pieces.append(text[token.start : token.end])
            length += token.end - token.start
    clean_at[len(text)] = length
    clean = "".join(pieces)
    spans = []
    for span in parsed.spans:
        start, end = clean_at[span.phrase_start], clean_at[span.phrase_end]
        spans.append(
            GroundedSpan(
                phrase=clean[start:end].strip(),
                boxes=[decode_bins(g.bins, image_size, num_bins) for g in span.groups],
                seg=[g.seg for g in span.groups],
                start=start,
                end=end,
            )
        )
    return ParsedAnswer(text=clean, spans=spans, num_dropped=parsed.num_dropped)
