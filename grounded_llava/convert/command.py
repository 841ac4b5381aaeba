"""Convert an original LLaVA checkpoint (haotian-liu/LLaVA) into transformers' LLaVA layout:

    python -m grounded_llava.convert --from-llava llava-v1.5-7b --out llava-v1.5-7b-hf
    python -m grounded_llava.convert --from-llava llava-lora-run --base vicuna-7b-v1.5 --out merged-hf
    python -m grounded_llava.convert --from-llava llava-7b-delta-v0 --delta --base llama-7b --out llava-7b-hf

A LoRA run (a directory with adapter_config.json and non_lora_trainables.bin) is merged into its --base
language model; a v0 delta (--delta) is added to its --base LLaMA. The CLIP tower comes from the config's
mm_vision_tower (a hub id needs the local cache offline) unless --vision-tower gives a directory. The
output is a `LlavaForConditionalGeneration` directory (safetensors, tokenizer with <image>, image
processor): use it as `model.base=OUT` in train.py or `GroundedLlava.from_pretrained(OUT)`. Anything that
cannot be mapped stops the conversion with its name; the output appears only when it is complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grounded_llava.convert.layout import is_lora_run
from grounded_llava.errors import UsageError, exit_on_user_error


def build_parser(prog: str = "python -m grounded_llava.convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from-llava", type=Path, required=True, help="original LLaVA checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="new directory for the transformers LLaVA")
    parser.add_argument("--base", type=Path, help="base language model (for a LoRA run or a --delta)")
    parser.add_argument("--delta", action="store_true", help="--from-llava holds v0 delta weights")
    parser.add_argument(
        "--vision-tower", type=Path, help="local CLIP vision tower (instead of mm_vision_tower)"
    )
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    for option, path in (
        ("--from-llava", args.from_llava),
        ("--base", args.base),
        ("--vision-tower", args.vision_tower),
    ):
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"{option} {path} is not a directory")
    if (args.delta or is_lora_run(args.from_llava)) and args.base is None:
        kind = "a v0 delta" if args.delta else "a LoRA run (adapter_config.json)"
        raise UsageError(f"--from-llava {args.from_llava} is {kind}: give its base model with --base DIR")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"--out {args.out} exists and is not an empty directory: nothing is overwritten")


def run(args: argparse.Namespace) -> int:
    _check_paths(args)
    from grounded_llava.atomic_dir import atomic_directory
    from grounded_llava.convert.merges import apply_delta, merge_lora_run
    from grounded_llava.convert.original_llava import convert_original_llava
    from grounded_llava.convert.weights import read_weights

    weights, tokenizer_source = None, args.from_llava
    if args.delta:
        weights = apply_delta(read_weights(args.from_llava), read_weights(args.base))
    elif is_lora_run(args.from_llava):
        weights = merge_lora_run(args.from_llava, args.base)
        if not any(
            (args.from_llava / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")
        ):
            tokenizer_source = args.base
    converted = convert_original_llava(
        args.from_llava, weights=weights, vision_tower=args.vision_tower, tokenizer_source=tokenizer_source
    )
    with atomic_directory(args.out) as staging:  # an existing `--out` is empty (checked above)
        converted.save_pretrained(staging)
    print(
        f"{args.from_llava} -> {args.out}: use it as model.base={args.out} or GroundedLlava.from_pretrained"
    )
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m grounded_llava.convert") -> int:
    args = build_parser(prog).parse_args(argv)
    return exit_on_user_error(prog, lambda: run(args))
