"""User images for inference: a path, a PIL image or an array, as the model reads them (`image_io.read_rgb`:
one clear error for a file that is missing or cannot be decoded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from grounded_llava.image_io import opened_image, read_rgb, to_rgb
from grounded_llava.inference.overlay import to_rgb_array

ImageInput = Image.Image | np.ndarray | str | Path


def check_image_file(path: str | Path) -> None:
    """Cheap check (header and structure, no full decode) that `path` is a readable image file."""
    with opened_image(path) as image:
        image.verify()


def load_image(image: ImageInput, *, max_pixels: int | None = None) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or an (H, W[, 3|4]) uint8 array.

    Raises FileNotFoundError for a missing path and ValueError (naming the file) for one that cannot
    be decoded, or, given `max_pixels`, whose width x height exceeds it (read from the header, before
    decoding). Paths and PIL images are in displayed orientation, 16-bit scaled to 8 (`image_io.to_rgb`),
    as in training and as the overlay reads them.
    """
    if isinstance(image, str | Path):
        return read_rgb(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(to_rgb_array(image))
    raise ValueError(f"image must be a PIL image, a path or a uint8 array, got {type(image).__name__}")
