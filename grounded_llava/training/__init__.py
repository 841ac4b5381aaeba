"""Model-agnostic training infrastructure: data order, checkpoints, metrics log, plots.

Every name is imported on first use: `train.py --help` answers without torch.
"""

from grounded_llava._lazy import lazy_getattr

_EXPORTS = {
    "FORMAT_VERSION": ".checkpointing",
    "MetricsLogger": ".metrics_log",
    "NonFiniteError": ".nonfinite",
    "ResumableSampler": ".sampler",
    "TrainingState": ".checkpointing",
    "find_latest_checkpoint": ".checkpointing",
    "list_checkpoints": ".checkpointing",
    "load_training_state": ".checkpointing",
    "plot_loss_curves": ".plots",
    "read_metrics": ".metrics_log",
    "save_training_state": ".checkpointing",
    "trainable_state_dict": ".checkpointing",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
