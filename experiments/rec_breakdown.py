"""REC failure breakdown (docs/EXPERIMENTS.md E18): for every referring target of a world, did the head
detect it (a detection of its class with IoU >= 0.5), what did the phrase say, is the first box right, and
the first span's mask IoU (None without a mask; E34 compares mask decoders on the right boxes).

    python experiments/rec_breakdown.py MODEL WORLD_DIR OUT.json
"""

import collections
import json
import sys

import numpy as np

from grounded_llava.box_iou import pairwise_iou
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.evaluation.tasks import referring_targets
from grounded_llava.inference.predictor import GroundedLlava
from grounded_llava.inference.reconciliation import phrase_category


def phrase_kind(phrase: str | None, expression: str, target_class: str, names: list[str]) -> str:
    """copy / names_target_class / names_other_class / names_no_class / no_span."""
    if phrase is None:
        return "no_span"
    if phrase.strip().lower() == expression.lower():
        return "copy"
    named = phrase_category(phrase, names)
    if named is None:
        return "names_no_class"
    return "names_target_class" if named == target_class else "names_other_class"


def main(model: str, world: str, out: str) -> None:
    data = load_coco_instances(f"{world}/annotations.json", f"{world}/images")
    targets = referring_targets(data.images)
    predictor = GroundedLlava.from_pretrained(model, device="cpu")
    answers = predictor.predict([t.image.path for t in targets], [t.prompt for t in targets], batch_size=16)
    names = predictor.categories
    records = []
    for target, answer in zip(targets, answers, strict=True):
        truth = np.array([target.instance.box_xyxy])
        detections = answer.detections.numpy()
        hits = (
            pairwise_iou(detections.boxes, truth)[:, 0] >= 0.5 if len(detections.boxes) else np.zeros(0, bool)
        )
        of_class = np.array([names[i] == target.instance.category_name for i in detections.class_ids], bool)
        span = answer.spans[0] if answer.spans else None
        right = span is not None and pairwise_iou(np.array([span.box]), truth)[0, 0] >= 0.5
        mask_iou = None
        if span is not None and span.mask is not None and target.instance.has_mask:
            gt = target.instance.decode_mask(target.image.image_size).astype(bool)
            mask_iou = float((span.mask & gt).sum() / max((span.mask | gt).sum(), 1))
        records.append({
            "expression": target.expression,
            "head": "found" if (hits & of_class).any() else ("found_other_class" if hits.any() else "missed"),
            "phrase": phrase_kind(span.phrase if span else None, target.expression,
                                  target.instance.category_name, names),
            "right": bool(right),
            "mask_iou": mask_iou,
            "class_shared": sum(i.category_name == target.instance.category_name
                                for i in target.image.non_crowd()) > 1,
            "answer": answer.raw_text[:200],
        })  # fmt: skip
    with open(out, "w") as f:
        json.dump(records, f, indent=1)
    counts = collections.Counter((r["head"], r["phrase"], r["right"]) for r in records)
    print(f"targets {len(records)}, right {sum(r['right'] for r in records)}")
    for key, n in counts.most_common():
        print(f"{n:4d}", key)
    on_right = [r["mask_iou"] for r in records if r["right"] and r["mask_iou"] is not None]
    no_mask = sum(r["mask_iou"] is None for r in records)
    print(
        f"mask IoU on the {len(on_right)} right boxes: {np.mean(on_right):.3f}; spans without a mask: {no_mask}"
    )
    for shared in (False, True):
        group = [r for r in records if r["class_shared"] == shared]
        print(f"class shared={shared}: right {sum(r['right'] for r in group)} / {len(group)}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
