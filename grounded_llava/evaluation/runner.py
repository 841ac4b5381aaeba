"""The evaluator behind `python -m grounded_llava.evaluate`: runs a checkpoint on a COCO-style set and writes
`metrics.json` / `metrics.md` (see `report.py`; null = task not run).

Tasks (`tasks.py` holds their prompts and the aggregation):
- `det`: the head's detections -> COCO box AP; the boxes written in the answer to a "detect every object"
  prompt, scored by their token probability -> `text_bbox_AP(50)`; the share of those text boxes that
  matched a head box -> `text_head_agreement`.
- `seg`: the head's detections with box-prompted masks -> COCO mask AP.
- `find`: "Find all the {names} in the image." for every category an image shows -> `find_name_acc` (every
  phrase names it), `find_precision50` / `find_recall50` / `find_f1` (its boxes against the category's
  instances) and `find_exact` (`grounding_metrics.find_metrics`).
- `rec` / `res`: the first referring expression of every annotation, asked with the `refer` prompt; the
  answer's first grounded span -> its box (`rec_*`) and its `<seg>` mask (`res_*`).
- `chat`: every human turn of each `--chat-data` entry, asked as its own single-turn prompt and answered
  greedily by the model -> `chat_accuracy` and `chat_description_f1` against the entry's gpt answers
  (`chat_accuracy.py`); with `--reference`, also answered by it -> `chat_exact_match` (answers with their
  grounding tokens) and `chat_kl`.
- `--stages RUN`: forgetting across the stages of a training run (`stage_forgetting.py`).

Deterministic: greedy decoding, images by sorted id (`max_images` keeps the first N), chat entries in
file order (the first `max_images` with an image, each with all its questions).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from grounded_llava.codec import parse_grounded
from grounded_llava.console import progress_shown
from grounded_llava.conversation import IMAGE_TOKEN
from grounded_llava.data.bad_data import DataError
from grounded_llava.data.chat import load_llava_chat
from grounded_llava.evaluation.chat_accuracy import chat_accuracy_entries
from grounded_llava.evaluation.chat_metrics import chat_exact_match
from grounded_llava.evaluation.config import STAGE_MATRIX_FILE, EvaluationConfig
from grounded_llava.evaluation.report import empty_metrics, metrics_markdown, write_metrics
from grounded_llava.evaluation.stage_forgetting import StagePlan, plan_stages, read_run, stage_forgetting
from grounded_llava.evaluation.tasks import (
    DETECT_PROMPT,
    CategoryMap,
    EvalData,
    answers_agreement,
    coco_entries,
    find_entries,
    find_questions,
    head_results,
    load_eval_data,
    map_categories,
    rec_entries,
    referring_targets,
    res_entries,
    text_box_results,
)
from grounded_llava.evaluation.teacher_forcing import chat_kl, text_box_probabilities
from grounded_llava.inference.detections import Detections
from grounded_llava.inference.predictor import GroundedLlava


@dataclass
class Evaluation:
    """The report (metric name -> float or None) and notes on what was skipped and why."""

    metrics: dict[str, float | None] = field(default_factory=empty_metrics)
    notes: list[str] = field(default_factory=list)


AP_CONF_THRESHOLD = 0.001


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def head_detections(
    predictor: GroundedLlava, images: Sequence[Path], *, masks: bool, batch_size: int
) -> list[Detections]:
    """`predictor.detect` over `images`, `batch_size` at a time, at confidence >= 0.001 (as COCO AP is
    computed by ultralytics' and detectron2's validators: low-score detections only add recall)."""
    detections: list[Detections] = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        detections += predictor.detect(batch, masks=masks, conf_threshold=AP_CONF_THRESHOLD)
    return detections


def _run_detection(
    predictor: GroundedLlava, data: EvalData, categories: CategoryMap, config: EvaluationConfig
) -> dict[str, float | None]:
    segm = "seg" in config.tasks
    detections = head_detections(predictor, data.image_paths, masks=segm, batch_size=config.batch_size)
    results = head_results(detections, data.image_ids, categories)
    ids = categories.evaluated_ids
    metrics: dict[str, float | None] = {"categories_evaluated": float(len(ids))}
    if "det" in config.tasks:
        metrics |= coco_entries(data, results, iou_type="bbox", category_ids=ids)
        answers = predictor.predict(
            data.image_paths,
            DETECT_PROMPT,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,
        )
        raw = [answer.raw_text for answer in answers]
        boxes = text_box_probabilities(
            predictor, data.image_paths, DETECT_PROMPT, raw, batch_size=config.batch_size
        )
        text = coco_entries(
            data,
            text_box_results(boxes, data.image_ids, categories),
            iou_type="bbox",
            category_ids=ids,
            prefix="text_",
        )
        metrics |= {"text_bbox_AP": text["text_bbox_AP"], "text_bbox_AP50": text["text_bbox_AP50"]}
        metrics["text_head_agreement"] = answers_agreement(answers)
    if segm:
        metrics |= coco_entries(data, results, iou_type="segm", category_ids=ids)
    return metrics


def _run_referring(
    predictor: GroundedLlava, data: EvalData, config: EvaluationConfig, notes: list[str]
) -> dict:
    targets = referring_targets(data.records)
    if not targets:
        notes.append(
            f"rec/res skipped: no annotation of the evaluated images in {data.source} has "
            "referring_expressions"
        )
        return {}
    answers = predictor.predict(
        [t.image.path for t in targets],
        [t.prompt for t in targets],
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
    )
    metrics: dict[str, float] = {"num_referring_expressions": float(len(targets))}
    if "rec" in config.tasks:
        metrics |= rec_entries(answers, targets)
    if "res" in config.tasks:
        if any(t.instance.has_mask for t in targets):
            metrics |= res_entries(answers, targets)
        else:
            notes.append("res skipped: no referred instance has a segmentation")
    return metrics


def _run_find(
    predictor: GroundedLlava, data: EvalData, categories: CategoryMap, config: EvaluationConfig
) -> dict[str, float]:
    questions = find_questions(data.records, categories)
    answers = predictor.predict(
        [q.image.path for q in questions],
        [q.prompt for q in questions],
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
    )
    return find_entries(answers, questions, categories) | {"num_find_questions": float(len(questions))}


@dataclass
class ChatQuestions:
    """The chat task's single-turn prompts: image, question (no `<image>`) and ground-truth answer (plain
    text) of every human turn of the first `max_images` entries with an image, in file order."""

    images: list[Path]
    prompts: list[str]
    truths: list[str]


def chat_questions(chat_data: Path, image_root: Path, *, max_images: int | None = None) -> ChatQuestions:
    """Every human turn of the first `max_images` entries of `chat_data` that have an image, with the gpt
    turn after it (grounding tokens removed) as its ground truth. ValueError when no entry has an image."""
    samples, _ = load_llava_chat(chat_data, image_root)
    samples = [s for s in samples if s.image_path is not None][:max_images]
    if not samples:
        raise DataError(f"{chat_data}: no conversation entry with an image")
    questions = ChatQuestions(images=[], prompts=[], truths=[])
    for sample in samples:
        turns = sample.conversation
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            questions.images.append(sample.image_path)
            questions.prompts.append(human["value"].replace(IMAGE_TOKEN, "").strip())
            questions.truths.append(parse_grounded(gpt["value"], (1, 1)).text.strip())
    return questions


def _chat_questions(config: EvaluationConfig, notes: list[str]) -> ChatQuestions | None:
    """The chat task's prompts (None when it cannot run, with a note)."""
    if config.chat_data is None:
        notes.append("chat skipped: it needs --chat-data")
        return None
    if config.reference is None:
        notes.append("chat_exact_match and chat_kl skipped: they need --reference")
    return chat_questions(config.chat_data, config.chat_images or config.images, max_images=config.max_images)


def _run_chat(
    predictor: GroundedLlava, questions: ChatQuestions, config: EvaluationConfig, notes: list[str]
) -> dict[str, float | None]:
    images, prompts = questions.images, questions.prompts
    options = {"batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens}
    answers = predictor.predict(images, prompts, **options)
    metrics = chat_accuracy_entries(prompts, questions.truths, [a.text for a in answers])
    metrics["num_chat_prompts"] = float(len(prompts))
    if metrics["chat_accuracy"] is None:
        notes.append(
            "chat_accuracy skipped: no count, colour, position or yes/no question among the chat prompts"
        )
    if metrics["chat_description_f1"] is None:
        notes.append('chat_description_f1 skipped: no "Describe the scene." question among the chat prompts')
    if config.reference is not None:
        reference = GroundedLlava.from_pretrained(config.reference, device=_device(config.device))
        reference_answers = [a.raw_text for a in reference.predict(images, prompts, **options)]
        metrics["chat_exact_match"] = chat_exact_match([a.raw_text for a in answers], reference_answers)
        metrics["chat_kl"] = chat_kl(
            predictor, reference, images, prompts, reference_answers, batch_size=config.batch_size
        )
    return metrics


def _run_stages(
    plan: StagePlan, data: EvalData, config: EvaluationConfig
) -> tuple[dict[str, float | None], dict]:
    run_dir = Path(config.stages)
    gt_ids = {category.name: category.id for category in data.categories}

    def stage_results(stage: str) -> list[dict]:
        predictor = GroundedLlava.from_pretrained(run_dir / "stages" / stage, device=_device(config.device))
        names = predictor.categories
        categories = CategoryMap(
            model_categories=tuple(names), name_to_gt={n: gt_ids[n] for n in names if n in gt_ids}
        )
        detections = head_detections(predictor, data.image_paths, masks=False, batch_size=config.batch_size)
        return head_results(detections, data.image_ids, categories)

    result = stage_forgetting(
        plan,
        gt=data.gt,
        image_ids=data.image_ids,
        name_to_gt=gt_ids,
        stage_results=stage_results,
        source=str(data.source),
    )
    return result.report_entries(), result.to_json()


def evaluate(config: EvaluationConfig) -> Evaluation:
    """Run the configured tasks and write `config.out/metrics.json` and `metrics.md` (and
    `stage_ap_matrix.json` with `config.stages`).

    Raises:
        FileNotFoundError / ValueError (incl. `DataError`): bad inputs, naming the file and the field or id.
    """
    # Read every input first, so that mistakes fail before any model runs.
    evaluation = Evaluation()
    data = load_eval_data(config.data, config.images, max_images=config.max_images)
    chat = _chat_questions(config, evaluation.notes) if "chat" in config.tasks else None
    plan = plan_stages(read_run(config.stages)) if config.stages is not None else None
    predictor = GroundedLlava.from_pretrained(config.model, device=_device(config.device))
    evaluation.metrics["num_images"] = float(len(data.records))
    out = Path(config.out)
    tasks: list[tuple[str, Callable[[], dict]]] = []
    if {"det", "seg", "find"} & set(config.tasks):
        categories = map_categories(predictor.categories, data.categories, source=str(data.source))
    if {"det", "seg"} & set(config.tasks):
        tasks.append(("det/seg", lambda: _run_detection(predictor, data, categories, config)))
    if {"rec", "res"} & set(config.tasks):
        tasks.append(("rec/res", lambda: _run_referring(predictor, data, config, evaluation.notes)))
    if "find" in config.tasks:
        tasks.append(("find", lambda: _run_find(predictor, data, categories, config)))
    if chat is not None:
        tasks.append(("chat", lambda: _run_chat(predictor, chat, config, evaluation.notes)))
    if plan is not None:

        def stages() -> dict:
            entries, matrix = _run_stages(plan, data, config)
            out.mkdir(parents=True, exist_ok=True)
            (out / STAGE_MATRIX_FILE).write_text(json.dumps(matrix, indent=2) + "\n")
            return entries

        tasks.append(("stages", stages))
    bar = tqdm(tasks, desc="evaluate", unit="task", file=sys.stderr, disable=not progress_shown())
    for name, run in bar:
        bar.set_postfix_str(name)
        evaluation.metrics |= run()
    write_metrics(evaluation.metrics, out)
    return evaluation


def print_report(evaluation: Evaluation) -> None:
    """The metrics table on stdout, the notes on stderr."""
    print(metrics_markdown(evaluation.metrics), end="")
    for note in evaluation.notes:
        print(f"note: {note}", file=sys.stderr)
