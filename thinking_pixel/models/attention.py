"""Plain multi-head attention over a fused qkv projection (DiT's attention), and the shared attend()."""

from __future__ import annotations

import torch.nn as nn

import tp_kernels

__all__ = ["Attention", "attend"]


def attend(qkv, num_heads, context_kv=None):
    """Scaled dot-product attention of fused projections qkv (N, T, 3D) -> (N, T, D), heads merged.

    context_kv: optional (k, v), each (N, L, D): extra keys/values (e.g. text tokens) that the T queries attend
    to jointly with their own. tp_kernels.joint_attention: on CPU in training, a kernel that reads the heads in
    place; elsewhere torch's scaled_dot_product_attention.
    """
    context_k, context_v = (None, None) if context_kv is None else context_kv
    return tp_kernels.joint_attention(qkv, num_heads, context_k=context_k, context_v=context_v)  # (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (columns [q | k | v], each head-major)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.num_heads))  # (N, T, D)
