"""Routed LoRA in Triton: grouped GEMMs over a padded per-expert tile layout, no host sync.

Grouping (all on device, once per step: the backward reuses the forward's): a counting sort of the expert
indices -- per-block histograms, an exclusive scan and a stable scatter (_group_* kernels; one program when the
tokens are few, else two launches) -- gives ``perm`` and per-expert ``offsets``; expert ``e`` owns sorted
positions ``[offsets[e], offsets[e+1])``, split into tiles of ``BLOCK_M`` tokens (the layout of vLLM's
``moe_align_block_size``); skipped tokens (index -1) come first, ``[0, offsets[0])``. The launch grid is the
host-side upper bound on the tile count, so nothing is read back and every shape is fixed by N and E (a CUDA
graph can capture it); each program finds its (expert, rows) from ``offsets`` with a prefix sum over
``cdiv(count, BLOCK_M)`` and programs past the last tile exit at once. Kernels gather rows of x / grad_y
through ``perm`` and write each output row once, at its token position; a skipped token's rows are written
(zeros, or the base) by tiles of their own, so no output is zero-filled first.

Kernels (all matmuls are ``tl.dot`` with fp32 accumulators, so they run on
tensor cores: ``mma.sync`` on sm_80, ``wgmma`` where Triton picks it on sm_90):
    _fwd_kernel            grid (tiles, S):        h = A_e x, y = base + B_e (m h);  m = gate * scale
                                                   (also the refinement step's LoRA: x normalised in registers)
    _bwd_dh_kernel         grid (tiles, S):        dh = m B_e^T dy, and sum(B_e^T dy * h) per slice for dgate
    _bwd_dx_kernel         grid (tiles, D_in tiles): dx = sum_s A_e[s]^T dh_s, and dgate = scale * the slices' sum
    _weight_grad_kernel    grid (E * S, dA tiles + dB tiles): dA = sum dh x^T and dB = sum dy (m h)^T over the
                           expert's contiguous sorted rows, one program per output tile (x normalised as loaded
                           for the refinement step's LoRA)

Determinism: no atomics. Each output element is written by exactly one program, and a weight gradient's tile
sums its expert's rows in sorted order, fixed by the routing: every result is bit-reproducible. A token's own
outputs (y, h, dh, dx) depend on no other token: the reduction order over D_in / D_out / R is the same in every
tile.

Precision: fp16/bf16 operands, fp32 accumulation; the rank-R intermediate is
rounded to the input dtype before the second GEMM (as the CPU path does). fp32
operands follow torch's matmul setting (see :func:`tp_kernels._triton.precision`): TF32 when torch
allows it, else 3xTF32 (fp32-level accuracy on tensor cores); under the
interpreter full fp32 (``"ieee"``) so results match a float64 reference. fp64
falls back to the plain-PyTorch reference: it is a checking dtype, not a training one.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .._triton import Launch, cdiv, dot, next_power_of_2, precision
from .._validate import acc_dtype
from . import reference

MAX_RANK = 256


@triton.jit
def _expert_tiles(offsets_ptr, n_exp, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, SKIPPED: tl.constexpr = False):
    """Per segment (BLOCK_E,): its expert, first sorted row, tile count cdiv(count, BLOCK_M) and the tiles before
    it. The segments are the experts, preceded with SKIPPED by the skipped tokens' rows [0, offsets[0]) (expert -1)."""
    e = tl.arange(0, BLOCK_E)
    if SKIPPED:
        e -= 1
    lo = tl.load(offsets_ptr + e, mask=(e >= 0) & (e < n_exp), other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=(e >= -1) & (e < n_exp), other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    return e, lo, hi, tiles, tile_end


@triton.jit
def _locate_tile(offsets_ptr, n_exp, pid, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, SKIPPED: tl.constexpr = False):
    """Tile ``pid`` of the grouped layout: (expert, first sorted row, end of the expert's rows); expert >= n_exp
    if there is no such tile, -1 for a tile of skipped tokens (SKIPPED: see _expert_tiles)."""
    e, lo, hi, tiles, tile_end = _expert_tiles(offsets_ptr, n_exp, BLOCK_E, BLOCK_M, SKIPPED)
    segment = tl.sum((tile_end <= pid).to(tl.int32), 0)
    mine = tl.arange(0, BLOCK_E) == segment
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row_lo = tl.sum(tl.where(mine, lo, 0), 0) + (pid - first_tile) * BLOCK_M
    row_hi = tl.sum(tl.where(mine, hi, 0), 0)
    if SKIPPED:
        segment -= 1
    return segment, row_lo, row_hi


@triton.jit
def _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr):
    """m = gate[tok] * scale, (BLOCK_M,) fp32."""
    if HAS_GATE:
        return tl.load(gate_ptr + tok, mask=row_ok, other=0.0).to(tl.float32) * scale
    return tl.full((BLOCK_M,), scale, tl.float32)


@triton.jit
def _fwd_kernel(
    x_ptr, mean_ptr, rstd_ptr, perm_ptr, offsets_ptr, a_ptr, b_ptr, gate_ptr, base_ptr, y_ptr, h_ptr,
    d_in, d_out, rank, n_exp, n_slice, scale,
    NORMALIZE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """h = A_e x', y = base + B_e (m h) with m = gate * scale; x' = x, or LN(x) = rstd (x - mean) if NORMALIZE.

    Routed LoRA (NORMALIZE off, the gate optional) and the refinement step's LoRA (NORMALIZE and the base on)
    are this one kernel. The LayerNorm is folded: each loaded tile of x is centred in registers and the
    (BLOCK_M, R) accumulator scaled by rstd, so LN(x) is never stored.
    """
    expert, row_lo, row_hi = _locate_tile(offsets_ptr, n_exp, tl.program_id(0), BLOCK_E, BLOCK_M, True)
    if expert >= n_exp:
        return
    s = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)  # (BLOCK_M,) int64 token ids
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    hw = n_slice * rank
    yw = n_slice * d_out
    if expert < 0:  # skipped tokens: h = 0, y = base (or 0), so no output needs zero-filling first
        tl.store(h_ptr + tok[:, None] * hw + s * rank + r[None, :], tl.zeros((BLOCK_M, BLOCK_R), tl.float32),
                 mask=row_ok[:, None] & r_ok[None, :])
        for n0 in range(0, d_out, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            out = tok[:, None] * yw + s * d_out + n[None, :]
            mask = row_ok[:, None] & (n < d_out)[None, :]
            y = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if HAS_BASE:
                y += tl.load(base_ptr + out, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + out, y.to(dt), mask=mask)
        return
    if NORMALIZE:
        mean = tl.load(mean_ptr + tok, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + tok, mask=row_ok, other=0.0)
    es = expert.to(tl.int64) * n_slice + s

    # h = x' A^T over D_in: (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)
    a_base = a_ptr + es * rank * d_in
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < d_in
        mask = row_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_ptr + tok[:, None] * d_in + k[None, :], mask=mask, other=0.0)
        if NORMALIZE:
            xt = tl.where(mask, xt.to(tl.float32) - mean[:, None], 0.0).to(dt)
        at = tl.load(a_base + r[None, :] * d_in + k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        h = dot(xt, at, h, PRECISION)
    if NORMALIZE:
        h = h * rstd[:, None]
    tl.store(h_ptr + tok[:, None] * hw + s * rank + r[None, :], h, mask=row_ok[:, None] & r_ok[None, :])

    # y = base + (m h) B^T over D_out: (BLOCK_M, BLOCK_R) @ (BLOCK_R, BLOCK_N), one output tile at a time
    m = _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE, BLOCK_M)
    hm = (h * m[:, None]).to(dt)
    b_base = b_ptr + es * d_out * rank
    for n0 in range(0, d_out, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < d_out
        bt = tl.load(b_base + n[None, :] * rank + r[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        y = dot(hm, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
        out = tok[:, None] * yw + s * d_out + n[None, :]
        mask = row_ok[:, None] & n_ok[None, :]
        if HAS_BASE:
            y += tl.load(base_ptr + out, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + out, y.to(dt), mask=mask)


@triton.jit
def _bwd_dh_kernel(
    dy_ptr, perm_ptr, offsets_ptr, b_ptr, gate_ptr, h_ptr, dh_ptr, dgp_ptr,
    d_out, rank, n_exp, n_slice, scale,
    HAS_GATE: tl.constexpr, NEED_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert, row_lo, row_hi = _locate_tile(offsets_ptr, n_exp, tl.program_id(0), BLOCK_E, BLOCK_M)
    if expert >= n_exp:
        return
    s = tl.program_id(1)
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    b_base = b_ptr + (expert.to(tl.int64) * n_slice + s) * d_out * rank
    yw = n_slice * d_out

    # dhg = dy B over D_out: (BLOCK_M, BLOCK_N) @ (BLOCK_N, BLOCK_R); the grad w.r.t. (m h)
    dhg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < d_out
        dy = tl.load(dy_ptr + tok[:, None] * yw + s * d_out + n[None, :], mask=row_ok[:, None] & n_ok[None, :],
                     other=0.0)
        bt = tl.load(b_base + n[:, None] * rank + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        dhg = dot(dy.to(bt.dtype), bt, dhg, PRECISION)
    hw = n_slice * rank
    hmask = row_ok[:, None] & r_ok[None, :]
    if NEED_GATE:
        h = tl.load(h_ptr + tok[:, None] * hw + s * rank + r[None, :], mask=hmask, other=0.0)
        tl.store(dgp_ptr + tok * n_slice + s, tl.sum(dhg * h, 1), mask=row_ok)
    m = _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE, BLOCK_M)
    tl.store(dh_ptr + tok[:, None] * hw + s * rank + r[None, :], dhg * m[:, None], mask=hmask)


@triton.jit
def _bwd_dx_kernel(
    dh_ptr, perm_ptr, offsets_ptr, a_ptr, dx_ptr, dgp_ptr, dgate_ptr,
    d_in, rank, n_exp, n_slice, scale,
    NEED_X: tl.constexpr, NEED_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = sum_s dh_s A_e[s], the rank reduced in steps of BLOCK_R (all of it, or chunks for wide operands); and
    (NEED_GATE, the first column of programs) d gate = scale * sum_s dgp_s. Skipped tokens' rows get zeros."""
    expert, row_lo, row_hi = _locate_tile(offsets_ptr, n_exp, tl.program_id(0), BLOCK_E, BLOCK_M, True)
    if expert >= n_exp:
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    if NEED_GATE:
        if tl.program_id(1) == 0:
            sl = tl.arange(0, BLOCK_S)
            dgp = tl.load(dgp_ptr + tok[:, None] * n_slice + sl[None, :],
                          mask=row_ok[:, None] & (sl < n_slice)[None, :] & (expert >= 0), other=0.0)
            tl.store(dgate_ptr + tok, (tl.sum(dgp, 1) * scale).to(dgate_ptr.dtype.element_ty), mask=row_ok)
    if NEED_X:
        dt = dx_ptr.dtype.element_ty
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < d_in
        hw = n_slice * rank
        # (BLOCK_M, BLOCK_R) @ (BLOCK_R, BLOCK_N) per slice and rank step; none for skipped tokens (dx = 0)
        dx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, tl.where(expert >= 0, n_slice, 0)):
            for r0 in range(0, rank, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < rank
                dh = tl.load(dh_ptr + tok[:, None] * hw + s * rank + r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                             other=0.0)
                a = tl.load(a_ptr + ((expert.to(tl.int64) * n_slice + s) * rank + r[:, None]) * d_in + n[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                dx = dot(dh.to(dt), a, dx, PRECISION)
        tl.store(dx_ptr + tok[:, None] * d_in + n[None, :], dx.to(dt), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _outer_tile(u_ptr, v_ptr, perm_ptr, gate_ptr, mean_ptr, rstd_ptr, row_lo, row_hi, s, p, q, u_stride, u_slice,
                v_stride, v_slice, p_dim, q_dim, scale, dt, SCALE_V: tl.constexpr, NORMALIZE_V: tl.constexpr,
                HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_Q: tl.constexpr):
    """sum over sorted rows [row_lo, row_hi) of u[n, s, p]^T v[n, s, q] (v times m_n if SCALE_V; v normalised,
    rstd_n (v - mean_n) in fp32, if NORMALIZE_V), fp32 (BLOCK_P, BLOCK_Q).

    u[n, s] = u_ptr[n * u_stride + s * u_slice + p], likewise v; both multiplied in the weights' dtype ``dt``."""
    p_ok = p < p_dim
    q_ok = q < q_dim
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_hi
        tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)
        u = tl.load(u_ptr + tok[:, None] * u_stride + s * u_slice + p[None, :], mask=row_ok[:, None] & p_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_P)
        v_ok = row_ok[:, None] & q_ok[None, :]
        v = tl.load(v_ptr + tok[:, None] * v_stride + s * v_slice + q[None, :], mask=v_ok, other=0.0)  # (BLOCK_M, BLOCK_Q)
        if NORMALIZE_V:
            mean = tl.load(mean_ptr + tok, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + tok, mask=row_ok, other=0.0)
            v = tl.where(v_ok, (v.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if SCALE_V:
            v = v * _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE, BLOCK_M)[:, None]
        acc = dot(tl.trans(u.to(dt)), v.to(dt), acc, PRECISION)
    return acc


@triton.jit
def _weight_grad_kernel(
    dh_ptr, x_ptr, mean_ptr, rstd_ptr, dy_ptr, h_ptr, perm_ptr, offsets_ptr, gate_ptr, da_ptr, db_ptr,
    d_in, d_out, rank, n_slice, scale,
    NORMALIZE: tl.constexpr, HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dA_e[s] (R, D_in) = sum dh x'^T and dB_e[s] (D_out, R) = sum dy (m h)^T over expert e's tokens; x' = x, or
    with NORMALIZE LN(x) = rstd (x - mean) from the forward's statistics (the refinement step's LoRA: LN(x) is
    normalised as loaded, never stored).

    Program (e * S + s, tile): tiles [0, dA tiles) of dA_e[s], then dB_e[s]'s. The expert's tokens are a contiguous
    run of sorted rows, reduced in order by the one program that owns the output tile and written once in the
    weights' dtype: no partials, no atomics, bit-reproducible. An expert without tokens gets zeros.
    """
    es = tl.program_id(0)
    expert = es // n_slice
    s = es % n_slice
    row_lo = tl.load(offsets_ptr + expert)
    row_hi = tl.load(offsets_ptr + expert + 1)
    dt = x_ptr.dtype.element_ty
    r_tiles = tl.cdiv(rank, BLOCK_R)
    a_tiles = r_tiles * tl.cdiv(d_in, BLOCK_D)
    t = tl.program_id(1)
    # (names differ between the branches: Triton merges a name assigned in both, and the tiles' shapes differ)
    if t < a_tiles:
        ra = (t % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        ka = (t // r_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
        da = _outer_tile(dh_ptr, x_ptr, perm_ptr, gate_ptr, mean_ptr, rstd_ptr, row_lo, row_hi, s, ra, ka,
                         n_slice * rank, rank, d_in, 0, rank, d_in, scale, dt, False, NORMALIZE, HAS_GATE, PRECISION,
                         BLOCK_M, BLOCK_R, BLOCK_D)
        tl.store(da_ptr + (es.to(tl.int64) * rank + ra[:, None]) * d_in + ka[None, :], da.to(dt),
                 mask=(ra < rank)[:, None] & (ka < d_in)[None, :])
    else:
        tb = t - a_tiles
        nb = (tb // r_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
        rb = (tb % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        db = _outer_tile(dy_ptr, h_ptr, perm_ptr, gate_ptr, mean_ptr, rstd_ptr, row_lo, row_hi, s, nb, rb,
                         n_slice * d_out, d_out, n_slice * rank, rank, d_out, rank, scale, dt, True, False, HAS_GATE,
                         PRECISION, BLOCK_M, BLOCK_D, BLOCK_R)
        tl.store(db_ptr + (es.to(tl.int64) * d_out + nb[:, None]) * rank + rb[None, :], db.to(dt),
                 mask=(nb < d_out)[:, None] & (rb < rank)[None, :])

@triton.jit
def _group_onehot(idx_ptr, start, n_tok, n_exp, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """Tokens [start, start + BLOCK): their ids (BLOCK,) and bins one-hot (BLOCK, BLOCK_B) int32 (see _group_bins);
    rows past the end are all zero."""
    tok = start + tl.arange(0, BLOCK)
    live = tok < n_tok
    i = tl.load(idx_ptr + tok, mask=live, other=-1).to(tl.int32)
    b = tl.where((i < -1) | (i >= n_exp), BLOCK_B - 1, i + 1)
    onehot = ((b[:, None] == tl.arange(0, BLOCK_B)[None, :]) & live[:, None]).to(tl.int32)
    return tok, onehot


@triton.jit
def _group_count_kernel(idx_ptr, counts_ptr, n_tok, n_exp, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """counts[block] (BLOCK_B,) = the histogram of one block of tokens."""
    pid = tl.program_id(0)
    _, onehot = _group_onehot(idx_ptr, pid * BLOCK, n_tok, n_exp, BLOCK, BLOCK_B)
    tl.store(counts_ptr + pid * BLOCK_B + tl.arange(0, BLOCK_B), tl.sum(onehot, 0))


@triton.jit
def _group_scatter_block(idx_ptr, perm_ptr, start, base, n_tok, n_exp, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """perm[base[bin] + rank of the token among its bin's tokens in the block] = token; -> the block's histogram."""
    tok, onehot = _group_onehot(idx_ptr, start, n_tok, n_exp, BLOCK, BLOCK_B)
    rank = tl.cumsum(onehot, 0) - 1  # (BLOCK, BLOCK_B) stable: earlier tokens first
    pos = tl.sum(onehot * (rank + base[None, :]), 1)
    tl.store(perm_ptr + pos, tok.to(tl.int64), mask=tok < n_tok)
    return tl.sum(onehot, 0)


@triton.jit
def _group_scatter_kernel(
    idx_ptr, counts_ptr, perm_ptr, offsets_ptr, ok_ptr, n_tok, n_exp, n_blocks,
    INLINE: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The counting sort's scan and scatter. INLINE: one program counts all tokens, then scatters block by block;
    else block ``pid`` scatters its tokens after the tokens of its bin in earlier blocks (_group_count_kernel's
    histograms). Every position is written once and the order is fixed by the indices: deterministic."""
    pid = tl.program_id(0)
    bins = tl.arange(0, BLOCK_B)
    total = tl.zeros((BLOCK_B,), tl.int32)
    before = tl.zeros((BLOCK_B,), tl.int32)  # tokens of each bin in earlier blocks
    if INLINE:
        for s0 in range(0, n_tok, BLOCK):
            _, onehot = _group_onehot(idx_ptr, s0, n_tok, n_exp, BLOCK, BLOCK_B)
            total += tl.sum(onehot, 0)
    else:
        for b0 in range(0, n_blocks, BLOCK_P):
            blk = b0 + tl.arange(0, BLOCK_P)
            cnt = tl.load(counts_ptr + blk[:, None] * BLOCK_B + bins[None, :], mask=(blk < n_blocks)[:, None],
                          other=0)
            total += tl.sum(cnt, 0)
            before += tl.sum(tl.where((blk < pid)[:, None], cnt, 0), 0)
    ends = tl.cumsum(total, 0)  # (BLOCK_B,) end of each bin in sorted order
    if pid == 0:
        # offsets[e] = skipped + tokens of experts before e = the end of bin e
        tl.store(offsets_ptr + bins, ends.to(tl.int64), mask=bins <= n_exp)
        if CHECK:
            tl.store(ok_ptr, tl.sum(tl.where(bins == BLOCK_B - 1, total, 0), 0) == 0)
    if INLINE:
        for s0 in range(0, n_tok, BLOCK):
            before += _group_scatter_block(idx_ptr, perm_ptr, s0, ends - total + before, n_tok, n_exp, BLOCK,
                                           BLOCK_B)
    else:
        _group_scatter_block(idx_ptr, perm_ptr, pid * BLOCK, ends - total + before, n_tok, n_exp, BLOCK, BLOCK_B)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch shape of one kernel."""

    BLOCK_M: int
    BLOCK_N: int = 0  # output columns per step (forward D_out, dh D_out chunk, dx D_in tile); outer: BLOCK_Q
    BLOCK_K: int = 0  # forward: D_in step; dx: rank step; outer: the rank tile
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=64)
def _tiles(rank, dtype, precision):
    """Per-kernel tiles, chosen so every kernel compiles without spills on sm_80 and sm_90a at the benchmark
    shapes up to DiT-XL (tests/test_triton_aot.py). The rank is padded to a power of two >= 16 (tl.dot's
    minimum) and kept whole in registers, so large ranks and the wide fp32 operands (2x bf16's registers,
    4x for tf32x3's head/tail split) get smaller row tiles or more warps."""
    block_r = max(16, next_power_of_2(rank))
    wide = dtype == torch.float32
    split = precision == "tf32x3"
    big_r = block_r >= 128
    if split:
        fwd = Tiles(BLOCK_M=32 if big_r else 64, BLOCK_N=16 if big_r else 32, BLOCK_K=32, num_warps=8, num_stages=2)
        dh = Tiles(BLOCK_M=32 if big_r else 64, BLOCK_N=32, num_warps=8, num_stages=2)
        dx = Tiles(BLOCK_M=64, BLOCK_N=32 if big_r else 64, BLOCK_K=min(block_r, 32), num_warps=8, num_stages=2)
        outer = Tiles(BLOCK_M=32, BLOCK_N=32, BLOCK_K=min(block_r, 64), num_warps=8, num_stages=2)
    else:
        block = 32 if block_r > 128 else 64
        heavy = big_r or wide
        warps, stages = (8, 2) if heavy else (4, 3)
        fwd = Tiles(BLOCK_M=block, BLOCK_N=block, BLOCK_K=64, num_warps=warps, num_stages=stages)
        dh = Tiles(BLOCK_M=block, BLOCK_N=block, num_warps=warps, num_stages=stages)
        # the dx accumulator is (BLOCK_M, BLOCK_N) whatever the rank, but a whole rank of 128 in bf16 operands
        # sits at 255 registers on sm_90a with 4 warps: 8 there
        dx = Tiles(BLOCK_M=block, BLOCK_N=block, BLOCK_K=min(block_r, 64) if wide else block_r,
                   num_warps=8 if big_r else 4, num_stages=stages)
        # a weight-gradient tile rereads its expert's rows for every tile: the whole rank up to 128 per tile
        # (16-bit operands; 128 x 128 spills on sm_80) cuts that traffic by a quarter against 64 x 64
        outer = (Tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(block_r, 128), num_warps=8, num_stages=3) if not wide else
                 Tiles(BLOCK_M=block, BLOCK_N=block, BLOCK_K=min(block_r, 64), num_warps=warps, num_stages=stages))
    return dict(BLOCK_R=block_r, fwd=fwd, dh=dh, dx=dx, outer=outer)


def _max_tiles(n_tok, n_exp, block_m):
    """Upper bound on sum_e cdiv(count_e, BLOCK_M), known on the host without reading the counts."""
    return min(n_tok, (n_tok + n_exp * (block_m - 1)) // block_m)


# Tokens per block of the grouping kernels; up to GROUP_INLINE tokens one program groups them all (one launch).
GROUP_BLOCK = 1024
GROUP_INLINE = 8192


def _group_bins(n_exp):
    """Bins of the counting sort: 0 skipped (-1), 1 + e expert e, the last one out-of-range indices."""
    return next_power_of_2(n_exp + 2)


@functools.lru_cache(maxsize=256)
def _group_plan(n_tok, n_exp, block, inline_max):
    bins = _group_bins(n_exp)
    block = min(block, 8192 // bins)  # the (block, bins) one-hot and its scan in registers: 16 bins spill at 1024
    blocks = max(1, cdiv(n_tok, block))
    inline = n_tok <= inline_max
    return blocks, inline, dict(BLOCK=block, BLOCK_B=bins), dict(INLINE=inline, BLOCK=block, BLOCK_B=bins, BLOCK_P=16)


def group_launches(idx, n_exp, perm, offsets, counts, ok=None):
    """The counting sort's launches: per-block histograms (``counts`` (blocks, bins) int32 scratch), then the
    exclusive scan and the stable scatter into ``perm`` (N,) and ``offsets`` (E+1,); one launch when the
    tokens are few enough for one program. ``ok`` (1,) bool: written True iff every index is in [-1, E)."""
    n_tok = idx.shape[0]
    blocks, inline, count, scatter = _group_plan(n_tok, n_exp, GROUP_BLOCK, GROUP_INLINE)
    launches = [] if inline else [Launch(_group_count_kernel, (blocks,),
                                         dict(idx_ptr=idx, counts_ptr=counts, n_tok=n_tok, n_exp=n_exp), count, 4, 1)]
    launches.append(Launch(
        _group_scatter_kernel, (1 if inline else blocks,),
        dict(idx_ptr=idx, counts_ptr=counts, perm_ptr=perm, offsets_ptr=offsets, ok_ptr=ok, n_tok=n_tok,
             n_exp=n_exp, n_blocks=blocks),
        dict(scatter, CHECK=ok is not None), 8, 1,  # 8 warps: the one-hot and its scan stay in registers
    ))
    return launches


def group_on_device(idx, n_exp, ok=None):
    """idx (N,) -> perm (N,) int64 with idx[perm] stably sorted, offsets (E+1,) int64: a counting sort on device,
    no sync, shapes fixed by N and E. Skipped tokens (index -1) come first and precede offsets[0]; indices
    outside [-1, E) come last, after offsets[E]: no tile covers either. ``ok``: see :func:`group_launches`."""
    n_tok = idx.shape[0]
    perm = torch.empty(n_tok, dtype=torch.int64, device=idx.device)
    offsets = torch.empty(n_exp + 1, dtype=torch.int64, device=idx.device)
    blocks, inline, _, _ = _group_plan(n_tok, n_exp, GROUP_BLOCK, GROUP_INLINE)
    counts = None if inline else torch.empty(blocks, _group_bins(n_exp), dtype=torch.int32, device=idx.device)
    for launch in group_launches(idx, n_exp, perm, offsets, counts, ok):
        launch()
    return perm, offsets


def forward_launch(x, perm, offsets, lora_a, lora_b, gate, scale, y, h, *, mean=None, rstd=None, base=None):
    """The forward kernel: routed LoRA, or with ``mean`` / ``rstd`` (and ``base``) the refinement step's LoRA."""
    n_tok, d_in = x.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    prec = precision(x.dtype)
    cfg = _tiles(rank, x.dtype, prec)
    t = cfg["fwd"]
    return Launch(
        _fwd_kernel, (_max_tiles(n_tok, n_exp + 1, t.BLOCK_M), n_slice),  # the experts' tiles and the skipped rows'
        dict(x_ptr=x, mean_ptr=mean, rstd_ptr=rstd, perm_ptr=perm, offsets_ptr=offsets, a_ptr=lora_a, b_ptr=lora_b,
             gate_ptr=gate, base_ptr=base, y_ptr=y, h_ptr=h, d_in=d_in, d_out=lora_b.shape[2], rank=rank,
             n_exp=n_exp, n_slice=n_slice, scale=scale),
        dict(NORMALIZE=mean is not None, HAS_GATE=gate is not None, HAS_BASE=base is not None, PRECISION=prec,
             BLOCK_E=next_power_of_2(n_exp + 1), BLOCK_M=t.BLOCK_M, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=t.BLOCK_K,
             BLOCK_N=t.BLOCK_N),
        t.num_warps, t.num_stages,
    )


def backward_launches(grad_y, x, perm, offsets, lora_a, lora_b, gate, h, scale, dh, dgp, dx, da, db, dgate=None, *,
                      mean=None, rstd=None):
    """Launches for the needed grads: dh (and the gate's per-slice partials dgp) first, then dx and d gate
    (one kernel), then dA and dB (one kernel) from dh.

    dgp (N, S) fp32 scratch, dgate (N,), dx, da, db are None when not needed (da and db together); dh (N, S*R)
    fp32 scratch is always computed. The gate's gradient needs no gate: without one it is the gradient of a unit
    gate. ``mean`` / ``rstd`` (N,): the LoRA's input was LN(x) (the refinement step's), dA reads x normalised.
    """
    n_tok, d_in = x.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    prec = precision(x.dtype)
    cfg = _tiles(rank, x.dtype, prec)
    br = cfg["BLOCK_R"]
    t = cfg["dh"]
    launches = [Launch(
        _bwd_dh_kernel, (_max_tiles(n_tok, n_exp, t.BLOCK_M), n_slice),
        dict(dy_ptr=grad_y, perm_ptr=perm, offsets_ptr=offsets, b_ptr=lora_b, gate_ptr=gate, h_ptr=h, dh_ptr=dh,
             dgp_ptr=dgp, d_out=d_out, rank=rank, n_exp=n_exp, n_slice=n_slice, scale=scale),
        dict(HAS_GATE=gate is not None, NEED_GATE=dgp is not None, PRECISION=prec,
             BLOCK_E=next_power_of_2(n_exp), BLOCK_M=t.BLOCK_M, BLOCK_R=br, BLOCK_N=t.BLOCK_N),
        t.num_warps, t.num_stages,
    )]
    if dx is not None or dgate is not None:
        t = cfg["dx"]
        launches.append(Launch(
            _bwd_dx_kernel,
            (_max_tiles(n_tok, n_exp + 1, t.BLOCK_M), cdiv(d_in, t.BLOCK_N) if dx is not None else 1),
            dict(dh_ptr=dh, perm_ptr=perm, offsets_ptr=offsets, a_ptr=lora_a, dx_ptr=dx, dgp_ptr=dgp,
                 dgate_ptr=dgate, d_in=d_in, rank=rank, n_exp=n_exp, n_slice=n_slice, scale=scale),
            dict(NEED_X=dx is not None, NEED_GATE=dgate is not None, PRECISION=prec,
                 BLOCK_E=next_power_of_2(n_exp + 1), BLOCK_M=t.BLOCK_M, BLOCK_R=t.BLOCK_K, BLOCK_N=t.BLOCK_N,
                 BLOCK_S=next_power_of_2(n_slice)),
            t.num_warps, t.num_stages,
        ))
    if da is not None:
        t = cfg["outer"]
        tiles = cdiv(rank, t.BLOCK_K) * (cdiv(d_in, t.BLOCK_N) + cdiv(d_out, t.BLOCK_N))
        launches.append(Launch(
            _weight_grad_kernel, (n_exp * n_slice, tiles),
            dict(dh_ptr=dh, x_ptr=x, mean_ptr=mean, rstd_ptr=rstd, dy_ptr=grad_y, h_ptr=h, perm_ptr=perm,
                 offsets_ptr=offsets, gate_ptr=gate, da_ptr=da, db_ptr=db, d_in=d_in, d_out=d_out, rank=rank,
                 n_slice=n_slice, scale=scale),
            dict(NORMALIZE=mean is not None, HAS_GATE=gate is not None, PRECISION=prec, BLOCK_M=t.BLOCK_M,
                 BLOCK_R=t.BLOCK_K, BLOCK_D=t.BLOCK_N),
            t.num_warps, t.num_stages,
        ))
    return launches


def check_rank(lora_a):
    """The kernels keep a whole rank in registers: up to MAX_RANK."""
    if lora_a.shape[2] > MAX_RANK:
        raise ValueError(f"the triton backend supports rank <= {MAX_RANK}, got lora_a with rank {lora_a.shape[2]}")


def forward(x, idx, lora_a, lora_b, gate, scale):
    """x (N, D_in), idx (N,), lora_a (E, S, R, D_in), lora_b (E, S, D_out, R)
    -> y (N, S*D_out) in x.dtype, h (N, S*R) fp32 (= A_e x, unscaled, token order), perm (N,), offsets (E+1,)."""
    n_exp = lora_a.shape[0]
    # indices outside [-1, E) are grouped after every expert, so no kernel reads out of bounds; on CUDA a
    # device-side assert on the grouping's flag reports them (CPU tensors are checked by the caller)
    ok = torch.empty(1, dtype=torch.bool, device=x.device) if x.device.type == "cuda" else None
    perm, offsets = group_on_device(idx, n_exp, ok)
    if ok is not None:
        torch._assert_async(ok, f"expert_idx must lie in [-1, {n_exp}) (-1: skip the token)")
    if x.dtype == torch.float64:
        return (*reference.forward(x, idx, lora_a, lora_b, gate, scale)[:2], perm, offsets)
    check_rank(lora_a)
    n_tok = x.shape[0]
    _, n_slice, rank, _ = lora_a.shape
    y = x.new_empty(n_tok, n_slice * lora_b.shape[2])  # every row written: skipped tokens' by their own tiles
    h = x.new_empty(n_tok, n_slice * rank, dtype=acc_dtype(x.dtype))
    forward_launch(x, perm, offsets, lora_a, lora_b, gate, scale, y, h)()
    return y, h, perm, offsets


def backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w, need_gate):
    """Gradients for forward(), with its grouping (perm, offsets); unneeded ones come back as empty tensors."""
    need_gate = need_gate and gate is not None
    if x.dtype == torch.float64:
        dx, da, db, dg = reference.backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale,
                                               need_x, need_w, need_gate)
        return _outputs(x, dx if need_x else None, da if need_w else None, db if need_w else None,
                        dg if need_gate else None)
    check_rank(lora_a)
    grad_y = grad_y.to(x.dtype)
    n_tok = x.shape[0]
    n_exp, n_slice, rank, d_in = lora_a.shape
    dh = x.new_empty(n_tok, n_slice * rank, dtype=torch.float32)  # m * B_e^T dy, token order
    dgp = x.new_empty(n_tok, n_slice, dtype=torch.float32) if need_gate else None  # per-slice sum(B^T dy * h)
    dgate = torch.empty_like(gate) if need_gate else None
    dx = torch.empty_like(x) if need_x else None  # every row written: skipped tokens' by their own tiles
    da = torch.empty_like(lora_a) if need_w else None
    db = torch.empty_like(lora_b) if need_w else None
    for launch in backward_launches(grad_y, x, perm, offsets, lora_a, lora_b, gate, h, scale, dh, dgp, dx, da, db,
                                    dgate):
        launch()
    return _outputs(x, dx, da, db, dgate)


def _outputs(x, *grads):
    """A fresh empty tensor per missing grad: custom-op outputs must not alias one another."""
    return tuple(x.new_empty(0) if g is None else g for g in grads)
