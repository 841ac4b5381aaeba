"""Property tests of the COCO reader: any file, and any value in any field of a valid one, yields records or
a `DataError` (nothing else), in bounded time; in skip mode a kept image keeps every one of its annotations,
and every kept mask decodes."""

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from grounded_llava.data.bad_data import DataError
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.data.coco_geometry import is_finite

WIDTH, HEIGHT = 12, 8
SQUARE = [2, 2, 6, 2, 6, 6, 2, 6]
RLE = {"size": [HEIGHT, WIDTH], "counts": [10, 4, 82]}


def _valid() -> dict:
    """Two images, two categories, three annotations (polygon, RLE, no mask)."""
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in (1, 2)],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4], "area": 16.0,
             "segmentation": [SQUARE], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "segmentation": RLE, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 12, 8]},
        ],
    }  # fmt: skip


# Any JSON value, with what breaks readers: NaN, inf, huge and 1.0-style integers, paths, nested lists.
scalars = st.one_of(
    st.none(), st.booleans(), st.floats(), st.integers(-(10**400), 10**400), st.integers(-3, 30),
    st.sampled_from([1.0, 2.0, "1.png", "../1.png", "/etc/passwd", "", "\x00", "circle"]), st.text(max_size=5),
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.sampled_from(["size", "counts", "id"]), inner)
    ),
    max_leaves=30,
)
FIELDS = {
    "images": ["id", "file_name", "width", "height"],
    "categories": ["id", "name"],
    "annotations": ["id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd"],
}
# (section, entry index, key): one field of one entry; key None replaces the entry, index None the section
locations = st.one_of(
    st.sampled_from(list(FIELDS)).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(0, 2), st.sampled_from([*FIELDS[s], None]))
    ),
    st.tuples(st.sampled_from(list(FIELDS)), st.none(), st.none()),
)
mutations = st.lists(st.tuples(locations, json_values), min_size=1, max_size=4)
SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def image_root():
    with tempfile.TemporaryDirectory() as root:
        for i in (1, 2):
            Image.new("RGB", (WIDTH, HEIGHT), (i * 60, 0, 0)).save(Path(root) / f"{i}.png")
        yield Path(root)


def _mutated(changes) -> dict:
    data = _valid()
    for (section, index, key), value in changes:
        entries = data[section]
        if index is None:
            data[section] = value
        elif isinstance(entries, list) and index < len(entries):
            if key is None or not isinstance(entries[index], dict):
                entries[index] = value
            else:
                entries[index][key] = value
    return data


def _reads_as(value: object, number: int) -> bool:
    """Whether the reader takes `value` as the id `number` (integers and integral floats, not bools)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and is_finite(value)
        and value == number
    )


def _load(text: str, image_root: Path, on_bad_data: str):
    path = image_root / "annotations.json"
    path.write_text(text)
    try:
        return load_coco_instances(path, image_root, on_bad_data=on_bad_data, image_check="header")
    except DataError:
        return None


@SETTINGS
@given(mutations)
def test_any_field_value_gives_records_or_a_data_error(image_root, changes):
    data = _mutated(changes)
    text = json.dumps(data)  # NaN and Infinity as Python writes them
    _load(text, image_root, "strict")
    loaded = _load(text, image_root, "skip")
    if loaded is None:
        return
    annotations = data["annotations"] if isinstance(data["annotations"], list) else []
    for image in loaded.images:
        # a kept image has all its annotations: a dropped one would teach that its object is background
        mine = [
            a for a in annotations if isinstance(a, dict) and _reads_as(a.get("image_id"), image.image_id)
        ]
        assert len(image.instances) == len(mine)
        for instance in image.instances:
            x0, y0, x1, y1 = instance.box_xyxy
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            mask = instance.decode_mask(image.image_size)
            assert mask is None or mask.shape == (image.height, image.width)


@SETTINGS
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=200), st.integers(0, 400).map(lambda n: "[" * n * 10))
)
def test_any_file_gives_records_or_a_data_error(image_root, content):
    path = image_root / "annotations.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for policy in ("strict", "skip"):
        with contextlib.suppress(DataError):
            load_coco_instances(path, image_root, on_bad_data=policy, image_check="header")


@SETTINGS
@given(st.integers(0, 400), st.text(max_size=3), st.integers(0, 9))
def test_edited_json_text_gives_records_or_a_data_error(image_root, position, insert, cut):
    """Hand edits gone wrong: characters inserted into, or cut from, a valid file's text."""
    text = json.dumps(_valid())
    position = min(position, len(text))
    _load(text[:position] + insert + text[position + cut :], image_root, "strict")
