"""Evaluate a checkpoint: detection / segmentation AP, referring expressions, chat retention, forgetting.

    python -m grounded_llava.evaluate --model runs/tiny-shapes/final --data DIR/annotations.json \\
        --images DIR/images --out outputs/eval [--tasks det,seg,rec,res,chat] \\
        [--chat-data DIR/chat.json [--reference runs/tiny-shapes/stages/align]] [--stages runs/tiny-shapes]

Writes OUT/metrics.json (null = not evaluated) and OUT/metrics.md, and prints the table. The options are
the fields of `grounded_llava.evaluation.runner.EvaluationConfig`; docs/EVALUATION.md describes the metrics.
Bad inputs exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grounded_llava.console import add_verbosity_options, apply_verbosity
from grounded_llava.errors import exit_on_user_error
from grounded_llava.evaluation.task_names import TASKS, parse_tasks


def build_parser(prog: str = "python -m grounded_llava.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--data", required=True, type=Path, help="COCO instances JSON (the ground truth)")
    parser.add_argument(
        "--images", required=True, type=Path, help="folder the JSON's file_names are relative to"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json / metrics.md")
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}"
    )
    parser.add_argument("--chat-data", type=Path, help="LLaVA conversation JSON for the chat task")
    parser.add_argument("--chat-images", type=Path, help="image folder of --chat-data (default: --images)")
    parser.add_argument(
        "--reference",
        type=Path,
        help="checkpoint to compare chat answers with (e.g. a base stage): chat_exact_match, chat_kl",
    )
    parser.add_argument("--stages", type=Path, help="training run directory: forgetting across its stages")
    parser.add_argument(
        "--max-images", type=int, help="evaluate the first N images (by id) and N chat entries"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_verbosity_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    apply_verbosity(args)
    from grounded_llava.evaluation.runner import EvaluationConfig, evaluate, print_report  # the model stack

    config = EvaluationConfig(
        model=args.model,
        data=args.data,
        images=args.images,
        out=args.out,
        tasks=parse_tasks(args.tasks),
        chat_data=args.chat_data,
        chat_images=args.chat_images,
        reference=args.reference,
        stages=args.stages,
        max_images=args.max_images,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    print_report(evaluate(config))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m grounded_llava.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    return exit_on_user_error("evaluate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
