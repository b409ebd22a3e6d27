"""Integrations with other libraries: the recursion on diffusers transformers, peft adapters.

diffusers and peft are imported only when a function needs them, so ``import thinking_pixel`` stays light.
"""

from .diffusers import apply_recursion, load_recursion, recursion_config, remove_recursion, save_recursion
from .peft import add_peft_experts, add_peft_lora, copy_experts_to_peft, export_peft

__all__ = ["add_peft_experts", "add_peft_lora", "apply_recursion", "copy_experts_to_peft", "export_peft",
           "load_recursion", "recursion_config", "remove_recursion", "save_recursion"]
