"""The detection head's results on one image: `Detections` (boxes, scores, classes, optional masks).

Frames: every box is xyxy in ORIGINAL image pixels; masks are bool at original image size;
`image_size` is (W, H). In JSON, masks are COCO RLE (`grounded_llava.rle`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from grounded_llava.inference.overlay import ImageLike, color_for, draw_overlay, to_rgb_array
from grounded_llava.rle import mask_to_rle

Array = torch.Tensor | np.ndarray
Index = int | slice | Sequence[int] | Sequence[bool] | np.ndarray | torch.Tensor


def check_image_size(image_size: Sequence[int], owner: str) -> tuple[int, int]:
    if len(image_size) != 2 or any(int(v) != v or v <= 0 for v in image_size):
        raise ValueError(f"{owner}.image_size must be (W, H) positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def load_image_of_size(image: ImageLike, image_size: tuple[int, int], owner: str) -> np.ndarray:
    array = to_rgb_array(image)
    if (array.shape[1], array.shape[0]) != image_size:
        raise ValueError(
            f"image is (W={array.shape[1]}, H={array.shape[0]}) but {owner} is for image_size (W, H)={image_size}"
        )
    return array


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@dataclass
class Detections:
    """Every instance the detection head found in one image (ultralytics Results / detectron2 Instances style).

    Holds numpy arrays or torch tensors (`.numpy()` / `.cpu()` convert; the predictor returns numpy, as
    ultralytics' `Results.numpy()` and the spans' boxes). Indexing with an int,
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
        self.image_size = check_image_size(self.image_size, "Detections")
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
            (H, W, 3) uint8 RGB array, the image's exact size (no text panel).
        """
        data = self.numpy()
        names = data.categories
        texts = [
            (f"{n} {s:.2f}" if scores else n) if labels else ""
            for n, s in zip(names, data.scores, strict=True)
        ]
        return draw_overlay(
            load_image_of_size(image, self.image_size, "Detections"),
            boxes=data.boxes,
            labels=texts,
            colors=[color_for(int(c)) for c in data.class_ids],
            masks=data.masks if masks else None,
            line_width=line_width,
            font_size=font_size,
        )

    def save(self, path: str | Path, image: ImageLike, **plot_kwargs: Any) -> Path:
        """Write `plot(image, **plot_kwargs)` as a PNG; returns the path."""
        return save_png(self.plot(image, **plot_kwargs), path)

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

    def to_coco(
        self, image_id: int = 0, category_ids: Sequence[int] | Mapping[int, int] | None = None
    ) -> list[dict[str, Any]]:
        """COCO result dicts for `COCO.loadRes` (pass it a copy: loadRes mutates the list).

        Args:
            image_id: the COCO image id.
            category_ids: class id -> COCO category id (a list indexed by class id, or a dict); None: class
                id + 1 (COCO's ids start at 1).
        Returns:
            `[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE (when masks)}]`.
        """
        data = self.numpy()
        if category_ids is None:
            category_ids = range(1, len(data.category_names) + 1)
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
