"""Inference results: head `Detections`, grounded spans and the full `GroundedAnswer`.

Frames: every box is xyxy in ORIGINAL image pixels; masks are bool at original image size;
`image_size` is (W, H). In JSON, masks are COCO RLE (`grounded_llava.inference.rle`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from grounded_llava.inference.overlay import ImageLike, color_for, draw_overlay, to_rgb_array
from grounded_llava.inference.rle import mask_to_rle

Array = torch.Tensor | np.ndarray
Index = int | slice | Sequence[int] | Sequence[bool] | np.ndarray | torch.Tensor


def _check_image_size(image_size: Sequence[int], owner: str) -> tuple[int, int]:
    if len(image_size) != 2 or any(int(v) != v or v <= 0 for v in image_size):
        raise ValueError(f"{owner}.image_size must be (W, H) positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _load_image(image: ImageLike, image_size: tuple[int, int], owner: str) -> np.ndarray:
    array = to_rgb_array(image)
    if (array.shape[1], array.shape[0]) != image_size:
        raise ValueError(
            f"image is (W={array.shape[1]}, H={array.shape[0]}) but {owner} is for image_size (W, H)={image_size}"
        )
    return array


def _save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@dataclass
class Detections:
    """Every instance the detection head found in one image (ultralytics Results / detectron2 Instances style).

    Holds torch tensors (`.numpy()` gives the same class holding numpy arrays). Indexing with an int,
    slice, bool mask or index array filters every per-instance field together (an int keeps the
    leading dimension, as ultralytics does).

    Attributes:
        boxes: (N, 4) float32 xyxy, original pixels.
        scores: (N,) float32 confidences in [0, 1].
        class_ids: (N,) int64 indices into `category_names`.
        category_names: the label space; `category_names[class_id]` is the category.
        image_size: (W, H) of the original image.
        masks: optional (N, H, W) bool masks at original size.
    """

    boxes: Array
    scores: Array
    class_ids: Array
    category_names: list[str]
    image_size: tuple[int, int]
    masks: Array | None = None

    def __post_init__(self) -> None:
        self.image_size = _check_image_size(self.image_size, "Detections")
        self.category_names = list(self.category_names)
        use_numpy = isinstance(self.boxes, np.ndarray)
        device = self.boxes.device if isinstance(self.boxes, torch.Tensor) else torch.device("cpu")

        def convert(x: Any, dtype: str) -> Array:
            if use_numpy:
                return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=dtype)
            return torch.as_tensor(x, device=device).to(getattr(torch, dtype))

        self.boxes = convert(self.boxes, "float32").reshape(-1, 4)
        self.scores = convert(self.scores, "float32")
        self.class_ids = convert(self.class_ids, "int64")
        count = self.boxes.shape[0]
        for name in ("scores", "class_ids"):
            if tuple(getattr(self, name).shape) != (count,):
                raise ValueError(
                    f"Detections.{name} has shape {tuple(getattr(self, name).shape)}, expected ({count},)"
                )
        if count and (int(self.class_ids.min()) < 0 or int(self.class_ids.max()) >= len(self.category_names)):
            raise ValueError(
                f"Detections.class_ids must lie in [0, {len(self.category_names)}) (len(category_names)), "
                f"got {self.class_ids.tolist()}"
            )
        if self.masks is not None:
            self.masks = convert(self.masks, "bool")
            width, height = self.image_size
            if tuple(self.masks.shape) != (count, height, width):
                raise ValueError(
                    f"Detections.masks has shape {tuple(self.masks.shape)}, expected (N={count}, H={height}, W={width})"
                )

    @classmethod
    def empty(cls, *, category_names: Sequence[str], image_size: tuple[int, int]) -> Detections:
        """No detections (torch tensors, no masks)."""
        return cls(
            boxes=torch.zeros(0, 4),
            scores=torch.zeros(0),
            class_ids=torch.zeros(0, dtype=torch.int64),
            category_names=list(category_names),
            image_size=image_size,
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def categories(self) -> list[str]:
        """The category name of each detection, (N,)."""
        return [self.category_names[i] for i in self.class_ids.tolist()]

    def _replace(self, **fields: Any) -> Detections:
        values = {
            "boxes": self.boxes,
            "scores": self.scores,
            "class_ids": self.class_ids,
            "masks": self.masks,
            "category_names": list(self.category_names),
            "image_size": self.image_size,
        }
        return Detections(**{**values, **fields})

    def _apply(self, fn: Any) -> Detections:
        return self._replace(
            boxes=fn(self.boxes),
            scores=fn(self.scores),
            class_ids=fn(self.class_ids),
            masks=None if self.masks is None else fn(self.masks),
        )

    def __getitem__(self, index: Index) -> Detections:
        count = len(self)
        is_torch = isinstance(self.boxes, torch.Tensor)
        if isinstance(index, torch.Tensor | np.ndarray) and index.ndim == 0:
            index = index.item()
        if isinstance(index, int | np.integer):
            if not -count <= index < count:
                raise IndexError(f"index {index} out of range for {count} detections")
            index = [int(index) % count]
        if not isinstance(index, slice):
            if is_torch:
                index = torch.as_tensor(
                    index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index),
                    device=self.boxes.device,
                )
                is_bool = index.dtype == torch.bool
            else:
                index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
                is_bool = index.dtype == bool
            if is_bool and tuple(index.shape) != (count,):
                raise IndexError(f"bool mask has shape {tuple(index.shape)}, expected ({count},)")
            if not is_bool and len(index) == 0:  # an empty list reads as float; index nothing
                index = index.long() if is_torch else index.astype(np.int64)
        return self._apply(lambda x: x[index])

    def cpu(self) -> Detections:
        """A copy on the CPU (numpy-backed detections are returned unchanged)."""
        if isinstance(self.boxes, np.ndarray):
            return self
        return self._apply(lambda x: x.cpu())

    def to(self, device: torch.device | str) -> Detections:
        """Torch-backed detections on `device`."""
        return self._apply(lambda x: torch.as_tensor(x).to(device))

    def numpy(self) -> Detections:
        """A copy holding numpy arrays (same fields, same dtypes)."""
        return self._apply(
            lambda x: x.detach().cpu().numpy().copy() if isinstance(x, torch.Tensor) else x.copy()
        )

    def plot(
        self,
        image: ImageLike,
        *,
        masks: bool = True,
        labels: bool = True,
        scores: bool = True,
        line_width: int | None = None,
        font_size: int | None = None,
    ) -> np.ndarray:
        """Boxes (one colour per category), masks and "category 0.87" labels over `image`.

        Returns:
            (H, W, 3) uint8 RGB array, the image's exact size.
        """
        data = self.numpy()
        names = data.categories
        texts = [
            (f"{n} {s:.2f}" if scores else n) if labels else ""
            for n, s in zip(names, data.scores, strict=True)
        ]
        return draw_overlay(
            _load_image(image, self.image_size, "Detections"),
            boxes=data.boxes,
            labels=texts,
            colors=[color_for(int(c)) for c in data.class_ids],
            masks=data.masks if masks else None,
            line_width=line_width,
            font_size=font_size,
        )

    def save(self, path: str | Path, image: ImageLike, **plot_kwargs: Any) -> Path:
        """Write `plot(image, **plot_kwargs)` as a PNG; returns the path."""
        return _save_png(self.plot(image, **plot_kwargs), path)

    def to_json(self, *, masks: bool = True) -> list[dict[str, Any]]:
        """`[{"box": [x0, y0, x1, y1], "score", "category", "mask_rle": {"size": [H, W], "counts": str} | None}]`.

        Plain floats and str RLE counts (`json.dumps` works as is); `masks=False` leaves out the `mask_rle` key.
        """
        data = self.numpy()
        records = []
        for i in range(len(data)):
            record = {
                "box": [float(v) for v in data.boxes[i]],
                "score": float(data.scores[i]),
                "category": data.category_names[int(data.class_ids[i])],
            }
            if masks:
                record["mask_rle"] = None if data.masks is None else mask_to_rle(data.masks[i])
            records.append(record)
        return records

    def to_coco(self, image_id: int, category_ids: Sequence[int] | Mapping[int, int]) -> list[dict[str, Any]]:
        """COCO result dicts for `COCO.loadRes` (pass it a copy: loadRes mutates the list).

        Args:
            image_id: the COCO image id.
            category_ids: class id -> COCO category id (a list indexed by class id, or a dict).
        Returns:
            `[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE (when masks)}]`.
        """
        data = self.numpy()
        results = []
        for i in range(len(data)):
            class_id = int(data.class_ids[i])
            try:
                category_id = int(category_ids[class_id])
            except (IndexError, KeyError):
                raise KeyError(
                    f"category_ids has no COCO id for class id {class_id} ({data.category_names[class_id]!r})"
                ) from None
            x0, y0, x1, y1 = (float(v) for v in data.boxes[i])
            result = {
                "image_id": int(image_id),
                "category_id": category_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(data.scores[i]),
            }
            if data.masks is not None:
                result["segmentation"] = mask_to_rle(data.masks[i])
            results.append(result)
        return results


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
    """

    text: str
    raw_text: str
    spans: list[GroundedSpanResult] = field(default_factory=list)
    detections: Detections
    image_size: tuple[int, int]
    agreement: float | None = None
    num_dropped_groups: int = 0

    def __post_init__(self) -> None:
        self.image_size = _check_image_size(self.image_size, "GroundedAnswer")
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
        one colour per category after the span colours), so everything the model found is visible.

        Returns:
            (H, W, 3) uint8 RGB array of the image's exact size; the text panel is drawn
            semi-transparent over the bottom of the image (`panel=False` omits it).
        """
        canvas = _load_image(image, self.image_size, "GroundedAnswer")
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
            for index in range(len(extra)):
                if index in matched:
                    continue
                class_id = int(extra.class_ids[index])
                name = extra.category_names[class_id]
                boxes.append(np.asarray(extra.boxes[index], np.float32))
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
        return _save_png(self.plot(image, **plot_kwargs), path)

    def to_json(self) -> dict[str, Any]:
        """`{"text", "spans": [{"phrase", "box", "score", "category", "mask_rle"}], "detections": [{"box", "score", "category"}]}`.

        Boxes in original pixels; plain floats and str RLE counts, so `json.dumps` works as is.
        """
        return {
            "text": self.text,
            "spans": [span.to_json() for span in self.spans],
            "detections": self.detections.to_json(masks=False),
        }
