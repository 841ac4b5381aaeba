"""`SpatialPrior`: a small conv stem on the canvas pixels beside the vision tower (ViT-Adapter's spatial
prior module), giving the neck the local detail a patch-16 ViT token grid lacks.

Two stems (config `heads.spatial_prior`):
- "patchify" (default): a 4x4 stride-4 conv (each stride-4 cell holds its 4x4 pixels: 48 values in 48
  channels) and two 3x3 convs at stride 8; ~125 M multiply-adds per 224 px image.
- "conv" (the first models): a ResNet-like stem of five 3x3 convs from stride 2 to 8, ~313 M
  multiply-adds, most of them at stride 2 (docs/EXPERIMENTS.md E32).

Frames: input (I, 3, S, S) normalised canvas pixels; outputs at canvas strides 8, 16 and 32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PriorStem = Literal["patchify", "conv"]
STEMS: tuple[str, ...] = ("patchify", "conv")


def conv_block(in_channels: int, out_channels: int, *, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """kxk conv + GroupNorm + SiLU. GroupNorm, not BatchNorm: batches are a few images and DDP ranks
    must not need synced statistics. A stride-k kxk conv (kernel == stride) patchifies."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=0 if kernel == stride else kernel // 2,
            bias=False,
        ),  # fmt: skip
        nn.GroupNorm(num_groups=min(8, out_channels), num_channels=out_channels),
        nn.SiLU(),
    )


def _stem(kind: PriorStem, channels: int) -> nn.Sequential:
    """(I, 3, S, S) -> (I, channels, S/8, S/8)."""
    if kind == "patchify":
        return nn.Sequential(
            conv_block(3, 48, stride=4, kernel=4),
            conv_block(48, channels, stride=2),
            conv_block(channels, channels),
        )
    if kind == "conv":
        width = 32
        return nn.Sequential(
            conv_block(3, width, stride=2),
            conv_block(width, width),
            conv_block(width, 2 * width, stride=2),
            conv_block(2 * width, channels, stride=2),
            conv_block(channels, channels),
        )
    raise ValueError(f"unknown spatial prior stem {kind!r}: expected one of {STEMS}")


class SpatialPrior(nn.Module):
    """(I, 3, S, S) -> [(I, C, S/8, S/8), (I, C, S/16, S/16), (I, C, S/32, S/32)], finest first."""

    def __init__(self, *, channels: int, stem: PriorStem = "patchify") -> None:
        super().__init__()
        self.stem = _stem(stem, channels)
        self.down16 = conv_block(channels, channels, stride=2)
        self.down32 = conv_block(channels, channels, stride=2)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        stride8 = self.stem(pixel_values)
        stride16 = self.down16(stride8)
        return [stride8, stride16, self.down32(stride16)]
