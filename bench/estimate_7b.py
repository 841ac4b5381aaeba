"""Parameter and memory estimates for the 7B configuration, computed offline from the model configs.

The models are built on the `meta` device (shapes, no storage) from llava-hf/llava-1.5-7b-hf's
hyperparameters: CLIP ViT-L/14-336 + Vicuna-7B (Llama), the grounding tokens added to its 32,002-token
tokenizer, peft LoRA as `lora_config_for` builds it, and our neck / Detect / SAM heads, all sized by
`configs/llava15_7b_coco.yaml` (its `model:` and `train:` sections) with the 80 COCO categories.
The formulas are stated in docs/BENCHMARKS.md; every figure is in GiB (2^30 bytes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from grounded_llava import GroundedLlavaConfig
from grounded_llava.codec import grounding_tokens
from grounded_llava.modeling.base import lora_config_for, peft_wrapping
from grounded_llava.modeling.heads import build_heads
from grounded_llava.training.config import TrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llava15_7b_coco.yaml"
BASE_TOKENIZER_SIZE = 32002  # llava-hf/llava-1.5-7b-hf: Llama's 32,000 + <image> + <pad>
BASE_EMBEDDING_ROWS = 32064  # its embedding matrix (padded)
COCO_CATEGORIES = 80
TEXT_TOKENS = 128  # text tokens per training sequence besides the image tokens
NF4_BITS = (
    4 + 8 / 64 + 32 / (64 * 256)
)  # NF4 + double-quantised absmax: 8-bit per 64 weights, fp32 per 256 blocks
GIB = 2**30


def llava15_7b_config(vocab_rows: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=vocab_rows, max_position_embeddings=4096,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _count(module: torch.nn.Module, keep=lambda name: True) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if keep(name))


def estimate_llava15_7b(config_file: Path = CONFIG) -> dict:
    """Parameter counts and memory (GiB) of the 7B grounded model: weights bf16 vs 4-bit, training state, activations."""
    train = TrainConfig.from_yaml(config_file)
    model_config: GroundedLlavaConfig = train.model
    new_tokens = len(grounding_tokens(model_config.num_bins))
    vocab_rows = max(BASE_EMBEDDING_ROWS, BASE_TOKENIZER_SIZE + new_tokens)
    new_token_ids = list(range(BASE_TOKENIZER_SIZE, BASE_TOKENIZER_SIZE + new_tokens))
    llava_config = llava15_7b_config(vocab_rows)
    vision, text = llava_config.vision_config, llava_config.text_config
    grid = vision.image_size // vision.patch_size
    heads_config = model_config.heads
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
        counts = {
            "vision_tower": _count(llava.model.vision_tower),
            "projector": _count(llava.model.multi_modal_projector),
            "language_model": _count(llava.model.language_model) + _count(llava.lm_head),
        }
        # The Linear weights of the decoder layers: what bitsandbytes quantises (lm_head is skipped).
        quantised = _count(llava.model.language_model.layers, lambda n: n.endswith("proj.weight"))
        with peft_wrapping():
            peft_model = get_peft_model(llava, lora_config_for(model_config, llava, new_token_ids))
        lora = _count(peft_model, lambda n: "lora_" in n)
        token_rows = _count(peft_model, lambda n: "trainable_tokens_delta" in n)
    heads = (  # small, and the Detect head's bias init needs real storage: on the CPU
        build_heads(
            heads_config,
            num_classes=COCO_CATEGORIES,
            text_hidden_size=text.hidden_size,
            grid_size=grid,
            canvas_size=vision.image_size,
            patch_size=vision.patch_size,
        )
    )
    counts |= {"lora": lora, "token_rows": token_rows, "heads": _count(heads)}
    base = counts["vision_tower"] + counts["projector"] + counts["language_model"]
    not_quantised = base - quantised
    trainable_fp32 = (
        lora + token_rows
    )  # peft keeps adapters (and, after the fp32 upcast, the token rows) in fp32
    trainable_bf16 = counts["heads"]  # the heads are cast to the compute dtype (bf16)

    batch, layers, hidden = train.train.batch_size, text.num_hidden_layers, text.hidden_size
    inter, seq = text.intermediate_size, grid * grid + TEXT_TOKENS
    lora_copies = 6 * hidden + inter if model_config.lora.dropout > 0 else 0
    activations = {
        "layer_inputs": layers * batch * seq * hidden * 2,
        "one_layer_recomputed": batch * seq * (6 * hidden + 4 * inter + lora_copies) * 2,
        "logits": batch * seq * vocab_rows * (2 + 4 + 4),
    }
    memory = {
        "weights_bf16": base * 2 / GIB,
        "weights_4bit": (quantised * NF4_BITS / 8 + not_quantised * 2) / GIB,
        "weights_4bit_as_built": (quantised * NF4_BITS / 8 + not_quantised * 4) / GIB,
        "trainable_weights": (trainable_fp32 * 4 + trainable_bf16 * 2) / GIB,
        "gradients": (trainable_fp32 * 4 + trainable_bf16 * 2) / GIB,
        "adamw_state": 2 * (trainable_fp32 * 4 + trainable_bf16 * 2) / GIB,
        "activations_checkpointed": sum(activations.values()) / GIB,
    }
    memory["training_total_4bit_as_built"] = memory["weights_4bit_as_built"] + sum(
        memory[k] for k in ("trainable_weights", "gradients", "adamw_state", "activations_checkpointed")
    )
    return {
        "config": str(config_file.relative_to(config_file.parents[1])),
        "parameters": {**counts, "base_total": base, "quantised_4bit": quantised},
        "memory_gib": memory,
        "activation_terms_gib": {k: v / GIB for k, v in activations.items()},
        "assumptions": {
            "batch_size": batch,
            "sequence_length": seq,
            "image_tokens": grid * grid,
            "vocab_rows": vocab_rows,
            "lora_r": model_config.lora.r,
            "lora_dropout": model_config.lora.dropout,
            "categories": COCO_CATEGORIES,
            "nf4_bits_per_weight": NF4_BITS,
        },
    }
