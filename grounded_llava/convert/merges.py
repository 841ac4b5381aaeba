"""The two original LLaVA checkpoints that are not whole models: LoRA runs and v0 deltas.

- A LoRA run (`train_mem.py --lora_enable`) saves a peft adapter (`adapter_config.json`,
  `adapter_model.safetensors|bin`), the non-LoRA trainables (`non_lora_trainables.bin`: the projector, under
  `base_model.model.model.mm_projector.*`) and the LLaVA `config.json`; the original loader puts the
  trainables on the base language model and merges the adapter (`merge_and_unload`). `merge_lora_run`
  does the same on tensors: W += (alpha / r) B A (alpha / sqrt(r) with rslora).
- A v0 delta holds target - base for every base tensor (the embeddings larger by the added tokens) and the
  projector as is; `apply_delta` adds the base back, as the original `apply_delta.py`.
Both give the tensors of a whole original LLaVA, under its names, for `convert_original_llava`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grounded_llava.convert.layout import ADAPTER_CONFIG, NON_LORA_TRAINABLES
from grounded_llava.convert.weights import ConversionError, read_tensor_file, read_weights

PEFT_PREFIX = "base_model.model."
GROWN_BY_ADDED_TOKENS = ("model.embed_tokens.weight", "lm_head.weight")


def _adapter_settings(path: Path) -> tuple[float, set[str]]:
    """The LoRA scale and target modules of `adapter_config.json`; refuses what a plain merge cannot do."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ConversionError(f"{path}: field {field!r} is missing")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise ConversionError(f"{path}: {flag}=true cannot be merged here")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return scale, set(config.get("modules_to_save") or [])


def _trainable_names(trainables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base_model.model.model.mm_projector.0.weight` -> `model.mm_projector.0.weight`, as the original loader."""
    trainables = {name.removeprefix("base_model."): tensor for name, tensor in trainables.items()}
    if any(name.startswith("model.model.") for name in trainables):
        trainables = {name.removeprefix("model."): tensor for name, tensor in trainables.items()}
    return trainables


def merge_lora_run(run_dir: str | Path, base_dir: str | Path) -> dict[str, torch.Tensor]:
    """The original LLaVA tensors of a LoRA run: the base language model's, the non-LoRA trainables, the
    adapter merged in. Every adapter tensor must land on a base tensor (ConversionError naming it)."""
    run_dir, base_dir = Path(run_dir), Path(base_dir)
    scale, modules_to_save = _adapter_settings(run_dir / ADAPTER_CONFIG)
    if modules_to_save:
        raise ConversionError(
            f"{run_dir / ADAPTER_CONFIG}: modules_to_save {sorted(modules_to_save)} is not supported"
        )
    merged = dict(read_weights(base_dir))
    trainables_path = run_dir / NON_LORA_TRAINABLES
    if not trainables_path.is_file():
        raise ConversionError(f"{trainables_path} is missing: the projector of the LoRA run is in it")
    merged.update(_trainable_names(read_tensor_file(trainables_path)))
    adapter = read_weights(run_dir, stem="adapter_model")
    for a_name in [n for n in adapter if n.endswith(".lora_A.weight")]:
        module = a_name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        target = f"{module}.weight"
        if b_name not in adapter or target not in merged:
            raise ConversionError(
                f"{run_dir}: adapter tensor {a_name} has no {'lora_B' if b_name not in adapter else 'base weight'}"
            )
        lora_a, lora_b = adapter.pop(a_name).float(), adapter.pop(b_name).float()
        weight = merged[target]
        merged[target] = (weight.float() + scale * lora_b @ lora_a).to(weight.dtype)
    if adapter:
        raise ConversionError(f"{run_dir}: adapter tensors that cannot be merged: {sorted(adapter)[:8]}")
    return merged


def apply_delta(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """target = delta + base for every base tensor (the embedding rows of added tokens stay the delta's);
    tensors only in the delta (the projector) are kept. A base tensor the delta lacks, or a shape that
    does not fit, is a ConversionError naming it."""
    missing = sorted(set(base) - set(delta))
    if missing:
        raise ConversionError(f"the delta has no tensor for the base's {missing[:8]}")
    target = {}
    for name, tensor in delta.items():
        if name not in base:
            target[name] = tensor
            continue
        added = base[name]
        if tensor.shape == added.shape:
            target[name] = (tensor.float() + added.float()).to(tensor.dtype)
        elif (
            name in GROWN_BY_ADDED_TOKENS
            and tensor.shape[1:] == added.shape[1:]
            and tensor.shape[0] > added.shape[0]
        ):
            grown = tensor.float().clone()
            grown[: added.shape[0]] += added.float()
            target[name] = grown.to(tensor.dtype)
        else:
            raise ConversionError(
                f"delta tensor {name} {tuple(tensor.shape)} does not fit the base's {tuple(added.shape)}"
            )
    return target
