"""Top-1 gate in Triton (the ``triton`` backend): one kernel adds the noise, takes the argmax and the softmax, several rows per program.

Math in fp32 (fp64 for fp64 logits), the dtype of the weight buffer it writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import Launch, cdiv, next_power_of_2
from .._validate import acc_dtype


@triton.jit
def _gate_kernel(
    logits_ptr, noise_ptr, idx_ptr, weight_ptr, probs_ptr, n_rows, n_exp, tau,
    HAS_NOISE: tl.constexpr, HARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    acc = weight_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < n_rows
    col_ok = cols < n_exp
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_exp + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(acc)  # (BLOCK_N, BLOCK_E)
    if HAS_NOISE:
        z += tl.load(noise_ptr + offs, mask=mask, other=0.0).to(acc)
    z = tl.where(col_ok[None, :], z, float("-inf"))  # padded experts never win and get probability 0
    idx = tl.argmax(z, 1, tie_break_left=True)  # (BLOCK_N,) first maximal index, like torch.argmax
    zt = z / tau
    p = tl.exp(zt - tl.max(zt, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    tl.store(idx_ptr + rows, idx.to(tl.int64), mask=row_ok)
    if HARD:
        tl.store(weight_ptr + rows, tl.full((BLOCK_N,), 1.0, acc), mask=row_ok)
        tl.store(probs_ptr + offs, p, mask=mask)
    else:
        tl.store(weight_ptr + offs, p, mask=mask)


def gate_launch(logits, noise, tau, hard, idx, weight, probs):
    n_rows, n_exp = logits.shape
    block_e = next_power_of_2(n_exp)
    block_n = max(16, min(256, 4096 // block_e))  # ~4K elements per program
    return Launch(
        _gate_kernel, (cdiv(n_rows, block_n),),
        dict(logits_ptr=logits, noise_ptr=noise, idx_ptr=idx, weight_ptr=weight, probs_ptr=probs, n_rows=n_rows,
             n_exp=n_exp, tau=tau),
        dict(HAS_NOISE=noise is not None, HARD=hard, BLOCK_N=block_n, BLOCK_E=block_e),
        4, 1,
    )


def forward(logits, noise, tau, hard):
    """logits (N, E) -> idx (N,) int64, weight (N,) ones if hard else (N, E) probs, probs (N, E) or empty."""
    n_rows, n_exp = logits.shape
    acc = acc_dtype(logits.dtype)
    idx = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    probs = torch.empty(n_rows, n_exp, dtype=acc, device=logits.device)
    weight = torch.empty(n_rows, dtype=acc, device=logits.device) if hard else probs
    gate_launch(logits, noise, float(tau), hard, idx, weight, probs)()
    return idx, weight, (probs if hard else probs.new_empty(0))
