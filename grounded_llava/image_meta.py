"""Image -> model canvas (pad to square with the mean colour, resize) and the coordinate mapping back.

Frames: *original* pixels of the user's image (W, H); *canvas* pixels of the square model input
(S, S). The image is pasted centred on a (L, L) square, L = max(W, H), then resized to S:
    x_canvas = (x + pad_x) * S / L,   y_canvas = (y + pad_y) * S / L
with integer paste offsets pad_x = (L - W) // 2, pad_y = (L - H) // 2 (as LLaVA's expand2square).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class ImageMeta:
    """How one original image sits on the model canvas."""

    original_size: tuple[int, int]
    """(W, H) of the original image."""
    canvas_size: int
    """S, the side of the square model input."""

    def __post_init__(self) -> None:
        width, height = self.original_size
        if width <= 0 or height <= 0:
            raise ValueError(f"empty image: size (W={width}, H={height})")

    @property
    def side(self) -> int:
        return max(self.original_size)

    @property
    def scale(self) -> float:
        """Canvas pixels per original pixel."""
        return self.canvas_size / self.side

    @property
    def pad(self) -> tuple[int, int]:
        """(pad_x, pad_y): offset of the image on the (L, L) square, in original pixels."""
        width, height = self.original_size
        return (self.side - width) // 2, (self.side - height) // 2

    def boxes_to_canvas(self, boxes_xyxy: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(..., 4) xyxy original pixels -> (..., 4) xyxy canvas pixels."""
        pad_x, pad_y = self.pad
        offset = [pad_x, pad_y, pad_x, pad_y]
        offset = (
            torch.tensor(offset, dtype=boxes_xyxy.dtype) if torch.is_tensor(boxes_xyxy) else np.array(offset)
        )
        return (boxes_xyxy + offset) * self.canvas_size / self.side

    def boxes_from_canvas(self, boxes_canvas: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(..., 4) xyxy canvas pixels -> (..., 4) xyxy original pixels, clipped to the image."""
        pad_x, pad_y = self.pad
        width, height = self.original_size
        if torch.is_tensor(boxes_canvas):
            offset = torch.tensor(
                [pad_x, pad_y, pad_x, pad_y], dtype=boxes_canvas.dtype, device=boxes_canvas.device
            )
            limit = torch.tensor(
                [width, height, width, height], dtype=boxes_canvas.dtype, device=boxes_canvas.device
            )
            return (boxes_canvas / self.scale - offset).clamp(min=torch.zeros_like(limit), max=limit)
        boxes = np.asarray(boxes_canvas, dtype=np.float64) / self.scale - np.array(
            [pad_x, pad_y, pad_x, pad_y]
        )
        return np.clip(boxes, 0, [width, height, width, height])

    def fractions_to_canvas(self, boxes_norm: torch.Tensor) -> torch.Tensor:
        """(..., 4) xyxy fractions of the original image -> (..., 4) xyxy canvas pixels."""
        width, height = self.original_size
        size = torch.tensor([width, height, width, height], dtype=boxes_norm.dtype, device=boxes_norm.device)
        return self.boxes_to_canvas(boxes_norm * size)

    def image_region_on_canvas(self, resolution: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) integer window of a (resolution, resolution) canvas map covered by the image."""
        width, height = self.original_size
        pad_x, pad_y = self.pad
        factor = resolution / self.side
        x0, y0 = round(pad_x * factor), round(pad_y * factor)
        x1, y1 = round((pad_x + width) * factor), round((pad_y + height) * factor)
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    def mask_from_canvas(self, mask_logits: torch.Tensor, box: Sequence[float] | None = None) -> np.ndarray:
        """(h, w) mask logits over the whole canvas (any square resolution) -> (H, W) bool, original frame.

        `box` (xyxy original pixels, the box that prompted the mask): pixels whose centre lies outside it are
        False. An object lies inside its box; the decoder's spill beyond it cost RES ~0.01 (E27)."""
        resolution = mask_logits.shape[-1]
        x0, y0, x1, y1 = self.image_region_on_canvas(resolution)
        crop = mask_logits[y0:y1, x0:x1].float()[None, None]
        width, height = self.original_size
        resized = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        mask = (resized > 0).cpu().numpy()
        if box is not None:
            x, y = np.arange(width) + 0.5, np.arange(height) + 0.5  # pixel centres
            mask &= ((y >= box[1]) & (y <= box[3]))[:, None] & ((x >= box[0]) & (x <= box[2]))
        return mask

    def mask_to_canvas(self, mask: np.ndarray, resolution: int) -> torch.Tensor:
        """(H, W) bool mask, original frame -> (resolution, resolution) float {0, 1} mask on the canvas."""
        height, width = mask.shape
        if (width, height) != self.original_size:
            raise ValueError(
                f"mask of shape (H={height}, W={width}) does not match the image size {self.original_size}"
            )
        x0, y0, x1, y1 = self.image_region_on_canvas(resolution)
        tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        resized = F.interpolate(tensor, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0]
        canvas = torch.zeros(resolution, resolution)
        canvas[y0:y1, x0:x1] = (resized >= 0.5).float()
        return canvas


def pad_to_square_and_resize(
    image: Image.Image, canvas_size: int, fill_rgb: tuple[int, int, int]
) -> Image.Image:
    """Paste `image` centred on a square of its longest side filled with `fill_rgb`, then resize to the canvas."""
    image = image.convert("RGB")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"empty image: size (W={width}, H={height})")
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill_rgb)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square.resize((canvas_size, canvas_size), Image.Resampling.BICUBIC)
