"""`RegionTokenEncoder`: the head's proposals as LLM input tokens (Groma's region tokens).

After the pooled patch grid, the LLM reads one token per class-agnostic proposal of the detection head
(the same top-K, best first, that a `<box>` points at): the neck features roi-aligned in the box, the
box geometry and the head's score, projected to the LLM's hidden size and layer-normalised (no affine:
every element ~ unit variance), plus a learned embedding of the head's class for the box weighted by its
score, initialised at the same scale. Unnormalised, the projected appearance grew to ~50x the label's
norm (docs/EXPERIMENTS.md E25). The LLM then sees objects, not only patches: what is
there (the detector's label, which a small LM cannot infer from appearance alone), how many, where.
Padding slots (fewer proposals than K) get a learned "empty" token. Frames: proposal boxes are xyxy
canvas pixels; the map is at `stride` canvas pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from .pointer import Proposals, region_inputs

LABEL_INIT_STD = 1.0
"""Initial std of the class-label rows: the normalised content's per-element scale, so that a confident
proposal's label is as loud as its appearance and geometry together."""


class RegionTokenEncoder(nn.Module):
    """(I, C, h, w) map + K proposals per image -> (I, K, D_text) region tokens for the LLM input."""

    def __init__(
        self, *, channels: int, text_hidden_size: int, canvas_size: int, stride: float, num_classes: int,
        pool: int = 4, dim: int = 256,
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
        self.content_norm = nn.LayerNorm(text_hidden_size, elementwise_affine=False)
        self.labels = nn.Embedding(num_classes, text_hidden_size)
        nn.init.normal_(self.labels.weight, std=LABEL_INIT_STD)
        self.empty = nn.Parameter(torch.zeros(text_hidden_size))

    def grow_classes(self, num_classes: int) -> None:
        """New label rows for added categories (random, at the old rows' initial scale); the old rows are
        kept exactly."""
        old = self.labels.num_embeddings
        if num_classes <= old:
            return
        grown = nn.Embedding(num_classes, self.labels.embedding_dim).to(
            self.labels.weight.device, self.labels.weight.dtype
        )
        with torch.no_grad():
            grown.weight[:old] = self.labels.weight
            grown.weight[old:].normal_(0.0, LABEL_INIT_STD)
        self.labels = grown

    def forward(self, feature_map: torch.Tensor, proposals: Proposals) -> torch.Tensor:
        pooled, geometry = region_inputs(
            feature_map, proposals, pool=self.pool, stride=self.stride, canvas_size=self.canvas_size
        )
        tokens = self.content_norm(self.appearance(pooled) + self.geometry(geometry))
        if proposals.class_ids is not None:
            tokens = tokens + proposals.scores[..., None].to(tokens.dtype) * self.labels(proposals.class_ids)
        return torch.where(proposals.valid[..., None], tokens, self.empty.to(tokens.dtype))
