"""The browser demo's logic without a browser (`grounded_llava/demo/session.py`): uploads people really
send (CMYK, 16-bit, not an image, huge) and a chat of several turns on a saved model, drawn and saved."""

import json

import numpy as np
import pytest
from PIL import Image

from grounded_llava.demo import session
from grounded_llava.demo.session import Conversation, DrawOptions, UploadError, check_prompt, read_upload


def test_cmyk_and_16bit_uploads_become_the_rgb_the_model_reads(tmp_path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    red = np.asarray(read_upload(tmp_path / "cmyk.jpg"))
    assert red.shape == (30, 40, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60
    ramp = np.tile(np.linspace(0, 65535, 50).astype(np.uint16), (20, 1))
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    gray = np.asarray(read_upload(tmp_path / "gray16.png"))
    assert gray.dtype == np.uint8 and gray[0, 0, 0] == 0 and gray[0, -1, 0] == 255
    assert 100 < gray[0, 25, 0] < 155  # scaled, not clipped to white


def test_bad_uploads_get_a_message_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UploadError, match=r"notes\.png.*cannot identify image file"):
        read_upload(tmp_path / "notes.png")
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(session, "MAX_UPLOAD_PIXELS", 199)
    with pytest.raises(UploadError, match=r"big\.png is 20x10 pixels"):
        read_upload(tmp_path / "big.png")
    assert str(tmp_path) not in str(pytest.raises(UploadError, read_upload, tmp_path / "big.png").value)


def test_prompts_are_checked():
    assert check_prompt("  Where is the star?\n") == "Where is the star?"
    with pytest.raises(UploadError, match="type a question"):
        check_prompt("   ")
    with pytest.raises(UploadError, match="at most"):
        check_prompt("x" * (session.MAX_PROMPT_CHARS + 1))


@pytest.fixture(scope="module")
def predictor(random_checkpoint):
    from grounded_llava.inference.predictor import GroundedLlava

    return GroundedLlava.from_pretrained(random_checkpoint, device="cpu")


def test_a_chat_of_two_turns_is_drawn_and_saved(predictor, random_image, tmp_path):
    image = random_image(64, 48)
    conversation = Conversation(image, out_dir=tmp_path)
    assert conversation.draw(DrawOptions()) is None and conversation.save(DrawOptions()) is None
    first = conversation.ask(predictor, "Find every circle.", max_new_tokens=12)
    second = conversation.ask(predictor, " Where is the star? ", max_new_tokens=12)
    assert conversation.last is second and second is not first
    assert conversation.messages() == [
        {"role": "user", "content": "Find every circle."},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Where is the star?"},
        {"role": "assistant", "content": second.text},
    ]
    # The second turn was asked with the first one as its history.
    assert second.raw_text == predictor.chat(image, "Where is the star?", [("Find every circle.", first)],
                                             max_new_tokens=12).raw_text  # fmt: skip
    assert len(second.detections) > 0 and second.detections.masks is not None  # masks for the toggle
    everything = conversation.draw(DrawOptions(detections=True, masks=True, conf=0.0))
    nothing_extra = conversation.draw(DrawOptions(detections=False, masks=False, conf=0.0))
    assert everything.shape[0] > 48 and everything.shape[1:] == (64, 3)  # the answer panel below
    assert not np.array_equal(everything, nothing_extra)
    overlay, png, record = conversation.save(DrawOptions(conf=1.1))  # no detection passes 1.1
    assert png == tmp_path / "answer_2.png" and np.array_equal(np.asarray(Image.open(png)), overlay)
    saved = json.loads(record.read_text())
    assert (
        saved["prompt"] == "Where is the star?" and saved["text"] == second.text and saved["detections"] == []
    )


def test_a_bad_port_is_one_line_and_exit_2(capsys):
    from grounded_llava.demo.command import main

    assert main(["--port", "70000"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "python -m grounded_llava.demo: error: --port must be in 1-65535, got 70000"
    )
