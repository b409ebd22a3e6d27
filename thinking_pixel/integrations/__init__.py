"""Integrations with other libraries: the recursion on diffusers transformers, peft adapters.

diffusers and peft are imported only when a function needs them, so ``import thinking_pixel`` stays light.
"""

from .diffusers import apply_recursion, load_recursion, recursion_config, save_recursion

__all__ = ["apply_recursion", "load_recursion", "recursion_config", "save_recursion"]
