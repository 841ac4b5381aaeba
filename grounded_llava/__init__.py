"""grounded-llava: LLaVA that answers with boxes and masks.

Top-level names are imported lazily, so light submodules (codec, data, evaluation) load fast.
"""

from . import _offline  # noqa: F401  (first: configures ultralytics before anything imports it)
from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "GroundedLlavaConfig": ".config",
    "GroundedLlavaForConditionalGeneration": ".modeling",
    "GroundedProcessor": ".processor",
    "encode_grounded": ".codec",
    "parse_grounded": ".codec",
    "GroundedLlava": ".inference.predictor",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
