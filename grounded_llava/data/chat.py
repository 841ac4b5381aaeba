"""Chat sources (no detection targets): the LLaVA conversation JSON and COCO captions JSON.

LLaVA format: a JSON list of `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`.
Checks per entry (file, entry id and field named in every error): `id` and a non-empty
`conversations` list present; turns alternate human/gpt starting with human and ending with gpt;
each `value` a string; with an image, `<image>` appears exactly once, in the first human turn, and
the image passes the same file checks as COCO images; without an image, no `<image>` at all; gpt
turns may carry grounding tokens only when they parse cleanly (`parse_grounded` drops nothing) and
never `<seg>` (a chat source has no mask to supervise it).

COCO captions (`captions_*.json`): every caption annotation becomes one sample, the question drawn
from `CAPTION_QUESTIONS` with `Random(f"{seed}/{annotation id}")`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from grounded_llava.codec import DEFAULT_NUM_BINS, SEG, parse_grounded
from grounded_llava.conversation import IMAGE_TOKEN, human_turn
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
from grounded_llava.data.sample import GroundedSample

CAPTION_QUESTIONS = (
    "Describe the image briefly.",
    "What is in this picture? Answer in one sentence.",
    "Give a short caption for this image.",
    "Summarize what you see in one sentence.",
)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the JSON: {error}") from error


def _check_turns(turns: object, *, has_image: bool, num_bins: int) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise InvalidItem("bad_turns", "conversations", "must be a non-empty list of turns")
    checked = []
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise InvalidItem(
                "bad_turns", f"conversations[{index}]", "must be an object with a string 'value'"
            )
        if turn.get("from") != expected:
            raise InvalidItem(
                "bad_turns",
                f"conversations[{index}].from",
                f"is {turn.get('from')!r}; turns must alternate human/gpt",
            )
        checked.append({"from": expected, "value": turn["value"]})
    if len(checked) % 2:
        raise InvalidItem("bad_turns", "conversations", "must end with a gpt turn")
    image_tokens = [turn["value"].count(IMAGE_TOKEN) for turn in checked]
    if has_image and (image_tokens[0] != 1 or sum(image_tokens) != 1):
        raise InvalidItem(
            "image_token", "conversations", f"{IMAGE_TOKEN} must appear exactly once, in the first human turn"
        )
    if not has_image and sum(image_tokens):
        raise InvalidItem("image_token", "conversations", f"has {IMAGE_TOKEN} but the entry has no 'image'")
    for index, turn in enumerate(checked):
        if turn["from"] != "gpt":
            continue
        if SEG in turn["value"] or parse_grounded(turn["value"], (1, 1), num_bins=num_bins).num_dropped:
            raise InvalidItem(
                "grounding_tokens", f"conversations[{index}].value", "has <seg> or malformed grounding tokens"
            )
    return checked


def load_llava_chat(
    json_file: str | Path,
    image_root: str | Path,
    *,
    on_bad_data: BadDataPolicy = "strict",
    image_check: ImageCheck = "header",
    num_bins: int = DEFAULT_NUM_BINS,
) -> tuple[list[GroundedSample], BadDataReport]:
    """LLaVA conversation JSON -> chat samples (`has_det_targets=False`) and the bad-data report.

    `image` paths are relative to `image_root`; `image_size` is read from the file header (None for
    text-only entries, or with `image_check="none"`). `on_bad_data` and `image_check` as in
    `load_coco_instances` (skip mode drops the offending entry).
    """
    check_policy(on_bad_data, image_check)
    json_file, image_root = Path(json_file), Path(image_root)
    report = BadDataReport(source=str(json_file), policy=on_bad_data)
    entries = _read_json(json_file)
    if not isinstance(entries, list):
        raise DataError(f"{json_file}: must hold a JSON list of conversation entries")
    samples = []
    for index, entry in enumerate(entries):
        where = f"entry #{index} (id {entry.get('id') if isinstance(entry, dict) else None})"
        try:
            if not isinstance(entry, dict):
                raise InvalidItem("bad_value", "entry", f"must be an object, got {type(entry).__name__}")
            for key in ("id", "conversations"):
                if key not in entry:
                    raise InvalidItem("missing_key", key, "required key is missing")
            has_image = entry.get("image") is not None
            conversation = _check_turns(entry["conversations"], has_image=has_image, num_bins=num_bins)
            path = resolve_image_path(image_root, entry["image"], field_name="image") if has_image else None
            size = inspect_image(path, image_check=image_check, field_name="image") if path else None
        except InvalidItem as error:
            report.flag_invalid(error, where=where)
            report.entries_skipped += 1
            continue
        samples.append(
            GroundedSample(
                image_path=path,
                conversation=conversation,
                image_size=size,
                source=f"{json_file}:{entry['id']}",
                task="chat",
            )
        )
    report.log_warning()
    return samples, report


def load_coco_captions(
    json_file: str | Path,
    image_root: str | Path,
    *,
    seed: int = 0,
    on_bad_data: BadDataPolicy = "strict",
    image_check: ImageCheck = "header",
) -> tuple[list[GroundedSample], BadDataReport]:
    """COCO captions JSON -> one caption sample per annotation (`has_det_targets=False`) and the report.

    `image_size` is (W, H) as the JSON declares it; a file whose header disagrees is bad data.
    """
    check_policy(on_bad_data, image_check)
    json_file, image_root = Path(json_file), Path(image_root)
    report = BadDataReport(source=str(json_file), policy=on_bad_data)
    data = _read_json(json_file)
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{json_file}: top-level field {key!r} is missing or not a list")
    images: dict[int, tuple[Path, tuple[int, int]]] = {}
    bad_images: set[object] = set()
    for index, image in enumerate(data["images"]):
        try:
            if not isinstance(image, dict):
                raise InvalidItem("bad_value", "images", "entry must be an object")
            for key in ("id", "file_name", "width", "height"):
                if key not in image:
                    raise InvalidItem("missing_key", key, "required key is missing")
            path = resolve_image_path(image_root, image["file_name"])
            declared = (image["width"], image["height"])
            size = inspect_image(path, image_check=image_check)
            if size is not None and size != declared:
                raise InvalidItem(
                    "image_size_mismatch", "width/height", f"JSON says {declared}, file {path} is {size}"
                )
            images[image["id"]] = (path, declared)
        except InvalidItem as error:
            raw_id = image.get("id") if isinstance(image, dict) else None
            report.flag_invalid(error, where=f"image #{index} (id {raw_id})")
            report.images_skipped += 1
            if isinstance(raw_id, int):
                bad_images.add(raw_id)
    samples = []
    for index, ann in enumerate(data["annotations"]):
        where = f"annotation #{index} (id {ann.get('id') if isinstance(ann, dict) else None})"
        try:
            if not isinstance(ann, dict):
                raise InvalidItem("bad_value", "annotations", "entry must be an object")
            for key in ("id", "image_id", "caption"):
                if key not in ann:
                    raise InvalidItem("missing_key", key, "required key is missing")
            if not isinstance(ann["caption"], str) or not ann["caption"].strip():
                raise InvalidItem("bad_value", "caption", "must be a non-empty string")
            if ann["image_id"] in bad_images:
                report.annotations_skipped += 1
                continue
            if ann["image_id"] not in images:
                raise InvalidItem(
                    "unknown_image_id", "image_id", f"image id {ann['image_id']!r} is not a (valid) image"
                )
        except InvalidItem as error:
            report.flag_invalid(error, where=where)
            report.annotations_skipped += 1
            continue
        path, size = images[ann["image_id"]]
        question = random.Random(f"{seed}/{ann['id']}").choice(CAPTION_QUESTIONS)
        conversation = [
            human_turn(question, first=True),
            {"from": "gpt", "value": ann["caption"].strip()},
        ]
        samples.append(
            GroundedSample(
                image_path=path,
                conversation=conversation,
                image_size=size,
                source=f"{json_file}:{ann['id']}",
                task="caption",
            )
        )
    report.log_warning()
    return samples, report
