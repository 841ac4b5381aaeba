"""A grounded chat answer: its `GroundedSpanResult`s (phrase, box, mask, score) and the `GroundedAnswer`.

Frames: every box is xyxy in ORIGINAL image pixels; masks are bool at original image size;
`image_size` is (W, H). In JSON, masks are COCO RLE (`grounded_llava.rle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from grounded_llava.box_iou import box_iou_pairs
from grounded_llava.inference.detections import Detections, check_image_size, load_image_of_size, save_png
from grounded_llava.inference.overlay import ImageLike, color_for, draw_overlay
from grounded_llava.rle import mask_to_rle

DRAW_DEDUP_IOU = 0.6  # a head detection overlapping an already drawn box this much is the same object


def _overlaps(box: np.ndarray, drawn: np.ndarray, threshold: float) -> bool:
    """Whether `box` (4,) has IoU > `threshold` with any row of `drawn` (N, 4), same frame."""
    return bool((box_iou_pairs(np.broadcast_to(box, drawn.shape), drawn) > threshold).any())


@dataclass(kw_only=True)
class GroundedSpanResult:
    """One grounded instance of the answer: a phrase and one of its boxes.

    Attributes:
        phrase: the phrase from `<p>..</p>` ("" for a box with no phrase).
        box: (4,) float32 xyxy, original pixels.
        mask: (H, W) bool at original size, or None.
        score: the head's score (source "head") or the box tokens' probability (source "text").
        category: the category (the head's when matched, else the one the phrase names), or None.
        source: "head" when the box/score come from a matched head detection, "text" otherwise.
        head_index: index of the matched detection in `GroundedAnswer.detections`, None when unmatched.
    """

    phrase: str
    box: np.ndarray
    mask: np.ndarray | None = None
    score: float
    category: str | None = None
    source: Literal["head", "text"]
    head_index: int | None = None

    def __post_init__(self) -> None:
        box = self.box.detach().cpu().numpy() if isinstance(self.box, torch.Tensor) else self.box
        self.box = np.asarray(box, dtype=np.float32)
        if self.box.shape != (4,):
            raise ValueError(
                f"GroundedSpanResult.box for {self.phrase!r} must be (4,) xyxy, got {self.box.shape}"
            )
        if self.source not in ("head", "text"):
            raise ValueError(f"GroundedSpanResult.source must be 'head' or 'text', got {self.source!r}")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, dtype=bool)
            if self.mask.ndim != 2:
                raise ValueError(
                    f"GroundedSpanResult.mask for {self.phrase!r} must be (H, W), got {self.mask.shape}"
                )
        self.score = float(self.score)

    def to_json(self) -> dict[str, Any]:
        """`{"phrase", "box": [x0, y0, x1, y1], "score", "category", "mask_rle": {"size", "counts"} | None}`."""
        return {
            "phrase": self.phrase,
            "box": [float(v) for v in self.box],
            "score": self.score,
            "category": self.category,
            "mask_rle": None if self.mask is None else mask_to_rle(self.mask),
        }


@dataclass(kw_only=True)
class GroundedAnswer:
    """A chat answer with its grounding.

    Attributes:
        text: the clean answer (grounding tokens removed).
        raw_text: the generated text with its grounding tokens.
        spans: one `GroundedSpanResult` per box group of the answer, in text order.
        detections: every instance the head found (label space = the model's categories).
        image_size: (W, H) of the original image.
        agreement: fraction of text boxes matched to a head box (None when the answer has no box).
        num_dropped_groups: malformed grounding groups dropped while parsing.
        scene_line: the line of the head's objects the LLM read before the question (`scene_line.py`;
            None for a model without `scene_line`).
    """

    text: str
    raw_text: str
    spans: list[GroundedSpanResult] = field(default_factory=list)
    detections: Detections
    image_size: tuple[int, int]
    agreement: float | None = None
    num_dropped_groups: int = 0
    scene_line: str | None = None

    def __post_init__(self) -> None:
        self.image_size = check_image_size(self.image_size, "GroundedAnswer")
        if self.detections.image_size != self.image_size:
            raise ValueError(
                f"GroundedAnswer.detections.image_size {self.detections.image_size} != image_size {self.image_size}"
            )
        width, height = self.image_size
        for i, span in enumerate(self.spans):
            if span.mask is not None and span.mask.shape != (height, width):
                raise ValueError(
                    f"GroundedAnswer.spans[{i}] ({span.phrase!r}) mask has shape {span.mask.shape}, "
                    f"expected (H={height}, W={width})"
                )

    def with_min_score(self, conf: float) -> GroundedAnswer:
        """A copy whose `detections` keep the scores >= `conf` (the spans stay: they are the answer; a span
        whose matched detection is dropped keeps its box and score, its `head_index` becomes None)."""
        scores = self.detections.numpy().scores
        kept = np.flatnonzero(np.asarray(scores) >= conf)
        new_index = {int(old): new for new, old in enumerate(kept)}
        spans = [replace(span, head_index=new_index.get(span.head_index)) for span in self.spans]
        return replace(self, spans=spans, detections=self.detections[kept])

    def plot(
        self,
        image: ImageLike,
        *,
        panel: bool = True,
        masks: bool = True,
        scores: bool = True,
        detections: bool = True,
        line_width: int | None = None,
        font_size: int | None = None,
    ) -> np.ndarray:
        """The spans (one colour per phrase) with "phrase 0.87" labels, and the answer text in a panel.

        `detections`: also draw the head's detections that no span was matched to ("category 0.42",
        one colour per category after the span colours), so everything the model found is visible;
        one box per object: a detection overlapping a drawn box (IoU > `DRAW_DEDUP_IOU`) is left out.

        Returns:
            (H + P, W, 3) uint8 RGB array: the image, then the answer text in a P-pixel panel below it
            (`panel=False` omits it: P = 0).
        """
        canvas = load_image_of_size(image, self.image_size, "GroundedAnswer")
        width, height = self.image_size
        empty = np.zeros((height, width), dtype=bool)
        phrases = list(dict.fromkeys(span.phrase for span in self.spans))
        boxes, labels, colors, mask_list = [], [], [], []
        for span in self.spans:
            name = span.phrase or span.category or "object"
            boxes.append(np.asarray(span.box, np.float32))
            labels.append(f"{name} {span.score:.2f}" if scores else name)
            colors.append(color_for(phrases.index(span.phrase)))
            mask_list.append(span.mask)
        if detections:
            matched = {span.head_index for span in self.spans if span.head_index is not None}
            extra = self.detections.numpy()
            for index in np.argsort(-np.asarray(extra.scores), kind="stable"):
                box = np.asarray(extra.boxes[index], np.float32)
                if index in matched or (boxes and _overlaps(box, np.stack(boxes), DRAW_DEDUP_IOU)):
                    continue
                class_id = int(extra.class_ids[index])
                name = extra.category_names[class_id]
                boxes.append(box)
                labels.append(f"{name} {float(extra.scores[index]):.2f}" if scores else name)
                colors.append(color_for(len(phrases) + class_id))
                mask_list.append(None if extra.masks is None else extra.masks[index])
        mask_array = None
        if masks and any(m is not None for m in mask_list):
            mask_array = np.stack([empty if m is None else m for m in mask_list])
        return draw_overlay(
            canvas,
            boxes=np.stack(boxes) if boxes else np.zeros((0, 4), np.float32),
            labels=labels,
            colors=colors,
            masks=mask_array,
            text=self.text if panel and self.text else None,
            line_width=line_width,
            font_size=font_size,
        )

    def save(self, path: str | Path, image: ImageLike, **plot_kwargs: Any) -> Path:
        """Write `plot(image, **plot_kwargs)` as a PNG (the image's size); returns the path."""
        return save_png(self.plot(image, **plot_kwargs), path)

    def to_json(self) -> dict[str, Any]:
        """`{"text", "spans": [{"phrase", "box", "score", "category", "mask_rle"}], "detections": [{"box", "score",
        "category"(, "mask_rle")}](, "scene_line")}`: a detection's `mask_rle` when masks were asked for
        (`masks_for_detections`), the scene line when the model reads one.

        Boxes in original pixels; plain floats and str RLE counts, so `json.dumps` works as is.
        """
        return {
            "text": self.text,
            "spans": [span.to_json() for span in self.spans],
            "detections": self.detections.to_json(masks=self.detections.masks is not None),
        } | ({} if self.scene_line is None else {"scene_line": self.scene_line})
