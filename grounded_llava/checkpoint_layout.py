"""The files of a grounded-llava checkpoint directory (`save_pretrained` writes them, `from_pretrained` reads
them); light, so that a command line checks a directory before the model stack loads.

    grounded_config.json       GroundedLlavaConfig + format version
    grounded_processor.json    the processor's image settings (`GroundedProcessor`)
    tokenizer_config.json ...  the tokenizer (transformers' files)
    adapter/                   the peft LoRA adapter (+ trainable token rows)
    heads.safetensors          neck, spatial prior, Detect head, SAM decoder, pointer(s), region encoder
    base/                      the base LLaVA weights, only when the base is not a hub id or local directory
"""

CONFIG_FILE = "grounded_config.json"
PROCESSOR_FILE = "grounded_processor.json"
TOKENIZER_FILE = "tokenizer_config.json"
ADAPTER_DIR = "adapter"
HEADS_FILE = "heads.safetensors"
BASE_DIR = "base"
REQUIRED = (CONFIG_FILE, PROCESSOR_FILE, TOKENIZER_FILE, ADAPTER_DIR, HEADS_FILE)
