"""Draw boxes, masks, labels and the answer text for an image (PIL + numpy).

Size contract: `draw_overlay` returns an (H + P, W, 3) uint8 RGB array: the image's own H x W pixels
on top, then, when `text` is given, a P-pixel answer panel BELOW the image (P = 0 without text), so
the panel never hides an object. Pixels far from every box, mask and label are unchanged. Labels
are placed so that they do not cover each other where the image leaves room (above the box, inside
its top, below it, inside its bottom: the first free place). Masks are translucent with an outline.

Fonts: PIL's built-in font (`ImageFont.load_default(size=...)`), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grounded_llava.image_io import read_rgb, to_rgb

# Distinct, saturated colours (RGB) that stay readable under white label text.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (0, 150, 150),
    (240, 50, 230),
    (128, 128, 0),
    (170, 110, 40),
    (0, 0, 128),
    (128, 0, 0),
    (70, 70, 70),
)
PANEL_COLOR = (24, 24, 24)
ELLIPSIS = "..."

ImageLike = Image.Image | np.ndarray | str | Path


def color_for(index: int) -> tuple[int, int, int]:
    """The palette colour for a span/category index (cycles past the palette's end)."""
    return PALETTE[index % len(PALETTE)]


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Load an image (PIL image, path, or (H, W) / (H, W, 3|4) uint8 array) as an (H, W, 3) uint8 RGB array;
    paths and PIL images in displayed orientation (`image_io.to_rgb`), as the model sees them."""
    if isinstance(image, str | Path):
        return np.asarray(read_rgb(image)).copy()
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image)).copy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[:, :, :3].copy()
    raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")


def default_font_size(image_size: tuple[int, int]) -> int:
    """Label font size for an image of (W, H): about 1/40 of the longer side, 10..40 px."""
    return int(min(max(round(max(image_size) / 40), 10), 40))


def wrap_text(
    text: str, *, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_width: float
) -> list[str]:
    """Greedy word wrap so each line is at most `max_width` px wide; words too long alone are split."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:  # a word wider than the panel: split it across lines
                if line and font.getlength(line + char) > max_width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _blend_masks(
    canvas: np.ndarray, masks: np.ndarray, colors: Sequence[tuple[int, int, int]], alpha: float
) -> None:
    """Blend each mask's colour in at `alpha` and paint its outline (pixels with an outside 4-neighbour)."""
    for mask, color in zip(masks, colors, strict=True):
        region = canvas[mask].astype(np.float32)
        canvas[mask] = np.round((1 - alpha) * region + alpha * np.asarray(color, np.float32)).astype(np.uint8)
        padded = np.pad(mask, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        canvas[mask & ~inner] = color


Rect = tuple[float, float, float, float]


def _overlap(a: Rect, b: Rect) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_place(
    box: Sequence[float], size: tuple[float, float], image_size: tuple[int, int], placed: list[Rect]
) -> Rect:
    """Where a (w, h) label of `box` goes: the first candidate (above, inside top, below, inside bottom)
    inside the image that covers no placed label, else the candidate covering the least."""
    (width, height), (image_w, image_h) = size, image_size
    x = min(max(box[0], 0), max(image_w - width, 0))
    tops = (box[1] - height, box[1], box[3], box[3] - height)
    ys = [y for y in tops if 0 <= y <= image_h - height] or [min(max(box[1], 0), max(image_h - height, 0))]
    candidates = [(x, y, x + width, y + height) for y in ys]
    return min(candidates, key=lambda c: sum(_overlap(c, p) for p in placed))


def _draw_label(
    draw: ImageDraw.ImageDraw,
    *,
    text: str,
    box: Sequence[float],
    color: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    image_size: tuple[int, int],
    placed: list[Rect],
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    rect = _label_place(box, (right - left + 2 * pad, bottom - top + 2 * pad), image_size, placed)
    placed.append(rect)
    draw.rectangle(rect, fill=color)
    draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=(255, 255, 255), font=font)


def _add_panel(
    canvas: Image.Image,
    *,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    font_size: int,
    max_lines: int,
) -> Image.Image:
    """The image with a dark panel of the wrapped answer text appended below it."""
    width, height = canvas.size
    margin = max(round(font_size / 2), 3)
    lines = wrap_text(text, font=font, max_width=width - 2 * margin)
    line_height = font.getbbox("Ag")[3] + max(round(font_size / 5), 2)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + ELLIPSIS) > width - 2 * margin:
            last = last[:-1]
        lines[-1] = last + ELLIPSIS
    panel_height = len(lines) * line_height + 2 * margin
    framed = Image.new("RGB", (width, height + panel_height), PANEL_COLOR)
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    for i, line in enumerate(lines):
        draw.text((margin, height + margin + i * line_height), line, fill=(255, 255, 255), font=font)
    return framed


def draw_overlay(
    image: ImageLike,
    *,
    boxes: np.ndarray,
    labels: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    masks: np.ndarray | None = None,
    text: str | None = None,
    mask_alpha: float = 0.45,
    line_width: int | None = None,
    font_size: int | None = None,
    max_panel_lines: int = 12,
) -> np.ndarray:
    """Draw instances and (optionally) the answer text.

    Args:
        image: the original image (PIL, path, or uint8 array); its size defines the output size.
        boxes: (N, 4) xyxy, original pixels.
        labels: N strings drawn above the boxes (e.g. "red circle 0.87"); "" draws no label.
        colors: N RGB colours, one per instance.
        masks: optional (N, H, W) bool, original size, blended with `mask_alpha`, outlined.
        text: answer text for the panel below the image; None: no panel.
        line_width: box outline width in px (default: font size / 6, at least 2).
        font_size: label/panel font size in px (default `default_font_size`).
        max_panel_lines: longer text is cut there with an ellipsis.
    Returns:
        (H + P, W, 3) uint8 RGB array: the image, then the P-pixel panel (P = 0 without `text`).
    """
    canvas = to_rgb_array(image)
    height, width = canvas.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    count = len(boxes)
    if len(labels) != count or len(colors) != count:
        raise ValueError(f"{count} boxes but {len(labels)} labels and {len(colors)} colors")
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != (count, height, width):
            raise ValueError(f"masks have shape {masks.shape}, expected (N={count}, H={height}, W={width})")
        _blend_masks(canvas, masks, colors, mask_alpha)
    size = font_size or default_font_size((width, height))
    font = ImageFont.load_default(size=size)
    thickness = line_width or max(round(size / 6), 2)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    for box, color in zip(boxes, colors, strict=True):
        draw.rectangle(tuple(float(v) for v in box), outline=color, width=thickness)
    placed: list[Rect] = []
    for box, label, color in zip(boxes, labels, colors, strict=True):
        if label:
            _draw_label(
                draw, text=label, box=box, color=color, font=font, image_size=(width, height), placed=placed
            )
    if text is not None:
        pil = _add_panel(pil, text=text, font=font, font_size=size, max_lines=max_panel_lines)
    return np.asarray(pil).copy()
