"""How often the attribute head names an object's colour right: on each annotated object's true box, and on
the scene line's own boxes (the detections the line names, matched to a true box at IoU >= 0.5).

    python experiments/attribute_accuracy.py MODEL WORLD_DIR

Prints the accuracy on true boxes, the confusions (true -> said) and the share of true objects that the
line names with the right kind and colour (docs/EXPERIMENTS.md E37).
"""

import collections
import sys

import torch
from PIL import Image
from torchvision.ops import box_iou

from grounded_llava.data.coco import load_coco_instances
from grounded_llava.inference.checkpoint_paths import load_grounded_model


@torch.inference_mode()
def main(model_dir: str, world: str) -> None:
    model = load_grounded_model(model_dir).eval()
    heads, processor = model.config.heads, model.processor
    right, confusions, named_right, objects = 0, collections.Counter(), 0, 0
    for record in load_coco_instances(f"{world}/annotations.json", f"{world}/images").images:
        instances = record.non_crowd()
        if not instances:
            continue
        conversation = [{"from": "human", "value": "<image>\nHi"}]
        batch = processor.collate(
            [processor.encode_conversation(conversation, Image.open(record.path), add_generation_prompt=True)]
        )
        pixels = batch.pixel_values
        pyramid = model.image_pyramid(model.encode_images(pixels), pixels)
        region_map = model.pointer_features(pyramid, pixels)
        truth = torch.as_tensor(
            batch.image_metas[0].boxes_to_canvas(torch.tensor([i.box_xyxy for i in instances])),
            dtype=torch.float32,
        )
        said = model.attribute_head(region_map, torch.zeros(len(truth), dtype=torch.long), truth).argmax(-1)
        colours = [i.attributes["color"] for i in instances]
        for colour, value in zip(colours, said.tolist(), strict=True):
            right += heads.attribute_values[value] == colour
            if heads.attribute_values[value] != colour:
                confusions[(colour, heads.attribute_values[value])] += 1
        rows = model.detection_head.postprocess(
            model.detection_head(pyramid), conf_threshold=model.config.scene_conf_threshold,
            iou_threshold=heads.nms_iou, agnostic=True,
        )[0].float()  # fmt: skip
        if len(rows):
            line_colours = model.attribute_head(
                region_map, torch.zeros(len(rows), dtype=torch.long), rows[:, :4]
            ).argmax(-1)
            iou = box_iou(truth, rows[:, :4])
            for t, instance in enumerate(instances):
                d = int(iou[t].argmax())
                named_right += bool(
                    iou[t, d] >= 0.5
                    and heads.categories[int(rows[d, 5])] == instance.category_name
                    and heads.attribute_values[int(line_colours[d])] == colours[t]
                )
        objects += len(instances)
    print(f"attribute accuracy on true boxes: {right} / {objects} = {right / objects:.3f}")
    print("confusions (true -> said):", dict(confusions.most_common(8)))
    print(f"objects the line names with the right kind and colour: {named_right / objects:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
