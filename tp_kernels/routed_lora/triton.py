"""Routed LoRA in Triton: grouped GEMMs over a padded per-expert tile layout, no host sync.

Grouping (all on device): a stable sort of the expert indices gives ``perm`` and
``searchsorted`` gives per-expert ``offsets``; expert ``e`` owns sorted positions
``[offsets[e], offsets[e+1])``, split into tiles of ``BLOCK_M`` tokens (the
layout of vLLM's ``moe_align_block_size``). The launch grid is the host-side
upper bound on the tile count, so nothing is read back; each program finds its
(expert, rows) from ``offsets`` with a prefix sum over ``cdiv(count, BLOCK_M)``
and programs past the last tile exit at once. Kernels gather rows of x / grad_y
through ``perm`` and write each output row once, at its token position.

Kernels (all matmuls are ``tl.dot`` with fp32 accumulators, so they run on
tensor cores: ``mma.sync`` on sm_80, ``wgmma`` where Triton picks it on sm_90):
    _fwd_kernel          grid (tiles, S):          h = A_e x, y = B_e (m h);  m = gate * scale
    _bwd_dh_kernel       grid (tiles, S):          dh = m B_e^T dy, and sum(B_e^T dy * h) for dgate
    _bwd_dx_kernel       grid (tiles, D_in tiles): dx = sum_s A_e[s]^T dh_s
    _expert_outer_kernel grid (E*S, P, Q tiles):   dA_e[s] = sum dh x^T,  dB_e[s] = sum dy (m h)^T

Determinism: no atomics. Each output element is written by exactly one program,
and dA / dB reduce over their expert's tokens in sorted (stable) order.

Precision: fp16/bf16 operands, fp32 accumulation; the rank-R intermediate is
rounded to the input dtype before the second GEMM (as the CPU path does). fp32
operands follow torch's matmul setting: ``torch.backends.cuda.matmul.allow_tf32``
(``torch.set_float32_matmul_precision("high")``) selects TF32 tensor cores,
otherwise (torch's default, and under the interpreter) ``input_precision="ieee"``
keeps full fp32 so results match a float64 reference. fp64 falls back to the
plain-PyTorch reference: it is a checking dtype, not a training one.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpret
from .._validate import acc_dtype

MAX_RANK = 256
# Triton 3.8's interpreter runs tl.dot as np.matmul on the raw storage, which is uint16 for bf16.
# There, bf16 operands are widened to fp32 first: exact (a bf16 product fits in fp32), only the
# summation order can differ from the tensor-core result. Compiled kernels never take this branch.
_WIDEN_BF16_DOT = tl.constexpr(triton_interpret())


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation, on tensor cores when compiled."""
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _locate_tile(offsets_ptr, n_exp, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's tile: (expert, first sorted row, end of the expert's rows); expert >= n_exp if none."""
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    lo = tl.load(offsets_ptr + e, mask=e < n_exp, other=0)  # (BLOCK_E,)
    hi = tl.load(offsets_ptr + e + 1, mask=e < n_exp, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_end <= pid).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row_lo = tl.sum(tl.where(mine, lo, 0), 0) + (pid - first_tile) * BLOCK_M
    row_hi = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row_lo, row_hi


@triton.jit
def _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr):
    """m = gate[tok] * scale, (BLOCK_M,) fp32."""
    if HAS_GATE:
        return tl.load(gate_ptr + tok, mask=row_ok, other=0.0).to(tl.float32) * scale
    return tl.full((BLOCK_M,), scale, tl.float32)


@triton.jit
def _fwd_kernel(
    x_ptr, perm_ptr, offsets_ptr, a_ptr, b_ptr, gate_ptr, y_ptr, h_ptr,
    d_in, d_out, rank, n_exp, n_slice, scale,
    HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert, row_lo, row_hi = _locate_tile(offsets_ptr, n_exp, BLOCK_E, BLOCK_M)
    if expert >= n_exp:
        return
    s = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)  # (BLOCK_M,) int64 token ids
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    es = expert.to(tl.int64) * n_slice + s

    # h = x A^T over D_in: (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)
    a_base = a_ptr + es * rank * d_in
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < d_in
        xt = tl.load(x_ptr + tok[:, None] * d_in + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_base + r[None, :] * d_in + k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        h = _dot(xt, at, h, PRECISION)
    hw = n_slice * rank
    tl.store(h_ptr + tok[:, None] * hw + s * rank + r[None, :], h, mask=row_ok[:, None] & r_ok[None, :])

    # y = (m h) B^T over D_out: (BLOCK_M, BLOCK_R) @ (BLOCK_R, BLOCK_N), one output tile at a time
    m = _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE, BLOCK_M)
    hm = (h * m[:, None]).to(dt)
    b_base = b_ptr + es * d_out * rank
    yw = n_slice * d_out
    for n0 in range(0, d_out, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < d_out
        bt = tl.load(b_base + n[None, :] * rank + r[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        y = _dot(hm, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
        tl.store(y_ptr + tok[:, None] * yw + s * d_out + n[None, :], y.to(dt), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_dh_kernel(
    dy_ptr, perm_ptr, offsets_ptr, b_ptr, gate_ptr, h_ptr, dh_ptr, dgp_ptr,
    d_out, rank, n_exp, n_slice, scale,
    HAS_GATE: tl.constexpr, NEED_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert, row_lo, row_hi = _locate_tile(offsets_ptr, n_exp, BLOCK_E, BLOCK_M)
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
        dhg = _dot(dy.to(bt.dtype), bt, dhg, PRECISION)
    hw = n_slice * rank
    hmask = row_ok[:, None] & r_ok[None, :]
    if NEED_GATE:
        h = tl.load(h_ptr + tok[:, None] * hw + s * rank + r[None, :], mask=hmask, other=0.0)
        tl.store(dgp_ptr + tok * n_slice + s, tl.sum(dhg * h, 1), mask=row_ok)
    m = _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE, BLOCK_M)
    tl.store(dh_ptr + tok[:, None] * hw + s * rank + r[None, :], dhg * m[:, None], mask=hmask)


@triton.jit
def _bwd_dx_kernel(
    dh_ptr, perm_ptr, offsets_ptr, a_ptr, dx_ptr,
    d_in, rank, n_exp, n_slice,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert, row_lo, row_hi = _locate_tile(offsets_ptr, n_exp, BLOCK_E, BLOCK_M)
    if expert >= n_exp:
        return
    dt = dx_ptr.dtype.element_ty
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_in
    hw = n_slice * rank

    # dx = sum_s dh_s A_e[s]: (BLOCK_M, BLOCK_R) @ (BLOCK_R, BLOCK_N)
    dx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, n_slice):
        dh = tl.load(dh_ptr + tok[:, None] * hw + s * rank + r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                     other=0.0)
        a = tl.load(a_ptr + ((expert.to(tl.int64) * n_slice + s) * rank + r[:, None]) * d_in + n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        dx = _dot(dh.to(dt), a, dx, PRECISION)
    tl.store(dx_ptr + tok[:, None] * d_in + n[None, :], dx.to(dt), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _expert_outer_kernel(
    u_ptr, v_ptr, perm_ptr, offsets_ptr, gate_ptr, out_ptr,
    u_stride, u_slice, v_stride, v_slice, p_dim, q_dim, n_slice, scale,
    SCALE_V: tl.constexpr, HAS_GATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[e, s] (P, Q) = sum over expert e's tokens n, in sorted order, of u[n, s]^T v[n, s] (times m_n if SCALE_V).

    u[n, s] = u_ptr[n * u_stride + s * u_slice + p], likewise v; one program per (e, s, P tile, Q tile).
    """
    es = tl.program_id(0)
    expert = es // n_slice
    s = es % n_slice
    dt = out_ptr.dtype.element_ty
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = p < p_dim
    q_ok = q < q_dim
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)
        u = tl.load(u_ptr + tok[:, None] * u_stride + s * u_slice + p[None, :], mask=row_ok[:, None] & p_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_P)
        v = tl.load(v_ptr + tok[:, None] * v_stride + s * v_slice + q[None, :], mask=row_ok[:, None] & q_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_Q)
        if SCALE_V:
            v = v * _token_mult(gate_ptr, tok, row_ok, scale, HAS_GATE, BLOCK_M)[:, None]
        acc = _dot(tl.trans(u.to(dt)), v.to(dt), acc, PRECISION)
    tl.store(out_ptr + (es.to(tl.int64) * p_dim + p[:, None]) * q_dim + q[None, :], acc.to(dt),
             mask=p_ok[:, None] & q_ok[None, :])


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch, described before it runs (so ahead-of-time compiles see the same configs)."""

    kernel: object
    grid: tuple
    args: dict  # runtime arguments by name: tensors, ints, floats, or None for an absent pointer
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self):
        # every kernel indexes its tensors as dense row-major arrays: a strided view would be read out of bounds
        for name, value in self.args.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                raise ValueError(f"{self.kernel.__name__}: {name} must be contiguous, got strides {value.stride()}")
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)


def _precision(dtype):
    """tl.dot input_precision: only fp32 operands have a choice (None = Triton's default for the dtype)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _blocks(rank, dtype):
    """Tile sizes: rank padded to a power of two >= 16 (tl.dot's minimum); picked for 0 spills (see _aot)."""
    block_r = max(16, triton.next_power_of_2(rank))
    # Many registers per thread: (64, R >= 128) fp32 accumulators, or fp32 operands (twice bf16's registers; on
    # 4 warps the fp32 forward spilled on sm_80 at R=16). Spread them over 8 warps, with fewer pipeline stages.
    heavy = block_r >= 128 or dtype == torch.float32
    block = 32 if block_r > 128 else 64
    return dict(BLOCK_M=block, BLOCK_R=block_r, BLOCK_N=block, num_warps=8 if heavy else 4,
                num_stages=2 if heavy else 3)


def _max_tiles(n_tok, n_exp, block_m):
    """Upper bound on sum_e cdiv(count_e, BLOCK_M), known on the host without reading the counts."""
    return min(n_tok, (n_tok + n_exp * (block_m - 1)) // block_m)


def group_on_device(idx, n_exp):
    """idx (N,) -> perm (N,) with idx[perm] sorted (stable), offsets (E+1,): all device ops, no sync."""
    perm = torch.argsort(idx, stable=True)
    bounds = torch.arange(n_exp + 1, device=idx.device, dtype=idx.dtype)
    offsets = torch.searchsorted(idx.index_select(0, perm), bounds)  # (E+1,) first sorted row of each expert
    return perm, offsets


def forward_launches(x, perm, offsets, lora_a, lora_b, gate, scale, y, h):
    n_tok, d_in = x.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    cfg = _blocks(rank, x.dtype)
    grid = (_max_tiles(n_tok, n_exp, cfg["BLOCK_M"]), n_slice)
    return [Launch(
        _fwd_kernel, grid,
        dict(x_ptr=x, perm_ptr=perm, offsets_ptr=offsets, a_ptr=lora_a, b_ptr=lora_b, gate_ptr=gate, y_ptr=y,
             h_ptr=h, d_in=d_in, d_out=d_out, rank=rank, n_exp=n_exp, n_slice=n_slice, scale=scale),
        dict(HAS_GATE=gate is not None, PRECISION=_precision(x.dtype), BLOCK_E=triton.next_power_of_2(n_exp),
             BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=64, BLOCK_N=cfg["BLOCK_N"]),
        cfg["num_warps"], cfg["num_stages"],
    )]


def backward_launches(grad_y, x, perm, offsets, lora_a, lora_b, gate, h, scale, dh, dgp, dx, da, db):
    """Launches for the needed grads: dh (and dgate partials dgp) first, then dx / dA / dB from dh.

    dgp, dx, da, db are None when not needed; dh (N, S*R) fp32 scratch is always computed.
    """
    n_tok, d_in = x.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    cfg = _blocks(rank, x.dtype)
    prec = _precision(x.dtype)
    bm, br, bn = cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["BLOCK_N"]
    tiles = _max_tiles(n_tok, n_exp, bm)
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    block_e = triton.next_power_of_2(n_exp)
    launches = [Launch(
        _bwd_dh_kernel, (tiles, n_slice),
        dict(dy_ptr=grad_y, perm_ptr=perm, offsets_ptr=offsets, b_ptr=lora_b, gate_ptr=gate, h_ptr=h, dh_ptr=dh,
             dgp_ptr=dgp, d_out=d_out, rank=rank, n_exp=n_exp, n_slice=n_slice, scale=scale),
        dict(HAS_GATE=gate is not None, NEED_GATE=dgp is not None, PRECISION=prec, BLOCK_E=block_e,
             BLOCK_M=bm, BLOCK_R=br, BLOCK_N=bn),
        warps, stages,
    )]
    if dx is not None:
        launches.append(Launch(
            _bwd_dx_kernel, (tiles, triton.cdiv(d_in, bn)),
            dict(dh_ptr=dh, perm_ptr=perm, offsets_ptr=offsets, a_ptr=lora_a, dx_ptr=dx, d_in=d_in, rank=rank,
                 n_exp=n_exp, n_slice=n_slice),
            dict(PRECISION=prec, BLOCK_E=block_e, BLOCK_M=bm, BLOCK_R=br, BLOCK_N=bn),
            4, stages,  # its accumulator is (BLOCK_M, BLOCK_N) whatever the rank: 4 warps suffice
        ))
    if da is not None:
        common = dict(perm_ptr=perm, offsets_ptr=offsets, gate_ptr=gate, n_slice=n_slice, scale=scale)
        # dA_e[s] (R, D_in) = sum_n dh_n,s x_n^T
        launches.append(Launch(
            _expert_outer_kernel, (n_exp * n_slice, 1, triton.cdiv(d_in, bn)),
            dict(u_ptr=dh, v_ptr=x, out_ptr=da, u_stride=n_slice * rank, u_slice=rank, v_stride=d_in, v_slice=0,
                 p_dim=rank, q_dim=d_in, **common),
            dict(SCALE_V=False, HAS_GATE=gate is not None, PRECISION=prec, BLOCK_M=bm, BLOCK_P=br, BLOCK_Q=bn),
            warps, stages,
        ))
        # dB_e[s] (D_out, R) = sum_n dy_n,s (m_n h_n,s)^T
        launches.append(Launch(
            _expert_outer_kernel, (n_exp * n_slice, triton.cdiv(d_out, bn), 1),
            dict(u_ptr=grad_y, v_ptr=h, out_ptr=db, u_stride=n_slice * d_out, u_slice=d_out,
                 v_stride=n_slice * rank, v_slice=rank, p_dim=d_out, q_dim=rank, **common),
            dict(SCALE_V=True, HAS_GATE=gate is not None, PRECISION=prec, BLOCK_M=bm, BLOCK_P=bn, BLOCK_Q=br),
            warps, stages,
        ))
    return launches


def _check(lora_a):
    if lora_a.shape[2] > MAX_RANK:
        raise ValueError(f"the triton backend supports rank <= {MAX_RANK}, got lora_a with rank {lora_a.shape[2]}")


def _reference():
    from .op import _Reference  # imported late: op imports this module on first use

    return _Reference


def forward(x, idx, lora_a, lora_b, gate, scale):
    """x (N, D_in), idx (N,), lora_a (E, S, R, D_in), lora_b (E, S, D_out, R)
    -> y (N, S*D_out) in x.dtype, h (N, S*R) fp32 (= A_e x, unscaled, token order)."""
    if x.dtype == torch.float64:
        return _reference().forward(x, idx, lora_a, lora_b, gate, scale)
    _check(lora_a)
    n_tok = x.shape[0]
    n_exp, n_slice, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    y = x.new_empty(n_tok, n_slice * d_out)
    h = x.new_empty(n_tok, n_slice * rank, dtype=acc_dtype(x.dtype))
    perm, offsets = group_on_device(idx, n_exp)
    for launch in forward_launches(x, perm, offsets, lora_a, lora_b, gate, scale, y, h):
        launch()
    return y, h


def backward(grad_y, x, idx, lora_a, lora_b, gate, h, scale, need_x, need_w, need_gate):
    """Gradients for forward(); unneeded ones come back as empty tensors."""
    need_gate = need_gate and gate is not None
    if x.dtype == torch.float64:
        dx, da, db, dg = _reference().backward(grad_y, x, idx, lora_a, lora_b, gate, h, scale, need_x, need_w,
                                               need_gate)
        return _outputs(x, dx if need_x else None, da if need_w else None, db if need_w else None,
                        dg if need_gate else None)
    _check(lora_a)
    n_tok = x.shape[0]
    n_exp, n_slice, rank, _ = lora_a.shape
    perm, offsets = group_on_device(idx, n_exp)
    dh = x.new_empty(n_tok, n_slice * rank, dtype=torch.float32)  # m * B_e^T dy, token order
    dgp = x.new_empty(n_tok, n_slice, dtype=torch.float32) if need_gate else None  # per-slice sum(B^T dy * h)
    dx = torch.empty_like(x) if need_x else None
    da = torch.empty_like(lora_a) if need_w else None
    db = torch.empty_like(lora_b) if need_w else None
    for launch in backward_launches(grad_y, x, perm, offsets, lora_a, lora_b, gate, h, scale, dh, dgp, dx, da, db):
        launch()
    dgate = (dgp.sum(1) * scale).to(gate.dtype) if need_gate else None  # (N,) summed over slices
    return _outputs(x, dx, da, db, dgate)


def _outputs(x, *grads):
    """A fresh empty tensor per missing grad: custom-op outputs must not alias one another."""
    return tuple(x.new_empty(0) if g is None else g for g in grads)
