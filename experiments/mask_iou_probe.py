"""Mask quality alone (docs/EXPERIMENTS.md E34): every instance of a world prompted to SAM by its true box (the
box-only prompt, as head detections are masked), mean mask IoU against its annotation in original pixels.

    python experiments/mask_iou_probe.py MODEL WORLD_DIR
"""

import sys

import numpy as np
import torch

from grounded_llava.data.coco import load_coco_instances
from grounded_llava.inference.images import load_image
from grounded_llava.inference.predictor import GroundedLlava


@torch.inference_mode()
def main(model_dir: str, world: str) -> None:
    data = load_coco_instances(f"{world}/annotations.json", f"{world}/images")
    predictor = GroundedLlava.from_pretrained(model_dir, device="cpu")
    model = predictor.model
    ious = []
    for record in data.images:
        instances = [i for i in record.non_crowd() if i.has_mask]
        if not instances:
            continue
        pixels, meta = predictor.processor.preprocess_image(load_image(record.path))
        pixel_values = pixels[None]
        pyramid = model.image_pyramid(model.encode_images(pixel_values), pixel_values)
        boxes = torch.tensor([i.box_xyxy for i in instances], dtype=torch.float32)
        logits, _ = model.mask_head(
            model.mask_features(pyramid), torch.zeros(len(instances), dtype=torch.long),
            meta.boxes_to_canvas(boxes), seg_hidden=None, pixels=pixel_values,
        )  # fmt: skip
        for instance, mask_logits in zip(instances, logits, strict=True):
            predicted = meta.mask_from_canvas(mask_logits, box=instance.box_xyxy)
            truth = instance.decode_mask(record.image_size).astype(bool)
            ious.append((predicted & truth).sum() / max((predicted | truth).sum(), 1))
    ious = np.array(ious)
    print(f"{model_dir}: {len(ious)} instances, mean mask IoU {ious.mean():.3f}, "
          f"IoU >= 0.9: {(ious >= 0.9).mean():.3f}, >= 0.75: {(ious >= 0.75).mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:3])
