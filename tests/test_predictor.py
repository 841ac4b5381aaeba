"""`GroundedLlava` predictor on a tiny random-init checkpoint (real transformers/peft/ultralytics/SAM parts)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grounded_llava.box_iou import pairwise_iou
from grounded_llava.codec import encode_phrase
from grounded_llava.inference import Detections, GroundedAnswer, GroundedLlava, checkpoint_paths
from grounded_llava.inference.forced import forced_answers
from grounded_llava.inference.grounding import find_box_groups
from grounded_llava.inference.requests import build_request, with_scene_lines
from grounded_llava.modeling import CheckpointError
from grounded_llava.modeling.base import BaseModelUnavailableError

REPO = Path(__file__).resolve().parents[1]
SPAN_KEYS = {"phrase", "box", "score", "category", "mask_rle"}
TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint


@pytest.fixture(scope="module")
def predictor(checkpoint) -> GroundedLlava:
    return GroundedLlava.from_pretrained(checkpoint, device="cpu")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def assert_inside(boxes: np.ndarray, size: tuple[int, int]) -> None:
    width, height = size
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_chat_answer_overlay_and_json_schema(predictor):
    image = noise_image(140, 90, seed=0)
    answer = predictor.chat(image, "Where is the circle?", max_new_tokens=TOKENS)
    assert isinstance(answer, GroundedAnswer) and answer.image_size == (140, 90)
    assert answer.raw_text and len(answer.detections) > 0
    assert_inside(answer.detections.numpy().boxes, (140, 90))
    assert answer.plot(image, panel=False).shape == (90, 140, 3)
    assert answer.plot(image).shape[1:] == (140, 3)

    record = answer.to_json()
    assert set(record) == {"text", "spans", "detections"} and isinstance(record["text"], str)
    for span in record["spans"]:
        assert set(span) == SPAN_KEYS
    for det in record["detections"]:
        assert set(det) == {"box", "score", "category"}
        assert len(det["box"]) == 4 and all(isinstance(v, float) for v in det["box"])
        assert isinstance(det["score"], float) and det["category"] in predictor.categories


def test_greedy_predict_batched_agrees_with_chat_one_by_one(predictor):
    images = [noise_image(140, 90, seed=1), noise_image(64, 128, seed=2), noise_image(100, 100, seed=3)]
    prompts = ["Where is the circle?", "Find all the shapes in the image.", "Describe it."]
    batched = predictor.predict(images, prompts, batch_size=3, max_new_tokens=TOKENS)
    single = [predictor.chat(im, p, max_new_tokens=TOKENS) for im, p in zip(images, prompts, strict=True)]
    again = predictor.chat(images[0], prompts[0], max_new_tokens=TOKENS)
    assert again.raw_text == single[0].raw_text  # greedy decoding is deterministic
    # Left padding differs by sample: the prompts have different lengths, so padding is exercised.
    assert len({len(p) for p in prompts}) == 3
    for a, b in zip(batched, single, strict=True):
        assert a.raw_text == b.raw_text and a.text == b.text
        assert len(a.spans) == len(b.spans) and len(a.detections) == len(b.detections) > 0
        np.testing.assert_allclose(a.detections.numpy().boxes, b.detections.numpy().boxes, atol=1e-4)
        np.testing.assert_allclose(a.detections.numpy().scores, b.detections.numpy().scores, atol=1e-4)
        for sa, sb in zip(a.spans, b.spans, strict=True):
            np.testing.assert_allclose(sa.box, sb.box, atol=1e-4)


def test_detect_is_the_chat_head_with_boxes_inside_the_image(predictor):
    image = noise_image(120, 80, seed=4)
    detections = predictor.detect([image], masks=True)
    assert len(detections) == 1 and isinstance(detections[0], Detections)
    dets = detections[0].numpy()
    assert len(dets) > 0 and dets.image_size == (120, 80)
    assert_inside(dets.boxes, (120, 80))
    assert dets.masks.shape == (len(dets), 80, 120) and dets.masks.dtype == bool
    assert ((dets.scores >= 1e-3) & (dets.scores <= 1)).all()
    # The teacher-forced pass of chat and the head alone see the same features: same detections.
    chat = predictor.chat(
        image, "Find the star.", max_new_tokens=2, masks_for_detections=True
    ).detections.numpy()
    np.testing.assert_allclose(chat.boxes, dets.boxes, atol=1e-4)
    np.testing.assert_array_equal(chat.masks, dets.masks)


def test_a_given_answer_gets_box_mask_and_token_probability(predictor):
    """`score` grounds a given answer `<p>circle</p><box>..</box><seg>` -> box, mask, score."""
    processor, model = predictor.processor, predictor.model
    image, size, box = noise_image(160, 120, seed=5), (160, 120), (20.0, 30.0, 90.0, 100.0)
    grounded = encode_phrase("circle", [box], size, num_bins=processor.num_bins, seg=True)
    # A stray <seg> and an <image> token, as a random model may emit: tolerated, the stray one counted.
    answer_text = f"Here: {grounded}, and <seg> <image> more."
    answer_ids = processor.encode_answer(answer_text)
    assert answer_ids.count(model.image_token_id) == 1 and answer_ids.count(model.token_ids.seg) == 2

    request = build_request(predictor.processor, image, "Segment the circle.", [])
    features, pyramid = predictor._encode([request])
    answer = predictor.score(image, "Segment the circle.", answer_text)
    assert answer.text.startswith("Here: circle") and answer.num_dropped_groups == 1
    assert len(answer.spans) == 1
    span = answer.spans[0]
    assert span.phrase == "circle"
    bin_px = np.array([160, 120, 160, 120]) / processor.num_bins
    written = np.array(processor.parse(answer.raw_text, request.meta).spans[0].boxes[0])
    assert (np.abs(written - np.array(box)) <= bin_px).all()  # the text's box, to the bin
    if span.source == "head":  # reconciled: the matched detection's box, which overlaps the text's enough
        np.testing.assert_allclose(span.box, answer.detections.numpy().boxes[span.head_index])
        assert pairwise_iou(span.box[None], written[None])[0, 0] >= model.config.heads.match_iou
    else:
        np.testing.assert_allclose(span.box, written)
    assert span.mask.shape == (120, 160) and span.mask.dtype == bool
    assert 0.0 <= span.score <= 1.0

    # Forced in a right-padded batch after a longer sample: the same log-probabilities and `<seg>` state.
    other = build_request(
        predictor.processor, noise_image(50, 70, seed=8), "Describe the image in detail, please.", []
    )
    other_features, other_pyramid = predictor._encode([other])
    requests = [other, request]
    pair = forced_answers(
        model,
        [r.encoded.input_ids.tolist() for r in requests],
        [answer_ids[:3], answer_ids],
        features=torch.cat([other_features, features]),
        pyramid=[torch.cat(levels) for levels in zip(other_pyramid, pyramid, strict=True)],
        pixel_values=torch.stack([r.encoded.pixel_values for r in requests]),
        original_sizes=torch.tensor([r.meta.original_size for r in requests]),
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    alone = forced_answers(
        model, [request.encoded.input_ids.tolist()], [answer_ids], features=features, pyramid=pyramid,
        pixel_values=request.encoded.pixel_values[None], original_sizes=torch.tensor([size]),
        pad_token_id=processor.tokenizer.pad_token_id,
    )  # fmt: skip
    assert len(other.encoded.input_ids) > len(request.encoded.input_ids)
    np.testing.assert_allclose(pair.log_probs[1], alone.log_probs[0], atol=1e-4)
    assert pair.seg_states[1].keys() == alone.seg_states[0].keys() and len(alone.seg_states[0]) == 1
    for position, state in alone.seg_states[0].items():
        torch.testing.assert_close(pair.seg_states[1][position], state, atol=1e-4, rtol=1e-4)

    # Recompute mask and token probability by hand from one forward over the same tokens.
    prompt_ids = request.encoded.input_ids.tolist()
    cut = answer_ids.index(model.token_ids.seg) + 1  # up to the first (valid) <seg>
    ids = torch.tensor([prompt_ids + answer_ids[:cut]])
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            image_features=features,
            pyramid=pyramid,
            pixel_values=request.encoded.pixel_values[None],
            image_sample_index=torch.tensor([0]),
            original_sizes=torch.tensor([size]),
        )
    assert out.mask_logits.shape[0] == 1
    np.testing.assert_array_equal(span.mask, request.meta.mask_from_canvas(out.mask_logits[0], box=span.box))
    loc_positions = torch.arange(len(prompt_ids) + cut - 6, len(prompt_ids) + cut - 2)
    log_probs = out.logits[0, loc_positions - 1].log_softmax(-1).gather(1, ids[0, loc_positions][:, None])
    if span.source == "text":
        assert span.score == pytest.approx(float(log_probs.mean().exp()), rel=1e-4)
    else:
        assert span.score == pytest.approx(float(answer.detections.scores[span.head_index]))


def test_history_and_masks_for_detections(predictor):
    image = noise_image(96, 72, seed=6)
    first = predictor.chat(image, "What is in the image?", max_new_tokens=4)
    second = predictor.chat(
        image, "And where?", [("What is in the image?", first)], max_new_tokens=4, masks_for_detections=True
    )
    request = build_request(predictor.processor, image, "And where?", [("What is in the image?", first)])
    assert (
        request.encoded.input_ids == predictor.model.image_token_id
    ).sum() == predictor.processor.num_image_tokens
    dets = second.detections.numpy()
    assert dets.masks is not None and dets.masks.shape == (len(dets), 72, 96)
    np.testing.assert_allclose(dets.boxes, first.detections.numpy().boxes, atol=1e-4)


def test_errors_are_clear(predictor, checkpoint, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="grounded_config.json is missing"):
        GroundedLlava.from_pretrained(tmp_path)
    (tmp_path / "grounded_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="heads.safetensors"):
        GroundedLlava.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GroundedLlava.from_pretrained(tmp_path / "nowhere" / "ckpt")
    with pytest.raises(BaseModelUnavailableError, match="'nobody/no-such-model' is not a local directory"):
        GroundedLlava.from_pretrained("nobody/no-such-model")  # HF_HUB_OFFLINE=1 (conftest): fails at once
    monkeypatch.setattr(checkpoint_paths, "DEFAULT_CHECKPOINT", tmp_path / "checkpoints" / "tiny-shapes")
    with pytest.raises(FileNotFoundError, match="default checkpoint .*--model DIR"):
        GroundedLlava.from_pretrained()
    image = noise_image(32, 32, seed=7)
    with pytest.raises(ValueError, match="empty prompt"):
        predictor.chat(image, "  ")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"cannot read image {corrupt}"):
        predictor.chat(corrupt, "Where?")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        predictor.predict([tmp_path / "missing.png"], "Where?")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        predictor.predict([image, image], ["a", "b", "c"])


def test_generation_keeps_what_a_second_pass_would_compute():
    """On the shipped model (it writes box groups and `<seg>`s): the log-probabilities of every box's loc
    tokens and the state that emits every `<seg>`, kept during generation, equal those of a teacher-forced
    pass over the same answer; so `chat` needs no second pass, and `score` grounds an answer as `chat` does."""
    shipped = GroundedLlava.from_pretrained(device="cpu")
    image, pad = REPO / "examples" / "shapes_1.png", shipped.processor.tokenizer.pad_token_id
    segs = 0
    for prompt in ("Segment every circle.", "Where is the red square?"):
        request = build_request(shipped.processor, image, prompt, [])
        features, pyramid = shipped._encode([request])
        request = with_scene_lines(shipped.model, [request], pyramid)[0]  # as `chat` reads it
        generated = shipped._generate([request], features, pyramid, max_new_tokens=48, temperature=0.0)
        forced = forced_answers(
            shipped.model, [request.encoded.input_ids.tolist()], generated.ids, features=features,
            pyramid=pyramid, pixel_values=request.encoded.pixel_values[None],
            original_sizes=torch.tensor([request.meta.original_size]), pad_token_id=pad,
        )  # fmt: skip
        groups = find_box_groups(generated.ids[0], shipped.model.token_ids)
        assert groups, shipped.processor.decode(generated.ids[0])
        for group in groups:
            loc = slice(group.start + 1, group.start + 5)
            np.testing.assert_allclose(generated.log_probs[0][loc], forced.log_probs[0][loc], atol=1e-4)
            if group.seg:
                segs += 1
                kept, recomputed = (
                    generated.seg_states[0][group.seg_position],
                    forced.seg_states[0][group.seg_position],
                )
                torch.testing.assert_close(kept, recomputed, atol=1e-4, rtol=1e-4)
        chat = shipped.chat(image, prompt, max_new_tokens=48)
        assert chat.raw_text == shipped.processor.decode(generated.ids[0])
    assert segs >= 2


def test_from_pretrained_merges_the_adapters_and_checkpoints_keep_them_apart(checkpoint, tmp_path):
    from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
    from grounded_llava.modeling.base import (
        adapters_disabled,
        adapters_merged,
        merge_adapters,
        unmerge_adapters,
    )

    model = GroundedLlavaForConditionalGeneration.from_pretrained(checkpoint)
    torch.manual_seed(0)
    for name, param in model.llava.named_parameters():
        if "lora_B" in name:  # a random checkpoint's LoRA starts at zero: merging it would change nothing
            param.data.normal_(std=0.05)
    model.save_pretrained(tmp_path / "trained")
    assert not adapters_merged(GroundedLlava(model, device="cpu").model.llava)  # a given model stays as it is
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    predictor = GroundedLlava.from_pretrained(tmp_path / "trained", device="cpu")
    merged_model = predictor.model
    assert adapters_merged(merged_model.llava)
    assert any(not torch.equal(before[n], t) for n, t in merged_model.state_dict().items())  # base weights
    image = noise_image(64, 48, seed=9)
    merged = predictor.chat(image, "Find the star.", max_new_tokens=TOKENS)
    unmerge_adapters(merged_model.llava)
    unmerged = predictor.chat(image, "Find the star.", max_new_tokens=TOKENS)
    assert merged.raw_text == unmerged.raw_text  # the same function, merged or not
    np.testing.assert_allclose([s.score for s in merged.spans], [s.score for s in unmerged.spans], rtol=1e-4)

    merge_adapters(merged_model.llava)
    with pytest.raises(RuntimeError, match="unmerge_adapters"), adapters_disabled(merged_model.llava):
        pass  # merged layers would still compute with the adapters: refused
    merged_model.save_pretrained(tmp_path / "saved")  # written unmerged, and merged again after
    assert adapters_merged(merged_model.llava)
    reloaded = GroundedLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert not adapters_merged(reloaded.llava) and reloaded.state_dict().keys() == before.keys()
    for name, saved in reloaded.state_dict().items():
        torch.testing.assert_close(saved, before[name], atol=1e-5, rtol=1e-5, msg=name)
