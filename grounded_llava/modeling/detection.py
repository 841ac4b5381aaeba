"""`DetectionHead`: ultralytics' YOLO `Detect` head and `v8DetectionLoss` over the vision neck's pyramid.

Frames: the head works on the square model canvas (S, S); boxes it returns are xyxy canvas pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from ultralytics.nn.modules.head import Detect
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.nms import non_max_suppression


@dataclass
class DetectionTargets:
    """Ground truth for the images that have it: `image_index` (n,) into the batch's images, `class_ids` (n,),
    `boxes_norm` (n, 4) xywh as fractions of the canvas (ultralytics' convention), and `image_has_targets` (I,)
    bool: False for images (e.g. chat replay) whose instances are unknown, which the loss skips."""

    image_index: torch.Tensor
    class_ids: torch.Tensor
    boxes_norm: torch.Tensor
    image_has_targets: torch.Tensor

    def to(self, device: torch.device) -> DetectionTargets:
        return DetectionTargets(*(t.to(device) for t in vars(self).values()))


def _group_norm_like(batch_norm: nn.BatchNorm2d) -> nn.GroupNorm:
    channels = batch_norm.num_features
    return nn.GroupNorm(num_groups=math.gcd(channels, 16), num_channels=channels)


def _replace_batch_norms(module: nn.Module) -> None:
    """Swap every BatchNorm2d of ultralytics' `Conv` blocks for GroupNorm, in place.

    Batches here are a few images per rank: BatchNorm's statistics would be noise in train mode and,
    frozen at their init (mean 0, var 1), never normalise the bias-free convs at all; per-rank running
    statistics also make DDP replicas diverge. GroupNorm needs no batch statistics.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _group_norm_like(child))
        else:
            _replace_batch_norms(child)


class _PinnedDetect(Detect):
    """ultralytics' `Detect` with its layer layout pinned: building any YOLO model from a v8 yaml sets
    the CLASS attribute `Detect.legacy = True` (process-wide), which would change the layers of every
    head built afterwards and make checkpoints unloadable. Nothing else differs."""

    legacy = False


class _LossHost:
    """The minimal model-like object `v8DetectionLoss` reads: `.args` gains, `.model[-1]` the head, `.parameters()`."""

    def __init__(self, detect: Detect, *, box: float, cls: float, dfl: float) -> None:
        self.args = SimpleNamespace(box=box, cls=cls, dfl=dfl)
        self.model = [detect]
        self.parameters = detect.parameters


class DetectionHead(nn.Module):
    """YOLO `Detect` over three pyramid levels of `channels` channels with the given canvas strides."""

    def __init__(
        self,
        *,
        num_classes: int,
        channels: int,
        strides: tuple[float, float, float],
        canvas_size: int,
        reg_max: int = 16,
        gains: tuple[float, float, float] = (7.5, 0.5, 1.5),
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("the detection head needs at least one category (heads.categories)")
        self.channels = channels
        self.gains = gains
        self.detect = _PinnedDetect(nc=num_classes, reg_max=reg_max, ch=(channels,) * len(strides))
        self.detect.stride = torch.tensor(strides, dtype=torch.float32)
        _replace_batch_norms(self.detect)
        self.canvas_size = canvas_size
        with torch.no_grad():
            for level, (box_branch, class_branch) in enumerate(
                zip(self.detect.cv2, self.detect.cv3, strict=True)
            ):
                box_branch[-1].bias.fill_(2.0)
                class_branch[-1].bias.fill_(self.class_prior(level, num_classes))
        self._criterion: tuple[torch.device, v8DetectionLoss] | None = None

    def class_prior(self, level: int, num_classes: int) -> float:
        """Initial class logit of a pyramid level: ~5 objects per image spread over its anchors and classes
        (ultralytics' `bias_init`, with this head's canvas instead of its fixed 640 px image)."""
        anchors = (self.canvas_size / float(self.detect.stride[level])) ** 2
        return math.log(5 / num_classes / anchors)

    @property
    def num_classes(self) -> int:
        return self.detect.nc

    def forward(self, pyramid: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw predictions: "boxes" (I, 4*reg_max, A) DFL logits, "scores" (I, nc, A) logits, "feats"."""
        out = self.detect([level for level in pyramid])
        return out if isinstance(out, dict) else out[1]

    def loss(self, predictions: dict[str, torch.Tensor], targets: DetectionTargets) -> torch.Tensor:
        """Box + classification + DFL loss (ultralytics gains applied) over the images that have targets."""
        keep = targets.image_has_targets.nonzero().flatten()
        if keep.numel() == 0:
            return predictions["scores"].sum() * 0.0
        subset = {
            "boxes": predictions["boxes"][keep],
            "scores": predictions["scores"][keep],
            "feats": [f[keep] for f in predictions["feats"]],
        }
        remap = torch.full((targets.image_has_targets.numel(),), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(keep.numel(), device=keep.device)
        rows = remap[targets.image_index]
        valid = rows >= 0
        batch = {
            "batch_idx": rows[valid].float(),
            "cls": targets.class_ids[valid].float(),
            "bboxes": targets.boxes_norm[valid].float(),
        }
        loss_parts = self._criterion_for(subset["scores"].device).get_assigned_targets_and_loss(
            subset, batch
        )[1]
        return loss_parts.sum()

    def _criterion_for(self, device: torch.device) -> v8DetectionLoss:
        if self._criterion is None or self._criterion[0] != device:
            box, cls, dfl = self.gains
            self._criterion = (device, v8DetectionLoss(_LossHost(self.detect, box=box, cls=cls, dfl=dfl)))
        return self._criterion[1]

    @torch.no_grad()
    def postprocess(
        self,
        predictions: dict[str, torch.Tensor],
        *,
        conf_threshold: float,
        iou_threshold: float,
        max_det: int = 100,
        agnostic: bool = False,
    ) -> list[torch.Tensor]:
        """Decode and NMS: per image a (n, 6) tensor [x0, y0, x1, y1, score, class_id], xyxy canvas pixels,
        best first. `agnostic`: one NMS over all classes (boxes of different classes suppress each other)."""
        decoded = self.detect._inference(predictions)  # (I, 4 + nc, A): xywh canvas pixels + sigmoid scores
        return non_max_suppression(
            decoded.float(),
            conf_thres=conf_threshold,
            iou_thres=iou_threshold,
            max_det=max_det,
            nc=self.num_classes,
            agnostic=agnostic,
        )

    def grow_classes(self, num_classes: int) -> None:
        """Add classes to the classification branch; the rows (and biases) of the old classes are kept exactly."""
        old = self.num_classes
        if num_classes < old:
            raise ValueError(f"cannot shrink the detection head from {old} to {num_classes} classes")
        if num_classes == old:
            return
        if max(self.channels, min(num_classes, 100)) != max(self.channels, min(old, 100)):
            raise ValueError(
                f"growing to {num_classes} classes would change Detect's hidden width; "
                f"use heads.neck_channels >= {min(num_classes, 100)}"
            )
        for branch in self.detect.cv3:
            last: nn.Conv2d = branch[-1]
            grown = nn.Conv2d(last.in_channels, num_classes, 1).to(last.weight.device, last.weight.dtype)
            with torch.no_grad():
                grown.weight[:old] = last.weight
                grown.bias[:old] = last.bias
                grown.weight[old:].normal_(0.0, 0.01)
            branch[-1] = grown
        self.detect.nc = num_classes
        self.detect.no = num_classes + self.detect.reg_max * 4
        with torch.no_grad():
            for level, branch in enumerate(self.detect.cv3):
                branch[-1].bias[old:] = self.class_prior(level, num_classes)
        self._criterion = None
