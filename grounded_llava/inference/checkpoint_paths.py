"""Where a checkpoint comes from: the shipped default, a local directory, or a hub id's snapshot."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import grounded_llava
from grounded_llava.checkpoint_layout import REQUIRED
from grounded_llava.errors import BaseModelUnavailableError, CheckpointError

if TYPE_CHECKING:
    from grounded_llava.modeling import GroundedLlavaForConditionalGeneration

logger = logging.getLogger(__name__)
DEFAULT_CHECKPOINT = Path(grounded_llava.__file__).resolve().parents[1] / "checkpoints" / "tiny-shapes"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(dir_or_id: str | Path | None) -> Path:
    """The checkpoint directory to load: the shipped default, a local directory, or a hub id's snapshot."""
    if dir_or_id is None:
        if not DEFAULT_CHECKPOINT.is_dir():
            raise FileNotFoundError(
                f"the default checkpoint {DEFAULT_CHECKPOINT} does not exist yet: train it with train.py, or "
                "pass a checkpoint directory (infer.py --model DIR, GroundedLlava.from_pretrained(DIR))"
            )
        directory = DEFAULT_CHECKPOINT
    else:
        directory = Path(dir_or_id)
        if not directory.exists() and _HUB_ID.match(str(dir_or_id)):
            directory = _download(str(dir_or_id))
        elif not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
    missing = [name for name in REQUIRED if not (directory / name).exists()]
    if missing:
        raise CheckpointError(
            f"{directory / missing[0]} is missing: {directory} is not a complete grounded-llava checkpoint "
            f"(missing {', '.join(missing)})"
        )
    return directory


def _download(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except (OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE=1: only the local cache is searched)" if constants.HF_HUB_OFFLINE else ""
        raise BaseModelUnavailableError(
            f"model {repo_id!r} is not a local directory and cannot be fetched from the Hugging Face hub"
            f"{offline}: {err.__class__.__name__}; pass a checkpoint directory"
        ) from None


def llava_base_directory(dir_or_id: str | Path | None) -> Path | None:
    """`dir_or_id` when it is a local LLaVA that is not a grounded-llava checkpoint: an original LLaVA
    (haotian-liu/LLaVA layout, `grounded_llava.convert`) or a transformers `LlavaForConditionalGeneration`."""
    if dir_or_id is None or not Path(dir_or_id).is_dir() or (Path(dir_or_id) / REQUIRED[0]).exists():
        return None
    config_file = Path(dir_or_id) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("model_type") == "llava" or "mm_vision_tower" in config:
        return Path(dir_or_id)
    return None


def load_grounded_model(dir_or_id: str | Path | None) -> GroundedLlavaForConditionalGeneration:
    """A grounded-llava checkpoint (`resolve_checkpoint`), or a LLaVA base directory (`llava_base_directory`)
    wrapped with new LoRA adapters and untrained grounding heads: it chats, its boxes mean nothing yet."""
    from grounded_llava.config import GroundedLlavaConfig
    from grounded_llava.modeling import GroundedLlavaForConditionalGeneration

    base = llava_base_directory(dir_or_id)
    if base is None:
        return GroundedLlavaForConditionalGeneration.from_pretrained(resolve_checkpoint(dir_or_id))
    logger.warning(
        "%s is a LLaVA without grounding heads: they start untrained (train them with train.py)", base
    )
    return GroundedLlavaForConditionalGeneration.from_config(GroundedLlavaConfig(base=str(base)))
