"""Evaluate a checkpoint: detection / segmentation AP, referring expressions, chat retention, forgetting.

    python -m grounded_llava.evaluate --model runs/tiny-shapes/final --data DIR/annotations.json \\
        --images DIR/images --out outputs/eval [--tasks det,seg,rec,res,find,chat] \\
        [--chat-data DIR/chat.json [--reference runs/tiny-shapes/stages/align]] [--stages runs/tiny-shapes]

Writes OUT/metrics.json (null = not evaluated) and OUT/metrics.md, and prints the table. The options are
the fields of `grounded_llava.evaluation.config.EvaluationConfig`, also given as a YAML file (`--config`) or
`key=value` overrides; docs/EVALUATION.md describes the metrics.
Bad inputs exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from grounded_llava.command_config import add_config_options, config_from_args
from grounded_llava.console import add_verbosity_options, apply_verbosity
from grounded_llava.errors import exit_on_user_error
from grounded_llava.evaluation.config import EvaluationConfig


def build_parser(prog: str = "python -m grounded_llava.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(parser, EvaluationConfig)
    add_verbosity_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    config = config_from_args(EvaluationConfig, args)  # checks the inputs before the model stack loads
    apply_verbosity(args)
    from grounded_llava.evaluation.runner import evaluate, print_report  # the model stack

    print_report(evaluate(config))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m grounded_llava.evaluate") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)  # key=value overrides may sit between flags
    return exit_on_user_error("evaluate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
