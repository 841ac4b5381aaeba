"""`GroundedDataset` + `GroundedCollator`: `GroundedSample`s -> tokenised conversations and head targets.

Head targets live on the model canvas: Detect gets class ids and xywh boxes as fractions of the canvas
(ultralytics' convention); SAM gets one {0, 1} mask per `<seg>` at the decoder's resolution (4g, 4g).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..codec import BOX_CLOSE, BOX_OPEN, SEG, loc_token
from ..grammar import lex_text, parse
from ..image_io import ImageReadError, read_rgb
from ..modeling.detection import DetectionTargets
from ..processor import EncodedConversation, GroundedBatch, GroundedProcessor
from ..scene_line import SeenObject, scene_line, with_scene_line
from .bad_data import BadDataPolicy, UnreadableImageError
from .phrasing import flip_text_left_right
from .sample import GroundedSample
from .unreadable import SkipUnreadable


def flip_text(text: str, num_bins: int) -> str:
    """Mirror a turn left <-> right: box groups' x bins (x0' = N-1-x1, x1' = N-1-x0) and the words left/right.

    Every complete group of the grammar is flipped (inverted ones too); broken ones stay as written.
    """
    pieces, position = [], 0
    for group in parse(lex_text(text, num_bins)).groups:
        x0, y0, x1, y1 = group.bins
        flipped = (num_bins - 1 - x1, y0, num_bins - 1 - x0, y1)
        pieces += [text[position : group.start], BOX_OPEN, *(loc_token(b) for b in flipped), BOX_CLOSE]
        position = group.close + len(BOX_CLOSE)
    pieces.append(text[position:])
    return flip_text_left_right("".join(pieces))


def flip_sample(
    sample: GroundedSample, image: Image.Image, num_bins: int
) -> tuple[GroundedSample, Image.Image]:
    """Horizontal flip keeping image, boxes, masks and the text's boxes and left/right words consistent."""
    width = image.size[0]
    boxes = sample.det_boxes.copy()
    boxes[:, [0, 2]] = width - sample.det_boxes[:, [2, 0]]
    conversation = [{**turn, "value": flip_text(turn["value"], num_bins)} for turn in sample.conversation]
    flipped = replace(
        sample,
        conversation=conversation,
        det_boxes=boxes,
        seg_masks=[np.ascontiguousarray(m[:, ::-1]) for m in sample.seg_masks],
    )
    return flipped, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def annotated_scene_line(
    sample: GroundedSample, attribute: str, *, kinds: Sequence[str] = (), attribute_values: Sequence[str] = ()
) -> str:
    """The scene line of every instance a sample lists (its boxes as they are: after any flip); `kinds` and
    `attribute_values` are the vocabularies it lists whole (`scene_line`)."""
    attributes = sample.det_attributes or [{}] * len(sample.det_categories)
    return scene_line(
        [
            SeenObject(name, attrs.get(attribute) if attribute else None, float(box[0] + box[2]) / 2)
            for name, attrs, box in zip(sample.det_categories, attributes, sample.det_boxes, strict=True)
        ],
        kinds=kinds,
        attribute_values=attribute_values,
    )


def load_image(path: Path, *, source: str = "") -> Image.Image:
    """Open an image as 8-bit RGB in displayed orientation (`image_io.read_rgb`, the one reader).

    Raises `UnreadableImageError` naming the file (and the sample's source) when it is missing or cannot
    be decoded (a truncated JPEG passes the readers' header check and fails only here).
    """
    where = f" (from {source})" if source else ""
    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise UnreadableImageError(f"image file {path} does not exist{where}") from None
    except ImageReadError as err:
        raise UnreadableImageError(f"image file {path} is unreadable or corrupt{where}: {err}") from None


@dataclass
class EncodedSample:
    """One item of `GroundedDataset`: the tokenised conversation and its canvas-frame head targets."""

    encoded: EncodedConversation
    has_det_targets: bool
    is_chat: bool  # chat (the `chat` task, grounded or not, or no grounding targets): where the KL to the base applies
    class_ids: torch.Tensor  # (n,)
    boxes_norm: torch.Tensor  # (n, 4) xywh fractions of the canvas
    seg_masks: torch.Tensor  # (m, 4g, 4g)


class GroundedDataset(Dataset):
    """Map-style dataset over `GroundedSample`s.

    Args:
        samples: the records (built by `grounded_llava.data` readers and task generators).
        processor: tokenises and preprocesses images.
        categories: the detection head's label space (class id = index).
        mask_resolution: side of SAM's low-res mask output (4 x patch grid).
        hflip_prob: probability of a horizontal flip, deterministic per (seed, epoch, index).
        on_bad_data: the source's policy for an image that cannot be decoded (`unreadable.py`).
        scene_line: open the image's turn with the scene line of its annotations (`scene_line.py`), for
            samples that list every instance (`has_det_targets`); its attribute words are `attributes[attribute]`,
            and it lists every one of `categories` and `attribute_values` (`scene_line`).
    """

    def __init__(
        self,
        samples: Sequence[GroundedSample],
        processor: GroundedProcessor,
        *,
        categories: Sequence[str],
        mask_resolution: int,
        hflip_prob: float = 0.0,
        seed: int = 0,
        on_bad_data: BadDataPolicy = "strict",
        scene_line: bool = False,
        attribute: str = "",
        attribute_values: Sequence[str] = (),
    ) -> None:
        self.samples = list(samples)
        self.categories = list(categories)
        self.attribute_values = list(attribute_values) if attribute else []
        self.scene_line = scene_line
        self.attribute = attribute
        self.unreadable = SkipUnreadable(on_bad_data)
        self.processor = processor
        self.class_of = {name: index for index, name in enumerate(categories)}
        self.mask_resolution = mask_resolution
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> EncodedSample:
        return self.unreadable.get(index, len(self), self._item)

    def _item(self, index: int) -> EncodedSample:
        sample = self.samples[index]
        image = load_image(Path(sample.image_path), source=sample.source) if sample.image_path else None
        if (
            image is not None
            and random.Random(f"{self.seed}-{self.epoch}-{index}").random() < self.hflip_prob
        ):
            sample, image = flip_sample(sample, image, self.processor.num_bins)
        turns = sample.conversation
        if self.scene_line and image is not None and sample.has_det_targets:
            line = annotated_scene_line(
                sample, self.attribute, kinds=self.categories, attribute_values=self.attribute_values
            )
            turns = with_scene_line(turns, line)
        encoded = self.processor.encode_conversation(turns, image)
        seg_count = sum(turn["value"].count(SEG) for turn in sample.conversation if turn["from"] == "gpt")
        if seg_count != len(sample.seg_masks):
            raise ValueError(f"{sample.source}: {seg_count} <seg> tokens but {len(sample.seg_masks)} masks")
        unknown = [c for c in sample.det_categories if c not in self.class_of]
        if unknown:
            raise ValueError(
                f"{sample.source}: categories {sorted(set(unknown))} are not in the model's label space"
            )
        meta = encoded.image_meta
        if meta is not None and len(sample.det_boxes):
            canvas = torch.as_tensor(
                meta.boxes_to_canvas(sample.det_boxes.astype(np.float64)), dtype=torch.float32
            )
            canvas = canvas / meta.canvas_size
            boxes_norm = torch.stack(
                [(canvas[:, 0] + canvas[:, 2]) / 2, (canvas[:, 1] + canvas[:, 3]) / 2,
                 canvas[:, 2] - canvas[:, 0], canvas[:, 3] - canvas[:, 1]], dim=1)  # fmt: skip
        else:
            boxes_norm = torch.zeros((0, 4))
        masks = [meta.mask_to_canvas(m, self.mask_resolution) for m in sample.seg_masks] if meta else []
        return EncodedSample(
            encoded=encoded,
            has_det_targets=sample.has_det_targets and meta is not None,
            is_chat=sample.task == "chat" or not sample.has_det_targets,
            class_ids=torch.tensor([self.class_of[c] for c in sample.det_categories], dtype=torch.long),
            boxes_norm=boxes_norm,
            seg_masks=torch.stack(masks)
            if masks
            else torch.zeros((0, self.mask_resolution, self.mask_resolution)),
        )


@dataclass
class TrainingBatch:
    """A padded batch plus the head targets: `forward(**batch.model_inputs(), det_targets=..., seg_masks=...)`."""

    batch: GroundedBatch
    det_targets: DetectionTargets
    seg_masks: torch.Tensor
    is_chat: torch.Tensor  # (B,) bool

    def model_inputs(self) -> dict:
        return {**self.batch.model_inputs(), "det_targets": self.det_targets, "seg_masks": self.seg_masks}


class GroundedCollator:
    """Pads `EncodedSample`s (right padding) and gathers Detect/SAM targets per image."""

    def __init__(self, processor: GroundedProcessor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[EncodedSample]) -> TrainingBatch:
        batch = self.processor.collate([item.encoded for item in items])
        with_image = [item for item in items if item.encoded.pixel_values is not None]
        image_index = torch.cat(
            [torch.full((len(item.class_ids),), i, dtype=torch.long) for i, item in enumerate(with_image)]
        ) if with_image else torch.zeros(0, dtype=torch.long)  # fmt: skip
        det_targets = DetectionTargets(
            image_index=image_index,
            class_ids=torch.cat([item.class_ids for item in with_image])
            if with_image
            else torch.zeros(0, dtype=torch.long),
            boxes_norm=torch.cat([item.boxes_norm for item in with_image])
            if with_image
            else torch.zeros((0, 4)),
            image_has_targets=torch.tensor([item.has_det_targets for item in with_image], dtype=torch.bool),
        )
        seg_masks = torch.cat([item.seg_masks for item in items])
        is_chat = torch.tensor([item.is_chat for item in items], dtype=torch.bool)
        return TrainingBatch(batch=batch, det_targets=det_targets, seg_masks=seg_masks, is_chat=is_chat)
