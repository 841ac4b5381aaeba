"""grounded-llava: LLaVA that answers with boxes and masks.

Top-level names are imported lazily, so light submodules (codec, data, evaluation) load fast.
"""

from importlib import import_module

from . import _offline  # noqa: F401  (first: configures ultralytics before anything imports it)

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grounded_llava' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
