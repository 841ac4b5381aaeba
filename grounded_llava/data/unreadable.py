"""Images found unreadable while training, under the source's `on_bad_data` policy.

The readers check image headers when they load a source (`image_check="header"`: a full decode of
every image would double the start-up time), so a truncated JPEG is only found when its sample is
built. Then `strict` raises the `UnreadableImageError` (one line naming the file); `skip` counts it,
logs one warning per image and builds the next readable sample of the same dataset instead. The
substitute is a function of the index, so batches stay deterministic and resume stays exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from .bad_data import BadDataPolicy, DataError, UnreadableImageError, check_policy

T = TypeVar("T")
_LOG = logging.getLogger(__name__)


class SkipUnreadable:
    """Builds dataset items, skipping (under `skip`) the indices whose image cannot be read.

    Attributes:
        policy: the source's `on_bad_data`.
        skipped: indices found unreadable so far (never tried again).
    """

    def __init__(self, policy: BadDataPolicy) -> None:
        check_policy(policy, "header")
        self.policy = policy
        self.skipped: set[int] = set()

    def get(self, index: int, size: int, build: Callable[[int], T]) -> T:
        """`build(index)`, or under `skip` `build` of the next index (cyclically) whose image reads."""
        for offset in range(size):
            candidate = (index + offset) % size
            if candidate in self.skipped:
                continue
            try:
                return build(candidate)
            except UnreadableImageError as error:
                if self.policy == "strict":
                    raise
                self.skipped.add(candidate)
                _LOG.warning(
                    "on_bad_data: skip: %s; item %d skipped (%d so far)", error, candidate, len(self.skipped)
                )
        raise DataError(f"none of the {size} images of this data source can be read (on_bad_data: skip)")
