"""Joint attention in composed torch ops: the ``torch`` backend, and what runs wherever the CPU kernel does not (the
``reference`` and ``triton`` backends, bf16, torch.compile, no extension, a score block over MAX_SCORES)."""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange

from .reference import split


def joint_attention_composed(qkv, num_heads, context_q=None, context_k=None, context_v=None):
    """torch's scaled_dot_product_attention on the split heads -> (N, T [+ L], D)."""
    out = F.scaled_dot_product_attention(*split(qkv, context_q, context_k, context_v, num_heads))
    return rearrange(out, "n h t d -> n t (h d)")
