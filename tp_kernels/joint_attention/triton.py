"""joint_attention's ``triton`` backend: no kernel of its own. On CUDA tensors joint_attention runs torch.py's
composed path: torch's scaled_dot_product_attention on the split heads (its flash / memory-efficient kernels)."""

from __future__ import annotations

from .torch import joint_attention_composed

__all__ = ["joint_attention_composed"]
