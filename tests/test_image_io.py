"""Image loading: 16-bit images scaled to 8 bits, EXIF orientation applied, truncated JPEGs skipped in training.

Every loader goes through `image_io.to_rgb`; COCO `width`/`height` (and so boxes) are in the displayed
frame. A truncated JPEG passes the readers' header check and is found when its sample is built: under
`on_bad_data: skip` the training dataset counts it and builds the next readable sample instead.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from grounded_llava.data.bad_data import UnreadableImageError, inspect_image
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.data.dataset import load_image
from grounded_llava.data.sample import GroundedSample
from grounded_llava.image_io import to_rgb
from grounded_llava.inference.images import load_image as load_user_image
from grounded_llava.inference.overlay import to_rgb_array
from grounded_llava.training.config import SourceConfig, StageConfig
from grounded_llava.training.data_sources import LoadedSource
from grounded_llava.training.trainer import Trainer

LOADERS = {
    "training": load_image,
    "inference": load_user_image,
    "overlay": lambda path: Image.fromarray(to_rgb_array(path)),
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_16bit_png_is_scaled_to_8_bits_not_white(tmp_path, loader):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(3, axis=0)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(loader(path))
    assert rgb.shape == (3, 4, 3) and rgb[0, :, 0].tolist() == [0, 64, 128, 255]


def test_mode_i_is_read_as_16_bits():
    image = Image.fromarray(np.array([[0, 257 * 200, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 1].tolist() == [0, 200, 255]


def _rotated_photo(path, orientation=6):
    """A 40x20 stored JPEG, left half red, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_exif_orientation_is_applied(tmp_path, loader):
    _rotated_photo(tmp_path / "phone.jpg")
    rgb = np.asarray(loader(tmp_path / "phone.jpg")).astype(int)
    assert rgb.shape == (40, 20, 3)  # displayed: 20 wide, 40 high; the stored left half is now on top
    assert rgb[:18, :, 0].min() > 200 and rgb[22:, :, 0].max() < 50


def test_coco_sizes_are_the_displayed_ones(tmp_path):
    (tmp_path / "images").mkdir()
    _rotated_photo(tmp_path / "images" / "phone.jpg")
    assert inspect_image(tmp_path / "images" / "phone.jpg", image_check="header") == (20, 40)
    data = {
        "images": [{"id": 1, "file_name": "phone.jpg", "width": 20, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]}],
        "categories": [{"id": 1, "name": "red"}],
    }
    (tmp_path / "ok.json").write_text(json.dumps(data))
    assert load_coco_instances(tmp_path / "ok.json", tmp_path / "images").images[0].image_size == (20, 40)
    data["images"][0].update(width=40, height=20)  # the stored size: boxes would be in the wrong frame
    (tmp_path / "stored.json").write_text(json.dumps(data))
    loaded = load_coco_instances(tmp_path / "stored.json", tmp_path / "images", on_bad_data="skip")
    assert loaded.images == [] and dict(loaded.report.counts) == {"image_size_mismatch": 1}


class _Processor:
    """Stands in for `GroundedProcessor`: records the image each conversation was encoded with."""

    num_bins = 32

    def encode_conversation(self, conversation, image):
        return SimpleNamespace(image_meta=None, pixel_values=None, image=np.asarray(image)[0, 0].tolist())


def _chat_dataset(tmp_path, on_bad_data):
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)  # data past the header
    Image.fromarray(noise).save(tmp_path / "bad.jpg", quality=95)
    Image.new("RGB", (64, 48), (0, 0, 255)).save(tmp_path / "good.png")
    jpeg = (tmp_path / "bad.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    assert inspect_image(tmp_path / "bad.jpg", image_check="header") == (64, 48)  # header check passes
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A colour."}]
    samples = [
        GroundedSample(str(tmp_path / name), conversation, (64, 48), False, np.zeros((0, 4)), [], [])
        for name in ("bad.jpg", "good.png")
    ]
    chat = SourceConfig(kind="llava_chat", annotations="chat.json", images=".", on_bad_data=on_bad_data)
    stage = StageConfig(name="chat", kind="align", data=[chat], hflip_prob=0.0)
    model = SimpleNamespace(
        processor=_Processor(),
        config=SimpleNamespace(
            heads=SimpleNamespace(categories=["red"], attribute="", attribute_values=[]), scene_line=False
        ),
        mask_head=SimpleNamespace(mask_resolution=8),
    )
    source = LoadedSource(samples, [], {}, on_bad_data=on_bad_data)
    return Trainer._dataset(stage, model, source, seed=0)


def test_truncated_jpeg_is_a_counted_skip_in_training(tmp_path, caplog):
    dataset = _chat_dataset(tmp_path, "skip")
    with caplog.at_level(logging.WARNING):
        assert dataset[0].encoded.image == [0, 0, 255]  # the next readable sample instead
        assert dataset[0].encoded.image == [0, 0, 255]
    assert dataset.unreadable.skipped == {0}
    assert sum("bad.jpg is unreadable" in r.getMessage() for r in caplog.records) == 1


def test_truncated_jpeg_is_one_line_error_in_strict_mode(tmp_path):
    dataset = _chat_dataset(tmp_path, "strict")
    with pytest.raises(UnreadableImageError) as error:
        dataset[0]
    assert "bad.jpg is unreadable or corrupt" in str(error.value) and "\n" not in str(error.value)
