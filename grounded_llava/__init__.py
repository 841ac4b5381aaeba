"""grounded-llava: LLaVA that answers with boxes and masks."""

from .codec import encode_grounded, parse_grounded
from .config import GroundedLlavaConfig
from .modeling import GroundedLlavaForConditionalGeneration
from .processor import GroundedProcessor

__version__ = "0.1.0"

__all__ = [
    "GroundedLlavaConfig",
    "GroundedLlavaForConditionalGeneration",
    "GroundedProcessor",
    "encode_grounded",
    "parse_grounded",
]
