"""The model's configuration: one typed source, YAML only overrides (see `configs/*.yaml`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .codec import DEFAULT_NUM_BINS
from .config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

TINY_BASE = "tiny"


@dataclass
class TinyBaseConfig:
    """Sizes of the random-init tiny LLaVA (CLIP ViT + Llama) used offline, in tests and for the default model."""

    image_size: int = 224
    """Square model canvas side in pixels."""
    patch_size: int = 16
    vision_hidden_size: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    text_hidden_size: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tokenizer_vocab_size: int = 1024
    """Size of the byte-level BPE the project trains on its own corpus (before special tokens)."""
    tie_word_embeddings: bool = False
    """Share the LM's input embeddings with its output layer (helps a small LM copy tokens)."""
    seed: int = 0
    """Seed of the random initialisation (weights and tokenizer training are deterministic)."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"tiny.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.text_hidden_size % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ConfigError(
                "tiny.text_hidden_size must divide by text_heads, and text_heads by text_kv_heads"
            )


@dataclass
class LoraSettings:
    """peft LoRA on the language model only (the regex never matches the vision tower or the projector)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_regex: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if "language_model" not in self.target_regex:
            raise ConfigError(
                "lora.target_regex must be restricted to the language model (contain 'language_model')"
            )


@dataclass
class HeadSettings:
    """The vision neck, the YOLO Detect head and the SAM mask decoder."""

    neck_channels: int = 64
    """Channels of every pyramid level (strides patch/2, patch, 2*patch: finest first)."""
    categories: list[str] = field(default_factory=list)
    """Names of the detection classes; class id = index. Incremental stages append to it."""
    reg_max: int = 16
    box_gain: float = 7.5
    cls_gain: float = 0.5
    dfl_gain: float = 1.5
    mask_decoder_depth: int = 2
    mask_decoder_heads: int = 4
    mask_decoder_mlp_dim: int = 256
    seg_mlp_hidden: int = 256
    spatial_prior: str | bool = "patchify"
    """A conv stem on the canvas pixels beside the vision tower, fused into every neck level (ViT-Adapter):
    "patchify" (the lighter stem), "conv" (the first models' stem; `true` in their configs), or false
    (none). See `modeling/spatial_prior.py`."""
    mask_from_finest: bool = True
    """SAM decodes from the stride patch/2 level (masks at 8x the patch grid) instead of stride patch (4x)."""
    mask_crop: int = 14
    """SAM decodes a mask_crop x mask_crop grid sampled over each prompt's widened box (masks at 4x that over
    the box: finer for small objects, 4x fewer tokens than the 28 x 28 map); 0 decodes the whole map, as the
    first models did (their saved configs have no `mask_crop`). See `modeling/masks.py`."""
    mask_pixels: bool = True
    """With crops: the crop's canvas pixels add detail to SAM's upscaled features (SAM-HQ-like; E34). Saved
    configs without the key load as false."""
    pointer_dim: int = 128
    chooser: bool = False
    """A second, choice pointer beside the stop pointer (set by a `chooser` stage, docs/EXPERIMENTS.md E21):
    the pointer says whether a `<box>` is "none", the chooser which proposal it is."""
    max_proposals: int = 16
    """Class-agnostic head proposals a `<box>` chooses among (top-K after NMS)."""
    proposal_nms_iou: float = 0.6
    box_only_prompt_rate: float = 0.2
    """Training: fraction of `<seg>` prompts given to SAM by box alone, so head detections can get masks too."""
    conf_threshold: float = 0.25
    nms_iou: float = 0.6
    match_iou: float = 0.5
    """IoU for matching a text box to a head box at inference (DESIGN: reconciliation)."""
    attribute: str = ""
    """An annotation attribute key (e.g. "color") that the attribute head classifies for every box
    (`modeling/attributes.py`) and the scene line names; "" for none."""
    attribute_values: list[str] = field(default_factory=list)
    """The attribute's values (class id = index); annotations with another value teach nothing."""

    def __post_init__(self) -> None:
        if self.spatial_prior is True:  # configs written before the stems had names
            self.spatial_prior = "conv"
        if self.spatial_prior not in (False, "patchify", "conv"):
            raise ConfigError(
                f"heads.spatial_prior must be 'patchify', 'conv' or false, got {self.spatial_prior!r}"
            )
        if self.mask_crop < 0:
            raise ConfigError(f"heads.mask_crop must be >= 0, got {self.mask_crop}")
        if self.mask_pixels and not self.mask_crop:
            self.mask_pixels = False  # pixel detail is a crop's: the whole-map decoder has none
        if self.neck_channels % self.mask_decoder_heads:
            raise ConfigError("heads.neck_channels must divide by heads.mask_decoder_heads")
        if bool(self.attribute) != bool(self.attribute_values):
            raise ConfigError(
                "heads.attribute and heads.attribute_values go together (both set or both empty)"
            )
        if len(set(self.categories)) != len(self.categories):
            raise ConfigError(f"heads.categories has duplicates: {self.categories}")


@dataclass
class LossWeights:
    lm: float = 1.0
    lm_phrase: float = 1.0
    """Weight of the LM loss on a grounded phrase's tokens and its `</p>` relative to other answer tokens."""
    det: float = 1.0
    mask_bce: float = 2.0
    mask_dice: float = 0.5
    pointer: float = 1.0


@dataclass
class GroundedLlavaConfig:
    """Everything needed to build the model.

    `base` is a hub id (e.g. llava-hf/llava-1.5-7b-hf), a local directory holding a
    LlavaForConditionalGeneration, or "tiny" for the inline random-init preset `tiny`.
    """

    base: str = TINY_BASE
    tiny: TinyBaseConfig = field(default_factory=TinyBaseConfig)
    num_bins: int = DEFAULT_NUM_BINS
    lora: LoraSettings = field(default_factory=LoraSettings)
    heads: HeadSettings = field(default_factory=HeadSettings)
    loss: LossWeights = field(default_factory=LossWeights)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    base_save_dtype: Literal["same", "bfloat16", "float16"] = "same"
    """The dtype a checkpoint stores the tiny base's weights in (`modeling/checkpoint.py`; a hub base is not
    stored): "same" as in memory; "float16" halves the file (weights rounded to ~3 significant digits) and
    loading casts them back to `dtype`."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """The base LLM's weights through bitsandbytes (CUDA only), as the original LLaVA builder's `load_4bit` /
    `load_8bit`: "4bit" NF4 (QLoRA), "8bit" LLM.int8; the vision tower, projector and LM head stay unquantised."""
    gradient_checkpointing: bool = False
    image_token_pool: int = 1
    """k > 1: the LLM reads the projected patch grid average-pooled k x k ((g/k)^2 image tokens, e.g. the
    tiny preset's 14x14 -> 7x7: 4x fewer image tokens per LLM step); the heads always read the full grid.
    Needs the "default" feature strategy (no CLS token) and k dividing the grid."""
    region_tokens: bool = False
    """After the image tokens the LLM reads one token per head proposal (`heads.max_proposals`, best
    first; Groma's region tokens): neck features pooled in the box + geometry + score."""
    region_feedback: bool = False
    """With `region_tokens`: the region token of the proposal a `<box>` group cites is added to the LLM's
    input at the group's `</box>`, so the words after a box read its object (`modeling/region_feedback.py`)."""
    copy_bias: float = 0.0
    """Decoding: inside a grounded phrase, this logit bonus goes to the word that continues a run of the
    question's words (`inference/copy_prior.py`; 0 = off). For a small LM that does not copy on its own."""
    copy_head: bool = False
    """A pointer-generator copy route beside the LM head (`modeling/copy_head.py`): the next token may be
    copied from the prompt's words. For a small LM trained from scratch, which does not learn to copy (E36)."""
    scene_line: bool = False
    """The image's turn opens with the scene line (`scene_line.py`): the objects the head sees (and their
    `heads.attribute`) as words, with counts; written from the annotations in training, from the head's
    detections at inference (OSCAR's object tags; docs/EXPERIMENTS.md E36)."""
    scene_conf_threshold: float = 0.25
    """The score a detection needs to be named in the scene line (a count is right only when every object
    of the image is named once)."""
    system_prompt: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )

    def __post_init__(self) -> None:
        if not 2 <= self.num_bins <= 1000:
            raise ConfigError(f"num_bins must be in [2, 1000], got {self.num_bins}")
        if self.image_token_pool < 1:
            raise ConfigError(f"image_token_pool must be >= 1, got {self.image_token_pool}")
        if self.region_feedback and not self.region_tokens:
            raise ConfigError("region_feedback needs region_tokens (it feeds a region token back)")
        if self.quantization != "none" and self.base == TINY_BASE:
            raise ConfigError(
                f"quantization {self.quantization} needs a pretrained base (bitsandbytes quantises weights as "
                "they load); the tiny preset is built in float"
            )
        if self.quantization != "none" and self.dtype == "float32":
            raise ConfigError(
                f"quantization {self.quantization} needs dtype bfloat16 or float16 for the compute"
            )

    @property
    def num_region_tokens(self) -> int:
        """Region tokens per image in the LLM input (0 without `region_tokens`)."""
        return self.heads.max_proposals if self.region_tokens else 0

    @property
    def is_tiny(self) -> bool:
        return self.base == TINY_BASE

    @classmethod
    def from_dict(cls, data: dict) -> GroundedLlavaConfig:
        """Also reads checkpoints written before `quantization` existed (their `load_in_4bit` flag)."""
        if "load_in_4bit" in data:
            data = {k: v for k, v in data.items() if k != "load_in_4bit"} | {
                "quantization": "4bit" if data["load_in_4bit"] else data.get("quantization", "none")
            }
        return from_dict(cls, data)

    @classmethod
    def from_saved(cls, data: dict) -> GroundedLlavaConfig:
        """A checkpoint's config: as `from_dict`, and a checkpoint saved before `heads.mask_crop` (or
        `heads.mask_pixels`) existed decodes its masks as it was trained to: from the whole map (without pixels)."""
        heads = data.get("heads")
        if isinstance(heads, dict):  # saved before crops (0) or before pixel detail (false)
            data = data | {"heads": {"mask_crop": 0, "mask_pixels": False} | heads}
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = (), *, section: str | None = "model"):
        """Load from a YAML file (its `section`, e.g. `model:` of a training config) plus `key=value` overrides."""
        data = load_yaml(path)
        if section is not None and section in data:
            data = data[section]
        try:
            return from_dict(cls, apply_overrides(data, overrides))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return to_dict(self)
