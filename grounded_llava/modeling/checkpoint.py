"""The checkpoint of a grounded model: build one from a config, save it, load it (the one owner of the
layout; `checkpoint_layout.py` holds the file names, light enough for command lines to check a directory).

The files are listed in `checkpoint_layout.py`. Saving writes into a temporary sibling directory and renames it into place (`atomic_dir.py`), so a crash
never leaves a half-written checkpoint; a failed write (disk full) is a one-line `CheckpointError`. Loading
checks every weight file first (`state_files.py`): a damaged one is a one-line error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from ..atomic_dir import atomic_directory
from ..checkpoint_layout import ADAPTER_DIR, BASE_DIR, CONFIG_FILE, HEADS_FILE
from ..config import GroundedLlavaConfig
from ..processor import GroundedProcessor
from ..tokenizer import GroundingTokenIds
from .base import (
    DTYPES,
    ImageSettings,
    base_state_dict,
    build_tiny_base,
    image_settings_for,
    load_pretrained_base,
    peft_wrapping,
    wrap_with_lora,
)
from .grounded_llava import GroundedLlavaForConditionalGeneration
from .state_files import CheckpointError, check_shapes, read_safetensors, verify_safetensors

FORMAT_VERSION = 1


def _assemble(
    config: GroundedLlavaConfig, llava: PeftModel, tokenizer, settings: ImageSettings
) -> tuple[GroundedLlavaForConditionalGeneration, GroundedProcessor]:
    token_ids = GroundingTokenIds.from_tokenizer(tokenizer, config.num_bins)
    with torch.random.fork_rng():
        torch.manual_seed(config.tiny.seed)
        model = GroundedLlavaForConditionalGeneration(
            config=config,
            llava=llava,
            token_ids=token_ids,
            num_image_tokens=settings.num_image_tokens,
            grid_size=settings.grid_size,
            canvas_size=settings.image_size,
            patch_size=settings.patch_size,
        )
    # The heads stay float32 whatever the LLaVA dtype: they are small, and SAM's prompt encoder casts
    # its coordinates to float32 itself. Their inputs are cast to float32 in `forward`.
    processor = GroundedProcessor(
        tokenizer,
        image_size=settings.image_size,
        num_image_tokens=settings.num_image_tokens,
        num_bins=config.num_bins,
        system_prompt=config.system_prompt,
        image_mean=settings.image_mean,
        image_std=settings.image_std,
    )
    return model, processor


def build_model(
    config: GroundedLlavaConfig,
) -> tuple[GroundedLlavaForConditionalGeneration, GroundedProcessor]:
    """A new grounded model: the base (tiny random-init, or real weights), LoRA, fresh heads."""
    if config.is_tiny:
        llava, tokenizer = build_tiny_base(config.tiny, config.num_bins)
        if config.dtype != "float32":
            llava.to(DTYPES[config.dtype])
        settings = image_settings_for(
            llava.config, token_pool=config.image_token_pool, region_tokens=config.num_region_tokens
        )
    else:
        llava, tokenizer, settings = load_pretrained_base(config.base, config)
    token_ids = GroundingTokenIds.from_tokenizer(tokenizer, config.num_bins)
    return _assemble(config, wrap_with_lora(config, llava, token_ids.all_ids), tokenizer, settings)


def _cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors in `dtype`; tensors that share storage (tied input and output
    embeddings) stay one tensor, so that `save_pretrained` still writes them once."""
    cast: dict[int, torch.Tensor] = {}
    for tensor in state.values():
        if tensor.is_floating_point() and tensor.data_ptr() not in cast:
            cast[tensor.data_ptr()] = tensor.detach().to(dtype)
    return {k: cast.get(v.data_ptr(), v) if v.is_floating_point() else v for k, v in state.items()}


def _write_checkpoint(
    model: GroundedLlavaForConditionalGeneration, processor: GroundedProcessor, directory: Path
) -> None:
    processor.save_pretrained(directory)
    model.llava.save_pretrained(directory / ADAPTER_DIR)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.heads_state_dict().items()},
        directory / HEADS_FILE,
    )
    if model.config.is_tiny:
        base = base_state_dict(model.llava)
        if model.config.base_save_dtype != "same":
            base = _cast_floats(base, DTYPES[model.config.base_save_dtype])
        model.base_llava.save_pretrained(directory / BASE_DIR, state_dict=base)
    geometry = {
        "num_image_tokens": model.num_image_tokens,
        "canvas_size": model.canvas_size,
        "grid_size": model.neck.grid_size,
        "patch_size": int(model.detection_head.detect.stride[1].item()),
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
    }
    meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "geometry": geometry}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def save_pretrained(
    model: GroundedLlavaForConditionalGeneration, processor: GroundedProcessor, directory: str | Path
) -> Path:
    """Write the checkpoint atomically (`atomic_dir.atomic_directory`): complete, or not at all."""
    with atomic_directory(directory) as staging:
        _write_checkpoint(model, processor, staging)
    return Path(directory)


def read_checkpoint_meta(directory: Path) -> dict:
    """The checkpoint's `grounded_config.json`, with its format version checked."""
    meta_file = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} is missing: {directory} is not a grounded-llava checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_file} is not valid JSON: {err}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format_version {version!r} is not supported by this grounded-llava "
            f"(expects {FORMAT_VERSION}); convert or re-export the checkpoint"
        )
    for key in ("config", "geometry"):
        if key not in meta:
            raise CheckpointError(f"{meta_file}: missing field {key!r}")
    return meta


def load_pretrained(
    directory: str | Path, *, is_trainable: bool = False
) -> tuple[GroundedLlavaForConditionalGeneration, GroundedProcessor]:
    """Load a checkpoint written by `save_pretrained` (the base from `base/`, or from its hub id / path)."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    config = GroundedLlavaConfig.from_saved(meta["config"])
    for required in (ADAPTER_DIR, HEADS_FILE):
        if not (directory / required).exists():
            raise CheckpointError(f"{directory / required} is missing: incomplete checkpoint")
    verify_safetensors(directory)
    processor = GroundedProcessor.from_pretrained(directory)
    # A base stored in the checkpoint is saved with it again: peft's adapter config and model card must not
    # record this machine's path to it (nor keep one that an older checkpoint recorded).
    stored_base = (directory / BASE_DIR).is_dir()
    if stored_base:
        llava = LlavaForConditionalGeneration.from_pretrained(
            directory / BASE_DIR, dtype=DTYPES[config.dtype]
        )
        llava.name_or_path = llava.config.name_or_path = ""
        settings = image_settings_for(
            llava.config,
            processor.image_mean,
            processor.image_std,
            token_pool=config.image_token_pool,
            region_tokens=config.num_region_tokens,
        )
    else:
        llava, _, settings = load_pretrained_base(config.base, config, tokenizer_source=directory)
    if llava.get_input_embeddings().weight.shape[0] != len(processor.tokenizer):
        raise CheckpointError(
            f"{directory}: the base has {llava.get_input_embeddings().weight.shape[0]} token rows but the "
            f"tokenizer {len(processor.tokenizer)} tokens"
        )
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(llava, directory / ADAPTER_DIR, is_trainable=is_trainable)
    if stored_base:
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = None
    model, _ = _assemble(config, peft_model, processor.tokenizer, settings)
    heads = read_safetensors(directory / HEADS_FILE)
    check_shapes(model, heads, directory / HEADS_FILE)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("llava.")]
    if missing or unexpected:
        raise CheckpointError(f"{directory / HEADS_FILE}: missing {missing[:5]} unexpected {unexpected[:5]}")
    return model, processor
