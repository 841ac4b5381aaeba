"""`build_heads`: everything outside LLaVA, sized from `HeadSettings` and the vision tower's geometry."""

from __future__ import annotations

from torch import nn

from ..config import HeadSettings
from .attributes import AttributeHead
from .copy_head import CopyHead
from .detection import DetectionHead
from .masks import MaskHead
from .neck import VisionNeck
from .pointer import ProposalPointer
from .region_tokens import RegionTokenEncoder
from .spatial_prior import SpatialPrior

OPTIONAL_PARTS = ("spatial_prior", "region_encoder", "chooser", "attribute_head", "copy_head")
"""The parts `build_heads` makes only when the settings ask for them (the model holds None otherwise)."""


def build_heads(
    heads: HeadSettings,
    *,
    num_classes: int,
    text_hidden_size: int,
    grid_size: int,
    canvas_size: int,
    patch_size: int,
    region_tokens: bool = False,
    copy_head: bool = False,
) -> nn.ModuleDict:
    """The heads, sized from `heads` and the vision tower's geometry: "neck" (LLM-space image tokens ->
    pyramid at strides patch/2, patch, 2*patch), "spatial_prior" (pixels -> the same strides; when
    `heads.spatial_prior`), "detection_head" (Detect), "mask_head" (SAM), "pointer" (`<box>` -> proposal)
    "region_encoder" (proposals -> LLM input tokens; when `region_tokens`) and "chooser" (the choice
    pointer; when `heads.chooser`), "attribute_head" (when `heads.attribute`) and "copy_head" (the LM's copy
    route; when `copy_head`)."""
    channels = heads.neck_channels
    strides = (patch_size / 2, float(patch_size), patch_size * 2.0)
    mask_level = 0 if heads.mask_from_finest else 1
    parts = nn.ModuleDict(
        {
            "neck": VisionNeck(
                in_dim=text_hidden_size,
                channels=channels,
                grid_size=grid_size,
                with_prior=bool(heads.spatial_prior),
            ),
            "detection_head": DetectionHead(
                num_classes=num_classes,
                channels=channels,
                strides=strides,
                canvas_size=canvas_size,
                reg_max=heads.reg_max,
                gains=(heads.box_gain, heads.cls_gain, heads.dfl_gain),
            ),
            "mask_head": MaskHead(
                channels=channels,
                grid_size=grid_size * 2 if mask_level == 0 else grid_size,
                canvas_size=canvas_size,
                text_hidden_size=text_hidden_size,
                depth=heads.mask_decoder_depth,
                num_heads=heads.mask_decoder_heads,
                mlp_dim=heads.mask_decoder_mlp_dim,
                seg_mlp_hidden=heads.seg_mlp_hidden,
                crop=heads.mask_crop,
                pixels=heads.mask_pixels,
            ),
        }
    )
    if heads.spatial_prior:
        parts["spatial_prior"] = SpatialPrior(channels=channels, stem=heads.spatial_prior)
    # built last, so that its size (a query change) leaves the other heads' initialisation as it was
    parts["pointer"] = ProposalPointer(
        channels=channels + 3,  # + the canvas colour (`pointer_features`)
        text_hidden_size=text_hidden_size,
        canvas_size=canvas_size,
        stride=strides[0],
        dim=heads.pointer_dim,
    )
    if region_tokens:
        parts["region_encoder"] = RegionTokenEncoder(
            channels=channels + 3,  # the pointer's map (`pointer_features`)
            text_hidden_size=text_hidden_size,
            canvas_size=canvas_size,
            stride=strides[0],
            num_classes=num_classes,
        )
    if heads.attribute:  # one attribute of every box (`heads.attribute`), built after the others likewise
        parts["attribute_head"] = AttributeHead(
            channels=channels + 3, num_values=len(heads.attribute_values), canvas_size=canvas_size,
            stride=strides[0],
        )  # fmt: skip
    if copy_head:
        parts["copy_head"] = CopyHead(text_hidden_size)
    if heads.chooser:  # the choice pointer (`GroundedLlava.add_chooser`), built last for the same reason
        parts["chooser"] = parts["pointer"].fresh_copy(reads="words")
    return parts
