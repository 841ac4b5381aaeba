"""The grounded model on tiny configs with the real transformers/peft/ultralytics/SAM parts."""

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from grounded_llava import GroundedLlavaConfig, GroundedLlavaForConditionalGeneration
from grounded_llava.codec import encode_phrase
from grounded_llava.config_io import ConfigError
from grounded_llava.data.dataset import GroundedCollator, GroundedDataset
from grounded_llava.data.sample import GroundedSample
from grounded_llava.modeling import CheckpointError
from grounded_llava.modeling.base import BaseModelUnavailableError, sync_trainable_rows

from .conftest import TEST_CATEGORIES, tiny_test_config


def _write_image(path, size, box):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (30, 60, 90))
    ImageDraw.Draw(image).ellipse(box, fill=(220, 40, 40))
    image.save(path)
    mask = np.zeros(size[::-1], dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return path, mask


def make_samples(tmp_path, num_bins):
    """Four samples: grounded with mask, grounded without mask, chat about an image, text-only chat."""
    (path_a, mask_a), box_a = _write_image(tmp_path / "a.png", (160, 120), (20, 30, 80, 90)), (20, 30, 80, 90)
    (path_b, _), box_b = _write_image(tmp_path / "b.png", (90, 150), (10, 60, 70, 130)), (10, 60, 70, 130)
    seg_answer = "Here: " + encode_phrase("circle", [box_a], (160, 120), num_bins=num_bins, seg=True) + "."
    box_answer = "There is " + encode_phrase("circle", [box_b], (90, 150), num_bins=num_bins) + "."
    return [
        GroundedSample(path_a, [{"from": "human", "value": "<image>\nSegment the circle."}, {"from": "gpt", "value": seg_answer}],
                       (160, 120), True, np.array([box_a], np.float32), ["circle"], [mask_a], "a", "segment"),
        GroundedSample(path_b, [{"from": "human", "value": "<image>\nFind the circle."}, {"from": "gpt", "value": box_answer}],
                       (90, 150), True, np.array([box_b], np.float32), ["circle"], [], "b", "find"),
        GroundedSample(path_a, [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "It is red."}],
                       (160, 120), source="chat-a", task="chat"),
        GroundedSample(None, [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}], source="text", task="chat"),
    ]  # fmt: skip


def make_batch(model, samples):
    dataset = GroundedDataset(
        samples, model.processor, categories=TEST_CATEGORIES, mask_resolution=model.mask_head.mask_resolution
    )
    return GroundedCollator(model.processor)([dataset[i] for i in range(len(dataset))])


def test_forward_backward_on_a_mixed_batch(tiny_model, tmp_path):
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins))
    assert batch.batch.pixel_values.shape[0] == 3 and batch.seg_masks.shape[0] == 1
    assert batch.det_targets.image_has_targets.tolist() == [True, True, False]
    assert batch.is_chat.tolist() == [False, False, True, True]  # where the KL to the base model applies
    out = tiny_model(**batch.model_inputs())
    for name in ("loss", "lm_loss", "det_loss", "mask_loss", "pointer_loss"):
        assert torch.isfinite(getattr(out, name)), name
    out.loss.backward()
    for head in (tiny_model.mask_head, tiny_model.pointer, tiny_model.spatial_prior):
        grads = [p.grad for p in head.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), type(head).__name__
    lora_grads = [p.grad for n, p in tiny_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is None for n, p in tiny_model.named_parameters() if "vision_tower" in n)
    # training computes the logits only where an answer token is predicted
    assert out.logits is None and out.answer_logits.shape[0] == int(out.answer_mask.sum())
    assert out.answer_mask.shape == (4, batch.batch.input_ids.shape[1] - 1) and out.mask_logits.shape[0] == 1


def test_grounded_chat_is_chat_for_the_kl_to_the_base(tiny_model, tmp_path):
    """A `chat` answer that grounds its objects keeps the KL to the base model (E27: it was dropped)."""
    grounded, _, plain, _ = make_samples(tmp_path, tiny_model.config.num_bins)
    grounded_chat = dataclasses.replace(grounded, task="chat")
    assert make_batch(tiny_model, [grounded_chat, grounded, plain]).is_chat.tolist() == [True, False, True]


def test_overfitting_two_samples_drives_every_loss_down(tiny_model, tmp_path):
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins)[:2])
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    tiny_model.train()
    history = []
    for _ in range(30):
        out = tiny_model(**batch.model_inputs())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: getattr(out, k).item() for k in ("lm_loss", "det_loss", "mask_loss")})
    for key in ("lm_loss", "det_loss", "mask_loss"):
        first, last = history[0][key], np.mean([h[key] for h in history[-3:]])
        assert last < 0.7 * first, f"{key}: {first:.3f} -> {last:.3f}"


def test_lora_keeps_base_weights_and_disable_adapter_gives_base_logits(tiny_model, tmp_path):
    reference = copy.deepcopy(tiny_model)
    base_before = {
        k: v.clone()
        for k, v in tiny_model.base_llava.state_dict().items()
        if "lora_" not in k and "trainable_tokens" not in k
    }
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins))
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        tiny_model(**batch.model_inputs()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base_after = tiny_model.base_llava.state_dict()
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())
    tiny_model.eval(), reference.eval()
    inputs = {k: v for k, v in batch.batch.model_inputs().items() if k != "labels"}
    with torch.no_grad():
        adapted = tiny_model(**inputs, compute_masks=False).logits
        with tiny_model.llava.disable_adapter():
            disabled = tiny_model(**inputs, compute_masks=False).logits
        with reference.llava.disable_adapter():
            base = reference(**inputs, compute_masks=False).logits
    assert not torch.allclose(adapted, base)
    assert torch.equal(disabled, base)


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins))
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    tiny_model(**batch.model_inputs()).loss.backward()
    optimizer.step()
    tiny_model.add_categories(["hexagon"])
    tiny_model.eval()
    saved = tiny_model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        ["adapter", "base", "grounded_config.json", "grounded_processor.json", "heads.safetensors",
         "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip
    loaded = GroundedLlavaForConditionalGeneration.from_pretrained(saved).eval()
    assert loaded.config == tiny_model.config and loaded.detection_head.num_classes == 4
    with torch.no_grad():
        a = tiny_model(**batch.model_inputs())
        b = loaded(**batch.model_inputs())
    for name in ("loss", "logits", "mask_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.detections["scores"], b.detections["scores"])


def test_growing_classes_keeps_old_rows(tiny_model):
    head = tiny_model.detection_head.detect
    old = [branch[-1].weight.detach().clone() for branch in head.cv3]
    tiny_model.add_categories(["hexagon", "star"])  # "star" is already known: only hexagon is new
    assert tiny_model.config.heads.categories == [*TEST_CATEGORIES, "hexagon"]
    for before, branch in zip(old, head.cv3, strict=True):
        assert branch[-1].weight.shape[0] == 4 and torch.equal(branch[-1].weight[:3], before)


def test_image_token_mismatch_and_bad_seg_raise(tiny_model, tmp_path):
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins))
    inputs = batch.model_inputs()
    corrupted = inputs["input_ids"].clone()
    corrupted[0, (corrupted[0] == tiny_model.image_token_id).nonzero()[0]] = (
        tiny_model.processor.tokenizer.eos_token_id
    )
    with pytest.raises(ValueError, match=r"image-token count mismatch in sample\(s\) \[0\]"):
        tiny_model(**{**inputs, "input_ids": corrupted})
    with pytest.raises(ValueError, match="mask targets"):
        tiny_model(**{**inputs, "seg_masks": inputs["seg_masks"][:0]})


def test_checkpoint_errors_name_the_file(tiny_model, tmp_path):
    saved = tiny_model.save_pretrained(tmp_path / "ckpt")
    meta = saved / "grounded_config.json"
    meta.write_text(meta.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(CheckpointError, match="grounded_config.json: format_version 99"):
        GroundedLlavaForConditionalGeneration.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="does not exist"):
        GroundedLlavaForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = GroundedLlavaConfig.from_dict(
        {"base": "llava-hf/llava-1.5-7b-hf", "heads": {"categories": ["dog"]}}
    )
    start = time.monotonic()
    with pytest.raises(BaseModelUnavailableError, match="huggingface-cli download llava-hf/llava-1.5-7b-hf"):
        GroundedLlavaForConditionalGeneration.from_config(config)
    assert time.monotonic() - start < 10


@pytest.fixture(scope="module")
def local_llava_dir(tmp_path_factory, tiny_config):
    """A plain transformers LLaVA checkpoint on disk (the 'local directory' kind of base)."""
    from grounded_llava.modeling.base import build_tiny_base

    llava, tokenizer = build_tiny_base(tiny_config.tiny, tiny_config.num_bins)
    directory = tmp_path_factory.mktemp("local_llava")
    llava.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_local_llava_directory_as_base_loads_through_transformers(local_llava_dir, tmp_path):
    config = tiny_test_config().to_dict() | {"base": str(local_llava_dir)}
    model = GroundedLlavaForConditionalGeneration.from_config(GroundedLlavaConfig.from_dict(config))
    assert model.num_image_tokens == 49 and not (model.save_pretrained(tmp_path / "ckpt") / "base").exists()
    reloaded = GroundedLlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(reloaded.mask_head.box_only_embedding, model.mask_head.box_only_embedding)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of GPU-only options")
def test_gpu_only_options_raise_on_cpu(local_llava_dir):
    base = tiny_test_config().to_dict() | {"base": str(local_llava_dir)}
    for bits in ("4bit", "8bit"):
        config = GroundedLlavaConfig.from_dict(base | {"quantization": bits, "dtype": "bfloat16"})
        with pytest.raises(ConfigError, match=f"model.quantization={bits} needs a CUDA GPU"):
            GroundedLlavaForConditionalGeneration.from_config(config)
    legacy = GroundedLlavaConfig.from_dict(base | {"load_in_4bit": True, "dtype": "bfloat16"})
    assert legacy.quantization == "4bit"  # checkpoints written before `quantization` existed
    with pytest.raises(ConfigError, match="quantization 8bit needs dtype bfloat16 or float16"):
        GroundedLlavaConfig.from_dict(base | {"quantization": "8bit"})
    with pytest.raises(ConfigError, match="quantization 8bit needs a pretrained base"):
        GroundedLlavaConfig.from_dict(base | {"base": "tiny", "quantization": "8bit", "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        GroundedLlavaForConditionalGeneration.from_config(
            GroundedLlavaConfig.from_dict(base | {"dtype": "float16"})
        )


def test_7b_config_parses_and_stops_at_loading_weights(tmp_path, monkeypatch):
    from grounded_llava.training.config import TrainConfig
    from grounded_llava.training.trainer import Trainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "llava15_7b_coco.yaml")
    assert (
        config.model.quantization == "4bit"
        and config.model.gradient_checkpointing
        and config.train.grad_accum == 4
    )
    assert [s.kind for s in config.stages] == ["align", "ground"] and config.model.lora.r == 64
    with pytest.raises(BaseModelUnavailableError, match="llava-hf/llava-1.5-7b-hf"):
        Trainer(config, tmp_path).run()  # conftest's fresh_accelerator_state resets its bf16 Accelerator


def test_bfloat16_with_gradient_checkpointing_trains_on_cpu(tmp_path):
    config = tiny_test_config().to_dict() | {"dtype": "bfloat16", "gradient_checkpointing": True}
    model = GroundedLlavaForConditionalGeneration.from_config(GroundedLlavaConfig.from_dict(config))
    assert model.base_llava.is_activation_checkpointing
    assert (
        model.base_llava.dtype == torch.bfloat16 and next(model.mask_head.parameters()).dtype == torch.float32
    )
    model.train()
    batch = make_batch(model, make_samples(tmp_path, model.config.num_bins))
    out = model(**batch.model_inputs())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n
    )


def test_pooled_image_tokens_feed_the_llm_while_the_heads_read_the_full_grid(tmp_path):
    """image_token_pool=2 on a 128 px canvas (8x8 patches): 16 LLM image tokens, each the mean of a 2x2
    block of the projected grid; the neck still gets all 64; the setting survives save/load."""
    config = tiny_test_config()
    config.tiny.image_size = 128
    config.image_token_pool = 2
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    assert model.num_image_tokens == 16 and model.processor.num_image_tokens == 16
    features = torch.arange(2 * 64 * 3, dtype=torch.float32).reshape(2, 64, 3)
    tokens = model.llm_image_tokens(features)
    block = features[0].reshape(8, 8, 3)[2:4, 4:6].reshape(4, 3).mean(0)  # row 1, column 2 of the 4x4 grid
    assert tokens.shape == (2, 16, 3) and torch.equal(tokens[0, 1 * 4 + 2], block)
    batch = make_batch(model, make_samples(tmp_path, model.config.num_bins))
    assert int((batch.batch.input_ids == model.image_token_id).sum()) == 3 * 16
    out = model(**batch.model_inputs())
    assert torch.isfinite(out.loss) and out.image_features.shape[1] == 64
    loaded = GroundedLlavaForConditionalGeneration.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.num_image_tokens == 16 and loaded.config.image_token_pool == 2


def test_token_pool_that_does_not_divide_the_grid_is_refused():
    config = tiny_test_config()  # 112 px: a 7x7 grid
    config.image_token_pool = 2
    with pytest.raises(ValueError, match="image_token_pool=2"):
        GroundedLlavaForConditionalGeneration.from_config(config)


def test_training_skips_the_heads_on_a_chat_only_batch(tiny_model, tmp_path):
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins)[2:])
    out = tiny_model.train()(**batch.model_inputs())
    assert out.detections is None and out.pyramid is None and torch.isfinite(out.loss)
    assert tiny_model.eval()(**batch.model_inputs()).detections is not None  # evaluation always runs them


def test_tied_word_embeddings_share_the_output_layer_and_survive_save_load(tmp_path):
    config = tiny_test_config()
    config.tiny.tie_word_embeddings = True
    model = GroundedLlavaForConditionalGeneration.from_config(config)
    base = model.base_llava
    assert (
        base.lm_head.token_adapter.base_layer.weight
        is base.get_input_embeddings().token_adapter.base_layer.weight
    )
    batch = make_batch(model, make_samples(tmp_path, model.config.num_bins))
    model.eval()
    loaded = GroundedLlavaForConditionalGeneration.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs()).logits, loaded(**batch.model_inputs()).logits)
    assert loaded.base_llava.config.get_text_config().tie_word_embeddings


@pytest.mark.parametrize("shapes_llm", [True, False])
def test_pointer_loss_reaches_the_llm_only_when_asked(tiny_model, tmp_path, shapes_llm):
    """`pointer_shapes_llm=False` (the `base` stage): the pointer learns, the LLM gets none of its gradient."""
    batch = make_batch(tiny_model, make_samples(tmp_path, tiny_model.config.num_bins))
    tiny_model.train()
    tiny_model.zero_grad()
    out = tiny_model(**batch.model_inputs(), pointer_shapes_llm=shapes_llm)
    out.pointer_loss.backward()
    llm = [p for n, p in tiny_model.named_parameters() if "language_model" in n and p.requires_grad]
    assert llm and any(p.grad is not None for p in tiny_model.pointer.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in llm) == shapes_llm


def test_after_a_base_stage_the_adapters_token_rows_start_from_the_trained_base_rows():
    """A `base` stage trains the base embedding with the adapter off; the rows peft copied at wrap time
    must follow, or the first LoRA stage sees the grounding tokens' untrained embeddings."""
    torch.manual_seed(0)
    model = GroundedLlavaForConditionalGeneration.from_config(tiny_test_config())
    embeddings = model.llava.get_input_embeddings()
    grounding = torch.tensor(model.token_ids.all_ids[:4])
    with torch.no_grad():
        embeddings.token_adapter.get_base_layer().weight[grounding] += (
            1.0  # what `base` training does to those rows
        )
        with model.llava.disable_adapter():
            trained = embeddings(grounding).clone()
        assert not torch.allclose(embeddings(grounding), trained)  # stale copy
        sync_trainable_rows(model.llava)
        assert torch.equal(embeddings(grounding), trained)
