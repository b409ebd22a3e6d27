"""The joint attention in plain torch: the specification the CPU kernel is tested against.

The ``reference`` backend has no implementation of its own: joint_attention runs torch.py's composed path there
(torch's scaled_dot_product_attention on the split heads), as on every backend where the CPU kernel does not run.
"""

from __future__ import annotations

import torch
from einops import rearrange


def _heads(x, num_heads):
    return rearrange(x, "n t (h d) -> n h t d", h=num_heads)  # (N, T, D) -> (N, H, T, D / H)


def split(qkv, context_q, context_k, context_v, num_heads):
    """-> q (N, H, T [+ L], D / H), k and v (N, H, T [+ L], D / H): vision rows first, then the context's."""
    q, k, v = (_heads(z, num_heads) for z in qkv.split(qkv.shape[-1] // 3, dim=-1))
    if context_k is not None:
        k = torch.cat([k, _heads(context_k, num_heads)], dim=2)
        v = torch.cat([v, _heads(context_v, num_heads)], dim=2)
    if context_q is not None:
        q = torch.cat([q, _heads(context_q, num_heads)], dim=2)
    return q, k, v


def joint_attention_reference(qkv, num_heads, context_q=None, context_k=None, context_v=None):
    """softmax(Q K^T / sqrt(D / H)) V written out, in the inputs' dtype (float64 in the tests) -> (N, T [+ L], D)."""
    q, k, v = split(qkv, context_q, context_k, context_v, num_heads)
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return rearrange(p @ v, "n h t d -> n t (h d)")
