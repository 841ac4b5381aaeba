"""The browser demo's page (gradio Blocks): upload or pick an image, chat, see each answer's overlay.

Layout: left, the image (upload, examples, preview) and the display options (head detections, masks,
confidence); right, the chat, the prompt, the overlay of the last answer and its downloads (PNG and
JSON). Every handler goes through `grounded_llava/demo/session.py`; a bad upload or prompt shows its
message in the status line. The page loads nothing from outside the server (gradio's fonts are local,
analytics are off: `command.py` sets GRADIO_ANALYTICS_ENABLED before gradio is imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from grounded_llava.demo.session import Conversation, DrawOptions, UploadError, read_upload

if TYPE_CHECKING:
    from grounded_llava.inference.predictor import GroundedLlava

TITLE = "grounded-llava"
INTRO = (
    "Ask about an image: each grounded phrase of the answer gets a box, a mask and a score. "
    "Upload an image or pick an example, then chat over several turns."
)


def _status(message: str) -> str:
    return f"**{message}**" if message else ""


def build_app(predictor: GroundedLlava, examples: Sequence[Path] = ()) -> gr.Blocks:
    """The demo page for `predictor`; `examples`: image files offered under the upload."""

    def on_upload(path: str | None) -> tuple[Any, ...]:
        if not path:  # the file box was emptied (by the user, or below after a bad upload): nothing changes
            return tuple(gr.skip() for _ in upload_outputs)
        try:
            image = read_upload(path)
        except UploadError as err:  # the box empties for the next try, the message stays
            return None, None, None, _status(f"⚠ {err}"), [], None, None
        width, height = image.size
        status = _status(f"{Path(path).name}: {width}x{height}, ask away")
        return gr.skip(), Conversation(image), image, status, [], None, None

    def on_ask(
        conversation: Conversation | None, prompt: str, detections: bool, masks: bool, conf: float
    ) -> tuple[Any, ...]:
        if conversation is None:
            return conversation, prompt, _status("⚠ upload or pick an image first"), [], None, None
        try:
            conversation.ask(predictor, prompt)
        except UploadError as err:
            return (
                conversation,
                prompt,
                _status(f"⚠ {err}"),
                conversation.messages(),
                *_drawn(conversation, detections, masks, conf),
            )
        return (
            conversation,
            "",
            _status(""),
            conversation.messages(),
            *_drawn(conversation, detections, masks, conf),
        )

    def on_options(
        conversation: Conversation | None, detections: bool, masks: bool, conf: float
    ) -> tuple[Any, ...]:
        if conversation is None:
            return None, None
        return _drawn(conversation, detections, masks, conf)

    def on_clear(conversation: Conversation | None) -> tuple[Any, ...]:
        if conversation is not None:
            conversation.turns.clear()
        return conversation, [], None, None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        conversation = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[upload], label="Examples")
                preview = gr.Image(
                    label="Uploaded", interactive=False, elem_id="preview", type="pil", buttons=["fullscreen"]
                )
                show_detections = gr.Checkbox(True, label="Head detections", elem_id="show-detections")
                show_masks = gr.Checkbox(True, label="Masks", elem_id="show-masks")
                conf = gr.Slider(
                    0.0, 1.0, value=0.25, step=0.05, label="Confidence threshold", elem_id="conf"
                )
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                chatbot = gr.Chatbot(
                    label="Chat", elem_id="chatbot", height=260, buttons=["copy_all"], feedback_options=None
                )
                with gr.Row():
                    prompt = gr.Textbox(
                        placeholder="Where is the red square?", show_label=False, elem_id="prompt", scale=4
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                    clear = gr.Button("Clear chat", elem_id="clear", scale=1)
                overlay = gr.Image(
                    label="Answer",
                    interactive=False,
                    elem_id="overlay",
                    type="numpy",
                    buttons=["download", "fullscreen"],
                )
                downloads = gr.File(
                    label="Download", file_count="multiple", interactive=False, elem_id="downloads"
                )

        options = [show_detections, show_masks, conf]
        upload_outputs = [upload, conversation, preview, status, chatbot, overlay, downloads]
        upload.change(on_upload, [upload], upload_outputs)
        ask_outputs = [conversation, prompt, status, chatbot, overlay, downloads]
        send.click(on_ask, [conversation, prompt, *options], ask_outputs)
        prompt.submit(on_ask, [conversation, prompt, *options], ask_outputs)
        for option in options:
            option.change(on_options, [conversation, *options], [overlay, downloads])
        clear.click(on_clear, [conversation], [conversation, chatbot, overlay, downloads])
    return app


def _drawn(conversation: Conversation, detections: bool, masks: bool, conf: float) -> tuple[Any, Any]:
    """The last answer's overlay and its [PNG, JSON] downloads under the current options."""
    saved = conversation.save(DrawOptions(detections=detections, masks=masks, conf=conf))
    if saved is None:
        return None, None
    overlay, png, record = saved
    return overlay, [str(png), str(record)]
