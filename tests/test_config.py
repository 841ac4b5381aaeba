"""Config: YAML + key=value overrides; invalid values and unknown keys raise naming the field."""

import pytest

from grounded_llava import GroundedLlavaConfig
from grounded_llava.config_io import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("model:\n  num_bins: 64\n  heads:\n    categories: [a, b]\n  lora:\n    r: 4\n")
    config = GroundedLlavaConfig.from_yaml(
        path, ["lora.r=16", "heads.neck_channels=32", "tiny.text_layers=2"]
    )
    assert config.num_bins == 64 and config.lora.r == 16 and config.heads.neck_channels == 32
    assert config.heads.categories == ["a", "b"] and config.tiny.text_layers == 2
    assert GroundedLlavaConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["heads.bogus=1"], "heads.bogus"),
        (["lora.r=0"], "lora.r"),
        (["tiny.text_layers=two"], "tiny.text_layers"),
        (["dtype=int8"], "dtype"),
        (["num_bins=1"], "num_bins"),
        (["lora.target_regex=.*q_proj"], "lora.target_regex"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, overrides, field):
    path = tmp_path / "model.yaml"
    path.write_text("model: {}\n")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        GroundedLlavaConfig.from_yaml(path, overrides)
    assert str(path) in str(info.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        GroundedLlavaConfig.from_yaml(_write(tmp_path, "model: {}\n"), ["lora.r"])
    with pytest.raises(ConfigError, match="does not exist"):
        GroundedLlavaConfig.from_yaml(tmp_path / "missing.yaml")


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path
