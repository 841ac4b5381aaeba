"""Chat sources: LLaVA conversation JSON and COCO captions, with their validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from grounded_llava.data.bad_data import DataError
from grounded_llava.data.chat import CAPTION_QUESTIONS, load_coco_captions, load_llava_chat


def _entries(root: Path) -> list[dict]:
    (root / "images").mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "images" / "a.png")
    return [
        {
            "id": "e1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "Dark."},
                {"from": "human", "value": "Anything else?"},
                {"from": "gpt", "value": "A <p>dot</p><box><loc_1><loc_2><loc_3><loc_4></box>."},
            ],
        },
        {"id": "e2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]


def _save(root: Path, entries) -> Path:
    path = root / "chat.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_chat_loads(tmp_path):
    samples, report = load_llava_chat(_save(tmp_path, _entries(tmp_path)), tmp_path / "images")
    assert report.num_problems == 0 and len(samples) == 2
    image, text = samples
    assert image.image_path == tmp_path / "images" / "a.png" and image.image_size == (40, 30)
    assert not image.has_det_targets and image.seg_masks == [] and len(image.conversation) == 4
    assert text.image_path is None and text.image_size is None
    assert image.source.endswith("chat.json:e1")


def _set(index, key, value):
    return lambda entries: entries[index].__setitem__(key, value)


def _turn(index, turn, **changes):
    return lambda entries: entries[index]["conversations"][turn].update(changes)


CASES = [
    ("no id", lambda e: e[0].pop("id"), "missing_key", "entry #0"),
    ("no conversations", lambda e: e[1].pop("conversations"), "missing_key", "id e2"),
    ("not alternating", _turn(0, 1, **{"from": "human"}), "bad_turns", "id e1"),
    ("starts with gpt", _turn(1, 0, **{"from": "gpt"}), "bad_turns", "id e2"),
    ("odd turn count", lambda e: e[1]["conversations"].pop(), "bad_turns", "id e2"),
    ("image token twice", _turn(0, 2, value="<image> again"), "image_token", "id e1"),
    ("image token missing", _turn(0, 0, value="What colour?"), "image_token", "id e1"),
    ("image token without image", _turn(1, 0, value="<image>\nHi"), "image_token", "id e2"),
    (
        "seg in chat",
        _turn(0, 3, value="<p>x</p><box><loc_1><loc_2><loc_3><loc_4></box><seg>"),
        "grounding_tokens",
        "id e1",
    ),
    ("broken box", _turn(0, 3, value="<p>x</p><box><loc_1></box>"), "grounding_tokens", "id e1"),
    ("missing image", _set(0, "image", "b.png"), "missing_image_file", "id e1"),
    ("escaping image", _set(0, "image", "../a.png"), "path_escapes_root", "id e1"),
]


@pytest.mark.parametrize(("case", "mutate", "reason", "named"), CASES, ids=[c[0] for c in CASES])
def test_llava_chat_bad_entries(tmp_path, case, mutate, reason, named):
    entries = _entries(tmp_path)
    mutate(entries)
    path = _save(tmp_path, entries)
    with pytest.raises(DataError) as error:
        load_llava_chat(path, tmp_path / "images")
    assert "chat.json" in str(error.value) and named in str(error.value)
    samples, report = load_llava_chat(path, tmp_path / "images", on_bad_data="skip")
    assert report.counts == Counter({reason: 1}) and report.entries_skipped == 1 and len(samples) == 1


def test_llava_chat_must_be_a_list(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text('{"id": 1}')
    with pytest.raises(DataError, match="JSON list"):
        load_llava_chat(path, tmp_path)


def _captions(root: Path) -> dict:
    (root / "images").mkdir()
    Image.new("RGB", (40, 30)).save(root / "images" / "a.png")
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 5, "image_id": 1, "caption": " A black square. "},
            {"id": 6, "image_id": 1, "caption": "Dark."},
        ],
    }


def test_coco_captions_load_deterministically(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(_captions(tmp_path)))
    samples, report = load_coco_captions(path, tmp_path / "images", seed=1)
    again, _ = load_coco_captions(path, tmp_path / "images", seed=1)
    assert report.num_problems == 0 and [s.conversation for s in samples] == [s.conversation for s in again]
    first = samples[0]
    assert first.conversation[1] == {"from": "gpt", "value": "A black square."}
    assert first.conversation[0]["value"].removeprefix("<image>\n") in CAPTION_QUESTIONS
    assert first.image_size == (40, 30) and not first.has_det_targets


@pytest.mark.parametrize(
    ("mutate", "reason", "named"),
    [
        (lambda d: d["annotations"][0].update(caption=""), "bad_value", "id 5"),
        (lambda d: d["annotations"][0].update(image_id=9), "unknown_image_id", "id 5"),
        (lambda d: d["annotations"][0].pop("caption"), "missing_key", "id 5"),
        (lambda d: d["images"][0].update(height=31), "image_size_mismatch", "id 1"),
    ],
)
def test_coco_captions_bad_data(tmp_path, mutate, reason, named):
    data = _captions(tmp_path)
    mutate(data)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as error:
        load_coco_captions(path, tmp_path / "images")
    assert "captions.json" in str(error.value) and named in str(error.value)
    _, report = load_coco_captions(path, tmp_path / "images", on_bad_data="skip")
    assert report.counts == Counter({reason: 1})
