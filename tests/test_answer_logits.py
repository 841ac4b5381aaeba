"""Training computes the LM head only at the answer positions: the loss and the chat KL to the base model
must be what evaluation's full logits give (known answers on the tiny model)."""

import pytest
import torch

from grounded_llava.evaluation.chat_metrics import token_kl
from grounded_llava.modeling.base import adapters_disabled
from grounded_llava.training.stages import chat_kl_loss

from .test_model import make_batch, make_samples


def test_training_scores_the_answer_tokens_as_evaluation_does(tiny_model, tmp_path):
    """Training runs the LM head only where an answer token is predicted; the loss must be the one that
    evaluation's full logits give (dropout is 0 in the test config)."""
    inputs = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins)).model_inputs()
    with torch.no_grad():
        trained = tiny_model.train()(**inputs, compute_masks=False)
        evaluated = tiny_model.eval()(**inputs, compute_masks=False)
    assert trained.logits is None and evaluated.logits.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(trained.answer_logits, evaluated.logits[:, :-1][evaluated.answer_mask])
    torch.testing.assert_close(trained.lm_loss, evaluated.lm_loss)


def test_chat_kl_is_zero_for_the_base_and_the_mean_over_chat_answer_tokens(tiny_model, tmp_path):
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins))
    inputs = batch.model_inputs()
    with torch.no_grad():
        out = tiny_model.train()(**inputs, compute_masks=False)
        assert float(chat_kl_loss(tiny_model, batch.batch, out, batch.is_chat)) == pytest.approx(
            0.0, abs=1e-6
        )
        for name, parameter in tiny_model.named_parameters():
            if "lora_B" in name:  # zero at init: the adapted model was the base
                parameter.normal_(std=0.05)
        out = tiny_model(**inputs, compute_masks=False)
        kl = float(chat_kl_loss(tiny_model, batch.batch, out, batch.is_chat))
        chat = batch.batch.select(batch.is_chat.nonzero().flatten())
        chat_inputs = {
            k: getattr(chat, k) for k in ("input_ids", "attention_mask", "pixel_values", "image_sample_index")
        }
        adapted = tiny_model.eval()(**chat_inputs, compute_masks=False).logits
        with adapters_disabled(tiny_model.llava):
            base = tiny_model(**chat_inputs, compute_masks=False).logits
    answers = chat.labels[:, 1:] != -100
    assert kl > 1e-4
    assert kl == pytest.approx(float(token_kl(base[:, :-1], adapted[:, :-1])[answers].mean()), rel=1e-4)
