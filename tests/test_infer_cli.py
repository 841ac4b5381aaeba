"""`infer.py` end to end on a tiny random-init checkpoint: files, JSON, COCO results, chat and errors."""

import copy
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from grounded_llava.inference import GroundedLlava

from .conftest import TEST_CATEGORIES

REPO = Path(__file__).resolve().parents[1]
SIZES = {"1": (140, 90), "2": (64, 112)}
TOKENS = "8"


def same_json(a, b) -> bool:
    """Equal JSON values, floats up to float32 noise (the CLI process may run other thread counts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-4)
    return a == b


def test_same_json_tells_values_apart():
    record = {"text": "x", "spans": [{"box": [1.0, 2.0], "score": 0.5, "category": "a"}]}
    assert same_json(
        record, {"text": "x", "spans": [{"box": [1.000001, 2.0], "score": 0.5, "category": "a"}]}
    )
    assert not same_json(record, {"text": "x", "spans": [{"box": [1.1, 2.0], "score": 0.5, "category": "a"}]})
    assert not same_json(record, {"text": "y", "spans": [{"box": [1.0, 2.0], "score": 0.5, "category": "a"}]})
    assert not same_json(record, {"text": "x", "spans": []})


def load_infer():
    spec = importlib.util.spec_from_file_location("infer", REPO / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_infer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "infer.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for seed, (stem, (width, height)) in enumerate(SIZES.items()):
        pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.png")
    return folder


def coco_ground_truth(image_dir: Path, category_ids: dict[str, int]) -> COCO:
    gt = COCO()
    gt.dataset = {
        "images": [
            {"id": int(s), "file_name": f"{s}.png", "width": w, "height": h} for s, (w, h) in SIZES.items()
        ],
        "annotations": [
            {
                "id": i + 1,
                "image_id": int(s),
                "category_id": category_ids["circle"],
                "bbox": [5, 5, 20, 20],
                "area": 400,
                "iscrowd": 0,
            }
            for i, s in enumerate(SIZES)
        ],
        "categories": [{"id": cid, "name": name} for name, cid in category_ids.items()],
    }
    gt.createIndex()
    return gt


def test_cli_writes_overlays_json_like_the_api_and_loadable_coco_results(checkpoint, image_dir, tmp_path):
    category_ids = dict(zip(TEST_CATEGORIES, (10, 20, 30), strict=True))
    (tmp_path / "cats.json").write_text(json.dumps(category_ids))
    out, coco_file = tmp_path / "out", tmp_path / "coco.json"
    prompt = "Where is the circle?"
    result = run_infer(
        "--image", str(image_dir), "--prompt", prompt, "--model", str(checkpoint), "--out", str(out),
        "--max-new-tokens", TOKENS, "--batch-size", "2", "--coco-results", str(coco_file),
        "--category-ids", str(tmp_path / "cats.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    predictor = GroundedLlava.from_pretrained(checkpoint, device="cpu")
    paths = sorted(image_dir.glob("*.png"))
    answers = predictor.predict(paths, prompt, batch_size=2, max_new_tokens=int(TOKENS))
    for path, answer in zip(paths, answers, strict=True):
        with Image.open(out / f"{path.stem}.png") as overlay:  # the answer panel below the image
            assert overlay.size[0] == SIZES[path.stem][0] and overlay.size[1] > SIZES[path.stem][1]
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert same_json(record, json.loads(json.dumps(answer.to_json())))
        assert set(record) == {"text", "spans", "detections"} and isinstance(record["text"], str)
        assert record["detections"] and all(
            set(d) == {"box", "score", "category"} for d in record["detections"]
        )
        assert f"{path}: {answer.text}" in result.stdout

    results = json.loads(coco_file.read_text())
    assert len(results) == sum(len(a.detections) for a in answers) > 0
    assert {r["image_id"] for r in results} == {1, 2}
    assert {r["category_id"] for r in results} <= set(category_ids.values())
    gt = coco_ground_truth(image_dir, category_ids)
    loaded = gt.loadRes(copy.deepcopy(results))
    assert len(loaded.getAnnIds()) == len(results)
    first = [r for r in results if r["image_id"] == 1][0]
    dets = answers[0].detections.numpy()
    x0, y0, x1, y1 = dets.boxes[0]
    assert first["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
    assert first["category_id"] == category_ids[dets.categories[0]]


def test_cli_chat_session_matches_the_api(checkpoint, image_dir, tmp_path, monkeypatch, capsys):
    infer = load_infer()
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is in the image?\n\nAnd where?\nexit\nnot read\n"))
    code = infer.main(["--image", str(image_dir / "2.png"), "--chat", "--model", str(checkpoint),
                       "--out", str(tmp_path), "--max-new-tokens", TOKENS])  # fmt: skip
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("assistant: ")]
    predictor = GroundedLlava.from_pretrained(checkpoint, device="cpu")
    first = predictor.chat(image_dir / "2.png", "What is in the image?", max_new_tokens=int(TOKENS))
    second = predictor.chat(
        image_dir / "2.png", "And where?", [("What is in the image?", first)], max_new_tokens=int(TOKENS)
    )
    assert printed == [f"assistant: {first.text}", f"assistant: {second.text}"]
    assert json.loads((tmp_path / "2.json").read_text()) == json.loads(json.dumps(second.to_json()))
    with Image.open(tmp_path / "2.png") as overlay:
        assert overlay.size[0] == SIZES["2"][0] and overlay.size[1] > SIZES["2"][1]


def test_unreadable_image_exits_2_with_one_stderr_line(tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is no jpeg")
    result = run_infer("--image", str(corrupt), "--prompt", "Where?", "--model", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"infer.py: error: cannot read image {corrupt}: cannot identify image file"
    ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_match", "no image matches"),
        ("empty_dir", "no image files"),
        ("model_missing_files", "grounded_config.json is missing"),
        ("empty_prompt", "--prompt is empty"),
        ("truncated_image", "cannot read image"),
    ],
)
def test_input_errors_exit_2_with_one_stderr_line(case, message, checkpoint, image_dir, tmp_path, capsys):
    args = {
        "--image": str(image_dir),
        "--prompt": "Where?",
        "--model": str(checkpoint),
        "--out": str(tmp_path),
    }
    if case == "no_match":
        args["--image"] = str(tmp_path / "nothing*.png")
    elif case == "empty_dir":
        args["--image"] = str(tmp_path)
    elif case == "model_missing_files":
        args["--model"] = str(image_dir)
    elif case == "empty_prompt":
        args["--prompt"] = "   "
    else:
        truncated = tmp_path / "cut.png"
        truncated.write_bytes((image_dir / "1.png").read_bytes()[:200])
        args["--image"] = str(truncated)
    code = load_infer().main([item for pair in args.items() for item in pair])
    stderr = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(stderr) == 1 and stderr[0].startswith("infer.py: error: ") and message in stderr[0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "out_is_the_image_dir",
            "output {images}/../images/1.png would overwrite the input image {images}/1.png",
        ),
        ("chat_out_is_the_image_dir", "output {images}/2.png would overwrite the input image {images}/2.png"),
        ("coco_results_is_an_image", "--coco-results {images}/1.png would overwrite the input image"),
        ("coco_results_is_an_output", "--coco-results {out}/1.json would overwrite output {out}/1.json"),
        ("out_is_a_file", "--out {tmp}/file.txt is a file, not a directory"),
        ("coco_results_is_a_dir", "--coco-results {tmp} is a directory, not a file"),
    ],
)
def test_outputs_that_would_overwrite_inputs_exit_2_before_the_model_loads(
    case, message, image_dir, tmp_path, capsys
):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for path in image_dir.iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (tmp_path / "file.txt").write_text("not a folder")
    # The model does not exist: the outputs are checked before it loads.
    args = {
        "--image": str(images),
        "--prompt": "Where?",
        "--model": str(tmp_path / "no-model"),
        "--out": str(out),
    }
    args |= {
        "out_is_the_image_dir": {"--out": f"{images}/../images"},  # the same folder, spelled differently
        "chat_out_is_the_image_dir": {"--image": str(images / "2.png"), "--chat": None, "--out": str(images)},
        "coco_results_is_an_image": {"--coco-results": str(images / "1.png")},
        "coco_results_is_an_output": {"--coco-results": str(out / "1.json")},
        "out_is_a_file": {"--out": str(tmp_path / "file.txt")},
        "coco_results_is_a_dir": {"--coco-results": str(tmp_path)},
    }[case]
    code = load_infer().main([item for pair in args.items() for item in pair if item is not None])
    stderr = capsys.readouterr().err.splitlines()
    assert code == 2 and len(stderr) == 1 and stderr[0].startswith("infer.py: error: "), stderr
    assert message.format(images=images, out=out, tmp=tmp_path) in stderr[0]
    assert all((images / p.name).read_bytes() == p.read_bytes() for p in image_dir.iterdir())
    assert not out.exists()
