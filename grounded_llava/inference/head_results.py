"""The Detect head's raw outputs as results: per image `Detections` in original pixels, with SAM masks
prompted by each box alone when asked. Used by `GroundedLlava.detect` and by every chat answer."""

from __future__ import annotations

import numpy as np
import torch

from grounded_llava.image_meta import ImageMeta
from grounded_llava.inference.detections import Detections
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration


def category_names(model: GroundedLlavaForConditionalGeneration) -> list[str]:
    """The detection label space (class id = index); "object" for a class-agnostic head."""
    return list(model.config.heads.categories) or ["object"]


def head_detections(
    model: GroundedLlavaForConditionalGeneration,
    predictions: dict,
    pyramid: list[torch.Tensor],
    pixel_values: torch.Tensor,
    metas: list[ImageMeta],
    *,
    masks: bool,
    conf_threshold: float | None = None,
) -> list[Detections]:
    """Raw Detect predictions -> per image `Detections` (original pixels; boxes left empty by clipping dropped).
    `pyramid` and `pixel_values` (I, 3, S, S) are what the masks read (`masks`: SAM prompted by each box)."""
    heads = model.config.heads
    threshold = heads.conf_threshold if conf_threshold is None else conf_threshold
    raw = model.detection_head.postprocess(predictions, conf_threshold=threshold, iou_threshold=heads.nms_iou)
    kept = []
    for pred, meta in zip(raw, metas, strict=True):
        pred = pred.float()
        boxes = meta.boxes_from_canvas(pred[:, :4])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        kept.append((pred[keep], boxes[keep]))
    mask_arrays = box_only_masks(model, pyramid, pixel_values, kept, metas) if masks else None
    return [
        Detections(
            boxes=boxes.cpu().numpy(),  # numpy out, as ultralytics' Results.numpy() (spans' boxes too)
            scores=pred[:, 4].cpu().numpy(),
            class_ids=pred[:, 5].long().cpu().numpy(),
            category_names=category_names(model),
            image_size=meta.original_size,
            masks=None if mask_arrays is None else mask_arrays[i],
        )
        for i, ((pred, boxes), meta) in enumerate(zip(kept, metas, strict=True))
    ]


def box_only_masks(
    model: GroundedLlavaForConditionalGeneration,
    pyramid: list[torch.Tensor],
    pixel_values: torch.Tensor,
    kept: list[tuple[torch.Tensor, ...]],
    metas: list[ImageMeta],
) -> list[np.ndarray]:
    """SAM masks prompted by boxes alone (the decoder's box-only embedding): per image (n, H, W) bool.
    `kept`: per image, its detections (n, 6) (xyxy canvas px first) and their (n, 4) original-frame boxes."""
    device = pyramid[0].device
    boxes_canvas = [pred[:, :4] for pred, _ in kept]
    index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes_canvas)])
    boxes = torch.cat(boxes_canvas).to(device, model.heads_dtype)
    features = model.mask_features(pyramid)
    logits, _ = model.mask_head(features, index.to(device), boxes, seg_hidden=None, pixels=pixel_values)
    return [
        np.stack([meta.mask_from_canvas(m, box=b.tolist()) for m, b in zip(image_logits, original, strict=True)])
        if len(image_logits) else np.zeros((0, meta.original_size[1], meta.original_size[0]), dtype=bool)
        for image_logits, (_, original), meta in zip(
            logits.split([len(b) for b in boxes_canvas]), kept, metas, strict=True
        )
    ]  # fmt: skip
