"""The tiny base in a checkpoint: `base_save_dtype` float16 is half the size, writes tied embeddings once, and
loads back as the model's own dtype with the weights rounded; a re-saved checkpoint names no local base path."""

import json

import torch
from safetensors import safe_open

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.modeling.checkpoint import ADAPTER_DIR, BASE_DIR

from .conftest import tiny_test_config


def _stored(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / BASE_DIR / "model.safetensors"), "pt") as file:
        names = file.keys()  # a safe_open handle is not iterable
        return {name: file.get_tensor(name) for name in names}


def test_a_float16_base_is_half_the_file_and_loads_back_rounded(tmp_path):
    config = tiny_test_config()
    config.tiny.tie_word_embeddings = True
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    full = _stored(model.save_pretrained(tmp_path / "same"))
    model.config.base_save_dtype = "float16"
    half_dir = model.save_pretrained(tmp_path / "half")
    half = _stored(half_dir)
    assert half.keys() == full.keys()  # the tied output layer is not written a second time
    assert {tensor.dtype for tensor in half.values()} == {torch.float16}
    size = (half_dir / BASE_DIR / "model.safetensors").stat().st_size
    assert size < 0.55 * (tmp_path / "same" / BASE_DIR / "model.safetensors").stat().st_size
    loaded = GroundedLlavaForConditionalGeneration.from_pretrained(half_dir)
    assert loaded.config.base_save_dtype == "float16"
    original = dict(model.base_llava.named_parameters())
    for name, parameter in loaded.base_llava.named_parameters():
        assert parameter.dtype == torch.float32
        expected = original[name].detach()
        if "lora_" not in name and "trainable_tokens" not in name:  # adapters are stored as they are
            expected = expected.half().float()
        assert torch.equal(parameter.detach(), expected), name


def test_a_reloaded_tiny_checkpoint_saves_no_path_of_this_machine(tmp_path):
    """A fine-tune of a tiny checkpoint (`init_from`) loads its base from `base/`; its own checkpoint carries
    that base beside the adapter, so the adapter config names no base path (as a from-scratch run's)."""
    first = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config()).save_pretrained(
        tmp_path / "a"
    )
    loaded = GroundedLlavaForConditionalGeneration.from_pretrained(first)
    second = loaded.save_pretrained(tmp_path / "b")
    for directory in (first, second):
        adapter_config = json.loads((directory / ADAPTER_DIR / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] is None
        assert str(tmp_path) not in (directory / ADAPTER_DIR / "README.md").read_text()  # peft's model card

    # a checkpoint saved before the rule, its adapter naming where its base was once read from
    old_config = first / ADAPTER_DIR / "adapter_config.json"
    old_config.write_text(
        json.dumps(json.loads(old_config.read_text()) | {"base_model_name_or_path": "/elsewhere/base"})
    )
    third = GroundedLlavaForConditionalGeneration.from_pretrained(first).save_pretrained(tmp_path / "c")
    assert (
        json.loads((third / ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"]
        is None
    )
