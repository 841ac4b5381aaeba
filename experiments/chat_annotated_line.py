"""Chat accuracy by question kind with the scene line written from the world's annotations instead of the
head's detections: what the LM makes of a perfect line (docs/EXPERIMENTS.md E36).

    python experiments/chat_annotated_line.py MODEL WORLD_DIR
"""

import collections
import json
import sys
from pathlib import Path

from chat_breakdown import kind_of

from grounded_llava.evaluation.chat_accuracy import answer_is_correct
from grounded_llava.evaluation.runner import chat_questions
from grounded_llava.inference.predictor import GroundedLlava
from grounded_llava.scene_line import SeenObject, scene_line


def annotated_lines(world: Path, kinds: list[str], values: list[str]) -> dict[str, str]:
    """Image file name -> the scene line of its annotations (colours from `attributes.color`), listing the
    vocabularies `kinds` and `values` whole as the model's line does."""
    data = json.loads((world / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects = collections.defaultdict(list)
    for a in data["annotations"]:
        x, _, w, _ = a["bbox"]
        objects[a["image_id"]].append(
            SeenObject(names[a["category_id"]], a["attributes"].get("color"), x + w / 2)
        )
    return {
        image["file_name"]: scene_line(objects[image["id"]], kinds=kinds, attribute_values=values)
        for image in data["images"]
    }


def main(model_dir: str, world: str) -> None:
    world_dir = Path(world)
    questions = chat_questions(world_dir / "chat.json", world_dir / "images")
    predictor = GroundedLlava.from_pretrained(model_dir, device="cpu")
    heads = predictor.model.config.heads
    lines = annotated_lines(world_dir, list(heads.categories), list(heads.attribute_values))
    predictor.model.config.scene_line = False  # the annotated line goes in instead of the head's
    prompts = [
        f"{lines[Path(image).name]}\n{p}"
        for image, p in zip(questions.images, questions.prompts, strict=True)
    ]
    answers = predictor.predict(questions.images, prompts, batch_size=8, max_new_tokens=64)
    scored = collections.defaultdict(list)
    for prompt, truth, answer in zip(questions.prompts, questions.truths, answers, strict=True):
        right = answer_is_correct(prompt, truth, answer.text)
        if right is not None:
            scored[kind_of(prompt, truth)].append(right)
    for kind, results in sorted(scored.items()):
        print(f"{kind:22s} {sum(results):3d} / {len(results):3d}")
    total = [r for results in scored.values() for r in results]
    print(f"total {sum(total)} / {len(total)} = {sum(total) / len(total):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
