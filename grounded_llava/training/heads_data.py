"""The `heads` stage's data: whole images with EVERY instance box and mask (no text), augmented.

Each item is one COCO-style image: canvas pixels, Detect targets for all its (non-crowd) instances and
one canvas-frame mask per instance that has a segmentation. Augmentation, a pure function of
(seed, epoch, index): horizontal flip, and a zoom-out that pastes the image smaller onto a larger
canvas of its mean colour (objects get smaller, as in other photos), with boxes and masks moved alike.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.bad_data import BadDataPolicy
from ..data.coco import ImageRecord
from ..data.dataset import load_image
from ..data.unreadable import SkipUnreadable
from ..modeling.attributes import IGNORE
from ..modeling.detection import DetectionTargets
from ..processor import GroundedProcessor
from .config import SourceConfig, TrainConfig
from .data_sources import LoadedSource, ensure_synthetic_world, load_instances, replay_policy, synthetic_dir


@dataclass
class HeadsItem:
    """pixel_values (3, S, S); class_ids (n,); boxes_canvas (n, 4) xyxy canvas px; masks (m, r, r) {0, 1};
    mask_instances (m,) the instance (row of boxes_canvas) of each mask; attribute_ids (n,) each instance's
    attribute value (`attributes.IGNORE`: none known)."""

    pixel_values: torch.Tensor
    class_ids: torch.Tensor
    boxes_canvas: torch.Tensor
    masks: torch.Tensor
    mask_instances: torch.Tensor
    attribute_ids: torch.Tensor


@dataclass
class HeadsBatch:
    """A collated batch: pixel_values (I, 3, S, S), det_targets (every instance), mask_image (M,),
    mask_boxes (M, 4) true boxes (xyxy canvas px, before jitter), mask_targets (M, r, r); boxes (N, 4)
    every instance's true box (xyxy canvas px, det_targets' order) and attribute_ids (N,) its attribute."""

    pixel_values: torch.Tensor
    det_targets: DetectionTargets
    mask_image: torch.Tensor
    mask_boxes: torch.Tensor
    mask_targets: torch.Tensor
    boxes: torch.Tensor
    attribute_ids: torch.Tensor

    def box_prompts(
        self, *, jitter: float, canvas_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The heads step's box inputs (`heads_step.heads_losses`): SAM's prompts and the attribute head's
        boxes, the true boxes jittered by `jitter` (`jitter_boxes`), on `device`."""
        return {
            "mask_image": self.mask_image.to(device),
            "mask_boxes": jitter_boxes(self.mask_boxes, scale=jitter, canvas_size=canvas_size).to(device),
            "mask_targets": self.mask_targets.to(device),
            "attribute_image": self.det_targets.image_index.to(device),
            "attribute_boxes": jitter_boxes(self.boxes, scale=jitter, canvas_size=canvas_size).to(device),
            "attribute_targets": self.attribute_ids.to(device),
        }


def load_heads_records(
    source: SourceConfig, config: TrainConfig, output_dir: Path
) -> tuple[list[ImageRecord], list[str]]:
    """The image records of a grounding source (generating a synthetic world if needed) and its category names."""
    if not source.is_grounding:
        raise ValueError(f"a heads stage trains on boxes and masks: source kind {source.kind!r} has none")
    if source.kind == "synthetic":
        directory = synthetic_dir(source, config, output_dir)
        ensure_synthetic_world(source, directory)
        annotations, images = directory / "annotations.json", directory / "images"
    else:
        annotations, images = config.resolve(source.annotations), config.resolve(source.images)
    dataset = load_instances(annotations, images, on_bad_data=source.on_bad_data)
    records = [r for r in dataset.images if r.non_crowd()]
    if source.limit is not None:
        records = records[: source.limit]
    if not records:
        raise ValueError(f"{annotations}: no image with an instance for the heads stage")
    present = {i.category_name for r in records for i in r.non_crowd()}
    return records, [c for c in dataset.category_names if c in present]


def _zoom_out(
    image: Image.Image, boxes: np.ndarray, masks: list[np.ndarray], scale: float, rng: random.Random
):
    """Paste `image` at `scale` (< 1) of a canvas of the original size filled with its mean colour."""
    width, height = image.size
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    x0, y0 = rng.randint(0, width - small[0]), rng.randint(0, height - small[1])
    fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(image.resize(small, Image.Resampling.BILINEAR), (x0, y0))
    factor = np.array([small[0] / width, small[1] / height] * 2, dtype=np.float32)
    boxes = boxes * factor + np.array([x0, y0, x0, y0], dtype=np.float32)
    moved = []
    for mask in masks:
        resized = (
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(small, Image.Resampling.BILINEAR))
            >= 128
        )
        full = np.zeros((height, width), dtype=bool)
        full[y0 : y0 + small[1], x0 : x0 + small[0]] = resized
        moved.append(full)
    return canvas, boxes, moved


class HeadsDataset(Dataset):
    """Images with all their instances for the heads stage (see the module docstring).

    Args:
        records: COCO image records; categories: the head's label space (class id = index).
        mask_resolution: side of SAM's mask output. hflip_prob / zoom_prob: augmentation rates;
        zoom_range: (min, max) scale of the zoom-out. on_bad_data: the source's policy for an image
        that cannot be decoded (`data/unreadable.py`). attribute / attribute_values: the annotation
        attribute the attribute head learns (`heads.attribute`) and its values (id = index).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        processor: GroundedProcessor,
        *,
        categories: Sequence[str],
        mask_resolution: int,
        hflip_prob: float = 0.5,
        zoom_prob: float = 0.3,
        zoom_range: tuple[float, float] = (0.5, 0.9),
        seed: int = 0,
        on_bad_data: BadDataPolicy = "strict",
        attribute: str = "",
        attribute_values: Sequence[str] = (),
    ) -> None:
        self.records = list(records)
        self.attribute = attribute
        self.value_of = {value: index for index, value in enumerate(attribute_values)}
        self.unreadable = SkipUnreadable(on_bad_data)
        self.processor = processor
        self.class_of = {name: index for index, name in enumerate(categories)}
        self.mask_resolution = mask_resolution
        self.hflip_prob, self.zoom_prob, self.zoom_range = hflip_prob, zoom_prob, zoom_range
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> HeadsItem:
        return self.unreadable.get(index, len(self), self._item)

    def _item(self, index: int) -> HeadsItem:
        record = self.records[index]
        rng = random.Random(f"heads-{self.seed}-{self.epoch}-{index}")
        image = load_image(record.path, source=record.file_name)
        instances = record.non_crowd()
        if unknown := sorted({i.category_name for i in instances} - set(self.class_of)):
            raise ValueError(f"{record.file_name}: categories {unknown} are not in the model's label space")
        boxes = np.array([i.box_xyxy for i in instances], dtype=np.float32).reshape(-1, 4)
        with_mask = [k for k, i in enumerate(instances) if i.has_mask]
        masks = [instances[k].decode_mask(record.image_size) for k in with_mask]
        if rng.random() < self.hflip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes[:, [0, 2]] = image.size[0] - boxes[:, [2, 0]]
            masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
        if rng.random() < self.zoom_prob:
            image, boxes, masks = _zoom_out(image, boxes, masks, rng.uniform(*self.zoom_range), rng)
        pixels, meta = self.processor.preprocess_image(image)
        canvas_masks = [meta.mask_to_canvas(m, self.mask_resolution) for m in masks]
        r = self.mask_resolution
        return HeadsItem(
            pixel_values=pixels,
            class_ids=torch.tensor([self.class_of[i.category_name] for i in instances], dtype=torch.long),
            boxes_canvas=torch.as_tensor(meta.boxes_to_canvas(boxes.astype(np.float64)), dtype=torch.float32),
            masks=torch.stack(canvas_masks) if canvas_masks else torch.zeros((0, r, r)),
            mask_instances=torch.tensor(with_mask, dtype=torch.long),
            attribute_ids=torch.tensor(
                [self.value_of.get(i.attributes.get(self.attribute), IGNORE) for i in instances],
                dtype=torch.long,
            ),
        )


def collate_heads(items: Sequence[HeadsItem]) -> HeadsBatch:
    """Stack a batch; Detect boxes become xywh fractions of the canvas (ultralytics' convention)."""
    side = items[0].pixel_values.shape[-1]
    boxes = torch.cat([item.boxes_canvas for item in items])
    xywh = (
        torch.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2,
                (boxes[:, 1] + boxes[:, 3]) / 2,
                boxes[:, 2] - boxes[:, 0],
                boxes[:, 3] - boxes[:, 1],
            ],
            dim=1,
        )
        / side
    )
    return HeadsBatch(
        pixel_values=torch.stack([item.pixel_values for item in items]),
        det_targets=DetectionTargets(
            image_index=torch.cat(
                [torch.full((len(item.class_ids),), i, dtype=torch.long) for i, item in enumerate(items)]
            ),
            class_ids=torch.cat([item.class_ids for item in items]),
            boxes_norm=xywh,
            image_has_targets=torch.ones(len(items), dtype=torch.bool),
        ),
        mask_image=torch.cat(
            [torch.full((len(item.masks),), i, dtype=torch.long) for i, item in enumerate(items)]
        ),
        mask_boxes=torch.cat([item.boxes_canvas[item.mask_instances] for item in items]),
        mask_targets=torch.cat([item.masks for item in items]),
        boxes=boxes,
        attribute_ids=torch.cat([item.attribute_ids for item in items]),
    )


def jitter_boxes(boxes: torch.Tensor, *, scale: float, canvas_size: int) -> torch.Tensor:
    """(M, 4) xyxy canvas px, each side moved by N(0, scale * box side): prompts like a detector's boxes."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0).repeat(1, 2)
    moved = boxes + torch.randn_like(boxes) * scale * size
    x0y0 = torch.minimum(moved[:, :2], moved[:, 2:] - 1.0)
    return torch.cat([x0y0, moved[:, 2:]], dim=1).clamp(0, canvas_size)


def load_heads_sources(
    config: TrainConfig, index: int, *, output_dir: Path, earlier: Sequence[SourceConfig]
) -> tuple[list[LoadedSource], list[float]]:
    """A heads stage's sources (`ImageRecord`s as samples) and their mixing weights;
    with `replay_weight`, a last source of `replay_size` images drawn from the `earlier` grounding sources
    (with all their annotations: rehearsal of the old categories)."""
    stage = config.stages[index]
    loaded, weights = [], []
    for source in stage.data:
        records, categories = load_heads_records(source, config, output_dir)
        description = {"kind": source.kind, "images": len(records), "weight": source.weight}
        loaded.append(LoadedSource(records, categories, description, on_bad_data=source.on_bad_data))
        weights.append(source.weight)
    if stage.replay_weight > 0:
        pool: list[ImageRecord] = []
        grounding = [source for source in earlier if source.is_grounding]
        for source in grounding:
            pool += load_heads_records(source, config, output_dir)[0]
        rng = random.Random(f"heads-replay-{config.train.seed}-{stage.name}")
        chosen = rng.sample(pool, min(stage.replay_size, len(pool)))
        if chosen:
            categories = sorted({i.category_name for r in chosen for i in r.non_crowd()})
            description = {"kind": "replay", "images": len(chosen), "weight": stage.replay_weight}
            loaded.append(LoadedSource(chosen, categories, description, on_bad_data=replay_policy(grounding)))
            weights.append(stage.replay_weight)
    return loaded, weights
