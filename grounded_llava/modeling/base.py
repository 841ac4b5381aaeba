"""Build or load the LLaVA base (tiny random-init, local directory or hub id) and wrap it with peft LoRA."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from ..config import GroundedLlavaConfig, TinyBaseConfig
from ..config_io import ConfigError
from ..conversation import IMAGE_TOKEN
from ..convert.layout import is_lora_run, is_original_llava
from ..errors import BaseModelUnavailableError
from ..processor import CLIP_MEAN, CLIP_STD
from ..tokenizer import GroundingTokenIds, add_grounding_tokens, train_tiny_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ImageSettings:
    """What the processor needs to know about the vision tower."""

    image_size: int
    patch_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    num_image_tokens: int

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


def image_settings_for(
    llava_config: LlavaConfig, mean=CLIP_MEAN, std=CLIP_STD, *, token_pool: int = 1, region_tokens: int = 0
) -> ImageSettings:
    """Image tokens per image: (S / patch / token_pool)^2 patches, plus the CLS token unless the "default"
    strategy drops it (pooling needs "default": a CLS token has no place in the pooled grid), plus
    `region_tokens` (the head's proposals, `GroundedLlavaConfig.region_tokens`)."""
    vision = llava_config.vision_config
    grid = vision.image_size // vision.patch_size
    extra = 0 if llava_config.vision_feature_select_strategy == "default" else 1
    if token_pool > 1 and (extra or grid % token_pool):
        raise ValueError(
            f"image_token_pool={token_pool} needs the 'default' feature strategy and a patch grid ({grid}) "
            "it divides"
        )
    tokens = (grid // token_pool) ** 2 + extra + region_tokens
    return ImageSettings(vision.image_size, vision.patch_size, tuple(mean), tuple(std), tokens)


def build_tiny_base(
    tiny: TinyBaseConfig, num_bins: int
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """Random-init CLIP-ViT + Llama LLaVA and its freshly trained byte-level BPE (deterministic by `tiny.seed`)."""
    tokenizer = train_tiny_tokenizer(tiny.tokenizer_vocab_size)
    add_grounding_tokens(tokenizer, num_bins)
    vision = CLIPVisionConfig(
        hidden_size=tiny.vision_hidden_size,
        intermediate_size=tiny.vision_intermediate_size,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
        projection_dim=tiny.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.text_hidden_size,
        intermediate_size=tiny.text_intermediate_size,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.text_heads,
        num_key_value_heads=tiny.text_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tiny.tie_word_embeddings,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng():
        torch.manual_seed(tiny.seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_pretrained_base(
    source: str, config: GroundedLlavaConfig, *, tokenizer_source: str | Path | None = None
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, ImageSettings]:
    """Load a LLaVA checkpoint (hub id or local directory) through transformers' own loading code.

    Grounding tokens are added to its tokenizer and the embeddings resized. Offline, a hub id that
    is not in the local cache fails at once with `BaseModelUnavailableError` saying how to provide it.
    """
    is_local = Path(source).is_dir()
    if is_local and is_original_llava(source):
        model, tokenizer, mean, std = _converted_original(source, config, tokenizer_source)
        return _with_grounding_tokens(model, tokenizer, mean, std, config)
    kwargs: dict = {"dtype": DTYPES[config.dtype], "local_files_only": _offline() and not is_local}
    if config.quantization != "none":
        kwargs["quantization_config"] = _bitsandbytes_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source or source, local_files_only=kwargs["local_files_only"]
        )
        _check_device_support(config)
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        try:
            image_processor = AutoImageProcessor.from_pretrained(
                source, local_files_only=kwargs["local_files_only"]
            )
            mean, std = image_processor.image_mean, image_processor.image_std
        except (OSError, ValueError):
            mean, std = CLIP_MEAN, CLIP_STD
    except OSError as err:
        hint = (
            f"cannot load the LLaVA base {source!r}"
            + (" (HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache)" if _offline() else "")
            + f": {err.__class__.__name__}. Download it on a connected machine, e.g. "
            f"`huggingface-cli download {source} --local-dir /path/to/{Path(source).name}`, then set "
            f"model.base=/path/to/{Path(source).name} (or copy it into HF_HOME's cache)."
        )
        raise BaseModelUnavailableError(hint) from None
    return _with_grounding_tokens(model, tokenizer, mean, std, config)


def _converted_original(
    source: str, config: GroundedLlavaConfig, tokenizer_source: str | Path | None
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, tuple, tuple]:
    """An original LLaVA directory (haotian-liu/LLaVA layout) converted in memory (`grounded_llava.convert`)."""
    from ..convert.original_llava import convert_original_llava

    if is_lora_run(source) or config.quantization != "none":
        what = "a LoRA run: merge it into its base" if is_lora_run(source) else "quantised: convert it"
        raise ConfigError(
            f"model.base={source} is an original LLaVA checkpoint and {what} first: "
            f"python -m grounded_llava.convert --from-llava {source} --out OUT [--base BASE], then model.base=OUT"
        )
    converted = convert_original_llava(source, tokenizer_source=tokenizer_source)
    processor = converted.image_processor
    return (
        converted.model.to(DTYPES[config.dtype]),
        converted.tokenizer,
        processor.image_mean,
        processor.image_std,
    )


def _with_grounding_tokens(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    mean: tuple,
    std: tuple,
    config: GroundedLlavaConfig,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, ImageSettings]:
    """The base with the grounding tokens added to its tokenizer and embeddings, and its image settings."""
    ids = add_grounding_tokens(tokenizer, config.num_bins)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _check_token_ids(ids, model)
    return (
        model,
        tokenizer,
        image_settings_for(
            model.config,
            mean,
            std,
            token_pool=config.image_token_pool,
            region_tokens=config.num_region_tokens,
        ),
    )


def _bitsandbytes_config(config: GroundedLlavaConfig):
    """`config.quantization` as transformers' `BitsAndBytesConfig`: NF4 with double quantisation, or LLM.int8;
    the vision tower, the projector and the LM head stay in `config.dtype`."""
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "multi_modal_projector", "lm_head"]
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[config.dtype],
        llm_int8_skip_modules=skip,
    )


def _check_device_support(config: GroundedLlavaConfig) -> None:
    """GPU-only options fail clearly on a CPU machine (checked once the weights are known to be available)."""
    if torch.cuda.is_available():
        return
    if config.quantization != "none":
        raise ConfigError(
            f"model.quantization={config.quantization} needs a CUDA GPU (bitsandbytes); "
            "set model.quantization=none on this CPU-only machine"
        )
    if config.dtype == "float16":
        raise ConfigError("model.dtype=float16 needs a GPU; use float32 or bfloat16 on CPU")


def _check_token_ids(ids: GroundingTokenIds, model: LlavaForConditionalGeneration) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids.all_ids) >= rows:
        raise ValueError(f"grounding token id {max(ids.all_ids)} >= embedding rows {rows}: resize failed")


def lora_config_for(
    config: GroundedLlavaConfig, model: LlavaForConditionalGeneration, token_ids: list[int]
) -> LoraConfig:
    """LoRA on the language model only (regex), new token rows trainable via `trainable_token_indices`."""
    trainable_rows = {"embed_tokens": token_ids}
    if not model.config.get_text_config().tie_word_embeddings:
        trainable_rows["lm_head"] = token_ids
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_regex,
        trainable_token_indices=trainable_rows,
    )


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's wrapping of a model: peft 0.21 reads transformers 5's deprecated
    `is_gradient_checkpointing` property there, a FutureWarning on every load that no user can act on.
    Only that warning is filtered; every other one still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def wrap_with_lora(
    config: GroundedLlavaConfig, model: LlavaForConditionalGeneration, token_ids: list[int]
) -> PeftModel:
    if config.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    with peft_wrapping():
        peft_model = get_peft_model(model, lora_config_for(config, model, token_ids))
    if config.gradient_checkpointing:
        peft_model.get_base_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        peft_model.enable_input_require_grads()
    return peft_model


def adapters_merged(peft_model: PeftModel) -> bool:
    """Whether the adapters are folded into the base weights (`merged_adapters`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.merged for m in peft_model.modules() if isinstance(m, BaseTunerLayer))


def _merged_lora_layers(peft_model: PeftModel) -> list[nn.Module]:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer) and m.merged]


def merge_adapters(peft_model: PeftModel) -> None:
    """Fold the LoRA and the trainable token rows into the base weights, for inference: decoding then runs
    one matmul per linear layer, and a merged LoRA layer calls its base layer's `forward` directly (peft's
    wrapper forward only checks flags and calls it: ~5% of a tiny model's decoding step, bench/latency.py).
    The adapters stay separable (`unmerge_adapters`; checkpoints store them unmerged). Not for training
    (a merged layer gives its LoRA no gradient), nor with `disable_adapter()` (the layers read merged)."""
    with peft_wrapping():
        peft_model.merge_adapter()
    for layer in _merged_lora_layers(peft_model):
        layer.forward = layer.get_base_layer().forward  # an instance attribute: unmerge deletes it


@contextmanager
def adapters_disabled(peft_model: PeftModel) -> Iterator[None]:
    """peft's `disable_adapter()`: within the block the model computes as its base. Refused (RuntimeError)
    while the adapters are merged (`merge_adapters`): the merged layers would still compute with them."""
    if adapters_merged(peft_model):
        raise RuntimeError("disable the adapters of a merged model only after unmerge_adapters()")
    with peft_model.disable_adapter():
        yield


def unmerge_adapters(peft_model: PeftModel) -> None:
    """Undo `merge_adapters` (the base weights back to their own values, up to rounding)."""
    for layer in _merged_lora_layers(peft_model):
        layer.__dict__.pop("forward", None)
    with peft_wrapping():
        peft_model.unmerge_adapter()


def extend_trainable_rows(peft_model: PeftModel, token_ids: list[int]) -> None:
    """Make more token rows trainable (category names added by an increment: a small base LM never saw
    their words, and their rows were only ever pushed down by its softmax). The rows start from their
    current values; the adapter config records them, so the saved adapter reloads with the same rows."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in peft_model.modules():
        if not isinstance(module, TrainableTokensLayer) or module.tied_adapter:
            continue
        for name, indices in list(module.token_indices.items()):
            extra = [t for t in dict.fromkeys(token_ids) if t not in indices]
            if not extra:
                continue
            rows = module.get_base_layer().weight[extra].detach().clone()
            delta = module.trainable_tokens_delta[name]
            module.token_indices[name] = [*indices, *extra]
            module.trainable_tokens_delta[name] = nn.Parameter(
                torch.cat([delta.data, rows.to(delta.dtype)]), requires_grad=delta.requires_grad
            )
            module.trainable_tokens_original[name] = torch.cat(
                [module.trainable_tokens_original[name], rows.to(delta.dtype)]
            )
    for config in peft_model.peft_config.values():
        rows = config.trainable_token_indices or {}
        for layer, indices in rows.items():
            rows[layer] = [*indices, *(t for t in dict.fromkeys(token_ids) if t not in indices)]


def sync_trainable_rows(peft_model: PeftModel) -> None:
    """Reset the trainable token rows to the base embedding's current rows. After a `base` stage (which
    trains the base rows with the adapter disabled) the rows peft copied at wrap time are stale: without
    this, the first LoRA stage would start from untrained embeddings of every grounding token."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, TrainableTokensLayer) or module.tied_adapter:
                continue
            weight = module.get_base_layer().weight
            for name, indices in module.token_indices.items():
                rows = weight[indices].to(module.trainable_tokens_delta[name].dtype)
                module.trainable_tokens_delta[name].copy_(rows)
                module.trainable_tokens_original[name].copy_(rows)


_PEFT_KEY = re.compile(r"\.(token_adapter\.)?base_layer\.")


def base_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The LLaVA weights without any adapter, under the plain transformers key names."""
    state = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in key or "trainable_tokens_" in key:
            continue
        state[_PEFT_KEY.sub(".", key)] = tensor
    return state
