"""Learning tests (issue 10, item 7): the heads and the proposal pointer fit a handful of examples.

Each trains a fresh tiny model (112 px canvas, fixed seeds) on 4 synthetic scenes for a few hundred
CPU steps and checks the result the way inference reads it (eval mode, the head's own post-processing),
not only that a loss went down: a head that trains but predicts differently in eval mode (BatchNorm
statistics), boxes in the wrong frame, masks misaligned with their prompts or a pointer that cannot
tell regions apart all fail here.
"""

import pytest
import torch
from torchvision.ops import box_iou

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.data.coco import load_coco_instances
from grounded_llava.data.shape_words import COLORS
from grounded_llava.data.synthetic import generate_world
from grounded_llava.modeling.attributes import IGNORE
from grounded_llava.modeling.heads_step import heads_losses
from grounded_llava.modeling.pointer import Proposals, pointer_loss, pointer_targets
from grounded_llava.training.heads_data import HeadsBatch, HeadsDataset, collate_heads, jitter_boxes
from grounded_llava.training.stages import set_trainable

from .conftest import TEST_CATEGORIES, tiny_test_config


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """4 synthetic 112 px scenes, 11 objects (circle/square/star, 11 to 36 px; some shapes repeat in an image)."""
    out = tmp_path_factory.mktemp("learning_world")
    generate_world(out, num_images=4, seed=8, image_size=112, categories=TEST_CATEGORIES, max_objects=4)
    return load_coco_instances(out / "annotations.json", out / "images").images


def _model(**heads) -> GroundedLlavaForConditionalGeneration:
    """A fresh tiny model whose heads (spatial prior, neck, Detect, SAM, pointer) train; the LLM (one layer
    here, unused by the heads step) and the vision tower stay frozen."""
    torch.manual_seed(0)
    config = tiny_test_config(**heads)
    config.tiny.text_layers = 1
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    set_trainable(model, "heads")
    return model.train()


def _batch(model: GroundedLlavaForConditionalGeneration, records) -> HeadsBatch:
    heads = model.config.heads
    dataset = HeadsDataset(
        records,
        model.processor,
        categories=heads.categories,
        mask_resolution=model.mask_head.mask_resolution,
        hflip_prob=0.0,
        zoom_prob=0.0,
        attribute=heads.attribute,
        attribute_values=heads.attribute_values,
    )
    return collate_heads([dataset[i] for i in range(len(dataset))])


def _true_boxes(batch: HeadsBatch, canvas_size: int) -> torch.Tensor:
    """(n, 4) xyxy canvas px of the Detect targets (xywh fractions of the canvas)."""
    xywh = batch.det_targets.boxes_norm * canvas_size
    return torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], dim=1)


def _train(model, batch: HeadsBatch, *, steps: int, loss_name: str, lr: float = 2e-3) -> list[float]:
    """`steps` heads steps (`heads_step.heads_losses`, SAM prompted by freshly jittered true boxes) on `loss_name`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        torch.manual_seed(step)
        out = heads_losses(
            model,
            pixel_values=batch.pixel_values,
            det_targets=batch.det_targets,
            mask_image=batch.mask_image,
            mask_boxes=jitter_boxes(batch.mask_boxes, scale=0.05, canvas_size=model.canvas_size),
            mask_targets=batch.mask_targets,
        )
        loss = getattr(out, loss_name)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(float(loss.detach()))
    return history


def test_detect_head_overfits_four_scenes(scenes):
    # Detect's init as first tuned: the mask head's pixel detail, built before the spatial prior, would move it
    model = _model(mask_pixels=False)
    batch = _batch(model, scenes)
    assert len(batch.det_targets.class_ids) == 11
    # 300 steps: at 200 the 15 px square in the corner of scene 0 was still missed on another CPU's
    # numerics (CI) and here at lr 5e-3; at 300 it is found at lr 3e-3 to 7e-3 and 1 or 2 threads.
    history = _train(model, batch, steps=300, loss_name="det_loss", lr=4e-3)
    assert sum(history[-5:]) / 5 < 0.1 * history[0], (history[0], history[-5:])

    model.eval()
    with torch.no_grad():
        features = model.encode_images(batch.pixel_values)
        detections = model.detection_head.postprocess(
            model.detection_head(model.image_pyramid(features, batch.pixel_values)),
            conf_threshold=0.25,  # the config's inference threshold
            iou_threshold=0.6,
        )
    truth = _true_boxes(batch, model.canvas_size)
    for image, found in enumerate(detections):
        rows = batch.det_targets.image_index == image
        boxes, classes = truth[rows], batch.det_targets.class_ids[rows]
        ious = box_iou(boxes, found[:, :4].float())  # (true, detected)
        same_class = classes[:, None] == found[None, :, 5].long()
        # Recall: every object found with its class and a tight box; precision: no confident extra box.
        assert ((ious >= 0.7) & same_class).any(1).all(), (image, boxes.tolist(), found.tolist())
        assert ((ious >= 0.5) & same_class).any(0).all(), (image, boxes.tolist(), found.tolist())


def test_sam_head_overfits_the_instance_masks_from_jittered_boxes(scenes):
    model = _model()
    batch = _batch(model, scenes)
    assert model.mask_head.crop == 14  # SAM decodes a 14 x 14 crop of the stride-8 map over each widened box
    assert batch.mask_targets.shape[1:] == (112, 112)  # the targets (and `forward`'s masks) are canvas-frame
    history = _train(model, batch, steps=200, loss_name="mask_loss")
    # the loss is taken over each crop frame, where the object is a large part: it ends near 0.16 / 1.7
    assert sum(history[-5:]) / 5 < 0.12 * history[0], (history[0], history[-5:])

    model.eval()
    torch.manual_seed(1234)  # prompts the training never saw: other jitters of the true boxes
    prompts = [batch.mask_boxes, jitter_boxes(batch.mask_boxes, scale=0.05, canvas_size=model.canvas_size)]
    with torch.no_grad():
        features = model.encode_images(batch.pixel_values)
        image_embeddings = model.mask_features(model.image_pyramid(features, batch.pixel_values))
        for boxes in prompts:
            logits, _ = model.mask_head(
                image_embeddings, batch.mask_image, boxes, seg_hidden=None, pixels=batch.pixel_values
            )
            predicted, target = logits > 0, batch.mask_targets > 0.5
            iou = (predicted & target).flatten(1).sum(1) / (predicted | target).flatten(1).sum(1)
            assert iou.mean() >= 0.9 and iou.min() >= 0.75, iou.tolist()


def test_attribute_head_overfits_the_colours_of_every_instance(scenes):
    """The attribute head (`heads.attribute: color`) learns each object's colour from jittered true boxes and
    names it from the exact boxes in eval mode; a colour outside its values teaches nothing."""
    values = sorted(COLORS)[:-1]  # one colour left out: its objects' targets are IGNORE
    model = _model(attribute="color", attribute_values=values)
    batch = _batch(model, scenes)
    known = batch.attribute_ids != IGNORE
    assert known.sum() >= 8 and len(set(batch.attribute_ids[known].tolist())) >= 3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for step in range(60):
        torch.manual_seed(step)
        out = heads_losses(model, pixel_values=batch.pixel_values, det_targets=batch.det_targets,
                           **batch.box_prompts(jitter=0.05, canvas_size=model.canvas_size, device=torch.device("cpu")))  # fmt: skip
        out.attribute_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(float(out.attribute_loss.detach()))
    assert sum(history[-5:]) / 5 < 0.1 * history[0], (history[0], history[-5:])
    model.eval()
    with torch.no_grad():
        pyramid = model.image_pyramid(model.encode_images(batch.pixel_values), batch.pixel_values)
        logits = model.attribute_head(
            model.pointer_features(pyramid, batch.pixel_values), batch.det_targets.image_index, batch.boxes
        )
    assert (logits.argmax(-1)[known] == batch.attribute_ids[known]).all()


def test_pointer_overfits_category_queries_and_says_none_when_the_object_is_not_proposed(scenes):
    """Queries are one fixed hidden state per CATEGORY ("where is the star?"), the same in every image: the
    pointer must read the proposals' regions to answer. Proposals: the objects' boxes + background boxes,
    shuffled; one object per image is left out of them, and a query whose object is absent must say "none"."""
    model = _model()
    batch = _batch(model, scenes)
    generator = torch.Generator().manual_seed(0)
    truth = _true_boxes(batch, model.canvas_size)
    images, k = len(scenes), 8
    boxes, valid = torch.zeros(images, k, 4), torch.zeros(images, k, dtype=torch.bool)
    query_image, query_class, query_box = [], [], []
    for image in range(images):
        rows = (batch.det_targets.image_index == image).nonzero().flatten()
        classes = batch.det_targets.class_ids[rows]
        counts = torch.bincount(classes, minlength=len(TEST_CATEGORIES))
        unique = [r for r, c in zip(rows.tolist(), classes.tolist(), strict=True) if counts[c] == 1]
        left_out = unique[:1] if len(unique) > 1 else []  # an object the head "missed"
        listed = [r for r in rows.tolist() if r not in left_out]
        corners = torch.rand(3, 2, generator=generator) * 70
        background = torch.cat([corners, corners + 12 + torch.rand(3, 2, generator=generator) * 20], dim=1)
        candidates = torch.cat([truth[listed], background])
        order = torch.randperm(len(candidates), generator=generator)
        boxes[image, : len(candidates)], valid[image, : len(candidates)] = candidates[order], True
        for category, count in enumerate(counts.tolist()):
            if count > 1:  # "where is the circle?" with two circles: ambiguous, not asked
                continue
            query_image.append(image)
            query_class.append(category)
            query_box.append(truth[rows[classes == category]][0] if count else torch.zeros(4))
    proposals = Proposals(boxes=boxes, scores=valid.float(), valid=valid)
    query_image = torch.tensor(query_image)
    positives, excluded = pointer_targets(
        proposals, query_image, torch.stack(query_box), phrase=torch.arange(len(query_image))
    )
    assert (positives.sum(1) == 1).all()  # one object per query: a single positive
    targets = positives.float().argmax(1)
    absent = targets == k
    assert len(targets) == 10 and int(absent.sum()) == 6 and not excluded.any()

    hidden_size = model.base_llava.config.get_text_config().hidden_size
    # a query per category, as `prompts.pointer_query` gives it: (`<box>` state, phrase mean state)
    category_states = torch.randn(len(TEST_CATEGORIES), 2 * hidden_size, generator=generator)
    queries = category_states[torch.tensor(query_class)]
    with torch.no_grad():
        features = model.encode_images(batch.pixel_values)
        stride8 = model.pointer_features(
            model.image_pyramid(features, batch.pixel_values), batch.pixel_values
        )
    optimizer = torch.optim.AdamW(model.pointer.parameters(), lr=2e-3)
    for _ in range(150):
        logits = model.pointer(
            queries, query_image, model.pointer.region_embeddings(stride8, proposals), valid
        )
        loss, _ = pointer_loss(logits, positives)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        regions = model.pointer.region_embeddings(stride8, proposals)
        choice = model.pointer(queries, query_image, regions, valid).argmax(1)
    assert float(loss.detach()) < 0.05
    assert torch.equal(choice, targets), (choice.tolist(), targets.tolist())
    assert (choice[absent] == k).all() and (choice[~absent] < k).all()


def test_pointer_targets_accept_a_phrases_boxes_in_any_order():
    """A phrase with two boxes: the first query may take either matching proposal, the second the other."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]])
    proposals = Proposals(boxes=boxes, scores=torch.ones(1, 3), valid=torch.ones(1, 3, dtype=torch.bool))
    truth = torch.tensor([[20.0, 20, 30, 30], [0, 0, 10, 10], [70, 70, 80, 80]])
    positives, excluded = pointer_targets(
        proposals, torch.zeros(3, dtype=torch.long), truth, phrase=torch.tensor([5, 5, 9])
    )
    assert positives.tolist() == [
        [True, True, False, False],
        [True, False, False, False],
        [False, False, False, True],
    ]
    assert excluded.tolist() == [[False, False, False], [False, True, False], [False, False, False]]
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [5.0, -9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    loss, accuracy = pointer_loss(logits, positives)
    assert float(accuracy) == 1.0 and float(loss) < 0.05
