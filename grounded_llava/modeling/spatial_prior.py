"""`SpatialPrior`: a small conv stem on the canvas pixels beside the vision tower (ViT-Adapter's spatial
prior module), giving the neck the local detail a patch-16 ViT token grid lacks.

Frames: input (I, 3, S, S) normalised canvas pixels; outputs at canvas strides 8, 16 and 32.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    """3x3 conv + GroupNorm + SiLU. GroupNorm, not BatchNorm: batches are a few images and DDP ranks
    must not need synced statistics."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(num_groups=min(8, out_channels), num_channels=out_channels),
        nn.SiLU(),
    )


class SpatialPrior(nn.Module):
    """(I, 3, S, S) -> [(I, C, S/8, S/8), (I, C, S/16, S/16), (I, C, S/32, S/32)], finest first."""

    def __init__(self, *, channels: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv_block(3, width, stride=2),
            conv_block(width, width),
            conv_block(width, 2 * width, stride=2),
            conv_block(2 * width, channels, stride=2),
            conv_block(channels, channels),
        )
        self.down16 = conv_block(channels, channels, stride=2)
        self.down32 = conv_block(channels, channels, stride=2)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        stride8 = self.stem(pixel_values)
        stride16 = self.down16(stride8)
        return [stride8, stride16, self.down32(stride16)]
