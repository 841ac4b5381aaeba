"""The LLM's region tokens keep the head's class label audible, whatever the scale of the features."""

import torch

from grounded_llava.modeling.pointer import Proposals
from grounded_llava.modeling.region_tokens import RegionTokenEncoder


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
