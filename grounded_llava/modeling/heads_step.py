"""The heads stage's step: Detect and SAM trained on every box and every instance mask, without the LLM."""

from __future__ import annotations

import torch

from .attributes import attribute_loss
from .detection import DetectionTargets
from .outputs import GroundedLlavaOutput


def heads_losses(
    model,
    *,
    pixel_values: torch.Tensor,
    det_targets: DetectionTargets,
    mask_image: torch.Tensor,
    mask_boxes: torch.Tensor,
    mask_targets: torch.Tensor,
    attribute_image: torch.Tensor | None = None,
    attribute_boxes: torch.Tensor | None = None,
    attribute_targets: torch.Tensor | None = None,
) -> GroundedLlavaOutput:
    """The heads stage's step, without the LLM: Detect on every box, SAM on every instance mask.

    Args:
        pixel_values: (I, 3, S, S) canvas pixels. det_targets: every instance of the images.
        mask_image: (M,) image of each mask prompt; mask_boxes: (M, 4) xyxy canvas px (jittered true
            boxes); mask_targets: (M, r, r) {0, 1} canvas-frame masks (r = `mask_head.mask_resolution`).
        attribute_image (A,), attribute_boxes (A, 4) xyxy canvas px (jittered true boxes), attribute_targets
            (A,) value ids (`attributes.IGNORE`: unknown): the attribute head's, when the model has one.
    """
    features = model.encode_images(pixel_values)
    pyramid = model.image_pyramid(features, pixel_values)
    out = GroundedLlavaOutput(image_features=features, pyramid=pyramid)
    out.detections = model.detection_head(pyramid)
    out.det_loss = model.detection_head.loss(out.detections, det_targets)
    prediction = model.mask_head.predict(
        model.mask_features(pyramid),
        mask_image,
        mask_boxes.to(model.heads_dtype),
        seg_hidden=None,
        pixels=pixel_values,
    )
    out.mask_scores = prediction.iou  # no canvas paste: the loss reads the masks in their frames
    loss = model.config.loss
    out.mask_loss = model.mask_head.loss(
        prediction, mask_targets, bce_weight=loss.mask_bce, dice_weight=loss.mask_dice
    )
    out.loss = loss.det * out.det_loss + out.mask_loss
    if model.attribute_head is not None and attribute_targets is not None:
        # detached: the attribute's loss does not pull on the neck (it cost v31's detector 0.1 AP50, E36)
        region_map = model.pointer_features(pyramid, pixel_values).detach()
        logits = model.attribute_head(region_map, attribute_image, attribute_boxes)
        out.attribute_loss, out.attribute_accuracy = attribute_loss(logits, attribute_targets)
        if out.attribute_loss is not None:
            out.loss = out.loss + out.attribute_loss
    return out
