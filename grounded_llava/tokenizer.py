"""Tokenizers: the grounding tokens as real special tokens, and the tiny preset's own byte-level BPE."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .codec import BOX_CLOSE, BOX_OPEN, P_CLOSE, P_OPEN, SEG, grounding_tokens, loc_token
from .conversation import IMAGE_TOKEN

TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# The tiny preset's BPE corpus: the conversation template, the vocabulary of the synthetic world and
# of COCO, and everyday words of questions and answers. Deterministic, versioned with the code.
_CORPUS_WORDS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT:
What is in the image? Describe the image. Where is the object? Find all the objects. Detect everything.
Segment the object. How many are there? Is there a one? Yes, there is. No, there is no. There are
What colour is it? What color is the shape? Which shape is on the left, right, top, bottom, middle, centre?
the small medium large big tiny red green blue yellow purple orange white black cyan pink gray brown magenta
circle circles square squares triangle triangles star stars hexagon hexagons cross crosses ellipse ellipses
diamond diamonds heart pentagon shape shapes object objects background noise gradient stripes
left of right of above below next to near far largest smallest leftmost rightmost topmost lowest
zero one two three four five six seven eight nine ten none several many some all each every
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag
tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis
racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot
pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell
phone microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush
a an the is are was were be it its this that these those there here with without and or but of in on
at to from by for as into over under between behind front picture photo scene I you he she we they
can see shows showing contains containing located position positioned region area mask box boxes
"""


def tiny_tokenizer_corpus() -> list[str]:
    """Lines of the built-in corpus the tiny BPE is trained on."""
    lines = [line.strip() for line in _CORPUS_WORDS.strip().splitlines() if line.strip()]
    # Numbers as text: counts and coordinates appear in chat answers.
    lines += [" ".join(str(n) for n in range(start, start + 20)) for start in range(0, 200, 20)]
    return lines


def train_tiny_tokenizer(vocab_size: int, extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train the tiny preset's byte-level BPE (deterministic); any text encodes, no `<unk>` needed.

    Returns a transformers fast tokenizer with `<s>`, `</s>`, `<pad>` and `<image>` as special tokens.
    Grounding tokens are added afterwards by `add_grounding_tokens`, the same way as for hub tokenizers.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = tiny_tokenizer_corpus() + list(extra_texts)
    # Repeat so that frequent template words merge first; training is deterministic for a fixed corpus.
    backend.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


@dataclass(frozen=True)
class GroundingTokenIds:
    """Token ids of the grounding tokens in one tokenizer; `loc[k]` is the id of `<loc_k>`."""

    p_open: int
    p_close: int
    box_open: int
    box_close: int
    seg: int
    loc: tuple[int, ...]

    @property
    def all_ids(self) -> list[int]:
        return [self.p_open, self.p_close, self.box_open, self.box_close, self.seg, *self.loc]

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, num_bins: int) -> GroundingTokenIds:
        def token_id(token: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([token])
            if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token!r} token: call add_grounding_tokens first")
            return int(ids[0])

        return cls(
            p_open=token_id(P_OPEN),
            p_close=token_id(P_CLOSE),
            box_open=token_id(BOX_OPEN),
            box_close=token_id(BOX_CLOSE),
            seg=token_id(SEG),
            loc=tuple(token_id(loc_token(i)) for i in range(num_bins)),
        )


def add_grounding_tokens(tokenizer: PreTrainedTokenizerBase, num_bins: int) -> GroundingTokenIds:
    """Add `<p> </p> <box> </box> <seg> <loc_0..N-1>` as special tokens (idempotent); return their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": grounding_tokens(num_bins)})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return GroundingTokenIds.from_tokenizer(tokenizer, num_bins)
