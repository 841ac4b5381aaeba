"""Answer questions about images with boxes and masks; write overlays and JSON.

    python infer.py --image photo.jpg --prompt "Where are the dogs?"
    python infer.py --image "data/*.jpg" --prompt "Find all circles." --coco-results results.json
    python infer.py --image photo.jpg --chat          # multi-turn, prompts from stdin
    grounded-llava infer ...                          # the same, as the console script

The options are the keyword names of `GroundedLlava.predict` / `.chat` (see grounded_llava/inference).
Outputs never overwrite an input: `--image DIR --out DIR` with DIR/x.png (whose overlay is x.png), an
`--out` that is a file or a `--coco-results` that is a folder exit with status 2 before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from grounded_llava.console import add_verbosity_options, apply_verbosity
from grounded_llava.errors import UsageError, exit_on_user_error


def build_parser(prog: str = "infer.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", required=True, help="an image file, a directory of images, or a glob")
    parser.add_argument("--prompt", help="the question (with --chat: the optional first turn)")
    parser.add_argument(
        "--model", default=None, help="checkpoint directory or hub id (default: checkpoints/tiny-shapes)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/infer"), help="where <stem>.png/.json go")
    parser.add_argument(
        "--coco-results", type=Path, help="write the head detections of all images as COCO results"
    )
    parser.add_argument(
        "--category-ids", type=Path, help='JSON {"category name": coco id} (default: 1-based index)'
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    parser.add_argument(
        "--masks-for-detections", action="store_true", help="box-prompted masks for head detections"
    )
    parser.add_argument(
        "--conf",
        type=float,
        help="keep head detections scored >= CONF (default: the checkpoint's heads.conf_threshold)",
    )
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat about one image")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_verbosity_options(parser)
    return parser


def _stdin_prompts(first: str | None) -> Iterator[str]:
    if first is not None:
        yield first
    while True:
        if sys.stdin.isatty():
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def run(args: argparse.Namespace) -> int:
    # Check the inputs before loading the model (torch, transformers), so that mistakes fail at once.
    from grounded_llava.inference.cli import (
        chat_session,
        check_outputs,
        coco_image_ids,
        coco_results,
        load_category_ids,
        predict_images,
        resolve_images,
    )

    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.prompt is None and not args.chat:
        raise UsageError("--prompt is required (or use --chat)")
    if args.conf is not None and not 0.0 <= args.conf <= 1.0:
        raise UsageError(f"--conf must be in [0, 1], got {args.conf}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    images = resolve_images(args.image)
    if args.chat and len(images) != 1:
        raise UsageError(f"--chat takes one image, {args.image!r} matches {len(images)}")
    check_outputs(images, args.out, coco_results=args.coco_results, category_ids=args.category_ids)
    apply_verbosity(args)
    from grounded_llava.inference.predictor import GroundedLlava  # the model stack loads after the checks

    predictor = GroundedLlava.from_pretrained(args.model, device=args.device)
    category_ids = load_category_ids(args.category_ids, predictor.categories) if args.coco_results else None
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "masks_for_detections": args.masks_for_detections,
        "conf": args.conf,
    }
    if args.chat:
        answers = chat_session(predictor, images[0], args.out, lines=_stdin_prompts(args.prompt), **options)
    else:
        answers = predict_images(
            predictor, images, args.prompt, args.out, batch_size=args.batch_size, **options
        )
    if args.coco_results:
        # In a chat every turn sees the same image: its detections are those of the last turn.
        detections = [a.detections for a in answers[-1:]] if args.chat else [a.detections for a in answers]
        results = coco_results(detections, coco_image_ids(images[: len(detections)]), category_ids)
        args.coco_results.parent.mkdir(parents=True, exist_ok=True)
        args.coco_results.write_text(json.dumps(results))
    return 0


def main(argv: list[str] | None = None, prog: str = "infer.py") -> int:
    args = build_parser(prog).parse_args(argv)
    return exit_on_user_error(prog, lambda: run(args))
