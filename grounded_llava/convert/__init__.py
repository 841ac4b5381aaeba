"""Checkpoints in the original LLaVA format (haotian-liu/LLaVA) as transformers' `LlavaForConditionalGeneration`.

- `weights.py`: reading a directory's tensors (safetensors first; pickled `.bin` only with `weights_only=True`);
- `original_llava.py`: `LlavaLlamaForCausalLM` directories (`model.mm_projector.*`, `mm_*` config fields) to a
  transformers LLaVA, every tensor accounted for;
- `merges.py`: LoRA runs (peft adapter + `non_lora_trainables.bin`) merged into their base, and v0 deltas added
  to a base LLaMA;
- `command.py`: `python -m grounded_llava.convert --from-llava DIR --out DIR2 [--base DIR] [--delta]`.
"""
