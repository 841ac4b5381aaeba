"""Checks of COCO geometry (polygons, RLE, area) before pycocotools sees it.

pycocotools trusts its input: a NaN polygon coordinate segfaults `frPyObjects`, a huge one makes it
rasterise an enormous outline (out of memory), `size: null` or `area: null` fail deep inside it. The
COCO reader (training and evaluation) and the COCO metrics both run these checks first. Each raises
`InvalidItem` (reason, field, problem); the caller adds the file and the item id.

A polygon may overshoot the image (annotators click past the border; pycocotools clips the mask), but
only by up to `POLYGON_TOLERANCE` of the image's width (x) or height (y): beyond that it is an error.
"""

from __future__ import annotations

import math

from grounded_llava.data.bad_data import InvalidItem

POLYGON_TOLERANCE = 0.5  # a polygon vertex may lie this fraction of the image side outside the image
# A compressed RLE run length has at most this many characters (5 bits each: 65 bits, pycocotools'
# long holds 64); more would only grow one Python int, in quadratic time.
MAX_RUN_CHARS = 13


def is_finite(value: float) -> bool:
    """`math.isfinite`, but False for an integer too large for a float (JSON allows 1 followed by 400
    zeros, on which `math.isfinite` raises `OverflowError`)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _rle_string_counts(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString) to run lengths."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("string ends inside a run length")
            if shift >= MAX_RUN_CHARS:
                raise ValueError(f"a run length is longer than {MAX_RUN_CHARS} characters")
            char = ord(counts[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_polygon(part: object, index: int, width: int, height: int) -> None:
    if not isinstance(part, list) or not all(isinstance(v, (int, float)) for v in part):
        raise InvalidItem("malformed_polygon", "segmentation", "each polygon must be a flat list of numbers")
    if len(part) % 2 or len(part) < 6:
        raise InvalidItem(
            "malformed_polygon", "segmentation", f"polygon has {len(part)} numbers; need an even count >= 6"
        )
    for position, value in enumerate(part):
        if not is_finite(value):
            raise InvalidItem(
                "malformed_polygon",
                "segmentation",
                f"polygon {index} coordinate #{position} is {value}, not finite",
            )
    for position, value in enumerate(part):
        axis, side = ("x", width) if position % 2 == 0 else ("y", height)
        margin = POLYGON_TOLERANCE * side
        if value < -margin or value > side + margin:
            raise InvalidItem(
                "polygon_outside_image",
                "segmentation",
                f"polygon {index} coordinate #{position} ({axis} = {value}) lies more than "
                f"{POLYGON_TOLERANCE:g} x the image side outside the {width}x{height} image",
            )


def _check_rle(segm: dict, width: int, height: int) -> None:
    size = segm["size"]
    if not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) for v in size):
        raise InvalidItem(
            "malformed_rle", "segmentation", f"RLE 'size' must be [height, width], got {size!r}"
        )
    if size != [height, width]:
        raise InvalidItem(
            "malformed_rle", "segmentation", f"RLE size {size} != image [H, W] [{height}, {width}]"
        )
    counts = segm["counts"]
    try:
        runs = _rle_string_counts(counts) if isinstance(counts, str) else list(counts)
    except (TypeError, ValueError) as error:
        raise InvalidItem("malformed_rle", "segmentation", f"RLE counts cannot be read: {error}") from error
    if any(not isinstance(r, int) or r < 0 for r in runs) or sum(runs) != height * width:
        raise InvalidItem(
            "malformed_rle", "segmentation", f"RLE run lengths do not cover the {height}x{width} image"
        )


def check_segmentation(segm: object, width: int, height: int) -> list | dict | None:
    """`segm` if pycocotools can safely rasterise it on a `width` x `height` image; None for none/`[]`.

    Polygons: flat lists of an even count >= 6 of finite numbers, within the image +/- tolerance.
    RLE: a dict with `size` == [height, width] and `counts` (string or run list) covering the image.
    """
    if segm is None or segm == []:
        return None
    if isinstance(segm, list):
        for index, part in enumerate(segm):
            _check_polygon(part, index, width, height)
        return segm
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise InvalidItem(
            "malformed_rle", "segmentation", "must be polygons or an RLE dict with 'size' and 'counts'"
        )
    _check_rle(segm, width, height)
    return segm


def check_area(value: object) -> float:
    """An annotation's `area` as a float; it must be a finite number >= 0 (not a string or null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value) or value < 0:
        raise InvalidItem("bad_value", "area", f"must be a finite number >= 0, got {value!r}")
    return float(value)
