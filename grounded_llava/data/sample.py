"""The unit every data source produces and the dataset/collator consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class GroundedSample:
    """One training conversation about one image.

    Attributes:
        image_path: the image file (None for text-only chat).
        conversation: LLaVA-format turns, `[{"from": "human"|"gpt", "value": str}, ...]`; the first
            human turn contains `<image>`; gpt turns may contain grounding tokens (`grounded_llava.codec`).
        image_size: (W, H) of the original image, as the annotation file declares it.
        has_det_targets: True when `det_boxes`/`det_categories` list EVERY instance of the image (so the
            detection head may learn "nothing else is there"); False for chat-only samples.
        det_boxes: (N, 4) float32 xyxy, original pixels, every instance of the image.
        det_categories: N category names, aligned with `det_boxes`.
        seg_masks: one bool (H, W) mask at original size per `<seg>` token of the gpt turns, in the
            order the tokens appear in the conversation.
        source: where it came from (file name), for error messages; task: which task made it.
        det_attributes: N annotation `attributes` dicts aligned with `det_boxes` (e.g. {"color": "red"}; {}
            when the annotation has none, or [] for none at all): the scene line's attribute words.
    """

    image_path: Path | None
    conversation: list[dict[str, str]]
    image_size: tuple[int, int] | None = None
    has_det_targets: bool = False
    det_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    det_categories: list[str] = field(default_factory=list)
    seg_masks: list[np.ndarray] = field(default_factory=list)
    source: str = ""
    task: str = ""
    det_attributes: list[dict] = field(default_factory=list)
