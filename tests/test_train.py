"""train.py end to end: a two-step run, 2-process CPU DDP, SIGKILL + resume equality, increment forgetting."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.config_io import from_dict, load_yaml
from grounded_llava.data.synthetic import generate_world
from grounded_llava.modeling.base import build_tiny_base
from grounded_llava.training.cli import train_from_cli
from grounded_llava.training.config import TrainConfig
from grounded_llava.training.metrics_log import read_metrics
from grounded_llava.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "train_tiny.yaml"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def _train_command(output_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(CONFIG),
        "--output-dir",
        str(output_dir),
        *overrides,
    ]


def _weights(final_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("heads.safetensors", "adapter/adapter_model.safetensors", "base/model.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(final_dir / name).items()})
    return tensors


def test_two_step_run_of_train_py(tmp_path):
    result = subprocess.run(
        _train_command(tmp_path, "max_steps=2"), env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "final" / "stages.json").read_text())
    assert [s["name"] for s in manifest] == ["align", "ground"] and all(s["steps"] == 1 for s in manifest)
    assert manifest[0]["new_categories"] == ["circle", "square", "star"]
    assert set(manifest[1]["trainable_parameters"]) == {"detector", "heads", "pointer", "token_rows", "lora"}
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]
    model = GroundedLlavaForConditionalGeneration.from_pretrained(tmp_path / "final")
    assert model.config.heads.categories == ["circle", "square", "star"]


def _vision_state(model: GroundedLlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    llava = model.base_llava.model
    return {**llava.vision_tower.state_dict(), **llava.multi_modal_projector.state_dict()}


def test_heads_then_base_stages_of_train_py(tmp_path):
    """A `heads` stage (no LLM: every box and mask, the tower trained too), `base` (the LLM on chat, the tower
    frozen: text alone would collapse its features) and a `heads` increment (new categories, replayed old
    images, old-class distillation), as configs/tiny_shapes.yaml runs them, through train.py."""
    data = load_yaml(CONFIG)
    world = {"kind": "synthetic", "dir": "data/old", "num_images": 8, "seed": 1, "image_size": 112,
             "categories": ["circle", "square", "star"]}  # fmt: skip
    data["stages"] = [
        {"name": "heads", "kind": "heads", "proportion": 2, "batch_size": 2, "lr": 2.0e-3,
         "train_vision": True, "data": [world]},
        {"name": "base", "kind": "base", "proportion": 1, "data": [{**world, "kind": "synthetic_chat"}]},
        {"name": "new_heads", "kind": "heads", "proportion": 1, "batch_size": 2, "distill_weight": 1.0,
         "replay_weight": 0.5, "replay_size": 4,
         "data": [{**world, "dir": "data/new", "seed": 2, "categories": ["hexagon"]}]},
    ]  # fmt: skip
    config = tmp_path / "heads.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--output-dir", str(run)]
    result = subprocess.run([*command, "max_steps=4"], env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((run / "stages.json").read_text())
    assert [(s["name"], s["steps"]) for s in manifest] == [("heads", 2), ("base", 1), ("new_heads", 1)]
    assert set(manifest[0]["trainable_parameters"]) == {"detector", "heads", "pointer", "vision"}
    assert set(manifest[1]["trainable_parameters"]) == {"base", "pointer"}
    assert manifest[0]["new_categories"] == ["circle", "square", "star"]
    assert manifest[2]["new_categories"] == ["hexagon"] and manifest[2]["categories"][-1] == "hexagon"
    assert [d["kind"] for d in manifest[2]["data"]] == ["synthetic", "replay"]
    heads_records = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "heads" and "loss" in r]
    assert [r["step"] for r in heads_records] == [1, 2]
    for record in heads_records:
        assert "lm_loss" not in record and "pointer_loss" not in record
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("loss", "det_loss", "mask_loss"))
    assert all((run / "stages" / s["name"] / "heads.safetensors").is_file() for s in manifest)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000004",
    ]  # keep_last
    increment = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "new_heads" and "loss" in r]
    assert increment and all(math.isfinite(r["distill_loss"]) for r in increment)

    after_heads = GroundedLlavaForConditionalGeneration.from_pretrained(run / "stages" / "heads")
    after_base = GroundedLlavaForConditionalGeneration.from_pretrained(run / "stages" / "base")
    initial, _ = build_tiny_base(after_heads.config.tiny, after_heads.config.num_bins)
    initial_vision = {
        **initial.model.vision_tower.state_dict(),
        **initial.model.multi_modal_projector.state_dict(),
    }
    heads_vision, base_vision = _vision_state(after_heads), _vision_state(after_base)
    assert not all(torch.equal(initial_vision[k], v) for k, v in heads_vision.items())  # `heads` trained it
    assert all(torch.equal(base_vision[k], v) for k, v in heads_vision.items())  # `base` did not
    assert after_base.heads_state_dict().keys() == after_heads.heads_state_dict().keys()
    assert all(
        torch.equal(after_base.heads_state_dict()[k], v) for k, v in after_heads.heads_state_dict().items()
    )


def test_bad_override_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        _train_command(tmp_path, "train.bogus=1"), env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("train.py: error: ")
        and "train.bogus" in result.stderr
    )


def test_coco_source_with_a_duplicate_category_name_exits_2(tmp_path, capsys):
    world = tmp_path / "world"
    generate_world(world, num_images=2, seed=0, image_size=64, categories=["circle", "square"], max_objects=2)
    annotations = json.loads((world / "annotations.json").read_text())
    annotations["categories"].append({"id": 9, "name": "circle"})
    (world / "annotations.json").write_text(json.dumps(annotations))
    data = load_yaml(CONFIG)
    source = {"kind": "coco", "annotations": str(world / "annotations.json"), "images": str(world / "images"),
              "on_bad_data": "skip"}  # fmt: skip
    data["stages"] = [{"name": "align", "kind": "align", "data": [source]}]
    config = tmp_path / "coco.yaml"
    config.write_text(yaml.safe_dump(data))
    assert train_from_cli(str(config), str(tmp_path / "run"), ["max_steps=1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train.py: error: ") and "'circle' is the name of category ids 1 and 9" in error


def test_two_process_cpu_ddp_ends_with_identical_weights(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        *_train_command(tmp_path, "max_steps=4")[1:],
    ]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = sorted((tmp_path / "replicas").glob("rank-*.sha256"))
    assert [d.name for d in digests] == ["rank-0.sha256", "rank-1.sha256"]
    assert digests[0].read_text() == digests[1].read_text()


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = ("max_steps=8", "train.save_every=1")
    reference = tmp_path / "reference"
    assert (
        subprocess.run(_train_command(reference, *overrides), env=_env(), capture_output=True).returncode == 0
    )

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_train_command(interrupted, *overrides), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoints" / "step-000005").exists():
        assert process.poll() is None and time.monotonic() < deadline, (
            "the run ended before it could be killed"
        )
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists()
    resumed = subprocess.run(
        _train_command(interrupted, *overrides), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, actual = _weights(reference / "final"), _weights(interrupted / "final")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    steps = [r["step"] for r in read_metrics(interrupted / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    """An `align` stage of 120 steps on circle/square/star: the previous stage of the increment runs."""
    out = tmp_path_factory.mktemp("aligned")
    overrides = ["max_steps=120", "batch_size=4", "train.save_every=1000", "train.log_every=10"]
    config = TrainConfig.from_yaml(CONFIG, overrides)
    config.stages = config.stages[:1]
    Trainer(config, out).run()
    return out


def test_align_stage_loss_fell(aligned_run):
    records = [r for r in read_metrics(aligned_run / "metrics.jsonl") if "det_loss" in r]
    assert records[-1]["det_loss"] < 0.8 * records[0]["det_loss"]
    masks = [r["mask_loss"] for r in records if "mask_loss" in r]
    assert len(masks) >= 4 and sum(masks[-2:]) < sum(masks[:2])


def _increment(aligned_run: Path, out: Path, *, distill: float, replay: float) -> Path:
    """An increment stage (hexagon, diamond) from the aligned model; replay comes from its manifest."""
    data = load_yaml(CONFIG)
    data["init_from"] = str(aligned_run / "final")
    data["train"].update(max_steps=30, save_every=1000, batch_size=4)
    data["stages"] = [
        {"name": "increment", "kind": "increment", "lr": 3.0e-3, "distill_weight": distill,
         "replay_weight": replay, "replay_size": 16, "hflip_prob": 0.0,
         "data": [{"kind": "synthetic", "dir": "new", "num_images": 16, "seed": 5, "image_size": 112,
                   "categories": ["hexagon", "diamond"]}]},
    ]  # fmt: skip
    Trainer(from_dict(TrainConfig, data), out).run()
    return out / "final"


def _old_class_scores(model_dir: Path, images_dir: Path, num_old: int) -> torch.Tensor:
    from PIL import Image

    model = GroundedLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    pixels = torch.stack(
        [model.processor.preprocess_image(Image.open(p))[0] for p in sorted(images_dir.glob("*.png"))[:8]]
    )
    with torch.no_grad():
        predictions = model.detection_head(model.image_pyramid(model.encode_images(pixels), pixels))
    return predictions["scores"][:, :num_old].sigmoid()


def test_replay_and_distillation_keep_old_classes_closer_than_plain_finetuning(aligned_run, tmp_path):
    held_out = tmp_path / "held_out"
    from grounded_llava.data import generate_world

    generate_world(held_out, num_images=8, seed=9, image_size=112, categories=["circle", "square", "star"])
    before = _old_class_scores(aligned_run / "final", held_out / "images", 3)
    protected = _increment(aligned_run, tmp_path / "protected", distill=1.0, replay=0.5)
    plain = _increment(aligned_run, tmp_path / "plain", distill=0.0, replay=0.0)
    # Compare where the previous stage saw old objects: its 50 most confident anchors per image.
    top = before.max(1).values.topk(50, dim=1).indices[:, None, :].expand(-1, 3, -1)

    def drift(model_dir: Path) -> torch.Tensor:
        return (_old_class_scores(model_dir, held_out / "images", 3) - before).gather(2, top).abs().mean()

    drift_protected, drift_plain = drift(protected), drift(plain)
    assert drift_protected < 0.7 * drift_plain, (float(drift_protected), float(drift_plain))


def test_a_train_llm_false_stage_trains_the_pointer_and_leaves_the_llm(aligned_run, tmp_path):
    """`train_llm: false`: the pointer (and SAM's decoder) learn to read a frozen LLM: the pointer loss
    falls, LoRA and the base LLM are bit-identical; chat batches (no trainable part reached) do not crash."""
    data = load_yaml(CONFIG)
    data["init_from"] = str(aligned_run / "final")
    data["train"].update(max_steps=40, save_every=1000, batch_size=4, log_every=5)
    data["stages"] = [
        {"name": "pointer", "kind": "ground", "lr": 3.0e-3, "train_detector": False, "train_llm": False,
         "hflip_prob": 0.0,
         "data": [{"kind": "synthetic", "dir": "w", "num_images": 16, "seed": 1, "image_size": 112,
                   "categories": ["circle", "square", "star"], "tasks": {"find": 1, "refer": 2},
                   "samples_per_image": 3, "weight": 0.5},
                  {"kind": "synthetic_chat", "dir": "w", "num_images": 16, "seed": 1, "image_size": 112,
                   "categories": ["circle", "square", "star"], "weight": 0.5}]},
    ]  # fmt: skip
    Trainer(from_dict(TrainConfig, data), tmp_path).run()
    losses = [r["pointer_loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("pointer_loss")]
    assert len(losses) >= 6 and sum(losses[-2:]) < 0.8 * sum(losses[:2])
    before, after = _weights(aligned_run / "final"), _weights(tmp_path / "final")
    llm = [k for k in before if not k.startswith("heads.safetensors")]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm)
    pointer = [k for k in before if k.startswith("heads.safetensors:pointer.")]
    assert pointer and any(not torch.equal(before[k], after[k]) for k in pointer)
