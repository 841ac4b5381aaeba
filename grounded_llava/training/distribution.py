"""Which accelerate distribution types the trainer's checkpoints can resume exactly.

`checkpointing.py` saves the whole optimizer state from one process and the model's trainable
tensors from the unwrapped module: right for one process and for data parallelism (DDP), where
every rank holds the same full copy. FSDP, DeepSpeed (ZeRO) and Megatron-LM shard parameters and
optimizer states across ranks, so a checkpoint would hold one shard and a resume would silently
train on from partial state: those set-ups are refused before anything runs.
"""

from __future__ import annotations

from ..config_io import ConfigError

SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_distribution(distributed_type: object) -> None:
    """`ConfigError` (one line, naming the setting) when `distributed_type` (accelerate's
    `DistributedType` or its name) shards training state; any other type passes."""
    name = str(getattr(distributed_type, "value", distributed_type)).upper()
    if name in SHARDED_TYPES:
        raise ConfigError(
            f"accelerate distributed_type {name}: sharded parameters and optimizer states are not "
            "saved by this trainer's checkpoints (they could not resume); launch with DDP "
            "(accelerate launch --multi_gpu) or one process"
        )
