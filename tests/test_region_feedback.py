"""Region feedback: the cited proposal's region token joins the LLM input at `</box>`, in training and decoding."""

import pytest
import torch

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.codec import box_bins
from grounded_llava.config import ConfigError
from grounded_llava.grammar import box_groups_in_ids
from grounded_llava.modeling.pointer import Proposals
from grounded_llava.modeling.region_feedback import CLOSE_OFFSET, cited_proposals, embeddings_with_feedback

from .conftest import tiny_test_config
from .test_decoding import _decode, _image, _rig


def _feedback_config(**heads):
    config = tiny_test_config(**heads)
    config.region_tokens = config.region_feedback = True
    return config


def _proposals(boxes: list[list[float]], valid: list[bool]) -> Proposals:
    return Proposals(
        boxes=torch.tensor([boxes], dtype=torch.float32),
        scores=torch.full((1, len(boxes)), 0.9),
        valid=torch.tensor([valid]),
        class_ids=torch.zeros((1, len(boxes)), dtype=torch.long),
    )


def test_cited_proposal_is_the_best_iou_of_at_least_a_half_among_valid_ones():
    proposals = _proposals(
        [[0, 0, 10, 10], [0, 0, 12, 10], [50, 50, 60, 60], [0, 0, 10, 10]], [True, True, True, False]
    )
    boxes = torch.tensor([[0.0, 0, 11, 10], [0, 0, 10, 10], [50, 50, 70, 70], [30, 30, 40, 40]])
    # IoUs: box 0 vs p0 10/11, p1 11/12 -> p1; box 1: p0 = 1 (p3 identical but padding); box 2: p2 = 0.25 -> none
    assert cited_proposals(proposals, torch.zeros(4, dtype=torch.long), boxes).tolist() == [1, 0, -1, -1]


def test_region_feedback_needs_region_tokens():
    config = tiny_test_config()
    config.region_feedback = True
    with pytest.raises(ConfigError, match="region_tokens"):
        config.__post_init__()


def test_training_input_gets_the_cited_region_token_at_a_groups_close_only():
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_config(_feedback_config())
    ids, canvas = model.token_ids, model.canvas_size
    proposals = _proposals([[10, 10, 50, 40], [60, 60, 100, 100]], [True, True])
    near = box_bins((60.0, 60.0, 100.0, 100.0), (canvas, canvas), len(ids.loc))  # proposal 1's box
    far = box_bins((0.0, 80.0, 8.0, 90.0), (canvas, canvas), len(ids.loc))  # no proposal near it
    words = model.processor.tokenizer(" the circle", add_special_tokens=False).input_ids

    def group(bins):
        return [ids.box_open, *(ids.loc[b] for b in bins), ids.box_close]

    row = [ids.p_open, *words, ids.p_close, *group(far), *group(near), ids.p_open, *words, ids.p_close]
    input_ids = torch.tensor([row])
    regions = torch.randn(1, 2, model.base_llava.config.get_text_config().hidden_size)
    groups = box_groups_in_ids(input_ids, ids)
    with torch.no_grad():
        plain = model.base_llava.get_input_embeddings()(input_ids)
        fed = embeddings_with_feedback(
            model, input_ids, groups, regions, proposals, torch.tensor([0]), torch.tensor([[canvas, canvas]])
        )
    changed = (fed - plain).abs().sum(-1)[0].nonzero().flatten().tolist()
    close = int(groups.starts[1]) + CLOSE_OFFSET
    assert changed == [close] and int(input_ids[0, close]) == ids.box_close
    torch.testing.assert_close(fed[0, close] - plain[0, close], regions[0, 1])
    without_image = embeddings_with_feedback(
        model, input_ids, groups, regions, proposals, torch.tensor([], dtype=torch.long), None
    )
    torch.testing.assert_close(without_image, plain)


def test_decoding_feeds_the_chosen_region_back_as_training_does():
    """The decoding test's rig (each answer state depends on its input token alone), with every region token
    set to one vector v that the LM head maps to end of answer: with feedback, the `</box>` input holds v and
    the answer ends after its first box; without, the list goes on. Teacher forcing the decoded answer
    through `forward` ends it at the same `</box>`: training and decoding feed back alike."""
    torch.manual_seed(0)
    # the rig leans on the heads' random init (the region encoder is built after the mask head): as first written
    model = GroundedLlavaForConditionalGeneration.from_config(_feedback_config(mask_pixels=False)).eval()
    processor, ids = model.processor, model.token_ids
    encoded = [processor.encode_conversation(
        [{"from": "human", "value": "<image>\nWhere is the circle?"}], _image(140, 90, seed=1), add_generation_prompt=True
    )]  # fmt: skip
    phrase = processor.tokenizer(" circle", add_special_tokens=False).input_ids
    expected_lm = _rig(model, int(encoded[0].input_ids[-1]), phrase)
    llava, encoder = model.base_llava, model.region_encoder
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad(), model.llava.disable_adapter():
        for layer in (encoder.appearance[-1], encoder.geometry[-1]):
            layer.weight.zero_(), layer.bias.zero_()
        encoder.geometry[-1].bias.copy_(torch.linspace(-3.0, 3.0, encoder.geometry[-1].bias.numel()))
        encoder.labels.weight.zero_()
        v = encoder.content_norm(encoder.geometry[-1].bias)
        close = llava.get_input_embeddings()(torch.tensor([ids.box_close]))[0]
        state = llava.model.language_model(inputs_embeds=(close + v)[None, None]).last_hidden_state[0, -1]
        head = dict(llava.named_parameters())["lm_head.token_adapter.base_layer.weight"]
        head[eos] = 20.0 * state / state.norm()
        batch = processor.collate(encoded, padding_side="left")
        features = model.encode_images(batch.pixel_values)
        pyramid = model.image_pyramid(features, batch.pixel_values)
        max_new_tokens = len(expected_lm) - 1 + 12
        fed = _decode(model, batch, features, pyramid, max_new_tokens)
        model.config.region_feedback = False
        plain = _decode(model, batch, features, pyramid, max_new_tokens)
        model.config.region_feedback = True
        answer = fed.ids[0]
        assert answer[: len(expected_lm)] == expected_lm and answer[-1] == ids.box_close
        assert fed.choices[0][0].proposal is not None and len(fed.choices[0]) == 1
        assert plain.ids[0].count(ids.box_open) == 2  # the rig's list goes on without the feedback
        sequence = torch.cat([batch.input_ids, torch.tensor([answer])], dim=1)
        inputs = {"input_ids": sequence, "attention_mask": torch.ones_like(sequence), "pixel_values": batch.pixel_values,
                  "original_sizes": torch.tensor([meta.original_size for meta in batch.image_metas])}  # fmt: skip
        with_feedback = model(**inputs).logits[0, -1]
        model.config.region_feedback = False
        without = model(**inputs).logits[0, -1]
    assert int(with_feedback.argmax()) == eos and int(without.argmax()) == ids.box_open
