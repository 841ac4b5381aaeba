"""Forgetting across the stages of a training run: head box AP per category group, stage by stage.

A run directory (see `grounded_llava/training/trainer.py`) holds `stages.json`, the manifest (one entry
per stage, in training order, with `name`, `kind`, `new_categories`, `categories`), and the model after
each stage in `stages/<name>/`. Manifest entries without a checkpoint in this run (stages inherited from
the run it was initialised from) are skipped.

Category groups ("tasks" of continual learning): group 0 is every category the first stage knows (its
`categories`: the initial label space has no `new_categories`), group j > 0 the `new_categories` of the
j-th later stage that added any. Row i of the accuracy matrix is the model at the end of task i: the last
stage before group i + 1 was added (the final stage for the last group). `acc[i][j]` is the head's box AP
on group j's categories (those the ground truth knows); None when group j did not exist yet (j > i) or
has no ground truth in the evaluated images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grounded_llava.data.bad_data import DataError
from grounded_llava.evaluation.coco_metrics import ap_for_categories
from grounded_llava.evaluation.forgetting_metrics import backward_transfer

MANIFEST = "stages.json"


@dataclass(frozen=True)
class CategoryGroup:
    """The categories a stage introduced."""

    stage: str
    categories: tuple[str, ...]


@dataclass
class StagePlan:
    """Which checkpoints to evaluate on which categories.

    Attributes:
        groups: the category groups, in training order.
        rows: per group, the stage whose model gives that row of the matrix.
        old_before: the stage before the last one that added categories (None with a single group).
        old_categories: every category `old_before` knows.
        final: the last stage.
    """

    groups: list[CategoryGroup]
    rows: list[str]
    old_before: str | None
    old_categories: tuple[str, ...]
    final: str


@dataclass
class StageForgetting:
    """`acc[i][j]` (box AP, see the module docstring), its backward transfer and the old-class AP."""

    plan: StagePlan
    acc: list[list[float | None]]
    bwt: float | None
    old_class_ap_before: float | None
    old_class_ap_after: float | None

    def report_entries(self) -> dict[str, float | None]:
        """Flat report keys: `bwt`, `old_class_AP_before/after`, `stage_ap_matrix.<row>.<group stage>`."""
        entries: dict[str, float | None] = {
            "bwt": self.bwt,
            "old_class_AP_before": self.old_class_ap_before,
            "old_class_AP_after": self.old_class_ap_after,
        }
        for row, values in zip(self.plan.rows, self.acc, strict=True):
            for group, value in zip(self.plan.groups, values, strict=True):
                entries[f"stage_ap_matrix.{row}.{group.stage}"] = value
        return entries

    def to_json(self) -> dict[str, Any]:
        """The matrix with its row and column names, for `stage_ap_matrix.json`."""
        return {
            "rows": self.plan.rows,
            "groups": [{"stage": g.stage, "categories": list(g.categories)} for g in self.plan.groups],
            "acc": self.acc,
            "bwt": self.bwt,
            "old_categories": list(self.plan.old_categories),
            "old_class_AP_before": self.old_class_ap_before,
            "old_class_AP_after": self.old_class_ap_after,
        }


def read_run(run_dir: Path) -> list[dict[str, Any]]:
    """The manifest entries of `run_dir` that have a checkpoint in `run_dir/stages/<name>`, in order."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: --stages needs a training run directory")
    try:
        entries = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{manifest} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise DataError(f"{manifest} must hold a JSON list of stage entries")
    for index, entry in enumerate(entries):
        for key in ("name", "new_categories", "categories"):
            if not isinstance(entry, dict) or key not in entry:
                raise DataError(f"{manifest}: entry #{index} has no field {key!r}")
    present = [e for e in entries if (Path(run_dir) / "stages" / e["name"]).is_dir()]
    if not present:
        raise FileNotFoundError(f"{run_dir}/stages/ holds no checkpoint of the stages listed in {manifest}")
    return present


def plan_stages(entries: Sequence[dict[str, Any]]) -> StagePlan:
    """The groups and rows of the matrix from manifest entries (see the module docstring)."""
    starts = [0] + [i for i in range(1, len(entries)) if entries[i]["new_categories"]]
    groups = [
        CategoryGroup(
            stage=entries[s]["name"],
            categories=tuple(entries[s]["categories"] if k == 0 else entries[s]["new_categories"]),
        )
        for k, s in enumerate(starts)
    ]
    ends = [next_start - 1 for next_start in starts[1:]] + [len(entries) - 1]
    last = starts[-1]
    return StagePlan(
        groups=groups,
        rows=[entries[e]["name"] for e in ends],
        old_before=entries[last - 1]["name"] if last > 0 else None,
        old_categories=tuple(entries[last - 1]["categories"]) if last > 0 else (),
        final=entries[-1]["name"],
    )


def stage_forgetting(
    plan: StagePlan,
    *,
    gt: dict[str, Any],
    image_ids: Sequence[int],
    name_to_gt: dict[str, int],
    stage_results: Callable[[str], list[dict[str, Any]]],
    source: str,
) -> StageForgetting:
    """Fill the matrix with `ap_for_categories` on `gt`.

    Args:
        gt: COCO instances dict; image_ids: the evaluated images.
        name_to_gt: category name -> ground truth category id (names the ground truth lacks are skipped).
        stage_results: stage name -> COCO box results of that stage's head on the evaluated images
            (called once per stage needed).
    """
    evaluated = set(image_ids)
    with_gt = {
        a["category_id"] for a in gt["annotations"] if a["image_id"] in evaluated and not a.get("iscrowd")
    }
    cache: dict[str, list[dict[str, Any]]] = {}

    def ap(stage: str, names: Sequence[str]) -> float | None:
        ids = sorted({name_to_gt[n] for n in names if n in name_to_gt} & with_gt)
        if not ids:
            return None
        if stage not in cache:
            cache[stage] = stage_results(stage)
        return ap_for_categories(gt, cache[stage], ids, image_ids=image_ids, source=source)["AP"]

    acc = [
        [ap(row, group.categories) if j <= i else None for j, group in enumerate(plan.groups)]
        for i, row in enumerate(plan.rows)
    ]
    before = ap(plan.old_before, plan.old_categories) if plan.old_before else None
    after = ap(plan.final, plan.old_categories) if plan.old_before else None
    return StageForgetting(
        plan=plan, acc=acc, bwt=backward_transfer(acc), old_class_ap_before=before, old_class_ap_after=after
    )
