"""`python -m grounded_llava.evaluate` on a tiny synthetic world with tiny random-init checkpoints.

The metric functions have their own known-answer tests (test_metrics.py); here: the wiring. Known-perfect
predictions built from the ground truth go through the same aggregation code as the model's outputs
and must score 1.0; the CLI writes every key (null for tasks not run), twice the same bytes, and exits 2
with one line on stderr for bad inputs.
"""

import copy
import json
import re

import numpy as np
import pytest
import torch

from grounded_llava.codec import encode_phrase
from grounded_llava.data.synthetic import generate_world
from grounded_llava.evaluate import main
from grounded_llava.evaluation.report import METRIC_KEYS, OPTIONAL_METRIC_KEYS
from grounded_llava.evaluation.stage_forgetting import plan_stages
from grounded_llava.evaluation.tasks import (
    DETECT_PROMPT,
    TextBox,
    answers_agreement,
    coco_entries,
    head_results,
    load_eval_data,
    map_categories,
    rec_entries,
    referring_targets,
    res_entries,
    text_box_results,
)
from grounded_llava.evaluation.teacher_forcing import chat_kl, text_box_probabilities
from grounded_llava.inference import Detections, GroundedAnswer, GroundedLlava, GroundedSpanResult
from grounded_llava.modeling import GroundedLlavaForConditionalGeneration
from grounded_llava.modeling.base import unmerge_adapters

from .conftest import tiny_test_config

WORLD_CATEGORIES = ["circle", "square", "star", "hexagon"]  # the model knows the first three
TOKENS = "4"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, num_images=4, seed=2, image_size=64, categories=WORLD_CATEGORIES, max_objects=3)
    return root


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return GroundedLlava.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def data(world):
    return load_eval_data(world / "annotations.json", world / "images", max_images=None)


def base_args(world, model, out) -> list[str]:
    data = ["--data", str(world / "annotations.json"), "--images", str(world / "images")]
    return ["--model", str(model), *data, "--out", str(out)]


def cli(world, checkpoint, out, *extra):
    return main([*base_args(world, checkpoint, out), "--max-new-tokens", TOKENS, "--batch-size", "4", *extra])


# ---------------------------------------------------------------------------- aggregation on known answers
def test_category_map_evaluates_the_names_both_know(data):
    categories = map_categories(["square", "blob", "circle"], data.categories, source="gt.json")
    assert categories.name_to_gt == {"square": 2, "circle": 1}  # synthetic ids: circle=1, square=2
    assert categories.class_to_gt == {0: 2, 2: 1} and categories.evaluated_ids == [1, 2]
    with pytest.raises(ValueError, match=r"gt.json: the model's categories \['blob'\] share no name"):
        map_categories(["blob"], data.categories, source="gt.json")


def test_ground_truth_detections_score_one_on_the_shared_categories(data):
    """Perfect head output for circle/square, an extra class the GT lacks, and no star at all."""
    categories = map_categories(["circle", "blob", "square"], data.categories, source="gt")
    class_of = {"circle": 0, "square": 2}
    detections, text_boxes = [], []
    for record in data.records:
        kept = [i for i in record.non_crowd() if i.category_name in class_of]
        boxes = [i.box_xyxy for i in kept] + [
            (0.0, 0.0, 10.0, 10.0)
        ]  # + a "blob": dropped, not a false positive
        masks = [i.decode_mask(record.image_size) for i in kept] + [
            np.ones((record.height, record.width), bool)
        ]
        detections.append(
            Detections(
                boxes=np.array(boxes, np.float32),
                scores=np.linspace(1.0, 0.5, len(boxes)),
                class_ids=[class_of[i.category_name] for i in kept] + [1],
                category_names=list(categories.model_categories),
                image_size=record.image_size,
                masks=np.stack(masks),
            )
        )
        text_boxes.append([TextBox(box=i.box_xyxy, phrase=f"the {i.category_name}", score=0.9) for i in kept])
    assert sum(len(d) for d in detections) > len(data.records)  # the world has circles/squares to find
    results = head_results(detections, data.image_ids, categories)
    assert {r["category_id"] for r in results} == {1, 2}
    ids = categories.evaluated_ids
    assert coco_entries(data, results, iou_type="bbox", category_ids=ids) == {
        "bbox_AP": 1.0, "bbox_AP50": 1.0, "bbox_AP75": 1.0,
    }  # fmt: skip
    assert coco_entries(data, results, iou_type="segm", category_ids=ids)["segm_AP"] == 1.0
    text = text_box_results(text_boxes, data.image_ids, categories)
    assert coco_entries(data, text, iou_type="bbox", category_ids=ids, prefix="text_")["text_bbox_AP"] == 1.0
    # Counting the star and hexagon ground truth would halve the AP: they are left out, not missed.
    assert coco_entries(data, results, iou_type="bbox", category_ids=[1, 2, 4, 5])["bbox_AP"] < 0.75


def answer_with(record, box, mask, *, source="text"):
    spans = (
        [] if box is None else [GroundedSpanResult(phrase="it", box=box, mask=mask, score=0.5, source=source)]
    )
    empty = Detections.empty(category_names=["circle"], image_size=record.image_size)
    return GroundedAnswer(
        text="it", raw_text="it", spans=spans, detections=empty, image_size=record.image_size
    )


def test_referring_ground_truth_answers_score_one_and_a_missing_span_scores_zero(data):
    targets = referring_targets(data.records)
    assert len(targets) >= 3 and all(t.prompt == f"Where is {t.expression}?" for t in targets)
    assert [t.image.image_id for t in targets] == sorted(t.image.image_id for t in targets)
    perfect = [
        answer_with(t.image, np.array(t.instance.box_xyxy), t.instance.decode_mask(t.image.image_size))
        for t in targets
    ]
    assert rec_entries(perfect, targets) == {"rec_acc50": 1.0, "rec_miou": 1.0}
    assert res_entries(perfect, targets) == {"res_ciou": 1.0, "res_giou": 1.0}
    one_missing = [answer_with(targets[0].image, None, None), *perfect[1:]]
    n = len(targets)
    assert rec_entries(one_missing, targets)["rec_acc50"] == pytest.approx((n - 1) / n)
    assert res_entries(one_missing, targets)["res_giou"] == pytest.approx((n - 1) / n)


def test_agreement_pools_text_boxes_over_answers(data):
    record = data.records[0]
    box = np.array([1.0, 1.0, 9.0, 9.0])
    answers = [
        answer_with(record, box, None, source="head"),
        answer_with(record, box, None),
        answer_with(record, None, None),
    ]
    assert answers_agreement(answers) == 0.5
    assert answers_agreement(answers[2:]) is None


# ---------------------------------------------------------------------------- teacher-forced passes
def test_text_box_probabilities_are_the_predictors_own_scores(predictor, checkpoint, data):
    """Answers written from the ground truth: their boxes come back (to the bin), scored as `GroundedLlava.score`
    scores unmatched text boxes, and score text AP50 = 1 through the evaluator's aggregation."""
    num_bins = predictor.processor.num_bins
    answers = []
    for record in data.records:
        parts = [
            encode_phrase(i.category_name, [i.box_xyxy], record.image_size, num_bins=num_bins)
            for i in record.non_crowd()
        ]
        answers.append("I can see " + " and ".join(parts) + "." if parts else "Nothing.")
    boxes = text_box_probabilities(predictor, data.image_paths, DETECT_PROMPT, answers, batch_size=3)
    for record, found in zip(data.records, boxes, strict=True):
        gt = record.non_crowd()
        assert [b.phrase for b in found] == [i.category_name for i in gt]
        bin_px = np.array(record.image_size * 2) / num_bins
        for b, instance in zip(found, gt, strict=True):
            assert (np.abs(np.array(b.box) - np.array(instance.box_xyxy)) <= bin_px).all()
            assert 0.0 < b.score <= 1.0
    # The same answer grounded by the predictor, whose head detects nothing at 0.99: same token probability.
    strict = GroundedLlava.from_pretrained(checkpoint, device="cpu")
    strict.model.config.heads.conf_threshold = 0.99
    grounded = strict.score(data.image_paths[0], DETECT_PROMPT, answers[0])
    assert [s.source for s in grounded.spans] == ["text"] * len(boxes[0])
    np.testing.assert_allclose([s.score for s in grounded.spans], [b.score for b in boxes[0]], rtol=1e-4)

    categories = map_categories(predictor.categories, data.categories, source="gt")
    results = text_box_results(boxes, data.image_ids, categories)
    text = coco_entries(data, results, iou_type="bbox", category_ids=categories.evaluated_ids, prefix="text_")
    assert text["text_bbox_AP50"] == 1.0


def test_chat_kl_is_zero_against_itself_and_positive_against_a_changed_model(predictor, data):
    images, prompts = data.image_paths[:2], ["What is in the image?", "Describe it."]
    answers = ["A <p>circle</p> and a square.", "Two shapes."]
    assert chat_kl(predictor, predictor, images, prompts, answers, batch_size=2) == 0.0
    changed = copy.deepcopy(predictor.model)
    unmerge_adapters(changed.llava)  # `from_pretrained` merged them for inference
    torch.manual_seed(0)
    with torch.no_grad():  # as if training had moved the LoRA adapters (zero-initialised: no change yet)
        for name, parameter in changed.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    kl = chat_kl(predictor, GroundedLlava(changed, device="cpu"), images, prompts, answers, batch_size=2)
    assert kl > 1e-3


# ---------------------------------------------------------------------------- the CLI
def test_cli_writes_every_key_twice_identically(world, checkpoint, tmp_path, capsys):
    args = ["--chat-data", str(world / "chat.json"), "--reference", str(checkpoint), "--max-images", "2"]
    assert cli(world, checkpoint, tmp_path / "a", *args) == 0
    assert "| bbox_AP |" in capsys.readouterr().out
    assert cli(world, checkpoint, tmp_path / "b", *args) == 0
    first = (tmp_path / "a" / "metrics.json").read_text()
    assert first == (tmp_path / "b" / "metrics.json").read_text()
    assert (tmp_path / "a" / "metrics.md").read_text().startswith("| metric | value |")
    metrics = json.loads(first)
    assert set(METRIC_KEYS) | {"bbox_AP75", "segm_AP75", "text_bbox_AP", "text_bbox_AP50"} <= set(metrics)
    for key in set(METRIC_KEYS) - {"text_head_agreement"}:  # a random model may write no box at all
        assert isinstance(metrics[key], float), key
    assert metrics["bwt"] is None  # no --stages
    assert isinstance(metrics["find_name_acc"], float) and metrics["num_find_questions"] >= 2
    assert metrics["num_images"] == 2.0 and metrics["categories_evaluated"] == 3.0  # not hexagon
    entries = json.loads((world / "chat.json").read_text())[:2]
    assert metrics["num_chat_prompts"] == sum(len(e["conversations"]) // 2 for e in entries)  # every question
    assert metrics["chat_exact_match"] == 1.0 and metrics["chat_kl"] == 0.0  # the reference is the model


def test_cli_tasks_not_run_are_null(world, checkpoint, tmp_path, capsys):
    assert cli(world, checkpoint, tmp_path, "--tasks", "rec,chat", "--max-images", "2") == 0
    assert "chat skipped: it needs --chat-data" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(METRIC_KEYS + OPTIONAL_METRIC_KEYS) <= set(metrics)
    assert isinstance(metrics["rec_acc50"], float)
    for key in (
        "bbox_AP",
        "segm_AP",
        "res_ciou",
        "res_giou",
        "chat_kl",
        "chat_exact_match",
        "chat_accuracy",
        "chat_description_f1",
        "text_head_agreement",
        "find_f1",
    ):
        assert metrics[key] is None, key


def test_plan_stages_groups_rows_and_old_classes():
    def entry(name, new, cats):
        return {"name": name, "kind": "x", "new_categories": new, "categories": cats}

    plan = plan_stages(
        [
            entry("align", [], ["a", "b"]),
            entry("ground", [], ["a", "b"]),
            entry("inc-1", ["c"], ["a", "b", "c"]),
            entry("inc-2", ["d", "e"], ["a", "b", "c", "d", "e"]),
            entry("polish", [], ["a", "b", "c", "d", "e"]),
        ]
    )
    assert [(g.stage, g.categories) for g in plan.groups] == [
        ("align", ("a", "b")), ("inc-1", ("c",)), ("inc-2", ("d", "e")),
    ]  # fmt: skip
    assert plan.rows == ["ground", "inc-1", "polish"]
    assert (plan.old_before, plan.old_categories, plan.final) == ("inc-1", ("a", "b", "c"), "polish")
    single = plan_stages([entry("align", [], ["a"]), entry("ground", [], ["a"])])
    assert single.rows == ["ground"] and single.old_before is None


def test_cli_stages_matrix_and_forgetting(world, tmp_path, capsys):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_config(
        tiny_test_config(conf_threshold=1e-3, categories=["circle", "square"])
    )
    model.save_pretrained(run / "stages" / "a")
    model.add_categories(["star"])
    with torch.no_grad():  # the increment changes the head, so the old classes' AP may change
        model.detection_head.detect.cv3[0][-1].weight.mul_(3.0)
    model.save_pretrained(run / "stages" / "b")
    manifest = [
        {"name": "inherited", "kind": "align", "new_categories": [], "categories": ["circle"]},
        {"name": "a", "kind": "align", "new_categories": ["square"], "categories": ["circle", "square"]},
        {
            "name": "b",
            "kind": "increment",
            "new_categories": ["star"],
            "categories": ["circle", "square", "star"],
        },
    ]
    (run / "stages.json").write_text(json.dumps(manifest))
    assert cli(world, run / "stages" / "b", tmp_path / "out", "--tasks", "det", "--stages", str(run)) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    matrix = json.loads((tmp_path / "out" / "stage_ap_matrix.json").read_text())
    assert matrix["rows"] == ["a", "b"] and [g["categories"] for g in matrix["groups"]] == [
        ["circle", "square"], ["star"],
    ]  # fmt: skip
    acc = matrix["acc"]
    assert acc[0][1] is None and all(isinstance(v, float) for v in (acc[0][0], acc[1][0], acc[1][1]))
    assert metrics["stage_ap_matrix.a.a"] == acc[0][0] and metrics["stage_ap_matrix.a.b"] is None
    assert metrics["bwt"] == pytest.approx(acc[1][0] - acc[0][0])
    # The old classes of the last increment are group 0, evaluated with the same two checkpoints.
    assert metrics["old_class_AP_before"] == acc[0][0] and metrics["old_class_AP_after"] == acc[1][0]
    # The final stage of the run is the evaluated model: its head AP on all three categories.
    assert isinstance(metrics["bbox_AP"], float)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--data": "missing.json"}, "--data .*missing.json does not exist"),
        ({"--images": "nowhere"}, "--images .*nowhere is not a directory"),
        ({"--tasks": "det,vqa"}, r"unknown task\(s\) \['vqa'\]"),
        ({"--model": "no-model"}, "--model .*no-model is not a directory"),
        ({"--max-images": "0"}, "max_images must be >= 1"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(world, checkpoint, tmp_path, capsys, change, message):
    args = base_args(world, checkpoint, tmp_path)
    for option, value in change.items():
        if option in args:
            args[args.index(option) + 1] = str(tmp_path / value)
        else:
            args += [option, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "metrics.json").exists()


def test_cli_ground_truth_without_shared_categories_exits_2(world, checkpoint, tmp_path, capsys):
    gt = json.loads((world / "annotations.json").read_text())
    gt["categories"] = [{"id": c["id"], "name": f"other-{c['name']}"} for c in gt["categories"]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = base_args(world, checkpoint, tmp_path / "out")
    args[args.index("--data") + 1] = str(tmp_path / "gt.json")
    code = main([*args, "--tasks", "det"])
    assert code == 2
    assert (
        "gt.json: the model's categories ['circle', 'square', 'star'] share no name"
        in capsys.readouterr().err
    )


def test_cli_ground_truth_with_a_duplicate_category_name_exits_2(world, tmp_path, capsys):
    gt = json.loads((world / "annotations.json").read_text())
    gt["categories"].append({"id": 99, "name": gt["categories"][0]["name"]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = base_args(world, tmp_path, tmp_path / "out")  # --model: no model, the data is read first
    args[args.index("--data") + 1] = str(tmp_path / "gt.json")
    assert main(args) == 2
    err = capsys.readouterr().err
    first = gt["categories"][0]
    assert (
        err.count("\n") == 1 and f"'{first['name']}' is the name of category ids {first['id']} and 99" in err
    )


def test_cli_stages_needs_a_run_manifest(world, checkpoint, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert cli(world, checkpoint, tmp_path / "out", "--stages", str(tmp_path / "run")) == 2
    assert (
        "run/stages.json does not exist: --stages needs a training run directory" in capsys.readouterr().err
    )


@pytest.mark.parametrize("case", ["out_is_a_file", "out_holds_the_data"])
def test_cli_out_that_is_a_file_or_would_overwrite_the_data_exits_2_before_the_model_loads(
    world, tmp_path, capsys, case
):
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("not a folder")
        data, message = world / "annotations.json", f"--out {out} is a file, not a directory"
    else:
        out.mkdir()
        data = out / "metrics.json"
        data.write_text((world / "annotations.json").read_text())
        message = f"output {data} would overwrite the input --data {data}"
    kept = out if case == "out_is_a_file" else data
    before = kept.read_text()
    args = base_args(world, tmp_path, out)  # --model: a folder without a model (checked before it loads)
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate: error:") and message in err, err
    assert kept.read_text() == before
