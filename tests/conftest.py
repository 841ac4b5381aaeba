"""Shared fixtures: offline settings and tiny random-init models (real transformers/peft/ultralytics/SAM parts)."""

import os
import tempfile

# Before ultralytics / transformers are imported: never touch the network, keep caches out of $HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "grounded_llava_yolo"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "grounded_llava_mpl"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from grounded_llava import GroundedLlavaConfig, GroundedLlavaForConditionalGeneration  # noqa: E402

transformers_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test starts with no `Accelerator` state: accelerate keeps it process-wide, and a Trainer built by
    one test (mixed_precision "no") would make a later bf16 Trainer fail with "already initialized"."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


TEST_CATEGORIES = ["circle", "square", "star"]


def tiny_test_config(**heads) -> GroundedLlavaConfig:
    """A smaller-than-default tiny preset: 112 px canvas (7x7 patches), 2-layer towers."""
    return GroundedLlavaConfig.from_dict(
        {
            "tiny": {
                "image_size": 112,
                "vision_layers": 2,
                "text_layers": 2,
                "text_hidden_size": 128,
                "text_intermediate_size": 256,
                "tokenizer_vocab_size": 600,
            },
            "num_bins": 32,
            "heads": {"categories": list(TEST_CATEGORIES), "neck_channels": 32, **heads},
            "lora": {"dropout": 0.0},
        }
    )


@pytest.fixture(scope="session")
def tiny_config() -> GroundedLlavaConfig:
    return tiny_test_config()


@pytest.fixture
def tiny_model(tiny_config) -> GroundedLlavaForConditionalGeneration:
    torch.manual_seed(0)
    return GroundedLlavaForConditionalGeneration.from_config(tiny_test_config())


@pytest.fixture(scope="session")
def random_image():
    def make(width: int, height: int, seed: int = 0) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    return make


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A saved random-init tiny model; its confidence threshold (1e-3) lets the random head report detections."""
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config(conf_threshold=1e-3))
    return model.save_pretrained(tmp_path_factory.mktemp("random") / "ckpt")
