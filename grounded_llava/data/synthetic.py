"""The synthetic shapes world: coloured shapes on varied backgrounds, with exact masks, as COCO + LLaVA JSON.

    python -m grounded_llava.data.synthetic --out DIR --num-images N --seed S --image-size 224 \\
        [--categories circle,square,...] [--max-objects 8]

writes `DIR/images/NNNNNN.png`, `DIR/annotations.json` (COCO instances: compressed RLE of the
VISIBLE part of each object, bbox xywh of that visible mask, `attributes` {color, size, shape},
`referring_expressions` that are unique in the image) and `DIR/chat.json` (LLaVA conversations:
counts, colours, positions, scene description). docs/DATA.md documents the schema.

Objects are drawn in order, later over earlier; an object less than `MIN_VISIBLE_FRACTION` visible
is not drawn at all (so no unannotated fragment stays in the image). Category ids come from the
fixed global `SHAPES` list (circle=1, square=2, ...), whatever `--categories` picks, so ids are
stable across splits and training stages; `categories` lists only the chosen shapes.
Image k depends only on (seed, k): same seed -> byte-identical files, and a larger N extends a set.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from grounded_llava.config_io import ConfigError
from grounded_llava.conversation import conversation
from grounded_llava.data.shape_words import COLORS, SHAPE_IDS, SHAPES, SIZES
from grounded_llava.data.synthetic_language import SceneObject, chat_turns, referring_expressions
from grounded_llava.rle import mask_to_rle

BACKGROUNDS = ("flat", "gradient", "striped", "noisy")
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 12
_REPEAT_PROB = 0.35  # reuse an earlier shape or colour, so scenes need relations to tell objects apart


def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), -np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5), _regular(5, 0.45, math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


_W = 0.32  # half-width of the cross arms
_OUTLINES = {  # unit shapes centred at 0, extent about [-1, 1]; y grows downwards
    "circle": _regular(64),
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": _regular(3),
    "star": _star(),
    "hexagon": _regular(6),
    "cross": np.array(
        [
            [-_W, -1],
            [_W, -1],
            [_W, -_W],
            [1, -_W],
            [1, _W],
            [_W, _W],
            [_W, 1],
            [-_W, 1],
            [-_W, _W],
            [-1, _W],
            [-1, -_W],
            [-_W, -_W],
        ]
    ),
    "ellipse": _regular(64) * np.array([1.0, 0.55]),
    "diamond": np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]]),
}
_MAX_ROTATION_DEG = {
    "circle": 0,
    "square": 8,
    "cross": 12,
    "diamond": 8,
    "ellipse": 180,
    "hexagon": 30,
    "triangle": 180,
    "star": 36,
}


@dataclass
class WorldSummary:
    """What `generate_world` wrote."""

    out_dir: Path
    num_images: int
    num_annotations: int
    categories: list[str]


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A dark/greyish background colour, far from the saturated object colours."""
    grey = rng.uniform(30, 140)
    return np.clip(grey + rng.uniform(-18, 18, size=3), 0, 255)


def _background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    first, second = _muted_color(rng), _muted_color(rng)
    if kind == "flat":
        return np.broadcast_to(first, (side, side, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, math.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    if kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        return (first * (1 - t[..., None]) + second * t[..., None]).astype(np.uint8)
    if kind == "striped":
        period = rng.uniform(0.04, 0.12)
        stripes = (np.floor(along / period) % 2).astype(bool)
        return np.where(stripes[..., None], first, second).astype(np.uint8)
    cells = int(rng.integers(6, 16))  # noisy: blocky grey noise plus a light grain
    blocks = rng.uniform(-25, 25, size=(cells, cells, 1))
    index = np.arange(side) * cells // side
    grain = rng.integers(-6, 7, size=(side, side, 1))
    return np.clip(first + blocks[index][:, index] + grain, 0, 255).astype(np.uint8)


def _shape_mask(
    shape: str, centre: tuple[float, float], radius: float, angle_deg: float, side: int
) -> np.ndarray:
    """Bool (side, side) mask of one shape (no anti-aliasing, so the mask is exactly the drawn pixels)."""
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = _OUTLINES[shape] @ rotation.T * radius + np.asarray(centre)
    canvas = Image.new("1", (side, side), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _draw_attributes(
    rng: np.random.Generator, shapes: Sequence[str], earlier: list[tuple[str, str]]
) -> tuple[str, str, str]:
    shape, color = str(rng.choice(shapes)), str(rng.choice(list(COLORS)))
    if earlier and rng.random() < _REPEAT_PROB:
        previous = earlier[int(rng.integers(len(earlier)))]
        shape, color = (previous[0], color) if rng.random() < 0.5 else (shape, previous[1])
        shape = shape if shape in shapes else str(rng.choice(shapes))
    return shape, color, str(rng.choice(list(SIZES)))


def visible_parts(full_masks: Sequence[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(index, visible bool mask) of the objects to draw, given full masks in drawing order (later on top).

    The visible part is the own mask minus everything drawn later. An object less than
    `MIN_VISIBLE_FRACTION` (or `MIN_VISIBLE_PIXELS`) visible is left out; going from the top down,
    a left-out object never covers anything, so every kept object keeps at least that fraction.
    """
    covered = None
    kept = []
    for index in reversed(range(len(full_masks))):
        full = full_masks[index]
        covered = np.zeros_like(full) if covered is None else covered
        part = full & ~covered
        area = int(part.sum())
        if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * int(full.sum()):
            kept.append((index, part))
            covered = covered | full
    return kept[::-1]


def render_scene(
    *, side: int, shapes: Sequence[str], max_objects: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[SceneObject], list[np.ndarray], str]:
    """One scene: image (side, side, 3) uint8, visible objects, their visible bool masks, background kind."""
    background = str(rng.choice(BACKGROUNDS))
    image = _background(background, side, rng).copy()
    candidates = []
    for _ in range(int(rng.integers(0, max_objects + 1))):
        shape, color, size = _draw_attributes(rng, shapes, [(c[0], c[1]) for c in candidates])
        radius = rng.uniform(*SIZES[size]) * side / 2
        centre = (rng.uniform(radius, side - radius), rng.uniform(radius, side - radius))
        angle = rng.uniform(-1, 1) * _MAX_ROTATION_DEG[shape]
        mask = _shape_mask(shape, centre, radius, angle, side)
        touching = {c[1] for c in candidates if (c[3] & mask).any()}
        free = [c for c in COLORS if c not in touching]
        if color in touching and free:  # same colour over same colour would hide the boundary between them
            color = str(rng.choice(free))
        jitter = rng.integers(-12, 13, size=3)
        candidates.append((shape, color, size, mask, jitter))
    kept = visible_parts([c[3] for c in candidates])
    objects, masks = [], []
    for index, part in kept:
        shape, color, size, full, jitter = candidates[index]
        image[full] = np.clip(np.asarray(COLORS[color]) + jitter, 0, 255).astype(np.uint8)
        ys, xs = np.nonzero(part)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        objects.append(SceneObject(shape=shape, color=color, size=size, box_xyxy=box, area=int(part.sum())))
        masks.append(part)
    return image, objects, masks, background


def generate_world(
    out_dir: str | Path,
    *,
    num_images: int,
    seed: int,
    image_size: int = 224,
    categories: Sequence[str] | None = None,
    max_objects: int = 8,
) -> WorldSummary:
    """Write `num_images` scenes into `out_dir` (images/, annotations.json, chat.json); see module doc."""
    shapes = list(categories) if categories else list(SHAPES)
    unknown = [s for s in shapes if s not in SHAPE_IDS]
    if unknown or len(set(shapes)) != len(shapes):
        raise ConfigError(f"categories must be distinct names from {SHAPES}, got {list(shapes)}")
    if num_images < 0 or image_size < 32 or max_objects < 0:
        raise ConfigError(
            f"need num_images >= 0, image_size >= 32, max_objects >= 0; got {num_images}, {image_size}, {max_objects}"
        )
    shapes.sort(key=SHAPE_IDS.__getitem__)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, chats = [], [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        words_rng = random.Random(int(rng.integers(2**62)))
        image, objects, masks, background = render_scene(
            side=image_size, shapes=shapes, max_objects=max_objects, rng=rng
        )
        image_id, file_name = index + 1, f"{index + 1:06d}.png"
        Image.fromarray(image).save(out_dir / "images" / file_name)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": image_size,
                "height": image_size,
                "background": background,
            }
        )
        expressions = referring_expressions(objects, image_side=image_size, rng=words_rng)
        for obj, mask, exprs in zip(objects, masks, expressions, strict=True):
            x0, y0, x1, y1 = obj.box_xyxy
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": SHAPE_IDS[obj.shape],
                    "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                    "area": obj.area,
                    "iscrowd": 0,
                    "segmentation": mask_to_rle(mask),
                    "attributes": {"color": obj.color, "size": obj.size, "shape": obj.shape},
                    "referring_expressions": exprs,
                }
            )
        turns = chat_turns(objects, background=background, shapes=shapes, colors=list(COLORS), rng=words_rng)
        chats.append({"id": f"{image_id:06d}", "image": file_name, "conversations": conversation(turns)})
    categories_json = [{"id": SHAPE_IDS[s], "name": s, "supercategory": "shape"} for s in shapes]
    coco = {"images": images, "annotations": annotations, "categories": categories_json}
    (out_dir / "annotations.json").write_text(json.dumps(coco))
    (out_dir / "chat.json").write_text(json.dumps(chats, indent=1))
    return WorldSummary(
        out_dir=out_dir, num_images=num_images, num_annotations=len(annotations), categories=shapes
    )


def main(argv: Sequence[str] | None = None) -> WorldSummary:
    parser = argparse.ArgumentParser(
        description="Generate the synthetic shapes world (COCO instances + LLaVA chat)."
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num-images", required=True, type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="side of the square images, pixels")
    parser.add_argument("--categories", default=None, help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--max-objects", type=int, default=8)
    args = parser.parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    summary = generate_world(
        args.out,
        num_images=args.num_images,
        seed=args.seed,
        image_size=args.image_size,
        categories=categories,
        max_objects=args.max_objects,
    )
    print(f"wrote {summary.num_images} images, {summary.num_annotations} annotations to {summary.out_dir}")
    return summary


if __name__ == "__main__":
    main()
