"""Chat accuracy by question kind (count, colour, position, yes/no) on a world's chat.json, with a few
wrong answers of each kind: where the contract's `chat_accuracy` is lost.

    python experiments/chat_breakdown.py MODEL WORLD_DIR [EXAMPLES]
"""

import collections
import sys
from pathlib import Path

from grounded_llava.evaluation.chat_accuracy import answer_is_correct, question_kind
from grounded_llava.evaluation.runner import chat_questions
from grounded_llava.inference.predictor import GroundedLlava


def main(model_dir: str, world: str, examples: int = 3) -> None:
    questions = chat_questions(Path(world) / "chat.json", Path(world) / "images")
    predictor = GroundedLlava.from_pretrained(model_dir, device="cpu")
    answers = predictor.predict(questions.images, questions.prompts, batch_size=8, max_new_tokens=64)
    scored: dict[str, list[bool]] = collections.defaultdict(list)
    wrong: dict[str, list[str]] = collections.defaultdict(list)
    for prompt, truth, answer in zip(questions.prompts, questions.truths, answers, strict=True):
        right = answer_is_correct(prompt, truth, answer.text)
        if right is None:
            continue
        kind = question_kind(prompt)
        scored[kind].append(right)
        if not right and len(wrong[kind]) < examples:
            wrong[kind].append(f"{prompt} | truth: {truth} | model: {answer.text}")
    for kind, results in sorted(scored.items()):
        print(f"{kind:9s} {sum(results):3d} / {len(results):3d} = {sum(results) / len(results):.3f}")
        for line in wrong[kind]:
            print("   ", line)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
