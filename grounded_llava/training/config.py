"""The training run's configuration (`train.py --config X.yaml key=value ...`): model, data, stages, loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import GroundedLlavaConfig
from ..config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

StageKind = Literal["heads", "base", "align", "ground", "increment", "chooser"]
SourceKind = Literal["coco", "synthetic", "llava_chat", "coco_captions", "synthetic_chat"]


@dataclass
class SourceConfig:
    """One data source of a stage.

    kinds: `coco` (instances JSON + image folder -> grounded tasks), `llava_chat` (LLaVA conversation
    JSON), `coco_captions` (captions JSON), `synthetic` / `synthetic_chat` (the shapes world, generated
    into `dir` on first use from `num_images`, `seed`, `image_size`, `categories`; tasks resp. chat).
    Relative paths are resolved against the config file's folder; a relative synthetic `dir`
    against the run's output directory.
    """

    kind: SourceKind
    weight: float = 1.0
    annotations: str | None = None
    images: str | None = None
    dir: str | None = None
    num_images: int = 200
    seed: int = 0
    image_size: int = 224
    categories: list[str] | None = None
    tasks: dict[str, float] | None = None
    samples_per_image: int = 1
    chat_draws: int = 1  # `chat` task: draws of chat turns joined into one conversation (`TaskConfig`)
    chat_grounded: bool = False  # `chat` task: colour and position answers ground their objects
    absent_prob: float = 0.3  # `count`/`exists`/`chat` counts: how often the subject is absent (`TaskConfig`)
    limit: int | None = None
    on_bad_data: Literal["strict", "skip"] = "strict"

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"weight must be > 0, got {self.weight}")
        needs_files = self.kind in ("coco", "llava_chat", "coco_captions")
        if needs_files and (self.annotations is None or self.images is None):
            raise ConfigError(f"a {self.kind} source needs `annotations` and `images`")
        if self.kind.startswith("synthetic") and self.dir is None:
            raise ConfigError(f"a {self.kind} source needs `dir`")

    @property
    def is_grounding(self) -> bool:
        return self.kind in ("coco", "synthetic")


@dataclass
class StageConfig:
    """One incremental stage (DESIGN.md "Incremental training").

    kind: `heads` (no LLM: spatial prior, neck, Detect and SAM on every box and every instance mask of
    grounding sources, on augmented images; with `train_vision` also the tower + projector; with new
    categories and `replay_weight` it is the heads part of an increment), `base` (tiny bases only: trains
    the random-init LLM on chat, vision tower and projector frozen, standing in for LLaVA's own
    pre-training), `align` (heads, neck, `<seg>` MLP, new token rows; LLM frozen),
    `ground` (+ LoRA, chat replay with KL to the adapter-disabled model), `increment` (new categories:
    the Detect class branch grows, replay of earlier grounding data, distillation of old-class outputs),
    `chooser` (everything frozen: the model runs forward once over the stage's steps x batch grounding
    samples, and a fresh choice pointer trains `epochs` passes over its cached `<box>` queries;
    `training/chooser_stage.py`).
    """

    name: str
    kind: StageKind
    data: list[SourceConfig]
    proportion: float = 1.0
    """Share of the run's total steps (`train.max_steps`) given to this stage."""
    lr: float = 1e-3
    kl_weight: float = 0.0
    """Weight of KL(adapter-disabled || model) on chat samples (ground/increment)."""
    distill_weight: float = 0.0
    """Weight of the old-class head distillation from the stage-start snapshot (increment)."""
    replay_weight: float = 0.0
    """Mixing weight of the replay buffer (earlier stages' grounding samples) in this stage's data."""
    replay_size: int = 200
    hflip_prob: float = 0.5
    train_vision: bool = False
    """Tiny bases only, `heads` stages only: also train the vision tower + projector on boxes and masks (a
    random-init tower has no visual features; a real LLaVA keeps its CLIP frozen, DESIGN.md). No stage
    trains the tower on text alone: it collapses the features the heads need."""
    train_detector: bool = True
    """False: the neck, spatial prior and Detect stay as an earlier `heads` stage left them (no det loss, no
    detector backward: cheaper LLM steps); SAM's decoder and the pointer still train. Not for `heads` stages."""
    train_llm: bool = True
    """False (`ground` / `increment` stages): LoRA, the token rows and the region-token projector stay as
    they are; the LLM only runs forward, and the pointer and SAM's decoder learn to read it."""
    batch_size: int | None = None
    """Samples per step (per rank) in this stage; None: `train.batch_size`."""
    source_batches: bool = False
    """Every batch holds samples of one source (the sources' shares kept over the epoch): long chat and
    short grounding tasks then pad within their own batches (`training/sampler.py`; E35: 47% of a mixed
    batch's LM tokens were padding)."""
    vision_lr_scale: float = 0.3
    """The tower + projector's learning rate as a fraction of `lr` (with `train_vision`)."""
    mask_jitter: float = 0.08
    """`heads` stages: SAM's box prompts are true boxes with each side moved by N(0, this * box side)."""
    zoom_prob: float = 0.3
    """`heads` stages: probability of the zoom-out augmentation (hflip uses `hflip_prob`)."""
    epochs: int = 30
    """`chooser` stages: passes of the choice pointer over the cached queries."""

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError(f"stage {self.name!r} has no data sources")
        if self.proportion <= 0:
            raise ConfigError(f"stage {self.name!r}: proportion must be > 0")
        if self.kind == "base" and (self.kl_weight or self.distill_weight):
            raise ConfigError(f"stage {self.name!r}: a base stage has no KL or distillation")
        if not self.train_detector and self.kind == "heads":
            raise ConfigError(
                f"stage {self.name!r}: a heads stage trains the detector (train_detector: true)"
            )
        if not self.train_llm and self.kind not in ("ground", "increment"):
            raise ConfigError(f"stage {self.name!r}: train_llm: false is for ground and increment stages")
        if self.train_vision and self.kind != "heads":
            raise ConfigError(
                f"stage {self.name!r}: train_vision is for heads stages only (text alone collapses the tower's features)"
            )
        if self.kind == "chooser" and (
            self.kl_weight or self.distill_weight or not all(s.is_grounding for s in self.data)
        ):
            raise ConfigError(
                f"stage {self.name!r}: a chooser stage reads grounding sources only, without KL or distillation"
            )
        if self.epochs < 1:
            raise ConfigError(f"stage {self.name!r}: epochs must be >= 1")
        if self.kind == "heads" and (self.kl_weight or not all(s.is_grounding for s in self.data)):
            raise ConfigError(
                f"stage {self.name!r}: a heads stage trains on grounding sources only, without KL"
            )


@dataclass
class LoopConfig:
    """The optimisation loop shared by all stages."""

    max_steps: int = 100
    """Total optimizer steps over all stages, split by the stages' proportions."""
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 5
    eval_every: int = 0
    """Run the evaluation hook every N steps (0: only at the end of each stage)."""
    eval_samples: int = 16
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_nonfinite_steps: int = 10
    """A step whose loss is NaN/inf is skipped (no update, counted as `skipped_nonfinite` in the metrics);
    this many skipped in a row stop the run with an error."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("max_steps, batch_size and grad_accum must be >= 1")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class TrainConfig:
    model: GroundedLlavaConfig = field(default_factory=GroundedLlavaConfig)
    init_from: str | None = None
    """A checkpoint directory to start from instead of building `model` fresh."""
    stages: list[StageConfig] = field(default_factory=list)
    train: LoopConfig = field(default_factory=LoopConfig)
    config_dir: str = "."
    """Folder relative paths are resolved against (set from the YAML file's location)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: duplicate stage names {names}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        """Load a YAML file plus `key=value` overrides; `max_steps=N` is a shortcut for `train.max_steps=N`."""
        path = Path(path)
        aliases = {"max_steps": "train.max_steps", "seed": "train.seed", "batch_size": "train.batch_size"}
        overrides = [aliases.get(o.split("=", 1)[0], o.split("=", 1)[0]) + "=" + o.split("=", 1)[1] if "=" in o else o
                     for o in overrides]  # fmt: skip
        data = apply_overrides(load_yaml(path), overrides)
        data.setdefault("config_dir", str(path.resolve().parent))
        try:
            config = from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        if config.init_from and not config.resolve(config.init_from).is_dir():
            raise ConfigError(
                f"{path}: field 'init_from': no checkpoint directory {config.resolve(config.init_from)} "
                "(the run it names has to be trained first)"
            )
        return config

    def to_dict(self) -> dict:
        return to_dict(self)

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.config_dir) / path

    def stage_steps(self) -> list[int]:
        """Optimizer steps of every stage: `train.max_steps` split by proportions (each >= 1)."""
        total = sum(s.proportion for s in self.stages)
        steps = [max(1, int(round(self.train.max_steps * s.proportion / total))) for s in self.stages]
        return steps
