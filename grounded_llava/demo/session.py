"""What the browser demo does, without the browser: read an upload, answer a turn, draw and save it.

The gradio page (`grounded_llava/demo/app.py`) only wires these functions to its widgets, so they are
tested directly. Every user mistake becomes an `UploadError` whose message the page shows: nothing a
user uploads crashes the server.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from grounded_llava.errors import UserError

if TYPE_CHECKING:  # the model stack loads with the predictor, not with this module
    from grounded_llava.inference.predictor import GroundedLlava
    from grounded_llava.inference.results import GroundedAnswer

MAX_UPLOAD_PIXELS = 40_000_000  # 40 MP: a phone photo passes, a decompression bomb does not
MAX_PROMPT_CHARS = 1000


class UploadError(UserError, ValueError):
    """An upload or prompt the demo cannot use; its message is shown in the page."""


def read_upload(path: str | Path) -> Image.Image:
    """The uploaded file as the model sees it: 8-bit RGB, displayed orientation (`inference.images.load_image`).

    CMYK, palette, 16-bit and EXIF-rotated images are converted. Raises UploadError (naming the file)
    for a file that is not an image or has more than `MAX_UPLOAD_PIXELS` (checked before decoding).
    """
    from grounded_llava.inference.images import load_image

    try:
        return load_image(Path(path), max_pixels=MAX_UPLOAD_PIXELS)
    except (FileNotFoundError, ValueError) as err:
        raise UploadError(str(err).replace(str(path), Path(path).name)) from None


def check_prompt(prompt: str | None) -> str:
    """The prompt stripped; UploadError for an empty or overlong one."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise UploadError("type a question about the image first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UploadError(f"the question is {len(prompt)} characters long: at most {MAX_PROMPT_CHARS}")
    return prompt


@dataclass
class DrawOptions:
    """What the overlay shows: the head's detections besides the answer's spans, masks, a score floor."""

    detections: bool = True
    masks: bool = True
    conf: float = 0.25


@dataclass
class Conversation:
    """One browser session's chat about one image: the image, its turns and where its files go."""

    image: Image.Image
    turns: list[tuple[str, GroundedAnswer]] = field(default_factory=list)
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="grounded-llava-demo-")))

    @property
    def last(self) -> GroundedAnswer | None:
        return self.turns[-1][1] if self.turns else None

    def ask(self, predictor: GroundedLlava, prompt: str, *, max_new_tokens: int = 128) -> GroundedAnswer:
        """Answer `prompt` after the earlier turns (greedy), with masks for the head's detections too."""
        answer = predictor.chat(
            self.image,
            check_prompt(prompt),
            self.turns,
            max_new_tokens=max_new_tokens,
            masks_for_detections=True,
        )
        self.turns.append((prompt.strip(), answer))
        return answer

    def draw(self, options: DrawOptions) -> np.ndarray | None:
        """(H + P, W, 3) uint8 overlay of the last answer (the answer panel below the image), or None."""
        if self.last is None:
            return None
        answer = self.last.with_min_score(options.conf)
        return answer.plot(self.image, detections=options.detections, masks=options.masks)

    def save(self, options: DrawOptions) -> tuple[np.ndarray, Path, Path] | None:
        """The last turn's overlay (`draw`), written as `answer_N.png` beside `answer_N.json` (the prompt and
        `GroundedAnswer.to_json()`: original pixels) in `out_dir` for download; None before any turn."""
        overlay = self.draw(options)
        if overlay is None:
            return None
        from grounded_llava.inference.detections import save_png

        number = len(self.turns)
        png = save_png(overlay, self.out_dir / f"answer_{number}.png")
        record = self.out_dir / f"answer_{number}.json"
        answer = self.last.with_min_score(options.conf)
        record.write_text(json.dumps({"prompt": self.turns[-1][0], **answer.to_json()}, indent=2))
        return overlay, png, record

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat messages (`{"role", "content"}`), the answers as clean text."""
        return [
            message
            for prompt, answer in self.turns
            for message in (
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer.text},
            )
        ]
