"""Original LLaVA checkpoints (haotian-liu/LLaVA layout), written here with its real key names and config
fields and random weights, convert to a transformers LLaVA whose logits equal the original computation:
CLIP hidden states at `mm_vision_select_layer` without CLS -> `mm_projector` -> spliced into the Llama's
input embeddings. The reference is built from transformers' Llama and CLIP and a torch Sequential, with
the original names, so it does not share the converter's key mapping."""

import json
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from grounded_llava.convert.command import main as convert_main
from grounded_llava.convert.layout import is_original_llava
from grounded_llava.convert.merges import apply_delta
from grounded_llava.convert.weights import ConversionError, read_tensor_file

IMAGE = 112
VISION = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=IMAGE,
    patch_size=16,
)
TEXT = LlamaConfig(
    vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=False,
)  # fmt: skip
GRID = (IMAGE // 16) ** 2


def _tokenizer(directory):
    """A byte-level BPE of TEXT's vocabulary size, with LLaMA's specials and no <image> or pad token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train_from_iterator(["where is the red square", "a chat about an image"] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def _llava_config(tower_dir, projector_type="mlp2x_gelu"):
    return {
        **TEXT.to_dict(),
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
        "mm_vision_tower": str(tower_dir), "mm_hidden_size": VISION.hidden_size, "mm_projector_type": projector_type,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    }  # fmt: skip


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original LLaVA-1.5 directory (pytorch_model.bin, as its trainer saves) and its parts for the reference."""
    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    CLIPVisionModel(VISION).save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    ).save_pretrained(root / "clip")
    llama = LlamaForCausalLM(TEXT).eval()
    projector = nn.Sequential(nn.Linear(VISION.hidden_size, TEXT.hidden_size), nn.GELU(), nn.Linear(48, 48))
    state = dict(
        llama.state_dict()
    )  # model.embed_tokens, model.layers.*, model.norm, lm_head: the original names
    state |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    directory = root / "llava-v1.5-tiny"
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(_llava_config(root / "clip")))
    tokenizer = _tokenizer(directory)
    return {"dir": directory, "root": root, "llama": llama, "projector": projector, "tokenizer": tokenizer}


def _reference_logits(llama, projector, tower_dir, before, after, pixels):
    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    embed = llama.get_input_embeddings()
    inputs = torch.cat([embed(before), projector(features), embed(after)], dim=1)
    return llama(inputs_embeds=inputs).logits


def _converted_logits(directory, before, after, pixels):
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    image_id = model.config.image_token_index
    ids = torch.cat([before, torch.full((1, GRID), image_id), after], dim=1)
    return model(input_ids=ids, pixel_values=pixels).logits[..., : TEXT.vocab_size]


@torch.no_grad()
def _assert_same_function(out_dir, llama, projector, tower_dir):
    torch.manual_seed(1)
    before, after = torch.tensor([[1, 40, 41, 42]]), torch.tensor([[43, 44, 2]])
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    expected = _reference_logits(llama, projector, tower_dir, before, after, pixels)
    actual = _converted_logits(out_dir, before, after, pixels)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_an_original_checkpoint_converts_to_the_same_function(original, tmp_path, capsys):
    assert is_original_llava(original["dir"])
    out = tmp_path / "llava-hf"
    assert convert_main(["--from-llava", str(original["dir"]), "--out", str(out)]) == 0
    assert "model.base=" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    _assert_same_function(out, original["llama"], original["projector"], original["root"] / "clip")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert "<image>" in tokenizer.get_vocab() and tokenizer.pad_token is not None
    assert (
        len(tokenizer) == len(original["tokenizer"]) + 2
    )  # <image> and <pad>, as transformers' conversion adds


def test_a_lora_run_merges_into_its_base(original, tmp_path):
    """A LoRA run as the original trainer writes it: peft's own adapter files, non_lora_trainables.bin, config."""
    base_dir, run_dir = tmp_path / "vicuna-tiny", tmp_path / "llava-lora"
    original["llama"].save_pretrained(base_dir)
    original["tokenizer"].save_pretrained(base_dir)
    torch.manual_seed(2)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    ).eval()
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.2)  # peft starts B at zero: a merge of zeros would prove nothing
    peft_model.save_pretrained(run_dir, safe_serialization=False)
    projector = nn.Sequential(nn.Linear(VISION.hidden_size, 48), nn.GELU(), nn.Linear(48, 48))
    trainables = {f"base_model.model.model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    torch.save(trainables, run_dir / "non_lora_trainables.bin")
    (run_dir / "config.json").write_text(json.dumps(_llava_config(original["root"] / "clip")))
    assert (run_dir / "adapter_model.bin").is_file()

    out = tmp_path / "merged"
    assert convert_main(["--from-llava", str(run_dir), "--base", str(base_dir), "--out", str(out)]) == 0
    _assert_same_function(out, peft_model, projector, original["root"] / "clip")  # adapters unmerged in peft


def test_a_v0_delta_adds_back_its_base(original, tmp_path):
    base_dir, delta_dir = tmp_path / "llama-tiny", tmp_path / "llava-delta"
    torch.manual_seed(3)
    base = LlamaForCausalLM(TEXT)
    base.save_pretrained(base_dir)
    target = dict(original["llama"].state_dict()) | {
        f"model.mm_projector.{k}": v for k, v in original["projector"].state_dict().items()
    }
    delta = {
        name: t - base.state_dict()[name] if name in base.state_dict() else t for name, t in target.items()
    }
    delta_dir.mkdir()
    torch.save(delta, delta_dir / "pytorch_model.bin")
    (delta_dir / "config.json").write_text(json.dumps(_llava_config(original["root"] / "clip")))
    original["tokenizer"].save_pretrained(delta_dir)

    out = tmp_path / "applied"
    assert (
        convert_main(["--from-llava", str(delta_dir), "--delta", "--base", str(base_dir), "--out", str(out)])
        == 0
    )
    _assert_same_function(out, original["llama"], original["projector"], original["root"] / "clip")


def test_a_delta_keeps_the_rows_of_added_tokens():
    base = {"model.embed_tokens.weight": torch.ones(3, 2), "model.norm.weight": torch.ones(2)}
    delta = {"model.embed_tokens.weight": torch.full((4, 2), 2.0), "model.norm.weight": torch.zeros(2)}
    target = apply_delta(delta, base)
    assert target["model.embed_tokens.weight"].tolist() == [[3.0, 3.0]] * 3 + [[2.0, 2.0]]
    with pytest.raises(ConversionError, match=r"no tensor for the base's \['model.norm.weight'\]"):
        apply_delta({"model.embed_tokens.weight": delta["model.embed_tokens.weight"]}, base)


def test_what_cannot_be_mapped_is_named(original, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    state = torch.load(original["dir"] / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "model.vision_resampler.weight": torch.ones(2)}, broken / "pytorch_model.bin")
    (broken / "config.json").write_text((original["dir"] / "config.json").read_text())
    original["tokenizer"].save_pretrained(broken)
    assert convert_main(["--from-llava", str(broken), "--out", str(tmp_path / "o1")]) == 2
    assert "model.vision_resampler.weight" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()  # nothing half-written

    config = json.loads((original["dir"] / "config.json").read_text()) | {"mm_projector_type": "mlp3x_gelu"}
    (broken / "config.json").write_text(json.dumps(config))
    assert convert_main(["--from-llava", str(broken), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mm_projector_type='mlp3x_gelu' cannot be converted" in err


class NotATensor:
    """Unpickling it would import and build an arbitrary object."""


def test_pickles_are_read_as_tensors_only(tmp_path):
    with (tmp_path / "evil.bin").open("wb") as f:
        pickle.dump({"x": NotATensor()}, f, protocol=2)
    with pytest.raises(ConversionError, match="weights_only=True"):
        read_tensor_file(tmp_path / "evil.bin")


def test_the_command_refuses_before_loading(original, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert convert_main(["--from-llava", str(original["dir"]), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text("{}")
    assert convert_main(["--from-llava", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "give its base model with --base" in capsys.readouterr().err


def test_grounded_llava_loads_an_original_directory_as_its_base(original, random_image):
    """`GroundedLlava.from_pretrained(DIR)` and `model.base=DIR` take the original layout (converted in memory):
    the LLM is the original's, with LoRA and grounding heads (untrained) around it."""
    from grounded_llava.inference.predictor import GroundedLlava

    predictor = GroundedLlava.from_pretrained(original["dir"], device="cpu")
    language = predictor.model.base_llava.model.language_model
    for name in ("q_proj", "v_proj"):  # LoRA-wrapped: the original weight is the base layer's
        projection = getattr(language.layers[1].self_attn, name)
        expected = original["llama"].model.layers[1].self_attn.get_submodule(name).weight
        torch.testing.assert_close(getattr(projection, "base_layer", projection).weight, expected)
    torch.testing.assert_close(language.norm.weight, original["llama"].model.norm.weight)
    answer = predictor.chat(random_image(96, 80), "Where is the red square?", max_new_tokens=6)
    assert isinstance(answer.text, str) and answer.image_size == (96, 80)
