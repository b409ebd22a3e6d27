"""Per-token top-1 LoRA expert dispatch: ``routed_lora`` (functional.py), its reference, and the registered ops."""

from .functional import reuse_packed_weights, routed_lora
from .op import routed_lora_bwd, routed_lora_fwd
from .reference import routed_lora_reference

__all__ = ["routed_lora", "routed_lora_reference", "routed_lora_fwd", "routed_lora_bwd", "reuse_packed_weights"]
