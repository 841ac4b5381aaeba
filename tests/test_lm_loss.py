"""The LM loss: plain next-token cross-entropy, and the grounded phrases weighted up (known answers)."""

import math

import torch

from grounded_llava.grammar import box_groups_in_ids
from grounded_llava.modeling.lm_loss import answer_positions, language_loss, phrase_token_weights
from grounded_llava.tokenizer import GroundingTokenIds

IDS = GroundingTokenIds(
    p_open=100, p_close=101, box_open=102, box_close=103, seg=104, loc=tuple(range(110, 118))
)


def _answer_ids() -> torch.Tensor:
    """`w w <p> a b </p> <box> l l l l </box> w`: the phrase content at 3-4, `</p>` at 5."""
    return torch.tensor([[7, 8, 100, 9, 10, 101, 102, 110, 111, 112, 113, 103, 11]])


def test_phrase_weights_cover_the_phrase_and_its_close():
    ids = _answer_ids()
    weights = phrase_token_weights(box_groups_in_ids(ids, IDS), ids.shape, 3.0)
    expected = torch.ones(ids.shape)
    expected[0, 3:6] = 3.0
    assert torch.equal(weights, expected)
    assert phrase_token_weights(box_groups_in_ids(ids, IDS), ids.shape, 1.0) is None


def _answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (P, V) at the positions whose next token is supervised (what training computes)."""
    return logits[:, :-1][answer_positions(labels)]


def test_uniform_logits_give_log_vocab_and_weights_scale_the_phrase_tokens():
    ids = _answer_ids()
    labels = ids.clone()
    labels[0, :2] = -100  # the prompt is not supervised
    assert answer_positions(labels).tolist() == [[False] + [True] * 11]  # position 0 predicts label 1
    logits = _answer_logits(torch.zeros(1, ids.shape[1], 200), labels)
    assert logits.shape == (11, 200)
    assert math.isclose(float(language_loss(logits, labels)), math.log(200), rel_tol=1e-6)
    weights = phrase_token_weights(box_groups_in_ids(ids, IDS), ids.shape, 3.0)
    supervised = int((labels[0, 1:] != -100).sum())  # 11 targets, 3 of them weighted 3
    expected = math.log(200) * (supervised + 2 * 3) / supervised
    assert math.isclose(float(language_loss(logits, labels, weights)), expected, rel_tol=1e-6)


def test_weighted_loss_pushes_harder_on_a_wrong_phrase_token():
    ids = _answer_ids()
    logits = torch.zeros(1, ids.shape[1], 200, requires_grad=True)
    weights = phrase_token_weights(box_groups_in_ids(ids, IDS), ids.shape, 3.0)
    language_loss(_answer_logits(logits, ids), ids, weights).backward()
    grad = logits.grad[0].abs().sum(-1)
    assert torch.isclose(grad[2], 3 * grad[0])  # position 2 predicts the phrase's first token, 0 plain text
