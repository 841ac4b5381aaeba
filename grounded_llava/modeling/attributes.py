"""`AttributeHead`: one attribute of every box (e.g. its colour), as BUTD's detector labels attributes.

It reads what the pointer reads of a region (`pointer.region_inputs`: the finest neck level and the
canvas colour roi-aligned in the box, and the box geometry) and scores the values of one annotation
attribute (`heads.attribute`, e.g. "color" over `heads.attribute_values`). The heads stages train it on
every annotated instance (true boxes, jittered) on the detached map (it reads the detector's features, it
does not shape them; 2 x 2 cells and 64 units: ~0.1 MB, the shipped checkpoint's budget); inference labels the head's detections with it, for the
scene line (`scene_line.py`) and the detections' results. Boxes are xyxy canvas pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pointer import box_regions

IGNORE = -1
"""Attribute target of a box whose annotation has no (known) value: it teaches nothing."""


class AttributeHead(nn.Module):
    """(I, C, h, w) region map + M boxes of its images -> (M, V) logits over the attribute's values."""

    def __init__(self, *, channels: int, num_values: int, canvas_size: int, stride: float, pool: int = 2,
                 dim: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.canvas_size, self.stride, self.pool = canvas_size, stride, pool
        self.mlp = nn.Sequential(
            nn.Linear(channels * pool * pool + 9, dim),
            nn.LayerNorm(dim),
            nn.GELU(),
            nn.Linear(dim, num_values),
        )

    def forward(self, region_map: torch.Tensor, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """region_map (I, C, h, w) at `stride`; images (M,) long, each box's image; boxes (M, 4) canvas px."""
        if boxes.shape[0] == 0:
            return region_map.new_zeros((0, self.mlp[-1].out_features))
        pooled, geometry = box_regions(
            region_map, images, boxes, boxes.new_ones(boxes.shape[0]), pool=self.pool, stride=self.stride,
            canvas_size=self.canvas_size,
        )  # fmt: skip
        return self.mlp(torch.cat([pooled, geometry.to(pooled.dtype)], dim=-1))


def attribute_loss(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Cross-entropy over the boxes with a known value (`IGNORE` elsewhere) and its accuracy; (None, None)
    when no box has one."""
    known = targets != IGNORE
    if not bool(known.any()):
        return None, None
    loss = F.cross_entropy(logits[known].float(), targets[known])
    accuracy = (logits[known].argmax(-1) == targets[known]).float().mean()
    return loss, accuracy.detach()
