"""Group tokens by expert: a permutation and per-expert offsets, computed from the indices only.

Tokens are never copied here; callers gather rows of x through ``perm``.
The sort is stable, so tokens of one expert keep their order (and any
reduction over them has a fixed order: results are bit-reproducible).
Used by the CPU path only: torch.bincount syncs on CUDA, so the Triton path
groups on device with argsort + searchsorted (routed_lora/triton.py).
"""

from __future__ import annotations

import torch


def group_by_expert(idx: torch.Tensor, num_experts: int):
    """idx (N,) -> perm (N,) int64 with idx[perm] sorted, offsets (E + 1,) int64."""
    counts = torch.bincount(idx, minlength=num_experts)  # (E,)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    perm = torch.argsort(idx, stable=True)
    return perm, offsets
