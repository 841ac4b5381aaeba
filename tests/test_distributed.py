"""The accelerate launch configs (DDP, FSDP, DeepSpeed) by accelerate's own code, and a 2-process CPU DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from accelerate.utils.dataclasses import get_module_class_from_name
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"

# ---------------------------------------------------------------------------------- accelerate configs


def _launch_args(config: Path):
    """What `accelerate launch --config_file <config> train.py` resolves, by accelerate's own code."""
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ddp.yaml", DistributedType.MULTI_GPU),
        ("fsdp.yaml", DistributedType.FSDP),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED),
    ],
)
def test_accelerate_config_loads_and_every_key_is_a_launch_option(
    name: str, expected: DistributedType
) -> None:
    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert isinstance(config, ClusterConfig) and config.distributed_type == expected
    assert config.mixed_precision == "bf16" and config.num_machines == 1
    # A misspelt key inside fsdp_config / deepspeed_config would be silently ignored by accelerate.
    options = set(vars(launch_command_parser().parse_args(["train.py"])))
    nested = list(config.fsdp_config) + list(config.deepspeed_config)
    assert nested == [] or set(nested) <= options, sorted(set(nested) - options)


def test_fsdp_config_wraps_llama_layers_with_orig_params() -> None:
    args, _ = _launch_args(ACCELERATE_CONFIGS / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # The class names to wrap must exist in a LLaVA model, or FSDP's auto wrap fails at prepare().
    text = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    llava = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision))
    for class_name in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):
        assert get_module_class_from_name(llava, class_name) is not None, class_name


def test_deepspeed_config_is_zero2_bf16() -> None:
    args, defaults = _launch_args(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(
        defaults.deepspeed_config
    )  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"


def test_ddp_config_launches_multi_gpu() -> None:
    args, _ = _launch_args(ACCELERATE_CONFIGS / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 8


# ------------------------------------------------------------------------------------ 2-process DDP

DDP_SCRIPT = """
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from grounded_llava.training import ResumableSampler, save_training_state, trainable_state_dict

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
inputs, targets = torch.randn(32, 4), torch.randn(32, 1)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
rank = accelerator.process_index
sampler = ResumableSampler(source_sizes=[32], seed=5, num_replicas=accelerator.num_processes, rank=rank)
order, batches = list(sampler), []
for step in range(3):
    batch = order[step * 4 : (step + 1) * 4]
    batches.append(batch)
    loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
    optimizer.zero_grad()
    accelerator.backward(loss)
    optimizer.step()
    sampler.advance(len(batch))
save_training_state(
    out / "checkpoints",
    step=3,
    model_state=trainable_state_dict(accelerator.unwrap_model(model)),
    optimizer=optimizer,
    sampler_state=sampler.state_dict(),
    accelerator=accelerator,
)
save_file(trainable_state_dict(accelerator.unwrap_model(model)), out / f"weights_rank{rank}.safetensors")
info = {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "batches": batches}
(out / f"rank{rank}.json").write_text(json.dumps(info))
accelerator.end_training()
"""


def test_two_process_cpu_ddp_trains_on_rank_shards_with_synced_weights(tmp_path: Path) -> None:
    script = tmp_path / "ddp_smoke.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no user default_config.yaml interferes
        "HF_HUB_OFFLINE": "1",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    accelerate_cli = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate_cli), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(script),
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["world_size"] for i in infos] == [2, 2] and infos[0]["backend"] == "gloo"
    seen = [sum(i["batches"], []) for i in infos]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 24  # disjoint shards
    weights = [load_file(out / f"weights_rank{r}.safetensors") for r in range(2)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key

    # DDP averages the two ranks' gradients: the same as one process on both shards' batches.
    torch.manual_seed(0)
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch0, batch1 in zip(infos[0]["batches"], infos[1]["batches"], strict=True):
        batch = batch0 + batch1
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-5, atol=1e-6)

    checkpoint = out / "checkpoints" / "step-000003"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    assert (checkpoint / "rng_state_0.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()
