"""`VisionNeck`: projected image tokens (+ the spatial prior's pixel features) -> a feature pyramid
(ViTDet's simple pyramid, fused with ViT-Adapter's spatial prior), finest stride first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spatial_prior import conv_block


class VisionNeck(nn.Module):
    """(I, N, D) projected image features on a g x g patch grid (N = g*g, row-major) -> three maps:
    (I, C, 2g, 2g) at stride patch/2, (I, C, g, g) at stride patch, (I, C, ceil(g/2), ceil(g/2)) at stride 2*patch.

    With `prior` maps (`SpatialPrior`, finest first), each level is the sum of the token map and the prior
    map (resized to it when the strides differ, e.g. patch 14), followed by a conv block.
    """

    def __init__(self, *, in_dim: int, channels: int, grid_size: int, with_prior: bool = False) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.input_proj = nn.Sequential(nn.Linear(in_dim, channels), nn.LayerNorm(channels))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, stride=2), conv_block(channels, channels)
        )
        self.mid = conv_block(channels, channels)
        self.down = conv_block(channels, channels, stride=2)
        self.fuse = nn.ModuleList([conv_block(channels, channels) for _ in range(3)]) if with_prior else None

    def forward(
        self, image_features: torch.Tensor, prior: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        count, tokens, _ = image_features.shape
        if tokens != self.grid_size**2:
            raise ValueError(f"VisionNeck expects {self.grid_size**2} image tokens per image, got {tokens}")
        grid = (
            self.input_proj(image_features).transpose(1, 2).reshape(count, -1, self.grid_size, self.grid_size)
        )
        levels = [self.up(grid), self.mid(grid), self.down(grid)]
        if (prior is None) != (self.fuse is None):
            raise ValueError("VisionNeck: prior maps are given iff the neck was built with_prior")
        if prior is None:
            return levels
        fused = []
        for level, extra, fuse in zip(levels, prior, self.fuse, strict=True):
            if extra.shape[-2:] != level.shape[-2:]:
                extra = F.interpolate(extra, size=level.shape[-2:], mode="bilinear", align_corners=False)
            fused.append(fuse(level + extra.to(level.dtype)))
        return fused
