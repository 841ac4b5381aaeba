"""Chat accuracy by question kind (count, colour, position, yes/no) on a world's chat.json, with a few
wrong answers of each kind: where the contract's `chat_accuracy` is lost. Counts are split by their
subject (all shapes, a shape, a colour) and by whether the true answer is zero.

    python experiments/chat_breakdown.py MODEL WORLD_DIR [EXAMPLES] [SCENE_CONF]

SCENE_CONF overrides the model's `scene_conf_threshold` (the score a detection needs to be in the scene line).
"""

import collections
import sys
from pathlib import Path

from grounded_llava.data.synthetic import COLORS
from grounded_llava.evaluation.chat_accuracy import answer_fact, answer_is_correct, question_kind, words
from grounded_llava.evaluation.runner import chat_questions
from grounded_llava.inference.predictor import GroundedLlava


def kind_of(question: str, truth: str) -> str:
    """`question_kind`, counts refined: `count/shapes`, `count/shape:zero`, `count/colour:nonzero`, ..."""
    kind = question_kind(question)
    if kind != "count":
        return kind
    tokens = words(question)
    subject = "shapes" if "shapes" in tokens else "colour" if set(tokens) & set(COLORS) else "shape"
    if subject == "shapes":
        return "count/shapes"
    return f"count/{subject}:{'zero' if answer_fact('count', truth) == 0 else 'nonzero'}"


def main(model_dir: str, world: str, examples: int = 3, scene_conf: float | None = None) -> None:
    questions = chat_questions(Path(world) / "chat.json", Path(world) / "images")
    predictor = GroundedLlava.from_pretrained(model_dir, device="cpu")
    if scene_conf is not None:
        predictor.model.config.scene_conf_threshold = scene_conf
    answers = predictor.predict(questions.images, questions.prompts, batch_size=8, max_new_tokens=64)
    scored: dict[str, list[bool]] = collections.defaultdict(list)
    wrong: dict[str, list[str]] = collections.defaultdict(list)
    for prompt, truth, answer in zip(questions.prompts, questions.truths, answers, strict=True):
        right = answer_is_correct(prompt, truth, answer.text)
        if right is None:
            continue
        kind = kind_of(prompt, truth)
        scored[kind].append(right)
        if not right and len(wrong[kind]) < examples:
            wrong[kind].append(f"{prompt} | truth: {truth} | model: {answer.text}")
    for kind, results in sorted(scored.items()):
        print(f"{kind:22s} {sum(results):3d} / {len(results):3d} = {sum(results) / len(results):.3f}")
        for line in wrong[kind]:
            print("   ", line)
    total = [r for results in scored.values() for r in results]
    print(f"total {sum(total)} / {len(total)} = {sum(total) / len(total):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]), *(float(a) for a in sys.argv[4:5]))
