"""Plain multi-head attention over a fused qkv projection (DiT's attention), and the shared attend()."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Attention", "attend", "split_heads"]


def split_heads(x, num_heads):
    """(N, T, D) -> (N, H, T, D / H)."""
    n, t, d = x.shape
    return x.view(n, t, num_heads, d // num_heads).transpose(1, 2)


def attend(qkv, num_heads, context_kv=None):
    """Scaled dot-product attention of fused projections qkv (N, T, 3D) -> (N, T, D), heads merged.

    context_kv: optional (k, v), each (N, H, L, D / H): extra keys/values (e.g. text tokens) that the
    T queries attend to jointly with their own.
    """
    q, k, v = (split_heads(z, num_heads) for z in qkv.chunk(3, dim=-1))  # (N, H, T, D / H) each
    if context_kv is not None:
        k = torch.cat([k, context_kv[0]], dim=2)  # (N, H, T + L, D / H)
        v = torch.cat([v, context_kv[1]], dim=2)
    x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D / H)
    return x.transpose(1, 2).flatten(2)  # (N, T, D)


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
