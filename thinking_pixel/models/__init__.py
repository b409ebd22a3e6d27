"""Models: the base DiT (with its size registry), ThinkingPixelDiT, the text-to-image SD3 model, checkpoint loading."""

from .dit import DIT_CONFIGS, DiT, DiTConfig, dit_config
from .pretrained import load_model, read_config
from .sd3 import SD3_CONFIGS, SD3TextToImage, sd3_config
from .thinking_pixel_dit import GATE_INPUTS, RecursionConfig, RoutingRecord, ThinkingPixelDiT

__all__ = [
    "DIT_CONFIGS",
    "GATE_INPUTS",
    "DiT",
    "DiTConfig",
    "RecursionConfig",
    "RoutingRecord",
    "SD3_CONFIGS",
    "SD3TextToImage",
    "ThinkingPixelDiT",
    "dit_config",
    "load_model",
    "read_config",
    "sd3_config",
]
