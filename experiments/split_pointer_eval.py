"""Probe (docs/EXPERIMENTS.md E21): one pointer decides "none" (list ends), another chooses the proposal.

The stop decision comes from the pointer of MODEL (trained in the loop on every task), the choice from the
pointer of CHOOSER (e.g. E20's fresh pointer trained on refer queries); MODEL's everything else. Runs the
contract's evaluation in-process with the combined pointer.

    python experiments/split_pointer_eval.py MODEL CHOOSER -- EVALUATE_ARGS...
"""

import sys

import torch
from torch import nn

from grounded_llava import GroundedLlavaForConditionalGeneration
from grounded_llava import evaluate as evaluate_cli
from grounded_llava.evaluation import runner
from grounded_llava.inference import GroundedLlava


class SplitPointer(nn.Module):
    """`stop` says whether a `<box>` gets "none"; otherwise `choose` picks among the proposals."""

    def __init__(self, stop: nn.Module, choose: nn.Module) -> None:
        super().__init__()
        self.stop, self.choose = stop, choose

    def region_embeddings(self, feature_map: torch.Tensor, proposals) -> torch.Tensor:
        """(I, K, 2 dim): both pointers' region embeddings side by side."""
        return torch.cat([self.stop.region_embeddings(feature_map, proposals),
                          self.choose.region_embeddings(feature_map, proposals)], dim=-1)  # fmt: skip

    def forward(self, query_hidden, query_image, regions, valid, excluded=None) -> torch.Tensor:
        half = regions.shape[-1] // 2
        stop = self.stop(query_hidden, query_image, regions[..., :half], valid, excluded)
        logits = self.choose(query_hidden, query_image, regions[..., half:], valid, excluded)
        none = stop.argmax(-1) == stop.shape[-1] - 1
        logits[:, -1] = float("-inf")
        logits[none, :-1] = float("-inf")
        logits[none, -1] = 0.0
        return logits


def main(model_dir: str, chooser_dir: str, evaluate_args: list[str]) -> int:
    chooser = GroundedLlavaForConditionalGeneration.from_pretrained(chooser_dir).pointer
    loader = GroundedLlava.from_pretrained

    def from_pretrained(directory, **kwargs):
        predictor = loader(directory, **kwargs)
        predictor.model.pointer = SplitPointer(predictor.model.pointer, chooser.to(predictor.device).eval())
        return predictor

    runner.GroundedLlava.from_pretrained = from_pretrained
    return evaluate_cli.main(["--model", model_dir, *evaluate_args])


if __name__ == "__main__":
    split = sys.argv.index("--")
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[split + 1 :]))
