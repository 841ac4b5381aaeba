"""Decoded images as the model sees them: displayed orientation, 8-bit RGB.

Every image file is read by `read_rgb` (training data, inference, overlays, the demo), which decodes
through `to_rgb`, so that one photo is the same array everywhere:
- EXIF orientation is applied (`ImageOps.exif_transpose`): a phone photo stored sideways is used the
  way viewers show it, and COCO boxes and `width`/`height` are in that displayed frame
  (`displayed_size` gives it without decoding the pixels);
- 16-bit grayscale (modes `I;16*`, and `I`, which is how Pillow reads 16-bit PNG/TIFF) is scaled from
  [0, 65535] to [0, 255]; PIL's own `convert("RGB")` clips it, turning most pixels white. Every other
  mode is converted by PIL (palette, gray, alpha dropped, CMYK, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from grounded_llava.errors import UserError

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


class ImageReadError(UserError, ValueError):
    """An image file that cannot be decoded, or is larger than allowed (the message names the file)."""


_READ_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    ImportError,
    Image.DecompressionBombError,
)


@contextmanager
def opened_image(path: str | Path) -> Iterator[Image.Image]:
    """`PIL.Image.open(path)` with one error for every way it fails: FileNotFoundError for a missing file,
    `ImageReadError` ("cannot read image PATH: reason") for one PIL cannot read, including failures of the
    code run inside the block (decoding, `verify`).

    ultralytics (imported with the model) wraps `PIL.Image.open`: for a file PIL cannot identify it logs an
    "AutoUpdate" attempt for the pi-heif plugin and raises ModuleNotFoundError when the plugin is absent.
    Here such a file is simply unreadable: its log lines are muted and the error is the same.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    ultralytics_log = logging.getLogger("ultralytics")
    level = ultralytics_log.level
    ultralytics_log.setLevel(logging.CRITICAL + 1)
    try:
        with Image.open(path) as image:
            yield image
    except ImageReadError:
        raise
    except _READ_ERRORS as err:
        unidentified = isinstance(err, ImportError | UnidentifiedImageError)  # PIL's message repeats the path
        raise ImageReadError(
            f"cannot read image {path}: {'cannot identify image file' if unidentified else err}"
        ) from None
    finally:
        ultralytics_log.setLevel(level)


def read_rgb(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """The one reader of image files: `path` decoded as `to_rgb` gives it (displayed orientation, 8-bit RGB).

    Raises FileNotFoundError or `ImageReadError` (`opened_image`); given `max_pixels`, also an
    `ImageReadError` for an image whose width x height exceeds it (read from the header, before decoding).
    """
    with opened_image(path) as image:
        width, height = displayed_size(image)
        if max_pixels is not None and width * height > max_pixels:
            raise ImageReadError(
                f"image {path} is {width}x{height} pixels, more than the {max_pixels:,} allowed"
            )
        rgb = to_rgb(image)
    if rgb.size[0] == 0 or rgb.size[1] == 0:
        raise ImageReadError(f"image {path} is empty")
    return rgb
