"""Sharded training states (FSDP, DeepSpeed ZeRO, Megatron-LM) are refused up front: the checkpoints
hold one process's full optimizer state, which a sharded run does not have."""

from pathlib import Path

import pytest
from accelerate.utils import DistributedType

from grounded_llava.config_io import ConfigError
from grounded_llava.training import trainer as trainer_module
from grounded_llava.training.cli import train_from_cli
from grounded_llava.training.distribution import check_distribution

CONFIG = Path(__file__).resolve().parent / "configs" / "train_tiny.yaml"


@pytest.mark.parametrize(
    "kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, "fsdp"]
)
def test_sharded_types_are_refused_naming_the_setting(kind):
    with pytest.raises(ConfigError, match=r"accelerate distributed_type (FSDP|DEEPSPEED|MEGATRON_LM): "):
        check_distribution(kind)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_one_process_and_ddp_pass(kind):
    check_distribution(kind)


def test_train_under_fsdp_exits_2_with_one_line_before_writing(tmp_path, monkeypatch, capsys):
    class FsdpAccelerator:
        """What `Accelerator(...)` is under `accelerate launch --use_fsdp`, as far as the trainer looks."""

        distributed_type = DistributedType.FSDP
        is_main_process = True

        def __init__(self, **kwargs) -> None:
            pass

    monkeypatch.setattr(trainer_module, "Accelerator", FsdpAccelerator)
    assert train_from_cli(str(CONFIG), str(tmp_path / "run"), ["max_steps=1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("train.py: error: accelerate distributed_type FSDP: ")
    assert not (tmp_path / "run").exists()
