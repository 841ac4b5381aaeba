"""Serve the browser demo on this machine:

    python -m grounded_llava.demo                      # the shipped default, http://127.0.0.1:7860
    python -m grounded_llava.demo --model DIR --port 8080
    grounded-llava demo ...                            # the same, as the console script

It binds to 127.0.0.1 unless `--host` says otherwise (e.g. 0.0.0.0 to be reached from other machines),
sends no analytics and loads nothing from outside the server. Needs the demo extra:
`pip install -e ".[demo]"` (gradio).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from grounded_llava.console import add_verbosity_options, apply_verbosity
from grounded_llava.errors import UsageError, exit_on_user_error

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def build_parser(prog: str = "python -m grounded_llava.demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint directory or hub id (default: checkpoints/tiny-shapes)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument(
        "--examples", type=Path, default=EXAMPLES_DIR, help="directory of example images offered in the page"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_verbosity_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1-65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise UsageError('the demo needs gradio: pip install -e ".[demo]"')
    from grounded_llava.inference.cli import IMAGE_SUFFIXES

    examples = (
        sorted(p for p in args.examples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if args.examples.is_dir()
        else []
    )
    apply_verbosity(args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    from grounded_llava.demo.app import build_app
    from grounded_llava.inference.predictor import GroundedLlava

    predictor = GroundedLlava.from_pretrained(args.model, device=args.device)
    app = build_app(predictor, examples)
    app.queue(default_concurrency_limit=1)  # one model: one answer at a time, the others wait in line
    app.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        quiet=args.quiet,
        max_file_size="50mb",
        allowed_paths=[str(p.parent) for p in examples[:1]],
    )
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m grounded_llava.demo") -> int:
    args = build_parser(prog).parse_args(argv)
    return exit_on_user_error(prog, lambda: run(args))
