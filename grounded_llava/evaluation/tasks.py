"""The evaluation tasks: their prompts, their ground truth and the aggregation of model outputs into metrics.

Everything here turns plain outputs (`Detections`, `GroundedAnswer`, text boxes) into report entries with
the pure metric functions of this package; `runner.py` runs the model and calls these. Boxes are xyxy in
original image pixels, masks bool (H, W) at original image size.

Category ids: the model's category names are matched to the ground truth's by name. Detections of a
name the ground truth lacks are dropped, and ground truth categories the model does not know are left
out of the AP: the AP is taken over the categories both know (`CategoryMap.evaluated_ids`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grounded_llava.data import phrasing
from grounded_llava.data.bad_data import DataError
from grounded_llava.data.coco import Category, ImageRecord, InstanceRecord, load_coco_instances
from grounded_llava.evaluation.coco_metrics import IouType, coco_detection_metrics, detections_to_coco_results
from grounded_llava.evaluation.grounding_metrics import (
    find_metrics,
    rec_metrics,
    res_metrics,
    text_head_agreement,
)
from grounded_llava.evaluation.report import coco_report_entries
from grounded_llava.inference.detections import Detections
from grounded_llava.inference.reconciliation import phrase_category
from grounded_llava.inference.results import GroundedAnswer

# Prompts the task generator (`grounded_llava/data/tasks.py`) trains with, so the model sees familiar
# questions. `rec` and `res` share one prompt: the `refer` task answers with the box AND a `<seg>` mask
# (`TaskConfig.refer_seg`), while the `segment` templates name categories, not expressions.
DETECT_PROMPT = phrasing.QUESTIONS["detect"][0]  # "Detect every object in the image."
REFER_PROMPT = phrasing.QUESTIONS["refer"][0]  # "Where is {expr}?"
FIND_PROMPT = phrasing.QUESTIONS["find"][0]  # "Find all the {names} in the image."


@dataclass
class EvalData:
    """The ground truth of one evaluation.

    Attributes:
        source: the COCO instances JSON.
        gt: its raw dict, as pycocotools scores against it.
        categories: its categories, sorted by id.
        records: the evaluated images, sorted by image id (the first `max_images`).
    """

    source: Path
    gt: dict[str, Any]
    categories: list[Category]
    records: list[ImageRecord]

    @property
    def image_ids(self) -> list[int]:
        return [record.image_id for record in self.records]

    @property
    def image_paths(self) -> list[Path]:
        return [record.path for record in self.records]


def load_eval_data(annotation_file: Path, image_root: Path, *, max_images: int | None) -> EvalData:
    """Read and check a COCO instances file (strict: any bad item raises `DataError`, naming file and id)."""
    instances = load_coco_instances(annotation_file, image_root, image_check="header")
    records = sorted(instances.images, key=lambda record: record.image_id)[:max_images]
    if not records:
        raise DataError(f"{annotation_file}: no image to evaluate")
    gt = json.loads(Path(annotation_file).read_text())
    return EvalData(source=Path(annotation_file), gt=gt, categories=instances.categories, records=records)


@dataclass(frozen=True)
class CategoryMap:
    """The model's label space matched to the ground truth's categories by name.

    Attributes:
        model_categories: the model's category names (class id = index).
        name_to_gt: category name -> ground truth category id, for the names both know.
    """

    model_categories: tuple[str, ...]
    name_to_gt: dict[str, int]

    @property
    def class_to_gt(self) -> dict[int, int]:
        """Model class id -> ground truth category id (classes the ground truth lacks are absent)."""
        return {k: self.name_to_gt[n] for k, n in enumerate(self.model_categories) if n in self.name_to_gt}

    @property
    def evaluated_ids(self) -> list[int]:
        """The ground truth category ids that take part in the AP, sorted."""
        return sorted(self.name_to_gt.values())

    def ids_of(self, names: Sequence[str]) -> list[int]:
        """Ground truth ids of those `names` that both know, sorted."""
        return sorted({self.name_to_gt[n] for n in names if n in self.name_to_gt})


def map_categories(
    model_categories: Sequence[str], gt_categories: Sequence[Category], *, source: str
) -> CategoryMap:
    """Match names; ValueError when the model and the ground truth share no category name."""
    gt_ids = {category.name: category.id for category in gt_categories}
    shared = {name: gt_ids[name] for name in model_categories if name in gt_ids}
    if not shared:
        raise DataError(
            f"{source}: the model's categories {list(model_categories)} share no name with the ground truth "
            f"categories {sorted(gt_ids)}"
        )
    return CategoryMap(model_categories=tuple(model_categories), name_to_gt=shared)


# ---------------------------------------------------------------------------- detection (det, seg)
def head_results(
    detections: Sequence[Detections], image_ids: Sequence[int], categories: CategoryMap
) -> list[dict[str, Any]]:
    """COCO results of the head's detections (with `segmentation` when they have masks), one list for all
    images; detections of classes the ground truth does not know are dropped."""
    class_to_gt = categories.class_to_gt
    results = []
    for dets, image_id in zip(detections, image_ids, strict=True):
        dets = dets.numpy()
        results += dets[np.isin(dets.class_ids, list(class_to_gt))].to_coco(image_id, class_to_gt)
    return results


def coco_entries(
    data: EvalData,
    results: Sequence[dict[str, Any]],
    *,
    iou_type: IouType,
    category_ids: Sequence[int],
    prefix: str = "",
) -> dict[str, float]:
    """`{prefix}{iou_type}_AP`, `_AP50`, `_AP75` of `results` on the evaluated images and `category_ids`."""
    metrics = coco_detection_metrics(
        data.gt,
        results,
        iou_type=iou_type,
        image_ids=data.image_ids,
        category_ids=category_ids,
        source=str(data.source),
    )
    return {prefix + key: value for key, value in coco_report_entries(metrics, iou_type).items()}


@dataclass(frozen=True)
class TextBox:
    """One box written in an answer: (4,) xyxy original pixels, its phrase, the probability of its tokens."""

    box: tuple[float, float, float, float]
    phrase: str
    score: float


def text_box_results(
    text_boxes: Sequence[Sequence[TextBox]], image_ids: Sequence[int], categories: CategoryMap
) -> list[dict[str, Any]]:
    """COCO results of the answers' boxes: the category is the one the phrase names (`phrase_category`);
    boxes whose phrase names no category the ground truth knows are dropped."""
    results = []
    for boxes, image_id in zip(text_boxes, image_ids, strict=True):
        named = [(b, phrase_category(b.phrase, categories.model_categories)) for b in boxes]
        kept = [(b, categories.name_to_gt[name]) for b, name in named if name in categories.name_to_gt]
        results += detections_to_coco_results(
            image_id=image_id,
            boxes=np.array([b.box for b, _ in kept], dtype=np.float64).reshape(-1, 4),
            scores=[b.score for b, _ in kept],
            category_ids=[category_id for _, category_id in kept],
        )
    return results


def answers_agreement(answers: Sequence[GroundedAnswer]) -> float | None:
    """Text boxes matched to a head box / text boxes, pooled over the answers (None without text boxes)."""
    matched = [sum(span.source == "head" for span in answer.spans) for answer in answers]
    return text_head_agreement(matched, [len(answer.spans) for answer in answers])


# ---------------------------------------------------------------------------- referring (rec, res)
@dataclass(frozen=True)
class ReferringTarget:
    """One referring expression (the first of its annotation) and the instance it names."""

    image: ImageRecord
    instance: InstanceRecord
    expression: str

    @property
    def prompt(self) -> str:
        return REFER_PROMPT.format(expr=self.expression)


def referring_targets(records: Sequence[ImageRecord]) -> list[ReferringTarget]:
    """Every non-crowd annotation with referring expressions, by image then annotation id."""
    return [
        ReferringTarget(image=record, instance=instance, expression=instance.referring_expressions[0])
        for record in records
        for instance in sorted(record.non_crowd(), key=lambda i: i.ann_id)
        if instance.referring_expressions
    ]


def rec_entries(answers: Sequence[GroundedAnswer], targets: Sequence[ReferringTarget]) -> dict[str, float]:
    """`rec_acc50`, `rec_miou` of the first grounded span's box of each answer (no span: IoU 0)."""
    predictions = [answer.spans[0].box if answer.spans else None for answer in answers]
    return rec_metrics(predictions, [target.instance.box_xyxy for target in targets])


def res_entries(answers: Sequence[GroundedAnswer], targets: Sequence[ReferringTarget]) -> dict[str, float]:
    """`res_ciou`, `res_giou` of the first grounded span's mask against the instance mask, over the targets
    that have a mask (no span or no mask: an empty prediction)."""
    pairs = [(a, t) for a, t in zip(answers, targets, strict=True) if t.instance.has_mask]
    if not pairs:
        raise DataError("res: no referred instance has a segmentation")
    predictions = [answer.spans[0].mask if answer.spans else None for answer, _ in pairs]
    masks = [target.instance.decode_mask(target.image.image_size) for _, target in pairs]
    return res_metrics(predictions, masks)


# ---------------------------------------------------------------------------- find
@dataclass(frozen=True)
class FindQuestion:
    """A "Find all the X" question: one category present in one image, and its non-crowd instances."""

    image: ImageRecord
    category: str
    instances: tuple[InstanceRecord, ...]

    @property
    def prompt(self) -> str:
        return FIND_PROMPT.format(names=phrasing.pluralize(self.category))


def find_questions(records: Sequence[ImageRecord], categories: CategoryMap) -> list[FindQuestion]:
    """One question per image and category that both the model and the ground truth know and the image
    shows, by image then category name."""
    questions = []
    for record in records:
        present = sorted({i.category_name for i in record.non_crowd()} & set(categories.name_to_gt))
        for name in present:
            instances = tuple(i for i in record.non_crowd() if i.category_name == name)
            questions.append(FindQuestion(image=record, category=name, instances=instances))
    return questions


def find_entries(
    answers: Sequence[GroundedAnswer], questions: Sequence[FindQuestion], categories: CategoryMap
) -> dict[str, float]:
    """`find_*` of the answers (`grounding_metrics.find_metrics`): every span's box, and whether every
    phrase names the asked category (`phrase_category`)."""
    names = categories.model_categories
    return find_metrics(
        [np.array([span.box for span in answer.spans]).reshape(-1, 4) for answer in answers],
        [
            bool(answer.spans) and all(phrase_category(s.phrase, names) == q.category for s in answer.spans)
            for answer, q in zip(answers, questions, strict=True)
        ],
        [np.array([i.box_xyxy for i in q.instances]) for q in questions],
    )
