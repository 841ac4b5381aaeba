"""`RegionTokenEncoder`: the head's proposals as LLM input tokens (Groma's region tokens).

After the pooled patch grid, the LLM reads one token per class-agnostic proposal of the detection head
(the same top-K, best first, that a `<box>` points at): the neck features roi-aligned in the box, the
box geometry and the head's score, projected to the LLM's hidden size. The LLM then sees objects, not
only patches: what is there, how many, where. Padding slots (fewer proposals than K) get a learned
"empty" token. Frames: proposal boxes are xyxy canvas pixels; the map is at `stride` canvas pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from .pointer import Proposals, region_inputs


class RegionTokenEncoder(nn.Module):
    """(I, C, h, w) map + K proposals per image -> (I, K, D_text) region tokens for the LLM input."""

    def __init__(
        self, *, channels: int, text_hidden_size: int, canvas_size: int, stride: float, pool: int = 4,
        dim: int = 256,
    ) -> None:  # fmt: skip
        super().__init__()
        self.canvas_size = canvas_size
        self.stride = stride
        self.pool = pool
        self.appearance = nn.Sequential(
            nn.Linear(channels * pool * pool, dim),
            nn.LayerNorm(dim),
            nn.GELU(),
            nn.Linear(dim, text_hidden_size),
        )
        self.geometry = nn.Sequential(nn.Linear(9, dim), nn.GELU(), nn.Linear(dim, text_hidden_size))
        self.empty = nn.Parameter(torch.zeros(text_hidden_size))

    def forward(self, feature_map: torch.Tensor, proposals: Proposals) -> torch.Tensor:
        pooled, geometry = region_inputs(
            feature_map, proposals, pool=self.pool, stride=self.stride, canvas_size=self.canvas_size
        )
        tokens = self.appearance(pooled) + self.geometry(geometry)
        return torch.where(proposals.valid[..., None], tokens, self.empty.to(tokens.dtype))
