"""Read a COCO instances JSON into per-image records (boxes xyxy in original pixels, raw segmentation).

Accepted segmentation forms (as pycocotools): polygons (list of flat `[x0, y0, x1, y1, ...]` lists),
uncompressed RLE (`counts` a list of ints, COCO's crowd regions) and compressed RLE (`counts` a
string). An annotation without `segmentation` (or with an empty list) has no mask: its
`decode_mask` returns None and the tasks never put `<seg>` after it.

Bad data (see `bad_data.py`): a bad *annotation* drops its whole *image* in skip mode, because the
image's instance list would otherwise be incomplete and the detection head would learn a missed
object as background. Problems checked: missing required keys, duplicate ids, `file_name` escaping
the image root, missing or unreadable image file, image size differing from the JSON, unknown
image or category id, bbox with w or h <= 0 or outside the image by more than 1 px, and the geometry
checks of `coco_geometry.py` (polygon coordinates finite and near the image, RLE size and counts
fitting the image, `area` a finite number >= 0), so pycocotools never sees what crashes it. Two categories
with the same name raise `DataError` in both modes: the names are the model's labels, so the file's
label space itself is wrong and there is no item to skip.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from grounded_llava.data.bad_data import (
    BadDataPolicy,
    BadDataReport,
    DataError,
    ImageCheck,
    InvalidItem,
    check_policy,
    inspect_image,
    resolve_image_path,
)
from grounded_llava.data.coco_geometry import check_area, check_segmentation, is_finite

Box = tuple[float, float, float, float]
REQUIRED_IMAGE_KEYS = ("id", "file_name", "width", "height")
IMAGE_ATTRIBUTES = ("background",)  # image-level keys kept in `ImageRecord.attributes`
REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
BOX_TOLERANCE_PX = 1.0  # COCO boxes overshoot the image by float rounding; more than this is an error


@dataclass
class Category:
    id: int
    name: str
    supercategory: str = ""


@dataclass
class InstanceRecord:
    """One annotation.

    Attributes:
        box_xyxy: (x0, y0, x1, y1) in original pixels, from COCO's xywh, clipped to the image.
        segmentation: the raw COCO value (polygons, RLE dict) or None when the annotation has none.
        attributes: free-form (the synthetic world stores color/size/shape); {} when absent.
        referring_expressions: phrases that single out this instance in its image; [] when absent.
    """

    ann_id: int
    category_id: int
    category_name: str
    box_xyxy: Box
    iscrowd: bool
    segmentation: list | dict | None
    area: float = 0.0
    attributes: dict[str, Any] = field(default_factory=dict)
    referring_expressions: list[str] = field(default_factory=list)

    @property
    def has_mask(self) -> bool:
        return self.segmentation is not None

    def decode_mask(self, image_size: tuple[int, int]) -> np.ndarray | None:
        """The instance mask, bool (H, W) at original size (`image_size` is (W, H)); None without segmentation."""
        if self.segmentation is None:
            return None
        width, height = image_size
        segm = self.segmentation
        if isinstance(segm, list):  # polygons: one object may have several parts, merged into one RLE
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
        elif isinstance(segm["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm
        return mask_utils.decode(rle).astype(bool)


@dataclass
class ImageRecord:
    """One image and every annotation of it (crowd regions included; `non_crowd()` filters them)."""

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    instances: list[InstanceRecord] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    """Image-level facts beside COCO's keys (the synthetic world's `background`); {} when absent."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(W, H), the order `grounded_llava.codec` uses."""
        return self.width, self.height

    def non_crowd(self) -> list[InstanceRecord]:
        return [inst for inst in self.instances if not inst.iscrowd]


@dataclass
class CocoInstances:
    """A loaded instances file: categories sorted by id, images in file order, the bad-data report."""

    source: Path
    categories: list[Category]
    images: list[ImageRecord]
    report: BadDataReport

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def category_by_id(self) -> dict[int, Category]:
        return {c.id: c for c in self.categories}


def _require(item: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in item:
            raise InvalidItem("missing_key", key, "required key is missing")


def _as_int(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
        raise InvalidItem("bad_value", field_name, f"must be an integer, got {value!r}")
    if int(value) != value:
        raise InvalidItem("bad_value", field_name, f"must be an integer, got {value!r}")
    return int(value)


def _id_or_none(value: object) -> int | None:
    """The id `_as_int` reads from `value` (1.0 is image 1), None when it reads none."""
    try:
        return _as_int(value, "id")
    except InvalidItem:
        return None


def _check_bbox(bbox: object, width: int, height: int) -> Box:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise InvalidItem("bad_bbox", "bbox", f"must be 4 numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) if is_finite(v) else math.nan for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise InvalidItem("bad_bbox", "bbox", f"{bbox} has w or h <= 0 (or is not finite)")
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise InvalidItem(
            "bbox_outside_image", "bbox", f"{bbox} (xywh) lies outside the {width}x{height} image"
        )
    return max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))


def _read_categories(data: dict, report: BadDataReport) -> list[Category]:
    categories: dict[int, Category] = {}
    id_by_name: dict[str, int] = {}
    for index, cat in enumerate(data["categories"]):
        where = f"category #{index} (id {cat.get('id') if isinstance(cat, dict) else None})"
        try:
            if not isinstance(cat, dict):
                raise InvalidItem("bad_value", "categories", f"entry must be an object, got {cat!r}")
            _require(cat, ("id", "name"))
            cat_id = _as_int(cat["id"], "id")
            if cat_id in categories:
                raise InvalidItem("duplicate_id", "id", f"category id {cat_id} appears twice")
            category = Category(cat_id, str(cat["name"]), str(cat.get("supercategory", "")))
        except InvalidItem as error:
            report.flag_invalid(error, where=where)
            continue
        if category.name in id_by_name:  # the name is the label: no item to skip, the label space is wrong
            raise DataError(
                f"{report.source}: {where}: field 'name': {category.name!r} is the name of category ids "
                f"{id_by_name[category.name]} and {cat_id}; category names must be unique"
            )
        id_by_name[category.name] = cat_id
        categories[cat_id] = category
    return sorted(categories.values(), key=lambda c: c.id)


def _read_image(image: object, image_root: Path, image_check: ImageCheck) -> ImageRecord:
    if not isinstance(image, dict):
        raise InvalidItem("bad_value", "images", f"entry must be an object, got {image!r}")
    _require(image, REQUIRED_IMAGE_KEYS)
    image_id = _as_int(image["id"], "id")
    width, height = _as_int(image["width"], "width"), _as_int(image["height"], "height")
    if width <= 0 or height <= 0:
        raise InvalidItem("bad_value", "width/height", f"must be positive, got {width}x{height}")
    path = resolve_image_path(image_root, image["file_name"])
    size = inspect_image(path, image_check=image_check)
    if size is not None and size != (width, height):
        raise InvalidItem(
            "image_size_mismatch",
            "width/height",
            f"JSON says {width}x{height}, file {path} is {size[0]}x{size[1]}",
        )
    attributes = {key: image[key] for key in IMAGE_ATTRIBUTES if key in image}
    return ImageRecord(
        image_id=image_id,
        file_name=image["file_name"],
        path=path,
        width=width,
        height=height,
        attributes=attributes,
    )


def _read_annotation(ann: dict, record: ImageRecord, categories: dict[int, Category]) -> InstanceRecord:
    category_id = _as_int(ann["category_id"], "category_id")
    if category_id not in categories:
        raise InvalidItem(
            "unknown_category_id", "category_id", f"category id {category_id} is not in 'categories'"
        )
    box = _check_bbox(ann["bbox"], record.width, record.height)
    segmentation = check_segmentation(ann.get("segmentation"), record.width, record.height)
    attributes = ann.get("attributes", {})
    if not isinstance(attributes, dict):
        raise InvalidItem("bad_value", "attributes", f"must be an object, got {attributes!r}")
    expressions = ann.get("referring_expressions", [])
    if not isinstance(expressions, list) or not all(isinstance(e, str) and e.strip() for e in expressions):
        raise InvalidItem("bad_value", "referring_expressions", "must be a list of non-empty strings")
    return InstanceRecord(
        ann_id=_as_int(ann["id"], "id"),
        category_id=category_id,
        category_name=categories[category_id].name,
        box_xyxy=box,
        iscrowd=bool(ann.get("iscrowd", 0)),
        segmentation=segmentation,
        area=check_area(ann.get("area", 0.0)),
        attributes=dict(attributes),
        referring_expressions=list(expressions),
    )


def load_coco_instances(
    annotation_file: str | Path,
    image_root: str | Path,
    *,
    on_bad_data: BadDataPolicy = "strict",
    image_check: ImageCheck = "decode",
) -> CocoInstances:
    """Read a COCO instances JSON into `ImageRecord`s (file order), each with its annotations (file order).

    Args:
        annotation_file: the instances JSON.
        image_root: folder that `images[].file_name` is relative to.
        on_bad_data: `strict` raises `DataError` (file, id, field) at the first problem; `skip` drops
            the offending image (with all its annotations), counts the reason in `report` and logs a
            warning at the end.
        image_check: `decode` (decode every image once at load: catches truncated files), `header`
            (PIL open + verify: cheap, misses truncated JPEGs) or `none`.
    """
    check_policy(on_bad_data, image_check)
    annotation_file, image_root = Path(annotation_file), Path(image_root)
    report = BadDataReport(source=str(annotation_file), policy=on_bad_data)
    try:  # ValueError: not JSON, not UTF-8, an integer over Python's digit limit
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise DataError(f"{annotation_file}: cannot read the JSON: {error}") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{annotation_file}: top-level field {key!r} is missing or not a list")
    categories = _read_categories(data, report)
    by_id = {c.id: c for c in categories}

    records: dict[int, ImageRecord] = {}
    bad_images: set[int] = set()
    for index, image in enumerate(data["images"]):
        raw_id = image.get("id") if isinstance(image, dict) else None
        try:
            record = _read_image(image, image_root, image_check)
            if record.image_id in records or record.image_id in bad_images:
                raise InvalidItem("duplicate_id", "id", f"image id {record.image_id} appears twice")
            records[record.image_id] = record
        except InvalidItem as error:
            report.flag_invalid(error, where=f"image #{index} (id {raw_id})")
            report.images_skipped += 1
            if (bad_id := _id_or_none(raw_id)) is not None:
                records.pop(bad_id, None)
                bad_images.add(bad_id)

    seen_ann_ids: set[int] = set()
    for index, ann in enumerate(data["annotations"]):
        raw_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"annotation #{index} (id {raw_id}, image id {ann.get('image_id') if isinstance(ann, dict) else None})"
        try:
            if not isinstance(ann, dict):
                raise InvalidItem("bad_value", "annotations", f"entry must be an object, got {ann!r}")
            _require(ann, REQUIRED_ANNOTATION_KEYS)
            ann_id, image_id = _as_int(ann["id"], "id"), _as_int(ann["image_id"], "image_id")
            if ann_id in seen_ann_ids:
                raise InvalidItem("duplicate_id", "id", f"annotation id {ann_id} appears twice")
            seen_ann_ids.add(ann_id)
            if image_id in bad_images:
                report.annotations_skipped += 1
                continue
            if image_id not in records:
                raise InvalidItem("unknown_image_id", "image_id", f"image id {image_id} is not in 'images'")
            records[image_id].instances.append(_read_annotation(ann, records[image_id], by_id))
        except InvalidItem as error:
            report.flag_invalid(error, where=where)
            report.annotations_skipped += 1
            image_id = _id_or_none(ann.get("image_id")) if isinstance(ann, dict) else None
            if image_id in records:  # the image would lose an instance: drop it whole
                report.images_skipped += 1
                report.annotations_skipped += len(records.pop(image_id).instances)
                bad_images.add(image_id)
    report.log_warning()
    return CocoInstances(
        source=annotation_file, categories=categories, images=list(records.values()), report=report
    )
