"""Group tokens by expert: a permutation and per-expert offsets, computed from the indices only.

Tokens are never copied here; callers gather rows of x through ``perm``.
The sort is stable, so tokens of one expert keep their order (and any
reduction over them has a fixed order: results are bit-reproducible).
On CPU a bincount and a stable argsort (the fastest there); on other devices :func:`counting_sort`, whose shapes
are fixed and which reads nothing back (torch.bincount syncs on CUDA). The Triton path runs the same counting
sort as kernels (routed_lora/triton.py); :func:`counting_sort` is their reference.
"""

from __future__ import annotations

import torch


def group_by_expert(idx: torch.Tensor, num_experts: int):
    """idx (N,) -> perm (N,) int64 with idx[perm] sorted, offsets (E + 1,) int64.

    Expert e's tokens are perm[offsets[e]:offsets[e + 1]]; tokens with index -1 (skipped) sort first,
    perm[:offsets[0]], and belong to no expert.
    """
    if idx.device.type != "cpu":
        return counting_sort(idx, num_experts)
    counts = torch.bincount(idx + 1, minlength=num_experts + 1)  # (E + 1,): skipped, then each expert
    offsets = torch.cumsum(counts, 0)  # (E + 1,) offsets[e] = skipped + tokens of experts before e
    perm = torch.argsort(idx, stable=True)
    return perm, offsets


def counting_sort(idx: torch.Tensor, num_experts: int):
    """group_by_expert as a counting sort: histogram, exclusive scan, stable scatter; no sort, no host sync.

    Bins: 0 skipped (-1), 1 + e expert e, E + 1 indices outside [-1, E) (sorted last, after offsets[E]).
    Memory (N, E + 2) int64: meant for the few experts of a router (E <= 8).
    """
    n_bins = num_experts + 2
    bins = torch.where((idx < -1) | (idx >= num_experts), num_experts + 1, idx + 1)  # (N,)
    onehot = (bins[:, None] == torch.arange(n_bins, device=idx.device)).long()  # (N, bins)
    rank = onehot.cumsum(0).gather(1, bins[:, None]).squeeze(1) - 1  # (N,) earlier tokens of the same bin
    counts = onehot.sum(0)  # (bins,)
    ends = counts.cumsum(0)  # (bins,) end of each bin in sorted order
    pos = (ends - counts).gather(0, bins) + rank  # (N,) sorted position of each token
    perm = torch.empty_like(pos).scatter_(0, pos, torch.arange(idx.shape[0], device=idx.device))
    return perm, ends[:num_experts + 1]


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
