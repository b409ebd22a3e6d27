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
    """idx (N,) -> perm (N,) int64 with idx[perm] sorted, offsets (E + 1,) int64.

    Expert e's tokens are perm[offsets[e]:offsets[e + 1]]; tokens with index -1 (skipped) sort first,
    perm[:offsets[0]], and belong to no expert.
    """
    counts = torch.bincount(idx + 1, minlength=num_experts + 1)  # (E + 1,): skipped, then each expert
    offsets = torch.cumsum(counts, 0)  # (E + 1,) offsets[e] = skipped + tokens of experts before e
    perm = torch.argsort(idx, stable=True)
    return perm, offsets


ROWS = 64  # rows per GEMM call of mm_rows


def mm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) with every row's result independent of M and of the other rows (batch invariance).

    A BLAS picks its kernel (and so the summation order) by the problem's shape: ``torch.mm`` on M = 1 and
    M = 300 rows gives a row different bits. Here the rows are cut into blocks of ROWS (the last one padded
    with zeros) and multiplied in one batched call whose every matrix has the same (ROWS, K) @ (K, N) shape.
    """
    m, k = a.shape
    blocks = -(-m // ROWS)
    if m % ROWS:
        a = torch.cat([a, a.new_zeros(blocks * ROWS - m, k)])
    out = torch.bmm(a.view(blocks, ROWS, k), b.expand(blocks, *b.shape))  # (blocks, ROWS, N)
    return out.view(blocks * ROWS, b.shape[1])[:m]
