"""COCO box and mask AP through pycocotools' `COCOeval`, on in-memory dicts.

Inputs are plain COCO data, so anything that predicts boxes can be scored:
- `gt`: a COCO *instances* dict (`images`, `annotations`, `categories`); boxes `bbox` are xywh in original
  image pixels, segmentations are polygons, uncompressed or compressed RLE at original image size.
- `results`: the COCO *result* format, one dict per detection:
  `{"image_id", "category_id", "bbox": [x, y, w, h] (original pixels), "score", "segmentation": RLE}`
  (`segmentation` only for `iou_type="segm"`). `detections_to_coco_results` builds them from xyxy boxes.

Boxes read from the answer text (`<box>` groups) are ordinary results: give them the category the phrase
names and, as `score`, the token probability of the box group; they are ranked with the head's
detections by that score like any other detection. Nothing else is special about them.

pycocotools mutates what it is given (`loadRes` writes `id`/`area` into each result, `COCOeval` replaces
polygons by RLE and adds `ignore` flags) and prints progress: every call here works on deep copies and
silences stdout.
"""

from __future__ import annotations

import contextlib
import copy
import io
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounded_llava.data.bad_data import DataError, InvalidItem
from grounded_llava.data.coco_geometry import check_area, check_segmentation, is_finite
from grounded_llava.rle import mask_to_rle

IouType = Literal["bbox", "segm"]

# Order of `COCOeval.stats` for bbox/segm (pycocotools `summarize()._summarizeDets`).
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_ALWAYS_DEFINED = ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")


def detections_to_coco_results(
    *,
    image_id: int,
    boxes: np.ndarray,
    scores: Sequence[float] | np.ndarray,
    category_ids: Sequence[int] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts for the detections of one image.

    Args:
        image_id: the `images[].id` of the ground truth.
        boxes: (N, 4) xyxy, original pixels.
        scores: (N,) confidences (head score, or token probability for text boxes).
        category_ids: (N,) COCO category ids.
        masks: optional N bool masks (H, W) at original image size, encoded as RLE `segmentation`.

    Returns:
        N dicts with `bbox` as xywh, original pixels.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    category_ids = np.asarray(category_ids).reshape(-1)
    n = len(boxes)
    if len(scores) != n or len(category_ids) != n or (masks is not None and len(masks) != n):
        raise ValueError(
            f"image {image_id}: boxes ({n}), scores ({len(scores)}), category_ids ({len(category_ids)})"
            + ("" if masks is None else f" and masks ({len(masks)})")
            + " must have the same length"
        )
    results = []
    for i in range(n):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        result = {
            "image_id": int(image_id),
            "category_id": int(category_ids[i]),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(scores[i]),
        }
        if masks is not None:
            result["segmentation"] = mask_to_rle(masks[i])
        results.append(result)
    return results


def _check_bbox(bbox: Any, where: str) -> None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
    if not all(isinstance(v, (int, float)) and is_finite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
        raise DataError(f"{where}: field 'bbox' must be finite [x, y, w, h] with w, h >= 0, got {bbox!r}")


def _segmentation_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as compressed RLE.

    The geometry is checked first (`coco_geometry.check_segmentation`): pycocotools crashes on NaN or
    huge polygon coordinates and on a malformed RLE.
    """
    if isinstance(segmentation, list) and not segmentation:
        raise DataError(f"{where}: field 'segmentation' is an empty polygon list")
    if segmentation is None:
        raise DataError(f"{where}: field 'segmentation' is null")
    try:
        check_segmentation(segmentation, width, height)
    except InvalidItem as error:
        raise DataError(f"{where}: field {error.field_name!r}: {error.problem}") from error
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _check_area(ann: dict[str, Any], where: str) -> None:
    if "area" in ann:
        try:
            check_area(ann["area"])
        except InvalidItem as error:
            raise DataError(f"{where}: field {error.field_name!r}: {error.problem}") from error


def _prepared_gt(gt: dict[str, Any], iou_type: IouType, source: str) -> dict[str, Any]:
    """A validated deep copy of `gt` that pycocotools can use as is."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DataError(f"{source}: ground truth needs a list field '{key}'")
    gt = copy.deepcopy(gt)
    images = {}
    for image in gt["images"]:
        if "id" not in image:
            raise DataError(f"{source}: an entry of 'images' has no 'id'")
        if iou_type == "segm" and not ("height" in image and "width" in image):
            raise DataError(
                f"{source}: images[id={image['id']}] needs 'height' and 'width' for segm evaluation"
            )
        images[image["id"]] = image
    category_ids = {category["id"] for category in gt["categories"]}
    for index, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotations[{index}] (id={ann.get('id')})"
        if ann.get("image_id") not in images:
            raise DataError(f"{where}: field 'image_id' {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise DataError(f"{where}: field 'category_id' {ann.get('category_id')!r} is not in 'categories'")
        _check_bbox(ann.get("bbox"), where)
        _check_area(ann, where)
        ann.setdefault("iscrowd", 0)
        if iou_type == "segm":
            if "segmentation" not in ann:
                raise DataError(f"{where}: field 'segmentation' is missing (needed for segm evaluation)")
            image = images[ann["image_id"]]
            rle = _segmentation_rle(ann["segmentation"], image["height"], image["width"], where)
            ann.setdefault("area", float(mask_utils.area(rle)))
        else:
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        # COCOeval stores matched gt ids in an array where 0 means "unmatched": ids must be unique and
        # non-zero. Results never refer to them, so renumbering the copy is safe.
        ann["id"] = index + 1
    return gt


def _prepared_results(
    results: Sequence[dict[str, Any]], gt: dict[str, Any], iou_type: IouType
) -> list[dict[str, Any]]:
    """A validated deep copy of `results` in the form `COCO.loadRes` expects."""
    images = {image["id"]: image for image in gt["images"]}
    category_ids = {category["id"] for category in gt["categories"]}
    prepared = []
    for index, result in enumerate(results):
        where = f"results[{index}]"
        for key in ("image_id", "category_id", "score"):
            if key not in result:
                raise DataError(f"{where}: field '{key}' is missing")
        if result["image_id"] not in images:
            raise DataError(
                f"{where}: field 'image_id' {result['image_id']!r} is not in the ground truth images"
            )
        if result["category_id"] not in category_ids:
            raise DataError(
                f"{where}: field 'category_id' {result['category_id']!r} is not a ground truth category"
            )
        score = result["score"]
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not is_finite(score):
            raise DataError(f"{where}: field 'score' must be finite, got {result['score']!r}")
        result = copy.deepcopy(dict(result))
        if iou_type == "bbox":
            _check_bbox(result.get("bbox"), where)
        else:
            if "segmentation" not in result:
                raise DataError(
                    f"{where}: field 'segmentation' (RLE) is missing (needed for segm evaluation)"
                )
            image = images[result["image_id"]]
            result["segmentation"] = _segmentation_rle(
                result["segmentation"], image["height"], image["width"], where
            )
            # With a bbox present, loadRes takes the box area as the instance area, which changes the
            # small/medium/large split of mask AP (detectron2 drops it for the same reason).
            result.pop("bbox", None)
        prepared.append(result)
    return prepared


def _mean_precision(precision: np.ndarray) -> float | None:
    """Mean of the defined (> -1) entries of a COCOeval precision slice, None when none is defined."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else None


def coco_detection_metrics(
    gt: dict[str, Any],
    results: Sequence[dict[str, Any]],
    *,
    iou_type: IouType = "bbox",
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
    per_category: bool = False,
    source: str = "ground truth",
) -> dict[str, Any]:
    """COCO AP of `results` against `gt` (see the module docstring for both formats).

    Args:
        gt: COCO instances dict; not modified. Annotation `iscrowd` defaults to 0 and `area` to the box
            (bbox) or mask (segm) area when missing.
        results: COCO result dicts (bbox xywh, original pixels; `segmentation` RLE for segm); not modified.
            An empty list scores 0.0 everywhere.
        iou_type: "bbox" or "segm".
        image_ids: evaluate only these images (default: every image of `gt`).
        category_ids: evaluate only these categories (default: all); results of other categories are ignored.
        per_category: also return `"per_category": {category_id: {"AP", "AP50", "AP75"}}` for every
            evaluated category that has ground truth in the evaluated images.
        source: names the ground truth (e.g. its file) in error messages.

    Returns:
        Floats in [0, 1]: "AP" (IoU .50:.95), "AP50", "AP75", "AR1", "AR10", "AR100"; and "APs", "APm",
        "APl", "ARs", "ARm", "ARl" for the area ranges that contain ground truth (pycocotools reports -1
        for the others; they are left out, never None or -1).

    Raises:
        ValueError: malformed input (naming the field and the id), or no non-crowd ground truth in the
            evaluated images and categories (AP would be undefined).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    gt = _prepared_gt(gt, iou_type, source)
    known_categories = {category["id"] for category in gt["categories"]}
    known_images = {image["id"] for image in gt["images"]}
    eval_categories = sorted(known_categories) if category_ids is None else list(category_ids)
    eval_images = sorted(known_images) if image_ids is None else list(image_ids)
    if unknown := set(eval_categories) - known_categories:
        raise ValueError(f"{source}: category_ids {sorted(unknown)} are not in 'categories'")
    if unknown := set(eval_images) - known_images:
        raise ValueError(f"{source}: image_ids {sorted(unknown)} are not in 'images'")
    selected_categories, selected_images = set(eval_categories), set(eval_images)
    if not any(
        ann["category_id"] in selected_categories
        and ann["image_id"] in selected_images
        and not ann["iscrowd"]
        for ann in gt["annotations"]
    ):
        raise ValueError(
            f"{source}: no non-crowd ground truth for categories {eval_categories} in the {len(eval_images)} "
            "evaluated images: AP is undefined"
        )
    results = _prepared_results(results, gt, iou_type)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes indexes results[0]; an empty detection set is still a valid (zero) answer
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.imgIds = eval_images
        evaluator.params.catIds = eval_categories
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    metrics: dict[str, Any] = {}
    for name, value in zip(_STAT_NAMES, evaluator.stats, strict=True):
        if value > -1:
            metrics[name] = float(value)
        elif name in _ALWAYS_DEFINED:  # cannot happen once ground truth exists; guard the contract anyway
            raise RuntimeError(f"COCOeval returned -1 for {name} although ground truth exists")
    if per_category:
        metrics["per_category"] = _per_category_ap(evaluator)
    return metrics


def _per_category_ap(evaluator: COCOeval) -> dict[int, dict[str, float]]:
    """AP, AP50, AP75 per category (area "all", 100 detections) from an accumulated COCOeval."""
    precision = evaluator.eval[
        "precision"
    ]  # (T iou thresholds, R recall points, K categories, A areas, M maxDets)
    iou_thresholds = evaluator.params.iouThrs
    t50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))
    per_category = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        ap = _mean_precision(precision[:, :, k, 0, -1])
        if ap is None:  # no ground truth of this category in the evaluated images
            continue
        per_category[int(category_id)] = {
            "AP": ap,
            "AP50": float(_mean_precision(precision[t50, :, k, 0, -1])),
            "AP75": float(_mean_precision(precision[t75, :, k, 0, -1])),
        }
    return per_category


def ap_for_categories(
    gt: dict[str, Any],
    results: Sequence[dict[str, Any]],
    category_ids: Sequence[int],
    iou_type: IouType = "bbox",
    *,
    image_ids: Sequence[int] | None = None,
    source: str = "ground truth",
) -> dict[str, float]:
    """AP, AP50, AP75 averaged over a subset of categories, e.g. the old or the new classes of a stage.

    Only ground truth and results of `category_ids` take part, so detections of other classes neither
    help nor hurt. Formats and errors as in `coco_detection_metrics`.
    """
    if not category_ids:
        raise ValueError("ap_for_categories needs at least one category id")
    metrics = coco_detection_metrics(
        gt, results, iou_type=iou_type, image_ids=image_ids, category_ids=category_ids, source=source
    )
    return {name: metrics[name] for name in ("AP", "AP50", "AP75")}
