"""`VisionNeck`: projected image tokens -> a simple feature pyramid (ViTDet style), finest stride first."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: batches are a few images and DDP ranks must not need synced statistics.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(num_groups=min(8, out_channels), num_channels=out_channels),
        nn.SiLU(),
    )


class VisionNeck(nn.Module):
    """(I, N, D) projected image features on a g x g patch grid (N = g*g, row-major) -> three maps:
    (I, C, 2g, 2g) at stride patch/2, (I, C, g, g) at stride patch, (I, C, ceil(g/2), ceil(g/2)) at stride 2*patch.
    """

    def __init__(self, *, in_dim: int, channels: int, grid_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.input_proj = nn.Sequential(nn.Linear(in_dim, channels), nn.LayerNorm(channels))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, stride=2), _conv_block(channels, channels)
        )
        self.mid = _conv_block(channels, channels)
        self.down = _conv_block(channels, channels, stride=2)

    def forward(self, image_features: torch.Tensor) -> list[torch.Tensor]:
        count, tokens, _ = image_features.shape
        if tokens != self.grid_size**2:
            raise ValueError(f"VisionNeck expects {self.grid_size**2} image tokens per image, got {tokens}")
        grid = (
            self.input_proj(image_features).transpose(1, 2).reshape(count, -1, self.grid_size, self.grid_size)
        )
        return [self.up(grid), self.mid(grid), self.down(grid)]
