"""The scene line (`scene_line.py`): its words for known scenes, where it goes in a conversation, the
dataset's line from the annotations (after a flip), and the predictor's line from the head's detections."""

import numpy as np
import pytest
import torch

from grounded_llava.data.dataset import GroundedDataset
from grounded_llava.data.sample import GroundedSample
from grounded_llava.inference.requests import build_request, with_scene_lines
from grounded_llava.inference.scene import scene_lines
from grounded_llava.scene_line import MAX_LISTED, MAX_VOCABULARY, SeenObject, scene_line, with_scene_line


def test_the_line_lists_objects_left_to_right_and_counts_kinds_and_colours():
    objects = [
        SeenObject("cross", "blue", 50.0),
        SeenObject("circle", "red", 10.0),
        SeenObject("circle", "red", 90.0),
    ]
    assert scene_line(objects) == (
        "Seen 3 objects, left to right: circle red, cross blue, circle red. Kinds: circle 2, cross 1. "
        "Colours: red 2, blue 1."
    )
    assert scene_line([SeenObject("bus", None, 1.0)]) == "Seen 1 object, left to right: bus. Kinds: bus 1."
    assert scene_line([]) == "Seen no objects."
    many = scene_line([SeenObject("dog", None, float(x)) for x in range(MAX_LISTED + 3)])
    assert many.count("dog,") == MAX_LISTED - 1 and f"Kinds: dog {MAX_LISTED + 3}." in many


def test_a_small_vocabulary_is_listed_whole_with_no_for_what_is_not_seen():
    objects = [SeenObject("cross", "blue", 50.0), SeenObject("circle", "red", 10.0)]
    line = scene_line(objects, kinds=["circle", "square", "cross"], attribute_values=["red", "green", "blue"])
    assert line.endswith("Kinds: circle 1, square no, cross 1. Colours: red 1, green no, blue 1.")
    empty = scene_line([], kinds=["circle", "square"], attribute_values=["red"])
    assert empty == "Seen no objects. Kinds: circle no, square no. Colours: red no."
    coco = [f"class{i}" for i in range(MAX_VOCABULARY + 1)]  # too many to list: only what is seen
    assert scene_line([SeenObject("class3", None, 1.0)], kinds=coco).endswith("Kinds: class3 1.")
    assert scene_line([], kinds=coco) == "Seen no objects."


def test_the_line_goes_right_after_the_image_token():
    turns = [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "Two."}]
    assert with_scene_line(turns, "Seen x.")[0]["value"] == "<image>\nSeen x.\nHow many?"
    assert turns[0]["value"] == "<image>\nHow many?"  # the input is not changed
    with pytest.raises(ValueError, match="no human turn"):
        with_scene_line([{"from": "human", "value": "text only"}], "Seen x.")


def test_the_dataset_writes_the_annotated_line_after_the_flip(tiny_model, random_image, tmp_path):
    image_path = tmp_path / "scene.png"
    random_image(100, 50).save(image_path)
    sample = GroundedSample(
        image_path, [{"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Shapes."}],
        (100, 50), True, np.array([[0, 0, 20, 20], [60, 0, 90, 30]], np.float32), ["circle", "square"],
        det_attributes=[{"color": "red"}, {}],
    )  # fmt: skip
    processor = tiny_model.processor
    for flip, order in ((0.0, "circle red, square"), (1.0, "square, circle red")):
        kinds = "circle 1, square 1"  # the head's vocabulary, in its order
        dataset = GroundedDataset([sample], processor, categories=["circle", "square"], mask_resolution=8,
                                  hflip_prob=flip, scene_line=True, attribute="color",
                                  attribute_values=["red", "blue"])  # fmt: skip
        text = processor.decode(dataset[0].encoded.input_ids)
        assert f"Seen 2 objects, left to right: {order}. Kinds: {kinds}. Colours: red 1, blue no." in text
    plain = GroundedDataset([sample], processor, categories=["circle", "square"], mask_resolution=8)
    assert "Seen" not in processor.decode(plain[0].encoded.input_ids)


def test_the_predictor_reads_the_line_of_the_heads_detections(tiny_model, random_image):
    model = tiny_model.eval()
    model.config.scene_conf_threshold = 0.0  # an untrained head: every box it keeps is named
    request = build_request(model.processor, random_image(64, 64), "How many?", [])
    with torch.inference_mode():
        pixels = request.encoded.pixel_values[None]
        pyramid = model.image_pyramid(model.encode_images(pixels), pixels)
        line = scene_lines(model, pyramid, pixels)[0]
        assert with_scene_lines(model, [request], pyramid)[0] is request  # scene_line off: as it was
        model.config.scene_line = True
        read = with_scene_lines(model, [request], pyramid)[0]
        encoded = read.encoded
        rows = model.detection_head.postprocess(
            model.detection_head(pyramid), conf_threshold=0.0, iou_threshold=model.config.heads.nms_iou,
            agnostic=True,
        )[0]  # fmt: skip
    assert read.scene_line == line and line.startswith(f"Seen {len(rows)} object")
    assert line in model.processor.decode(encoded.input_ids)
