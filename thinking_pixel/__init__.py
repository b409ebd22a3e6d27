"""thinking_pixel: recursive sparse reasoning in diffusion latents (The Thinking Pixel, arXiv 2604.25299).

The model API lives here; training, sampling and data are in their own submodules and are imported on use
(``thinking_pixel.train``, ``thinking_pixel.diffusion``, ...), not by this package.
"""

from .models import (
    DIT_CONFIGS,
    DiT,
    DiTConfig,
    RecursionConfig,
    RoutingRecord,
    ThinkingPixelDiT,
    dit_config,
    load_model,
)
from .integrations import apply_recursion, export_peft, load_recursion, recursion_config, save_recursion

__version__ = "0.1.0"

__all__ = [
    "DIT_CONFIGS",
    "DiT",
    "DiTConfig",
    "RecursionConfig",
    "RoutingRecord",
    "ThinkingPixelDiT",
    "apply_recursion",
    "dit_config",
    "export_peft",
    "load_model",
    "load_recursion",
    "recursion_config",
    "save_recursion",
]
