"""The copy head (`modeling/copy_head.py`): its mixture on known inputs, and decoding that reads the same
distribution as a teacher-forced pass (so `chat` and `score` agree with a copy head too)."""

import random

import numpy as np
import torch

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava.inference import GroundedLlava
from grounded_llava.inference.forced import forced_answers
from grounded_llava.inference.requests import build_request
from grounded_llava.modeling.copy_head import CopyHead
from grounded_llava.training.stages import set_trainable

from .conftest import tiny_test_config


def test_the_mixture_is_a_distribution_whose_gate_chooses_generating_or_copying():
    torch.manual_seed(0)
    head = CopyHead(8, dim=4)
    logits, hidden, scores = torch.randn(2, 10), torch.randn(2, 8), torch.zeros(2, 5)
    ids = torch.tensor([[3, 3, 7, 1, 9], [2, 4, 4, 4, 0]])
    allowed = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    with torch.no_grad():
        head.gate.weight.zero_()
        mixed = head.mix(logits, hidden, scores, ids, allowed)
        torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(2))
        head.gate.bias.fill_(-40.0)  # generate: the LM head's softmax
        torch.testing.assert_close(head.mix(logits, hidden, scores, ids, allowed), logits.log_softmax(-1))
        head.gate.bias.fill_(40.0)  # copy: equal scores spread the mass evenly over the allowed sources
        copied = head.mix(logits, hidden, scores, ids, allowed).exp()
    expected = torch.zeros(2, 10)
    expected[0, 3], expected[0, 7] = 2 / 3, 1 / 3  # sources 3, 3, 7 (1 and 9 not allowed)
    expected[1, 2], expected[1, 4], expected[1, 0] = 1 / 5, 3 / 5, 1 / 5
    torch.testing.assert_close(copied, expected, atol=1e-6, rtol=0)


def test_decoding_reads_the_distribution_a_teacher_forced_pass_computes(random_image):
    torch.manual_seed(3)
    config = tiny_test_config()
    config.copy_head = True
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    with torch.no_grad():
        model.copy_head.gate.bias.zero_()  # half copied, half generated: both routes count
    predictor = GroundedLlava(model, device="cpu")
    history = [("Name a red circle and a blue star.", "A red circle.")]
    request = build_request(model.processor, random_image(48, 40), "And the star?", history)
    features, pyramid = predictor._encode([request])
    generated = predictor._generate([request], features, pyramid, max_new_tokens=16, temperature=0.0)
    assert len(generated.ids[0]) >= 8
    forced = forced_answers(
        model, [request.encoded.input_ids.tolist()], generated.ids, features=features, pyramid=pyramid,
        pixel_values=request.encoded.pixel_values[None], original_sizes=torch.tensor([request.meta.original_size]),
        pad_token_id=model.processor.tokenizer.pad_token_id,
    )  # fmt: skip
    np.testing.assert_allclose(generated.log_probs[0], forced.log_probs[0], atol=1e-4)


def _repeat_words(copy: bool, steps: int) -> tuple[float, float]:
    """A 2-layer tiny LM (with or without the copy head) trained for `steps` steps to answer "Say W please."
    with "W." for 20 words; returns its last loss and its accuracy at the first answer token for 10 words
    it never saw in an answer."""
    torch.manual_seed(0)
    config = tiny_test_config()
    config.copy_head = copy
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    set_trainable(model, "base")
    tokenizer = model.processor.tokenizer
    words = sorted(
        w[1:] for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 4
    )
    random.Random(0).shuffle(words)
    seen, unseen = words[:20], words[20:30]
    rng = random.Random(1)

    def batch(chosen):
        turns = [
            [{"from": "human", "value": f"Say {w} please."}, {"from": "gpt", "value": f"{w}."}]
            for w in chosen
        ]
        return model.processor(turns, [None] * len(turns)).model_inputs()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        out = model(**batch([rng.choice(seen) for _ in range(8)]))
        out.lm_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    inputs = batch(unseen)
    with torch.no_grad():
        held = model.eval()(**inputs)
    first = held.answer_mask.float().argmax(1)  # the position that predicts each answer's first token
    rows = torch.arange(len(unseen))
    right = held.logits[rows, first].argmax(-1) == inputs["labels"][rows, first + 1]
    return float(out.lm_loss.detach()), float(right.float().mean())


def test_with_the_copy_head_a_small_lm_repeats_words_it_never_answered_with():
    """The copy route generalises to words never seen as answers; the LM head alone cannot (E36)."""
    copy_loss, copy_accuracy = _repeat_words(True, steps=200)
    plain_loss, plain_accuracy = _repeat_words(False, steps=200)
    assert copy_accuracy >= 0.8 and plain_accuracy <= 0.3, (copy_accuracy, plain_accuracy)
    assert copy_loss < 0.5, copy_loss


def test_the_identity_term_scores_the_source_after_the_word_asked_about():
    """With content scores and subject keys at zero, the subject attention is its recency slope alone: it
    picks the last token read, and the source after that word's earlier occurrence gets the identity gain
    (cosine 1); every other source gets less. A closed per-query gate removes the term (E37)."""
    torch.manual_seed(0)
    head, embed = CopyHead(16, dim=4), torch.nn.Embedding(12, 16)
    with torch.no_grad():
        for layer in (head.query, head.key, head.subject_query, head.subject_key):
            layer.weight.zero_()
            layer.bias.zero_()
        head.subject_previous_key.weight.zero_()
        head.subject_recency.fill_(8.0)  # softplus ~8 logits per token back: the last token is the subject
        head.identity_gate.weight.zero_()
        ids = torch.tensor([[1, 7, 2, 8, 3, 9, 5, 2]])  # "w1 v1, w2 v2, w3 v3. How-many w2"
        hidden = torch.randn(1, 8, 16)
        keys = head.sequence_keys(hidden, ids, embed)
        distance = torch.arange(7, -1, -1)[None, None]  # the query is the last position
        allowed = torch.ones(1, 1, 8, dtype=torch.bool)
        head.identity_gate.bias.fill_(40.0)
        opened = head.scores(hidden[:, -1:], keys, allowed, distance)[0, 0]
        head.identity_gate.bias.fill_(-40.0)
        closed = head.scores(hidden[:, -1:], keys, allowed, distance)[0, 0]
    assert int(opened.argmax()) == 3  # v2, the source after w2
    torch.testing.assert_close(opened[3], head.identity_gain.detach(), atol=1e-3, rtol=0)
    assert float(opened.topk(2).values[1]) < float(opened[3]) - 0.5
    torch.testing.assert_close(closed, torch.zeros(8), atol=1e-3, rtol=0)
