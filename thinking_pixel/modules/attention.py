"""Plain multi-head attention over a fused qkv projection (DiT's attention), and the shared attend()."""

from __future__ import annotations

import torch.nn as nn
from einops import rearrange

import tp_kernels

__all__ = ["Attention", "attend", "merge_heads", "split_heads", "split_qkv"]


def split_heads(x, num_heads):
    """(N, T, D) -> (N, H, T, D / H)."""
    return rearrange(x, "n t (h d) -> n h t d", h=num_heads)


def split_qkv(qkv, num_heads):
    """Fused projections (N, T, 3D), columns [q | k | v] each head-major -> q, k, v, each (N, H, T, D / H).

    Split along the columns, not unbound from one (3, N, H, T, D / H) view: the backward then writes the three
    gradients into (N, T, 3D) with one cat, where unbind's stack plus the permute back cost two copies."""
    return tuple(split_heads(z, num_heads) for z in qkv.split(qkv.shape[-1] // 3, dim=-1))


def merge_heads(x):
    """(N, H, T, D / H) -> (N, T, D)."""
    return rearrange(x, "n h t d -> n t (h d)")


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
