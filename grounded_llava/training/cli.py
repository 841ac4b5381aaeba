"""What `train.py` runs: load the config, train every stage, print where the model went."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers.utils import logging as transformers_logging

from ..errors import exit_on_user_error
from .config import TrainConfig
from .trainer import Trainer


def train_from_cli(config_path: str, output_dir: str, overrides: list[str], prog: str = "train.py") -> int:
    """Returns the process exit code: 0, or 2 with one line on stderr for bad configs, data, models or
    checkpoints (damaged, or not writable: disk full), and for a run stopped by non-finite losses or weights."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.disable_progress_bar()  # one bar per saved shard would bury the training bar

    def train() -> int:
        trainer = Trainer(TrainConfig.from_yaml(config_path, overrides), output_dir)
        final = trainer.run()
        if trainer.accelerator.is_main_process:
            print(f"final model: {final}\nstage manifest: {Path(final) / 'stages.json'}")
            print(
                f"metrics: {Path(output_dir) / 'metrics.jsonl'}  loss curves: {Path(output_dir) / 'loss_curves.png'}"
            )
        return 0

    return exit_on_user_error(prog, train)
