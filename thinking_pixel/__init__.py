"""thinking_pixel: recursive sparse reasoning in diffusion latents (The Thinking Pixel, arXiv 2604.25299).

The model API lives here; training, sampling and data are in their own submodules and are imported on use
(``thinking_pixel.train``, ``thinking_pixel.diffusion``, ...), not by this package. The model API itself is
imported on first use too, so the command line starts without importing torch.
"""

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
    "remove_recursion",
    "save_recursion",
]


_HOMES = {"DIT_CONFIGS": ".models", "DiT": ".models", "DiTConfig": ".models", "dit_config": ".models",
          "load_model": ".checkpoints"}  # the rest: .recursion


def __getattr__(name):
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(_HOMES.get(name, ".recursion"), __name__), name)
    raise AttributeError(f"module 'thinking_pixel' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
