"""The scene line at inference (`scene_line.py`): the head's detections and their attribute, as words."""

from __future__ import annotations

import torch

from grounded_llava.inference.head_results import category_names
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
from grounded_llava.scene_line import SeenObject, scene_line


@torch.inference_mode()
def scene_lines(
    model: GroundedLlavaForConditionalGeneration, pyramid: list[torch.Tensor], pixel_values: torch.Tensor
) -> list[str]:
    """One scene line per image: the Detect head's detections (score >= `scene_conf_threshold`, one box per
    object: class-agnostic NMS) named by class and, with an attribute head, by attribute.

    pyramid: the neck's maps of I images; pixel_values: (I, 3, S, S) their canvases (the attribute head
    reads their colour)."""
    heads = model.config.heads
    rows = model.detection_head.postprocess(
        model.detection_head(pyramid),
        conf_threshold=model.config.scene_conf_threshold,
        iou_threshold=heads.nms_iou,
        agnostic=True,
    )
    names = category_names(model)
    counts = [len(r) for r in rows]
    values: list[str | None] = [None] * sum(counts)
    if model.attribute_head is not None and values:
        images = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)])
        boxes = torch.cat([r[:, :4] for r in rows])
        logits = model.attribute_head(
            model.pointer_features(pyramid, pixel_values), images.to(boxes.device), boxes
        )
        values = [heads.attribute_values[v] for v in logits.argmax(-1).tolist()]
    listed_values = heads.attribute_values if model.attribute_head is not None else ()
    lines, start = [], 0
    for r, n in zip(rows, counts, strict=True):
        seen = [
            SeenObject(names[int(row[5])], value, (row[0] + row[2]) / 2)
            for row, value in zip(r.float().tolist(), values[start : start + n], strict=True)
        ]
        lines.append(scene_line(seen, kinds=names, attribute_values=listed_values))
        start += n
    return lines
