"""The LLM's region tokens: the head's proposals in the LLM input, trained with it, and a class label that
stays audible whatever the scale of the features."""

import pytest
import torch

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.modeling.pointer import Proposals
from grounded_llava.modeling.region_tokens import RegionTokenEncoder

from .conftest import TEST_CATEGORIES, tiny_test_config
from .test_model import make_batch, make_samples


def _encoder_and_proposals(num_classes: int = 4) -> tuple[RegionTokenEncoder, Proposals]:
    torch.manual_seed(0)
    encoder = RegionTokenEncoder(
        channels=8, text_hidden_size=32, canvas_size=64, stride=8.0, num_classes=num_classes, pool=2, dim=16
    )
    boxes = torch.tensor([[[4.0, 4.0, 30.0, 30.0], [32.0, 8.0, 60.0, 40.0], [0.0, 0.0, 0.0, 0.0]]])
    proposals = Proposals(
        boxes=boxes,
        scores=torch.tensor([[1.0, 1.0, 0.0]]),
        valid=torch.tensor([[True, True, False]]),
        class_ids=torch.tensor([[1, 2, 0]]),
    )
    return encoder, proposals


def test_a_confident_label_is_as_loud_as_the_content_even_when_the_features_are_large():
    """E25: unnormalised, the projected appearance grew to ~50x the label's norm (the class was ~2% of the
    token). The content is layer-normalised and the label rows start at its scale."""
    encoder, proposals = _encoder_and_proposals()
    for scale in (1.0, 100.0):
        feature_map = scale * torch.randn(1, 8, 8, 8)
        with torch.no_grad():
            tokens = encoder(feature_map, proposals)
            unlabelled = encoder(feature_map, Proposals(proposals.boxes, proposals.scores, proposals.valid))
        label_part = (tokens - unlabelled)[0, :2].norm(dim=-1)
        content_part = unlabelled[0, :2].norm(dim=-1)
        ratio = label_part / content_part
        assert ((ratio > 0.5) & (ratio < 2.0)).all(), (scale, ratio)
    assert torch.equal(tokens[0, 2], encoder.empty), "a padding slot is the learned empty token"


def test_grown_label_rows_start_at_the_old_rows_scale_and_keep_the_old_rows():
    encoder, _ = _encoder_and_proposals(num_classes=4)
    old = encoder.labels.weight.detach().clone()
    encoder.grow_classes(6)
    assert torch.equal(encoder.labels.weight[:4], old)
    new_norm, old_norm = encoder.labels.weight[4:].detach().norm(dim=-1).mean(), old.norm(dim=-1).mean()
    assert 0.5 < float(new_norm / old_norm) < 2.0


def test_region_tokens_put_the_heads_proposals_into_the_llm_input(tmp_path):
    """`region_tokens`: K = max_proposals tokens follow the image tokens; they carry the region encoder's
    output (changing it changes the LLM's logits, not the head's detections), train with the LLM, decode,
    and survive save/load."""
    from grounded_llava.inference.predictor import GroundedLlava

    config = tiny_test_config()
    config.region_tokens = True
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    grid_tokens = model.neck.grid_size**2
    assert (
        model.num_image_tokens == grid_tokens + config.heads.max_proposals == model.processor.num_image_tokens
    )
    batch = make_batch(model, make_samples(tmp_path, model.config.num_bins))
    model.train()
    out = model(**batch.model_inputs())
    out.loss.backward()
    assert out.proposals.boxes.shape == (3, config.heads.max_proposals, 4)
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.region_encoder.appearance.parameters()
    )
    model.eval()
    with torch.no_grad():
        before = model(**batch.model_inputs())
        model.region_encoder.geometry[-1].bias.add_(1.0)
        after = model(**batch.model_inputs())
    assert not torch.allclose(before.logits, after.logits)
    assert all(torch.equal(a, b) for a, b in zip(before.pyramid, after.pyramid, strict=True))
    answer = GroundedLlava(model, device="cpu").chat(tmp_path / "a.png", "Find the circle.", max_new_tokens=6)
    assert isinstance(answer.raw_text, str)
    loaded = GroundedLlavaForConditionalGeneration.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.config.region_tokens and loaded.num_image_tokens == model.num_image_tokens
    assert torch.equal(loaded.region_encoder.empty, model.region_encoder.empty)


def test_region_token_projector_and_pointer_train_with_the_llm():
    from grounded_llava.training.stages import set_trainable

    config = tiny_test_config()
    config.region_tokens = True
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    assert "regions" in set_trainable(model, "ground") and "regions" in set_trainable(model, "base")
    assert "regions" not in set_trainable(model, "heads")
    assert "pointer" in set_trainable(model, "base") and "heads" not in set_trainable(model, "base")
    pointer_only = set_trainable(model, "ground", train_detector=False, train_llm=False)
    assert set(pointer_only) == {"heads", "pointer"}  # the LLM (LoRA, token rows, region projector) stays
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if "lora_" in n or "region_encoder" in n
    )
    from grounded_llava.config_io import ConfigError
    from grounded_llava.training.config import SourceConfig, StageConfig

    with pytest.raises(ConfigError, match="train_llm: false is for ground and increment"):
        StageConfig(name="b", kind="base", data=[SourceConfig(kind="synthetic", dir="w")], train_llm=False)


def test_region_tokens_carry_the_heads_class_and_grow_with_new_categories():
    """A region token adds the embedding of the head's class for its box, weighted by the score."""
    from grounded_llava.modeling.pointer import Proposals

    config = tiny_test_config()
    config.region_tokens = True
    encoder = GroundedLlavaForConditionalGeneration.from_config(config).region_encoder
    feature_map = torch.randn(1, encoder.appearance[0].in_features // encoder.pool**2, 8, 8)
    boxes = torch.tensor([[[4.0, 4.0, 30.0, 30.0], [10.0, 20.0, 50.0, 60.0]]])
    valid, scores = torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0.9, 0.0]])
    as_class = [encoder(feature_map, Proposals(boxes, scores, valid, torch.tensor([[c, c]]))) for c in (0, 1)]
    assert not torch.allclose(as_class[0][0, 0], as_class[1][0, 0])  # scored 0.9: the label shows
    assert torch.allclose(as_class[0][0, 1], as_class[1][0, 1])  # scored 0: no label
    old = encoder.labels.weight.detach().clone()
    encoder.grow_classes(len(TEST_CATEGORIES) + 2)
    assert encoder.labels.num_embeddings == len(TEST_CATEGORIES) + 2
    assert torch.equal(encoder.labels.weight[: len(TEST_CATEGORIES)], old)
