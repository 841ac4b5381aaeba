"""The grounded model: LLaVA + LoRA composed with a vision neck, a YOLO Detect head and SAM's mask decoder."""

from .checkpoint import CheckpointError
from .detection import DetectionHead, DetectionTargets
from .grounded_llava import GroundedLlavaForConditionalGeneration
from .masks import MaskHead
from .neck import VisionNeck
from .outputs import GroundedLlavaOutput

__all__ = [
    "CheckpointError",
    "DetectionHead",
    "DetectionTargets",
    "GroundedLlavaForConditionalGeneration",
    "GroundedLlavaOutput",
    "MaskHead",
    "VisionNeck",
]
