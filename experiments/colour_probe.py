"""Is an object's colour linearly decodable from its region token, and from the pooled region input?

A linear softmax probe is fitted on the objects of WORLD's first 250 images that a head proposal matches
(IoU >= 0.5) and scored on a held-out world's 60 (docs/EXPERIMENTS.md E26).

    python experiments/colour_probe.py MODEL WORLD HELD_OUT_WORLD
"""

import sys

import torch
from PIL import Image

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.modeling.pointer import region_inputs
from grounded_llava.modeling.region_feedback import cited_proposals


@torch.no_grad()
def collect(model, world: str, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, D) region tokens, (N, P) pooled region inputs and the colours of the N matched objects."""
    processor, encoder = model.processor, model.region_encoder
    tokens, pooled_inputs, colours = [], [], []
    for record in load_coco_instances(f"{world}/annotations.json", f"{world}/images").images[:count]:
        instances = record.non_crowd()
        if not instances:
            continue
        conversation = [{"from": "human", "value": "<image>\nHi"}]
        encoded = processor.encode_conversation(conversation, Image.open(record.path).convert("RGB"))
        batch = processor.collate([encoded])
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        proposals = model.proposals(model.detection_head(pyramid))
        region_map = model.pointer_features(pyramid, batch.pixel_values)
        region_tokens = model.region_tokens(region_map, proposals)
        pooled, _ = region_inputs(
            region_map, proposals, pool=encoder.pool, stride=encoder.stride, canvas_size=model.canvas_size
        )
        boxes = torch.as_tensor(
            batch.image_metas[0].boxes_to_canvas(torch.tensor([i.box_xyxy for i in instances]))
        )
        cited = cited_proposals(proposals, torch.zeros(len(instances), dtype=torch.long), boxes)
        for instance, k in zip(instances, cited.tolist(), strict=True):
            if k >= 0:
                tokens.append(region_tokens[0, k])
                pooled_inputs.append(pooled[0, k])
                colours.append(instance.attributes["color"])
    return torch.stack(tokens), torch.stack(pooled_inputs), colours


def probe_accuracy(
    train: torch.Tensor, train_y: list[str], test: torch.Tensor, test_y: list[str]
) -> tuple[float, float]:
    """Train and held-out accuracy of a linear softmax probe (standardised inputs, Adam, weight decay)."""
    names = sorted(set(train_y))
    y_train = torch.tensor([names.index(y) for y in train_y])
    y_test = torch.tensor([names.index(y) if y in names else -1 for y in test_y])
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    linear = torch.nn.Linear(train.shape[1], len(names))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return tuple(
            float((linear(x).argmax(1) == y).float().mean()) for x, y in ((train, y_train), (test, y_test))
        )


def main(model_dir: str, world: str, held_out: str) -> None:
    model = GroundedLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    tokens, pooled, colours = collect(model, world, 250)
    test_tokens, test_pooled, test_colours = collect(model, held_out, 60)
    for name, train, test in (("region token", tokens, test_tokens), ("pooled input", pooled, test_pooled)):
        fit, held = probe_accuracy(train, colours, test, test_colours)
        print(f"{name}: train {fit:.3f}, held-out {held:.3f} ({len(colours)} / {len(test_colours)} objects)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
