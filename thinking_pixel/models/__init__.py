"""Models: the base DiT (with its size registry) and ThinkingPixelDiT, plus checkpoint loading."""

from .dit import DIT_CONFIGS, DiT, DiTConfig, dit_config
from .pretrained import load_model, read_config
from .thinking_pixel_dit import GATE_INPUTS, RecursionConfig, RoutingRecord, ThinkingPixelDiT

__all__ = [
    "DIT_CONFIGS",
    "GATE_INPUTS",
    "DiT",
    "DiTConfig",
    "RecursionConfig",
    "RoutingRecord",
    "ThinkingPixelDiT",
    "dit_config",
    "load_model",
    "read_config",
]
