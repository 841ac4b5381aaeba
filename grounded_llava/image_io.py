"""Decoded images as the model sees them: displayed orientation, 8-bit RGB.

Every loader (training data, inference, overlays) goes through `to_rgb`, so that one photo is the same
array everywhere:
- EXIF orientation is applied (`ImageOps.exif_transpose`): a phone photo stored sideways is used the
  way viewers show it, and COCO boxes and `width`/`height` are in that displayed frame
  (`displayed_size` gives it without decoding the pixels);
- 16-bit grayscale (modes `I;16*`, and `I`, which is how Pillow reads 16-bit PNG/TIFF) is scaled from
  [0, 65535] to [0, 255]; PIL's own `convert("RGB")` clips it, turning most pixels white. Every other
  mode is converted by PIL (palette, gray, alpha dropped, CMYK, ...).
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _is_16bit(image: Image.Image) -> bool:
    return image.mode == "I" or image.mode.startswith("I;16")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in displayed orientation as 8-bit RGB (a new image; `image` is not modified)."""
    image = ImageOps.exif_transpose(image)
    if _is_16bit(image):
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    return image.convert("RGB")


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(W, H) of `image` once its EXIF orientation is applied (header only, no decode)."""
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
