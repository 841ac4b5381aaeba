"""An original LLaVA checkpoint (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`) as transformers' LLaVA.

The original layout: `config.json` is a Llama config plus `mm_vision_tower` (the CLIP tower's hub id or
path), `mm_hidden_size`, `mm_projector_type` (`linear` or `mlp2x_gelu`), `mm_vision_select_layer` and
`mm_vision_select_feature` (`patch`: drop CLS, `cls_patch`: keep it); the weights are a Llama's
(`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`) plus `model.mm_projector.*` (`.0`, `.2` of
Linear-GELU-Linear, or one Linear), and the tower's (`model.vision_tower.vision_tower.*`) only when it was
trained; otherwise the tower comes from `mm_vision_tower`.

Mapped to `LlavaForConditionalGeneration`: the Llama parts to `model.language_model` and `lm_head`, the
projector to `model.multi_modal_projector` (a `linear` projector is `linear_1`, with an identity `linear_2`
and activation: the same function), the tower to `model.vision_tower`; an `<image>` token (and a pad
token where there is none) is added, their embedding rows the mean of the others. Every tensor is
assigned with strict loading: one that cannot be mapped is named in a `ConversionError`, never dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from grounded_llava.conversation import IMAGE_TOKEN
from grounded_llava.convert.weights import ConversionError, read_weights
from grounded_llava.errors import BaseModelUnavailableError

PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
MLP2X_NAMES = {f"{i}.{p}": f"linear_{n}.{p}" for i, n in ((0, 1), (2, 2)) for p in ("weight", "bias")}
RECOMPUTED_BUFFERS = (
    "rotary_emb.inv_freq",
)  # old Llama checkpoints saved them; transformers recomputes them
# Fields of the original config that only steer the original training code, not the model's function.
TRAINING_ONLY_FIELDS = {
    "architectures", "model_type", "mm_hidden_size", "mm_vision_tower", "mm_projector_type",
    "mm_vision_select_layer", "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token",
    "mm_patch_merge_type", "mm_projector_lr", "mm_vision_tower_lr", "image_aspect_ratio", "image_grid_pinpoints",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj",
    "tokenizer_model_max_length", "tokenizer_padding_side", "use_cache", "transformers_version", "torch_dtype",
}  # fmt: skip


@dataclass
class ConvertedLlava:
    """A transformers LLaVA with its tokenizer and image processor, ready for `save_pretrained`."""

    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: CLIPImageProcessor

    def save_pretrained(self, directory: Path) -> Path:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        return directory


def read_config(directory: Path) -> dict:
    """`directory/config.json` as a dict (ConversionError naming the file when it is missing or not JSON)."""
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: {directory} is not a LLaVA checkpoint") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def _field(config: dict, name: str, path: Path, allowed: tuple = ()) -> object:
    if name not in config:
        raise ConversionError(f"{path}: field {name!r} is missing")
    value = config[name]
    if allowed and value not in allowed:
        raise ConversionError(
            f"{path}: {name}={value!r} cannot be converted (supported: {', '.join(map(str, allowed))})"
        )
    return value


def _check_supported(config: dict, path: Path) -> None:
    """Refuse, naming the field, what transformers' LLaVA cannot express."""
    if config.get("mm_use_im_start_end"):
        raise ConversionError(
            f"{path}: mm_use_im_start_end=true (image start/end tokens) cannot be converted"
        )
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError(
            f"{path}: mm_patch_merge_type={config['mm_patch_merge_type']!r} (LLaVA-NeXT) is not LLaVA-1.5"
        )
    if str(config.get("image_aspect_ratio", "pad")).startswith("anyres"):
        raise ConversionError(
            f"{path}: image_aspect_ratio={config['image_aspect_ratio']!r} (LLaVA-NeXT) is not LLaVA-1.5"
        )
    if config.get("model_type") not in (None, "llava", "llava_llama", "llama"):
        raise ConversionError(
            f"{path}: model_type={config['model_type']!r} (only Llama-based LLaVA converts)"
        )


def load_vision_tower(name: str, *, field: str) -> CLIPVisionModel:
    """The CLIP vision tower from a local directory, or a hub id in the local cache (offline: fails clearly)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return CLIPVisionModel.from_pretrained(name, local_files_only=offline and not Path(name).is_dir())
    except OSError as err:
        raise BaseModelUnavailableError(
            f"cannot load the vision tower {name!r} ({field}): {err.__class__.__name__}; give a local copy "
            "of it with --vision-tower DIR"
        ) from None


def _take(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop the tensors whose name starts with `prefix`, with the prefix removed."""
    names = [name for name in weights if name.startswith(prefix)]
    return {name[len(prefix) :]: weights.pop(name) for name in names}


def _load_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path, prefix: str = ""
) -> None:
    """Load `state` into `module`, every tensor used and every parameter set; else a ConversionError naming
    the tensors (with their checkpoint `prefix`)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise ConversionError(
            f"{path}: the {what} does not fit: {' '.join(str(err).split())[:300]}"
        ) from None
    if missing or unexpected:
        missing, unexpected = [prefix + k for k in missing[:4]], [prefix + k for k in unexpected[:8]]
        raise ConversionError(
            f"{path}: the {what} does not fit: missing {missing}, cannot be mapped {unexpected}"
        )


def _tokenizer_with_image_token(source: Path) -> tuple[PreTrainedTokenizerBase, int]:
    """The checkpoint's tokenizer with `<image>` (and a pad token where none) added; the vocabulary size before."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, config=LlamaConfig()
        )  # not the llava_llama config.json
    except (OSError, ValueError) as err:
        raise ConversionError(
            f"{source}: no tokenizer files can be read ({err.__class__.__name__})"
        ) from None
    before = len(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer, before


def _grown(rows: torch.Tensor, total: int) -> torch.Tensor:
    """(V, D) embedding rows grown to (total, D), the new rows the mean of the old ones."""
    if total <= rows.shape[0]:
        return rows
    extra = rows.float().mean(0, keepdim=True).to(rows.dtype).expand(total - rows.shape[0], -1)
    return torch.cat([rows, extra])


def convert_original_llava(
    directory: str | Path,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    vision_tower: str | Path | None = None,
    tokenizer_source: str | Path | None = None,
) -> ConvertedLlava:
    """The checkpoint in `directory` (its `config.json`; `weights` if given, else the directory's own) as a
    transformers LLaVA. `vision_tower` overrides `mm_vision_tower`; `tokenizer_source` the tokenizer's directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = read_config(directory)
    _check_supported(config, config_path)
    projector_type = _field(config, "mm_projector_type", config_path, ("linear", "mlp2x_gelu"))
    select_feature = _field(config, "mm_vision_select_feature", config_path, tuple(SELECT_FEATURE))
    select_layer = int(_field(config, "mm_vision_select_layer", config_path))
    weights = dict(read_weights(directory) if weights is None else weights)

    tower_name = str(vision_tower or _field(config, "mm_vision_tower", config_path))
    tower = load_vision_tower(
        tower_name, field="--vision-tower" if vision_tower else f"{config_path}: mm_vision_tower"
    )
    tokenizer, vocab_before = _tokenizer_with_image_token(Path(tokenizer_source or directory))
    text_fields = {k: v for k, v in config.items() if k not in TRAINING_ONLY_FIELDS}
    rows = max(len(tokenizer), int(_field(config, "vocab_size", config_path)))  # rows may pad the vocabulary
    text_config = LlamaConfig(**{**text_fields, "vocab_size": rows, "pad_token_id": tokenizer.pad_token_id})
    vision_config = tower.config
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu" if projector_type == "mlp2x_gelu" else "linear",
        vision_feature_layer=select_layer,
        vision_feature_select_strategy=SELECT_FEATURE[select_feature],
        image_seq_length=grid + (select_feature == "cls_patch"),
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(llava_config).eval()
    weight_file = f"{directory} (weights)"

    projector = _take(weights, PROJECTOR_PREFIX)
    hidden = text_config.hidden_size
    if projector_type == "linear":
        projector = {f"linear_1.{k}": v for k, v in projector.items()}
        projector |= {"linear_2.weight": torch.eye(hidden), "linear_2.bias": torch.zeros(hidden)}
    else:
        projector = {MLP2X_NAMES.get(k, k): v for k, v in projector.items()}
    _load_strict(
        model.model.multi_modal_projector, projector, f"projector ({projector_type})", Path(weight_file)
    )

    trained_tower = _take(weights, TOWER_PREFIX)
    if trained_tower:  # saved as CLIPVisionModel's "vision_model.*"; transformers 5 names them without it
        trained_tower = {k.removeprefix("vision_model."): v for k, v in trained_tower.items()}
        _load_strict(tower, trained_tower, "vision tower", Path(weight_file), TOWER_PREFIX)
    _load_strict(model.model.vision_tower, tower.state_dict(), "vision tower", Path(tower_name))

    for name in [n for n in weights if n.endswith(RECOMPUTED_BUFFERS)]:
        del weights[name]
    lm_head = weights.pop("lm_head.weight", None)
    language = _take(weights, "model.")
    if "embed_tokens.weight" in language:
        language["embed_tokens.weight"] = _grown(language["embed_tokens.weight"], rows)
    _load_strict(model.model.language_model, language, "language model", Path(weight_file), "model.")
    if lm_head is not None:
        _load_strict(model.lm_head, {"weight": _grown(lm_head, rows)}, "lm_head", Path(weight_file))
    elif not text_config.tie_word_embeddings:
        raise ConversionError(f"{weight_file}: 'lm_head.weight' is missing and the embeddings are not tied")
    if weights:
        raise ConversionError(f"{weight_file}: tensors that cannot be mapped: {sorted(weights)[:8]}")
    if len(tokenizer) < vocab_before:
        raise ConversionError(f"{directory}: the tokenizer shrank ({vocab_before} -> {len(tokenizer)})")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ConvertedLlava(model, tokenizer, _image_processor(tower_name, vision_config.image_size))


def _image_processor(tower_name: str, image_size: int) -> CLIPImageProcessor:
    """The tower's own CLIP preprocessing where its directory has one, else CLIP's at the tower's size."""
    if (Path(tower_name) / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(tower_name)
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
