"""Reading user images, with one clear error for any file that is missing or cannot be decoded.

ultralytics (imported with the model) wraps `PIL.Image.open`: for a file PIL cannot identify it
logs an "AutoUpdate" attempt for the pi-heif plugin and then raises ModuleNotFoundError when the
plugin is absent. Here such a file is simply unreadable: its log lines are muted and the error
becomes the same ValueError as for any other undecodable file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from grounded_llava.image_io import displayed_size, to_rgb
from grounded_llava.inference.overlay import to_rgb_array

ImageInput = Image.Image | np.ndarray | str | Path


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    ultralytics_log = logging.getLogger("ultralytics")
    level = ultralytics_log.level
    ultralytics_log.setLevel(logging.CRITICAL + 1)
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError, SyntaxError, ImportError, Image.DecompressionBombError) as err:
        unidentified = isinstance(err, ImportError | UnidentifiedImageError)  # PIL's message repeats the path
        reason = "cannot identify image file" if unidentified else str(err)
        raise ValueError(f"cannot read image {path}: {reason}") from None
    finally:
        ultralytics_log.setLevel(level)


def check_image_file(path: str | Path) -> None:
    """Cheap check (header and structure, no full decode) that `path` is a readable image file."""
    with _opened(Path(path)) as image:
        image.verify()


def load_image(image: ImageInput, *, max_pixels: int | None = None) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or an (H, W[, 3|4]) uint8 array.

    Raises FileNotFoundError for a missing path and ValueError (naming the file) for one that cannot
    be decoded, or, given `max_pixels`, whose width x height exceeds it (read from the header, before
    decoding). Paths and PIL images are in displayed orientation, 16-bit scaled to 8 (`image_io.to_rgb`),
    as in training and as the overlay reads them.
    """
    if isinstance(image, str | Path):
        with _opened(Path(image)) as opened:
            width, height = displayed_size(opened)
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(
                    f"image {image} is {width}x{height} pixels, more than the {max_pixels:,} allowed"
                )
            return to_rgb(opened)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(to_rgb_array(image))
    raise ValueError(f"image must be a PIL image, a path or a uint8 array, got {type(image).__name__}")
