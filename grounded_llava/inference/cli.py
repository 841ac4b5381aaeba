"""The work behind `infer.py`: image discovery, answers to files, COCO results and the terminal chat.

Outputs per image, in `out_dir`: `<stem>.png` (`GroundedAnswer.plot`: boxes, masks, labels with
scores, the answer panel) and `<stem>.json` (`GroundedAnswer.to_json()`, original pixels).
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

from grounded_llava.console import progress_shown
from grounded_llava.data.bad_data import DataError
from grounded_llava.errors import UsageError
from grounded_llava.inference.images import check_image_file
from grounded_llava.output_paths import check_directory_option, check_file_option, refuse_overwrites

if TYPE_CHECKING:  # the checks before the model loads stay light: `infer.py` answers mistakes at once
    from grounded_llava.inference.detections import Detections
    from grounded_llava.inference.predictor import GroundedLlava
    from grounded_llava.inference.results import GroundedAnswer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXIT_WORDS = ("exit", "quit")


def resolve_images(pattern: str) -> list[Path]:
    """Image files named by a path, a directory (its image files) or a glob, sorted; checked readable.

    Raises FileNotFoundError when nothing matches, ValueError (naming the file) for an unreadable
    image or for two images with the same stem (their outputs would overwrite each other).
    """
    path = Path(pattern)
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
    elif path.is_file():
        paths = [path]
    else:
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise FileNotFoundError(f"no image matches {pattern!r}")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise UsageError(
                f"images {stems[p.stem]} and {p} share the stem {p.stem!r}: their outputs would collide"
            )
        stems[p.stem] = p
        check_image_file(p)
    return paths


def coco_image_ids(paths: Sequence[Path]) -> list[int]:
    """COCO image ids: the file stems when all are numeric (COCO's 000000123456.jpg), else the 0-based index.

    All-or-nothing so that a numeric stem can never collide with another image's index.
    """
    if all(p.stem.isdigit() for p in paths):
        return [int(p.stem) for p in paths]
    return list(range(len(paths)))


def load_category_ids(path: str | Path | None, categories: Sequence[str]) -> list[int]:
    """COCO category id per class id: from a JSON file `{"name": id}`, default 1-based class index."""
    if path is None:
        return list(range(1, len(categories) + 1))
    try:
        mapping = json.loads(Path(path).read_text())
    except OSError as err:
        raise FileNotFoundError(f"cannot read category ids {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path} must hold a JSON object mapping category names to ids")
    missing = [name for name in categories if name not in mapping]
    if missing:
        raise DataError(
            f"{path} has no id for the model's categor{'y' if len(missing) == 1 else 'ies'} {missing}"
        )
    if not all(isinstance(mapping[name], int) for name in categories):
        raise DataError(f"{path}: category ids must be integers")
    return [mapping[name] for name in categories]


def coco_results(
    detections: Sequence[Detections], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict]:
    """COCO result dicts (`COCO.loadRes` input) of the head detections of every image."""
    return [
        r
        for dets, image_id in zip(detections, image_ids, strict=True)
        for r in dets.to_coco(image_id, category_ids)
    ]


def output_files(image: Path, out_dir: Path) -> tuple[Path, Path]:
    """The `<stem>.png` overlay and `<stem>.json` that `write_answer` writes for `image`."""
    return out_dir / f"{image.stem}.png", out_dir / f"{image.stem}.json"


def check_outputs(
    images: Sequence[Path],
    out_dir: Path,
    *,
    coco_results: Path | None = None,
    category_ids: Path | None = None,
) -> None:
    """Refuse (ValueError naming the path) an `out_dir` that is a file, a `coco_results` that is a
    directory, and any output that would overwrite an input image, the category ids or another output.

    Run it before the model loads: `--image DIR --out DIR` would otherwise replace `DIR/x.png` by its overlay.
    """
    check_directory_option(out_dir, "--out")
    inputs = [(image, "the input image") for image in images]
    outputs = [(path, "output") for image in images for path in output_files(image, out_dir)]
    if category_ids is not None:
        inputs.append((category_ids, "the input --category-ids"))
    if coco_results is not None:
        check_file_option(coco_results, "--coco-results")
        outputs.append((coco_results, "--coco-results"))
    refuse_overwrites(outputs, inputs)


def write_answer(answer: GroundedAnswer, image: Path, out_dir: Path) -> tuple[Path, Path]:
    """`<stem>.png` overlay and `<stem>.json` for one image (`output_files`); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_path, record = output_files(image, out_dir)
    overlay = answer.save(overlay_path, image)
    record.write_text(json.dumps(answer.to_json(), indent=2))
    return overlay, record


def predict_images(
    predictor: GroundedLlava,
    paths: Sequence[Path],
    prompt: str,
    out_dir: Path,
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    masks_for_detections: bool,
    conf: float | None = None,
    stdout: TextIO | None = None,
) -> list[GroundedAnswer]:
    """Answer `prompt` for every image (batched), write its overlay and JSON, print its answer.
    `conf`: keep the head detections scored >= conf (`GroundedAnswer.with_min_score`)."""
    answers: list[GroundedAnswer] = []
    stdout = stdout or sys.stdout  # read at call time: sys.stdout may be replaced after import
    with tqdm(
        total=len(paths),
        desc="infer",
        unit="img",
        disable=len(paths) == 1 or not progress_shown(),
        file=sys.stderr,
    ) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            batch = predictor.predict(
                chunk,
                prompt,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                masks_for_detections=masks_for_detections,
            )
            batch = [answer.with_min_score(conf) for answer in batch] if conf is not None else batch
            for path, answer in zip(chunk, batch, strict=True):
                write_answer(answer, path, out_dir)
                bar.write(f"{path}: {answer.text}", file=stdout)
            answers += batch
            bar.update(len(chunk))
    return answers


def chat_session(
    predictor: GroundedLlava,
    image: Path,
    out_dir: Path,
    *,
    lines: Iterable[str],
    max_new_tokens: int,
    temperature: float,
    masks_for_detections: bool,
    conf: float | None = None,
    stdout: TextIO | None = None,
) -> list[GroundedAnswer]:
    """Multi-turn chat about one image: one prompt per line until the end or "exit"; blank lines are skipped.

    Prints each answer and writes the overlay and JSON of the last turn (detections scored >= `conf`).
    """
    history: list[tuple[str, GroundedAnswer]] = []
    stdout = stdout or sys.stdout  # read at call time: sys.stdout may be replaced after import
    for line in lines:
        prompt = line.strip()
        if prompt.lower() in EXIT_WORDS:
            break
        if not prompt:
            continue
        answer = predictor.chat(
            image,
            prompt,
            history,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            masks_for_detections=masks_for_detections,
        )
        print(f"assistant: {answer.text}", file=stdout, flush=True)
        history.append((prompt, answer))
    answers = [answer for _, answer in history]
    if conf is not None:
        answers = [answer.with_min_score(conf) for answer in answers]
    if answers:
        write_answer(answers[-1], image, out_dir)
    return answers
