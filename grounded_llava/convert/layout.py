"""What marks a directory as an original LLaVA checkpoint (haotian-liu/LLaVA), without loading anything:
light, so that the commands check their arguments before torch is imported."""

from __future__ import annotations

import json
from pathlib import Path

ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
ADAPTER_CONFIG = "adapter_config.json"  # a LoRA run: peft adapter + NON_LORA_TRAINABLES + the LLaVA config
NON_LORA_TRAINABLES = "non_lora_trainables.bin"


def is_original_llava(directory: str | Path) -> bool:
    """Whether `directory` holds a checkpoint in the original LLaVA layout (its config names a CLIP tower)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return "mm_vision_tower" in config or any(
        a in ORIGINAL_ARCHITECTURES for a in config.get("architectures") or []
    )


def is_lora_run(directory: str | Path) -> bool:
    """Whether `directory` is an original LLaVA LoRA run (to be merged into its base)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()
