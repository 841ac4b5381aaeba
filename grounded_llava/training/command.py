"""Fine-tune a LLaVA into a grounded model, stage by stage: `python train.py --config C --output-dir D [key=value ...]`.

Overrides are dotted config keys (`train.batch_size=2`, `model.lora.r=16`); `max_steps=N` sets the total
number of optimizer steps over all stages, split by the stages' proportions. A run resumes from the
last checkpoint in its output directory. Multi-process: `accelerate launch --config_file
configs/accelerate/ddp.yaml train.py ...`. Also `grounded-llava train ...`.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    parser.add_argument(
        "--output-dir", required=True, help="run directory (checkpoints, metrics, stages, final/)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    from grounded_llava.training.cli import train_from_cli  # the model stack loads after the arguments parse

    return train_from_cli(args.config, args.output_dir, args.overrides, prog=prog)
