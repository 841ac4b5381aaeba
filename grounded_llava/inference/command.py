"""Answer questions about images with boxes and masks; write overlays and JSON.

    python infer.py --image photo.jpg --prompt "Where are the dogs?"
    python infer.py --image "data/*.jpg" --prompt "Find all circles." --coco-results results.json
    python infer.py --image photo.jpg --chat          # multi-turn, prompts from stdin
    grounded-llava infer ...                          # the same, as the console script

The options are the fields of `InferConfig` (the keyword names of `GroundedLlava.predict` / `.chat`), as
flags, in a YAML file (`--config`) or as `key=value` overrides (`grounded_llava/command_config.py`).
Outputs never overwrite an input: `--image DIR --out DIR` with DIR/x.png (whose overlay is x.png), an
`--out` that is a file or a `--coco-results` that is a folder exit with status 2 before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from grounded_llava.command_config import add_config_options, config_from_args
from grounded_llava.console import add_verbosity_options, apply_verbosity
from grounded_llava.errors import UsageError, exit_on_user_error


def _option(default, text: str):
    """A field with a default and its `--help` text."""
    return field(default=default, metadata={"help": text})


@dataclass(kw_only=True)
class InferConfig:
    """What `infer.py` answers and where it writes (checked on construction: `UsageError` naming the option)."""

    image: str = field(metadata={"help": "an image file, a directory of images, or a glob"})
    prompt: str | None = _option(None, "the question (with --chat: the optional first turn)")
    model: str | None = _option(None, "checkpoint directory or hub id (default: checkpoints/tiny-shapes)")
    out: Path = _option(Path("outputs/infer"), "where <stem>.png/.json go")
    coco_results: Path | None = _option(None, "write the head detections of all images as COCO results")
    category_ids: Path | None = _option(None, 'JSON {"category name": coco id} (default: 1-based index)')
    batch_size: int = _option(8, "images per generate call")
    max_new_tokens: int = _option(128, "the longest answer")
    temperature: float = _option(0.0, "0 = greedy (deterministic)")
    masks_for_detections: bool = _option(False, "box-prompted masks for head detections (also in the JSON)")
    conf: float | None = _option(
        None, "keep head detections scored >= CONF (default: the checkpoint's heads.conf_threshold)"
    )
    chat: bool = _option(False, "interactive multi-turn chat about one image (prompts from stdin)")
    device: str | None = _option(None, "torch device (default: cuda if available, else cpu)")

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.prompt.strip():
            raise UsageError("--prompt is empty")
        if self.prompt is None and not self.chat:
            raise UsageError("--prompt is required (or use --chat)")
        if self.conf is not None and not 0.0 <= self.conf <= 1.0:
            raise UsageError(f"--conf must be in [0, 1], got {self.conf}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")


def build_parser(prog: str = "infer.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_options(parser, InferConfig)
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


def run(config: InferConfig, args: argparse.Namespace) -> int:
    """Answer, write the outputs; `args` only for `--quiet` / `--verbose`. The inputs are checked before
    the model (torch, transformers) loads, so that mistakes fail at once."""
    from grounded_llava.inference.cli import (
        chat_session,
        check_outputs,
        coco_image_ids,
        coco_results,
        load_category_ids,
        predict_images,
        resolve_images,
    )

    images = resolve_images(config.image)
    if config.chat and len(images) != 1:
        raise UsageError(f"--chat takes one image, {config.image!r} matches {len(images)}")
    check_outputs(images, config.out, coco_results=config.coco_results, category_ids=config.category_ids)
    apply_verbosity(args)
    from grounded_llava.inference.predictor import GroundedLlava  # the model stack loads after the checks

    predictor = GroundedLlava.from_pretrained(config.model, device=config.device)
    category_ids = (
        load_category_ids(config.category_ids, predictor.categories) if config.coco_results else None
    )
    options = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "masks_for_detections": config.masks_for_detections,
        "conf": config.conf,
    }
    if config.chat:
        answers = chat_session(
            predictor, images[0], config.out, lines=_stdin_prompts(config.prompt), **options
        )
    else:
        answers = predict_images(
            predictor, images, config.prompt, config.out, batch_size=config.batch_size, **options
        )
    if config.coco_results:
        # In a chat every turn sees the same image: its detections are those of the last turn.
        detections = [a.detections for a in answers[-1:]] if config.chat else [a.detections for a in answers]
        results = coco_results(detections, coco_image_ids(images[: len(detections)]), category_ids)
        config.coco_results.parent.mkdir(parents=True, exist_ok=True)
        config.coco_results.write_text(json.dumps(results))
    return 0


def main(argv: list[str] | None = None, prog: str = "infer.py") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)  # key=value overrides may sit between flags
    return exit_on_user_error(prog, lambda: run(config_from_args(InferConfig, args), args))
