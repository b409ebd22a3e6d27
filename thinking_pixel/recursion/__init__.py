"""The method, in one folder: recursive sparse reasoning in the latents of a diffusion transformer.

- :mod:`.config`: :class:`RecursionConfig`, where and how a model recurses.
- :mod:`.layers`: the T-step loop (:class:`LatentRecursion`, :class:`RecursiveAttention`), the routed LoRA
  experts (:class:`RoutedLoRA`), the top-1 gate (:class:`Gate`) and per-token halting (:class:`Halting`).
- :mod:`.dit`: :class:`ThinkingPixelDiT`, our DiT with recursive blocks.
- :mod:`.diffusers`: the recursion as attention processors on diffusers' SD3 and DiT transformers
  (:func:`apply_recursion`, :func:`remove_recursion`, :func:`save_recursion`, :func:`load_recursion`).
- :mod:`.peft`: experts as peft LoRA adapters (:func:`export_peft`, :func:`add_peft_lora`).

diffusers and peft are imported only when a function needs them.
"""

from .config import GATE_INPUTS, RecursionConfig
from .diffusers import apply_recursion, load_recursion, recursion_config, remove_recursion, save_recursion
from .dit import RoutingRecord, ThinkingPixelDiT
from .layers import Gate, Halting, LatentRecursion, RecursiveAttention, RoutedLoRA
from .peft import add_peft_experts, add_peft_lora, copy_experts_to_peft, export_peft

__all__ = ["GATE_INPUTS", "Gate", "Halting", "LatentRecursion", "RecursionConfig", "RecursiveAttention",
           "RoutedLoRA", "RoutingRecord", "ThinkingPixelDiT", "add_peft_experts", "add_peft_lora", "apply_recursion",
           "copy_experts_to_peft", "export_peft", "load_recursion", "recursion_config", "remove_recursion",
           "save_recursion"]
