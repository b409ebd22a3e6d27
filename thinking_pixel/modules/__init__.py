"""nn.Modules built on tp_kernels: plain and recursive attention, routed LoRA experts, the top-1 gate."""

from .attention import Attention, attend
from .gate import Gate
from .recursive_attention import RecursiveAttention
from .routed_lora import RoutedLoRA

__all__ = ["Attention", "Gate", "RecursiveAttention", "RoutedLoRA", "attend"]
