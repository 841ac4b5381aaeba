"""Model-agnostic training infrastructure: data order, checkpoints, metrics log, plots."""

from grounded_llava.training.checkpointing import (
    FORMAT_VERSION,
    CheckpointFormatError,
    TrainingState,
    find_latest_checkpoint,
    list_checkpoints,
    load_training_state,
    save_training_state,
    trainable_state_dict,
)
from grounded_llava.training.metrics_log import MetricsLogger, read_metrics
from grounded_llava.training.nonfinite import NonFiniteError
from grounded_llava.training.plots import plot_loss_curves
from grounded_llava.training.sampler import ResumableSampler

__all__ = [
    "FORMAT_VERSION",
    "CheckpointFormatError",
    "MetricsLogger",
    "NonFiniteError",
    "ResumableSampler",
    "TrainingState",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "plot_loss_curves",
    "read_metrics",
    "save_training_state",
    "trainable_state_dict",
]
