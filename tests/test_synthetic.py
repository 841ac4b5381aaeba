"""The synthetic shapes world: determinism, exact masks, unique referring expressions, stable ids, chat."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from grounded_llava.codec import parse_grounded
from grounded_llava.data.chat import load_llava_chat
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.data.synthetic import COLORS, SHAPE_IDS, SHAPES, generate_world, main, visible_parts
from grounded_llava.data.synthetic_language import SceneObject, referring_expressions
from grounded_llava.data.tasks import TaskConfig, build_task_samples

FILES = ["annotations.json", "chat.json"] + [f"images/{i:06d}.png" for i in range(1, 7)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, num_images=6, seed=7, image_size=96, max_objects=6)
    return out


def test_same_seed_gives_identical_bytes(world, tmp_path):
    main(
        [
            "--out",
            str(tmp_path / "again"),
            "--num-images",
            "6",
            "--seed",
            "7",
            "--image-size",
            "96",
            "--max-objects",
            "6",
        ]
    )
    for name in FILES:
        assert (world / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    generate_world(tmp_path / "other", num_images=6, seed=8, image_size=96, max_objects=6)
    assert (world / "annotations.json").read_bytes() != (tmp_path / "other" / "annotations.json").read_bytes()


def test_a_smaller_set_is_a_prefix(world, tmp_path):
    generate_world(tmp_path, num_images=2, seed=7, image_size=96, max_objects=6)
    for name in ("images/000001.png", "images/000002.png"):
        assert (world / name).read_bytes() == (tmp_path / name).read_bytes()


def test_annotations_are_exact_visible_masks(world):
    data = load_coco_instances(world / "annotations.json", world / "images", image_check="decode")
    reference = COCO(str(world / "annotations.json"))
    assert len(data.images) == 6 and data.report.num_problems == 0
    assert [(c.id, c.name) for c in data.categories] == [(SHAPE_IDS[s], s) for s in SHAPES]
    assert sum(len(r.instances) for r in data.images) == len(reference.getAnnIds()) > 6
    for record in data.images:
        pixels = np.asarray(Image.open(record.path).convert("RGB")).astype(int)
        union = np.zeros((96, 96), dtype=int)
        for inst in record.instances:
            mask = inst.decode_mask(record.image_size)
            union += mask
            ys, xs = np.nonzero(mask)
            assert inst.box_xyxy == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert inst.area == mask.sum()
            assert inst.attributes["shape"] == inst.category_name and inst.attributes["size"] in (
                "small",
                "medium",
                "large",
            )
            colour = np.asarray(COLORS[inst.attributes["color"]])
            assert np.abs(pixels[mask] - colour).max() <= 12  # the visible pixels are the object's colour
        assert union.max() <= 1  # visible parts never overlap


def test_visible_parts_drops_mostly_hidden_objects():
    def square(x0, y0, x1, y1):
        mask = np.zeros((20, 20), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return mask

    bottom = square(0, 0, 10, 10)  # 100 px
    hides_80 = square(0, 0, 10, 8)  # covers 80 of them -> 20% visible: dropped
    hides_half = square(0, 0, 5, 10)  # covers 50 -> 50% visible: kept
    kept = visible_parts([bottom, hides_80])
    assert [i for i, _ in kept] == [1]
    kept = visible_parts([bottom, hides_half])
    assert [i for i, _ in kept] == [0, 1] and kept[0][1].sum() == 50
    # the middle one (60 px) is 10/60 visible: dropped, so it hides nothing: 50 px of the bottom stay, not 40
    kept = visible_parts([bottom, square(0, 0, 6, 10), hides_half])
    assert [i for i, _ in kept] == [0, 2] and kept[0][1].sum() == 50


_ATTRIBUTE_RE = re.compile(r"^the (?:(small|medium|large) )?(?:(\w+) )?(\w+)$")  # "the small red circle"


def _attribute_match(expression, inst):
    """Whether an attribute-only expression describes `inst`; None for other expressions."""
    match = _ATTRIBUTE_RE.match(expression)
    if (
        match is None
        or match.group(3) not in (*SHAPES, "object")
        or match.group(2) in ("leftmost", "rightmost")
    ):
        return None
    size, color, noun = match.groups()
    if color in ("topmost", "bottommost", "largest", "smallest"):
        return None
    return (
        (noun == "object" or noun == inst.category_name)
        and (size is None or size == inst.attributes["size"])
        and (color is None or color == inst.attributes["color"])
    )


def test_referring_expressions_single_out_one_object(world):
    data = load_coco_instances(world / "annotations.json", world / "images", image_check="none")
    checked = 0
    for record in data.images:
        owners = {}
        for inst in record.instances:
            for expression in inst.referring_expressions:
                assert owners.setdefault(expression, inst.ann_id) == inst.ann_id, expression
                if _attribute_match(expression, inst) is not None:
                    assert _attribute_match(expression, inst)
                    assert [_attribute_match(expression, o) for o in record.instances].count(True) == 1, (
                        expression
                    )
                    checked += 1
    assert checked > 5


def test_relational_expression_hand_example():
    # two red circles, one left of the blue star and one right of it: only relations tell them apart
    left = SceneObject("circle", "red", "small", (0, 40, 10, 50), 80)
    star = SceneObject("star", "blue", "large", (30, 30, 60, 60), 500)
    right = SceneObject("circle", "red", "small", (80, 40, 90, 50), 80)
    left_exprs, star_exprs, right_exprs = referring_expressions(
        [left, star, right], image_side=100, rng=random.Random(0)
    )
    assert "the red circle" not in left_exprs and "the leftmost red circle" in left_exprs
    assert "the star" in star_exprs and "the largest object" in star_exprs
    assert "the rightmost circle" in right_exprs and "the leftmost object" in left_exprs
    # the anchor is named by its shortest unique descriptor; at most 2 relations are kept per object
    left_relational = [e for e in left_exprs if " of the " in e]
    assert len(left_relational) == 2 and all(e.endswith(" left of the star") for e in left_relational)
    right_relational = [e for e in right_exprs if " of the " in e]
    assert len(right_relational) == 2 and all(e.endswith(" right of the star") for e in right_relational)


def test_categories_restrict_shapes_with_stable_ids(tmp_path):
    generate_world(tmp_path, num_images=4, seed=1, image_size=64, categories=["star", "circle"])
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert coco["categories"] == [
        {"id": 1, "name": "circle", "supercategory": "shape"},
        {"id": 4, "name": "star", "supercategory": "shape"},
    ]
    assert {a["category_id"] for a in coco["annotations"]} <= {1, 4}
    with pytest.raises(ValueError, match="categories"):
        generate_world(tmp_path, num_images=1, seed=1, categories=["blob"])


def test_chat_json_is_valid_and_counts_are_right(world):
    samples, report = load_llava_chat(world / "chat.json", world / "images", image_check="decode")
    assert report.num_problems == 0 and len(samples) == 6
    coco = json.loads((world / "annotations.json").read_text())
    per_image = {
        img["file_name"]: sum(a["image_id"] == img["id"] for a in coco["annotations"])
        for img in coco["images"]
    }
    for sample in samples:
        turns = sample.conversation
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            if question["value"].endswith("How many shapes are there in the image?"):
                n = per_image[sample.image_path.name]
                expected = {0: "I count no shapes.", 1: "I count 1 shape."}.get(n, f"I count {n} shapes.")
                assert answer["value"] == expected


def test_tasks_on_the_world_parse_cleanly(world):
    data = load_coco_instances(world / "annotations.json", world / "images", image_check="none")
    samples = build_task_samples(
        data, config=TaskConfig(weights={"refer": 1.0, "segment": 1.0}), seed=0, samples_per_image=3
    )
    assert samples
    for sample in samples:
        parsed = parse_grounded(sample.conversation[1]["value"], sample.image_size)
        assert parsed.num_dropped == 0 and len(sample.seg_masks) == sum(sum(s.seg) for s in parsed.spans)


def test_the_world_command_runs_its_module_once_without_a_warning(tmp_path):
    """`python -m grounded_llava.data.synthetic` (a README command): no package import loads the module first."""
    done = subprocess.run(
        [sys.executable, "-m", "grounded_llava.data.synthetic", "--out", str(tmp_path / "w"), "--num-images", "1"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "w" / "annotations.json").is_file()
