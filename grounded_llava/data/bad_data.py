"""What the readers do with bad input: raise at once (`strict`) or skip, count and report (`skip`).

Every reader (COCO instances, COCO captions, LLaVA chat JSON) validates with the same vocabulary:
a problem has a *reason* (a short key such as `missing_image_file`, counted in skip mode) and a
message naming the file, the image/annotation/entry id and the field. In `strict` mode the first
problem raises `DataError`; in `skip` mode the offending item is left out, the reason is counted in
a `BadDataReport` (with the first few messages as examples) and one warning is logged at the end.

The image checks live here too because every reader needs them: the file name must stay inside the
image root, the file must exist, and PIL must be able to read it (header only, or a full decode).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from grounded_llava.config_io import ConfigError
from grounded_llava.errors import UserError
from grounded_llava.image_io import ImageReadError, displayed_size, opened_image

BadDataPolicy = Literal["strict", "skip"]
ImageCheck = Literal["decode", "header", "none"]

_POLICIES = ("strict", "skip")
_IMAGE_CHECKS = ("decode", "header", "none")
_LOG = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the item id and the field."""


class UnreadableImageError(DataError):
    """An image that cannot be read when a sample is built: training skips it under `on_bad_data: skip`."""


class InvalidItem(Exception):
    """Raised by validators inside a reader; the reader turns it into `BadDataReport.flag`."""

    def __init__(self, reason: str, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.reason = reason
        self.field_name = field_name
        self.problem = problem


@dataclass
class BadDataReport:
    """Counts of skipped items per reason, with the first `max_examples` messages.

    Attributes:
        source: the file being read (used in every message).
        policy: `strict` (raise `DataError` at the first problem) or `skip`.
        counts: reason -> number of problems seen (skip mode only; strict mode raises instead).
        examples: the first `max_examples` full messages.
        images_skipped / annotations_skipped / entries_skipped: how many items were left out.
    """

    source: str
    policy: BadDataPolicy = "strict"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5
    images_skipped: int = 0
    annotations_skipped: int = 0
    entries_skipped: int = 0

    def __post_init__(self) -> None:
        if self.policy not in _POLICIES:
            raise ConfigError(f"on_bad_data must be one of {_POLICIES}, got {self.policy!r}")

    @property
    def num_problems(self) -> int:
        return sum(self.counts.values())

    def flag(self, *, reason: str, where: str, field_name: str, problem: str) -> None:
        """Report one problem: raise `DataError` in strict mode, otherwise count it."""
        message = f"{self.source}: {where}: field {field_name!r}: {problem}"
        if self.policy == "strict":
            raise DataError(message)
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def flag_invalid(self, error: InvalidItem, *, where: str) -> None:
        self.flag(reason=error.reason, where=where, field_name=error.field_name, problem=error.problem)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        skipped = (
            f"{self.images_skipped} images, {self.annotations_skipped} annotations, "
            f"{self.entries_skipped} entries skipped"
        )
        lines = [f"{self.source}: {self.num_problems} bad items ({reasons}); {skipped}"]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)

    def log_warning(self) -> None:
        """Log the summary as one warning when anything was skipped (no-op otherwise)."""
        if self.num_problems:
            _LOG.warning("skipped bad data\n%s", self.summary())


def check_policy(on_bad_data: str, image_check: str) -> None:
    if on_bad_data not in _POLICIES:
        raise ConfigError(f"on_bad_data must be one of {_POLICIES}, got {on_bad_data!r}")
    if image_check not in _IMAGE_CHECKS:
        raise ConfigError(f"image_check must be one of {_IMAGE_CHECKS}, got {image_check!r}")


def resolve_image_path(image_root: Path, file_name: object, *, field_name: str = "file_name") -> Path:
    """`image_root / file_name`, refusing names that are not relative paths inside the root.

    Raises `InvalidItem` (reason `path_escapes_root` or `bad_value`). Symlinks are not resolved:
    the check is on the written name (`../x.jpg`, `/abs/x.jpg`, `a/../../x.jpg` are refused).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise InvalidItem("bad_value", field_name, f"must be a non-empty string, got {file_name!r}")
    if os.path.isabs(file_name) or Path(file_name).is_absolute():
        raise InvalidItem(
            "path_escapes_root", field_name, f"{file_name!r} is absolute; must be relative to {image_root}"
        )
    root = os.path.normpath(image_root)
    path = os.path.normpath(os.path.join(root, file_name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise InvalidItem(
            "path_escapes_root", field_name, f"{file_name!r} escapes the image root {image_root}"
        )
    return Path(path)


def inspect_image(
    path: Path, *, image_check: ImageCheck, field_name: str = "file_name"
) -> tuple[int, int] | None:
    """Check that the image file exists and PIL can read it; return its displayed (W, H), i.e. with the
    EXIF orientation applied as every loader does (None when not checked).

    `header`: open + `verify()` (catches missing, non-image and PNG-CRC errors, not truncated JPEGs);
    `decode`: also decodes every pixel (catches truncated files); `none`: no check at all.
    Raises `InvalidItem` with reason `missing_image_file` or `corrupt_image`.
    """
    if image_check == "none":
        return None
    if not path.is_file():
        raise InvalidItem("missing_image_file", field_name, f"image file {path} does not exist")
    try:
        with opened_image(path) as image:
            image.verify()  # must come first: reading the EXIF of a PNG moves past what verify checks
        with opened_image(path) as image:
            size = displayed_size(image)
            if image_check == "decode":
                image.load()
    except ImageReadError as error:
        raise InvalidItem("corrupt_image", field_name, str(error)) from None
    return size
