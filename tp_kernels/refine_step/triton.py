"""The refinement step in Triton (the ``triton`` backend): two forward kernels, no host sync, LN(state) never written.

    _stats_gate_kernel  grid (token blocks,):  one read of the state per token block gives the LayerNorm
                        statistics, the gate's token logits (folded through the normalisation), the conditioning
                        rows and the noise, the argmax and the softmax: writes idx, probs, mean, rstd.
    (grouping)          routed_lora.triton.group_on_device: a counting sort on device (one launch up to 8192
                        tokens), its inactive tokens (index -1) first, covered by tiles of their own.
    routed_lora.triton._fwd_kernel with NORMALIZE and HAS_BASE, grid (expert tiles, S): the three Q/K/V slices
                        in one launch, the LayerNorm folded into the shrink, the base added in the expand's
                        epilogue, each output row written once.

LayerNorm folding. ``A_e LN(a) = rstd * A_e (a - mean)``: the shrink centres each loaded tile of ``a`` in
registers and scales the (BLOCK_M, R) accumulator by rstd, so LN(a) is never stored. (The algebraically equal
``rstd * (A_e a - mean * A_e 1)`` would cancel catastrophically in bf16/TF32 when |mean| >> std.) Likewise
the gate's token term is ``rstd * ((a - c) W^T - (mean - c) W 1)`` with c a per-row shift (the row's first
element) that keeps the one-pass sums from cancelling.

With normalize=False (state already is LN(a)) the stats kernel stores mean 0, rstd 1 and the same kernels
compute the step on the state as given.

The gate's E logits per token are too few for tensor cores (tl.dot needs 16 columns), so that product runs in
fp32 on CUDA cores, one expert's row of W at a time (``_expert_row``); the kernel is bound by its one read of the
state anyway.

Backward (:func:`backward`), no LN(state) recomputed: the forward's statistics (N,) are saved, and
routed_lora.triton's three backward kernels (dh; dx with the unit gate's gradient; dA with dB, dA normalising
x as it loads it) run on them; then one kernel per token block for the rest:
    _gate_ln_bwd_kernel grid (token blocks,): the straight-through gate gradient d logits (N, E), the token
                        term's d LN(a) (+= d logits W, never stored), the LayerNorm backward (row sums in a first
                        sweep, d state in a second) and the block's part of d token_weight = d logits^T LN(a)
                        (fp32, (token blocks, E, D)), instead of ~8 torch ops, an in-place GEMM and a LayerNorm.
d token_weight is the parts' sum and the per-group d cond_logits a sum of d logits: one torch reduction each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import Launch, cdiv, next_power_of_2
from .._validate import acc_dtype
from ..routed_lora import triton as _lora
from . import reference


@triton.jit
def _expert_row(w_ptr, j, k, k_ok, dim, n_exp):
    """Columns ``k`` of row ``j`` of the gate's token weight W (E, D) in fp32, zeros for a padded expert j >= E.

    The token term's products with W run one expert at a time as 2-D multiply-adds. The 3-D form
    ``tl.sum(a[:, :, None] * w[None, :, :], 1)`` is rewritten by Triton before 3.8 into a TF32 ``tt.dot``
    whose inner dimension (the experts, < 8) is too short for the tensor core: the padding it gets there counts
    the term twice (3.6.0), or the compile crashes (3.2.0). No Triton version turns this form into a dot
    (tests/test_triton_aot.py checks it).
    """
    return tl.load(w_ptr + j * dim + k, mask=k_ok & (j < n_exp), other=0.0).to(tl.float32)


@triton.jit
def _stats_gate_kernel(
    x_ptr, w_ptr, cond_ptr, noise_ptr, idx_ptr, weight_ptr, probs_ptr, mean_ptr, rstd_ptr,
    n_tok, dim, n_exp, group_size, tau, eps,
    NORMALIZE: tl.constexpr, HAS_W: tl.constexpr, HAS_COND: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tok
    x_row = x_ptr + rows.to(tl.int64)[:, None] * dim
    e = tl.arange(0, BLOCK_E)
    e_ok = e < n_exp
    shift = tl.load(x_ptr + rows.to(tl.int64) * dim, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_T,)
    s1 = tl.zeros((BLOCK_T,), tl.float32)  # sum of (a - shift)
    s2 = tl.zeros((BLOCK_T,), tl.float32)  # sum of (a - shift)^2
    xw = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)  # (a - shift) W^T
    w1 = tl.zeros((BLOCK_E,), tl.float32)  # W 1
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < dim
        mask = row_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_row + k[None, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_K)
        xc = tl.where(mask, xt - shift[:, None], 0.0)
        s1 += tl.sum(xc, 1)
        s2 += tl.sum(xc * xc, 1)
        if HAS_W:
            for j in tl.static_range(BLOCK_E):  # one expert's row of W at a time: see _expert_row
                wj = _expert_row(w_ptr, j, k, k_ok, dim, n_exp)  # (BLOCK_K,)
                xw += tl.where(e[None, :] == j, tl.sum(xc * wj[None, :], 1)[:, None], 0.0)
                w1 += tl.where(e == j, tl.sum(wj, 0), 0.0)
    if NORMALIZE:
        mean_c = s1 / dim  # mean - shift
        var = tl.maximum(s2 / dim - mean_c * mean_c, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
    else:  # h = a: mean 0, rstd 1 (the LoRA kernel then centres by 0 and scales by 1)
        mean_c = -shift
        rstd = tl.full((BLOCK_T,), 1.0, tl.float32)
    tl.store(mean_ptr + rows, shift + mean_c, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    z = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    if HAS_W:
        z = rstd[:, None] * (xw - mean_c[:, None] * w1[None, :])  # LN(a) W^T
    mask = row_ok[:, None] & e_ok[None, :]
    if HAS_COND:
        group = (rows // group_size).to(tl.int64)
        z += tl.load(cond_ptr + group[:, None] * n_exp + e[None, :], mask=mask, other=0.0).to(tl.float32)
    offs = rows.to(tl.int64)[:, None] * n_exp + e[None, :]
    if HAS_NOISE:
        z += tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(e_ok[None, :], z, float("-inf"))  # padded experts never win and get probability 0
    idx = tl.argmax(z, 1, tie_break_left=True)  # first maximal index, like torch.argmax
    zt = z / tau
    p = tl.exp(zt - tl.max(zt, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    tl.store(idx_ptr + rows, idx.to(tl.int64), mask=row_ok)
    tl.store(weight_ptr + rows, tl.full((BLOCK_T,), 1.0, tl.float32), mask=row_ok)
    tl.store(probs_ptr + offs, p, mask=mask)


@triton.jit
def _xhat_tile(x_ptr, offs, mask, mean, rstd):
    """LN(a) on a (BLOCK_T, BLOCK_K) tile, fp32, from the forward's statistics (mean 0, rstd 1: a itself)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _grad_tile(dh_ptr, w_ptr, offs, mask, k, k_ok, dlogits, e, dim, n_exp, HAS_W: tl.constexpr,
               BLOCK_E: tl.constexpr):
    """g = d loss / d LN(a) (the LoRA's part + dlogits W) on a (BLOCK_T, BLOCK_K) tile, fp32."""
    g = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        for j in tl.static_range(BLOCK_E):  # g += dlogits W, one expert at a time: see _expert_row
            dj = tl.sum(tl.where(e[None, :] == j, dlogits, 0.0), 1)  # (BLOCK_T,) column j, loop-invariant
            g += dj[:, None] * _expert_row(w_ptr, j, k, k_ok, dim, n_exp)[None, :]
    return g


@triton.jit
def _gate_ln_bwd_kernel(
    dh_ptr, dgate_ptr, gw_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, probs_ptr, idx_ptr, dlogits_ptr, dx_ptr, dtw_ptr,
    n_tok, dim, n_exp, tau,
    NORMALIZE: tl.constexpr, HAS_GW: tl.constexpr, HAS_W: tl.constexpr, NEED_LOGITS: tl.constexpr,
    NEED_STATE: tl.constexpr, NEED_TW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tok
    e = tl.arange(0, BLOCK_E)
    e_ok = e < n_exp
    dlogits = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    if NEED_LOGITS:
        # weight = 1 + p_sel - sg(p_sel): d weight / d z_j = p_sel (onehot_j - p_j) / tau
        dw = tl.load(dgate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_T,)
        if HAS_GW:
            dw += tl.load(gw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        emask = row_ok[:, None] & e_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * n_exp + e[None, :]
        p = tl.load(probs_ptr + offs, mask=emask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_E)
        chosen = e[None, :] == tl.load(idx_ptr + rows, mask=row_ok, other=0)[:, None]
        p_sel = tl.sum(tl.where(chosen, p, 0.0), 1)
        dlogits = (dw * p_sel)[:, None] * (chosen.to(tl.float32) - p) / tau
        tl.store(dlogits_ptr + offs, dlogits, mask=emask)
    if NEED_STATE or NEED_TW:
        # d a = rstd (g - mean(g) - xhat mean(g xhat)) over the row: the row sums in a first sweep, d a in the
        # second (without the LayerNorm, d a = g: one sweep, with c1 = c2 = 0, mean 0 and rstd 1); the second
        # also writes this block's part of d token_weight = d logits^T LN(a), expert by expert
        c1 = tl.zeros((BLOCK_T,), tl.float32)
        c2 = tl.zeros((BLOCK_T,), tl.float32)
        mean = tl.zeros((BLOCK_T,), tl.float32)
        rstd = tl.full((BLOCK_T,), 1.0, tl.float32)
        x_row = rows.to(tl.int64)[:, None] * dim
        if NORMALIZE:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            if NEED_STATE:
                for k0 in range(0, dim, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < dim
                    mask = row_ok[:, None] & k_ok[None, :]
                    g = _grad_tile(dh_ptr, w_ptr, x_row + k[None, :], mask, k, k_ok, dlogits, e, dim, n_exp, HAS_W,
                                   BLOCK_E)
                    c1 += tl.sum(g, 1)
                    c2 += tl.sum(g * _xhat_tile(x_ptr, x_row + k[None, :], mask, mean, rstd), 1)
                c1 = c1 / dim
                c2 = c2 / dim
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < dim
            mask = row_ok[:, None] & k_ok[None, :]
            xhat = _xhat_tile(x_ptr, x_row + k[None, :], mask, mean, rstd)
            if NEED_STATE:
                g = _grad_tile(dh_ptr, w_ptr, x_row + k[None, :], mask, k, k_ok, dlogits, e, dim, n_exp, HAS_W,
                               BLOCK_E)
                dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
                tl.store(dx_ptr + x_row + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_TW:
                for j in tl.static_range(BLOCK_E):  # a 2-D product per expert (see _expert_row)
                    dj = tl.sum(tl.where(e[None, :] == j, dlogits, 0.0), 1)  # (BLOCK_T,)
                    tl.store(dtw_ptr + (pid.to(tl.int64) * n_exp + j) * dim + k, tl.sum(dj[:, None] * xhat, 0),
                             mask=k_ok & (j < n_exp))


def _row_blocks(n_exp):
    """(BLOCK_T, BLOCK_K, BLOCK_E) of the per-token-block kernels: the (T, E, K) product ~8K fp32 per program."""
    block_e = max(2, next_power_of_2(n_exp))
    block_t = 32 if block_e <= 8 else 16
    return block_t, max(8, min(64, 8192 // (block_t * block_e))), block_e


def stats_gate_launch(state, token_weight, cond_logits, noise, tau, eps, normalize, idx, weight, probs, mean, rstd):
    n_tok, dim = state.shape
    n_exp = probs.shape[1]
    block_t, block_k, block_e = _row_blocks(n_exp)
    groups = 0 if cond_logits is None else cond_logits.shape[0]
    return Launch(
        _stats_gate_kernel, (cdiv(n_tok, block_t),),
        dict(x_ptr=state, w_ptr=token_weight, cond_ptr=cond_logits, noise_ptr=noise, idx_ptr=idx, weight_ptr=weight,
             probs_ptr=probs, mean_ptr=mean, rstd_ptr=rstd, n_tok=n_tok, dim=dim, n_exp=n_exp,
             group_size=max(1, n_tok // groups) if groups else 1, tau=tau, eps=eps),
        dict(NORMALIZE=normalize, HAS_W=token_weight is not None, HAS_COND=cond_logits is not None,
             HAS_NOISE=noise is not None, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_E=block_e),
        4, 1,
    )


def forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize, active=None):
    """state (N, D) -> qkv (N, S*D_out), weight (N,) ones, idx (N,) int64, probs (N, E), lora_h (N, S*R) fp32,
    the LoRA's grouping perm (N,), offsets (E+1,), and the LayerNorm's mean, rstd (N,) fp32 (empty if not
    normalize)."""
    if state.dtype == torch.float64:
        return reference.forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps,
                                 normalize, active)
    _lora.check_rank(lora_a)
    n_tok = state.shape[0]
    n_exp, n_slice, rank, _ = lora_a.shape
    acc = acc_dtype(state.dtype)
    dev = state.device
    idx = torch.empty(n_tok, dtype=torch.int64, device=dev)
    weight = torch.empty(n_tok, dtype=acc, device=dev)
    probs = torch.empty(n_tok, n_exp, dtype=acc, device=dev)
    mean = torch.empty(n_tok, dtype=acc, device=dev)
    rstd = torch.empty(n_tok, dtype=acc, device=dev)
    y = state.new_empty(n_tok, n_slice * lora_b.shape[2])
    h = state.new_empty(n_tok, n_slice * rank, dtype=acc)
    stats_gate_launch(state, token_weight, cond_logits, noise, float(tau), float(eps), normalize, idx, weight, probs,
                      mean, rstd)()
    if active is not None:  # inactive tokens: expert -1, weight 0; their own tiles write qkv = base or 0
        idx = torch.where(active, idx, -1)
        weight = active.to(acc)
    perm, offsets = _lora.group_on_device(idx, n_exp)
    if not normalize:  # the state is used as given, and the backward needs no statistics
        mean, rstd = mean.new_empty(0), rstd.new_empty(0)
    stats = dict(mean=mean, rstd=rstd) if normalize else {}
    _lora.forward_launch(state, perm, offsets, lora_a, lora_b, None, float(scale), y, h, base=base,
                         **stats)()  # the gate weight is exactly 1 forward: no multiplier
    return y, weight, idx, probs, h, perm, offsets, mean, rstd


def gate_ln_bwd_launch(dh, dgate, grad_weight, state, mean, rstd, token_weight, probs, idx, tau, dlogits, d_state,
                       d_tw_parts=None):
    """The fused gate + LayerNorm backward; dlogits / d_state / d_tw_parts (token blocks, E, D) fp32 None when not
    needed (then not written); mean / rstd None when the step did not normalise (no LayerNorm backward)."""
    n_tok, dim = state.shape
    block_t, block_k, block_e = _row_blocks(probs.shape[1])
    need_logits = dlogits is not None
    return Launch(
        _gate_ln_bwd_kernel, (cdiv(n_tok, block_t),),
        dict(dh_ptr=dh, dgate_ptr=dgate if need_logits else None, gw_ptr=grad_weight if need_logits else None,
             x_ptr=state, mean_ptr=mean, rstd_ptr=rstd, w_ptr=token_weight, probs_ptr=probs, idx_ptr=idx,
             dlogits_ptr=dlogits, dx_ptr=d_state, dtw_ptr=d_tw_parts, n_tok=n_tok, dim=dim, n_exp=probs.shape[1],
             tau=tau),
        dict(NORMALIZE=mean is not None, HAS_GW=need_logits and grad_weight is not None,
             HAS_W=need_logits and token_weight is not None and d_state is not None,
             NEED_LOGITS=need_logits, NEED_STATE=d_state is not None, NEED_TW=d_tw_parts is not None,
             BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_E=block_e),
        4, 1,
    )


def backward(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean,
             rstd, n_groups, tau, scale, eps, normalize, need_state, need_w, need_token_weight, need_cond):
    """Gradients of forward() -> (d state, dA, dB, d token_weight, d cond (G, E) fp32); unneeded ones empty.

    The LoRA's backward kernels read LN(state) through the forward's statistics (dA normalises as it loads);
    the LoRA's gate is a unit one (its gradient without a multiplier); the fused gate + LayerNorm kernel gives
    d logits, d state and per-token-block parts of d token_weight, summed here in one reduction."""
    if state.dtype == torch.float64:
        return reference.backward(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h,
                                  perm, offsets, mean, rstd, n_groups, tau, scale, eps, normalize, need_state, need_w,
                                  need_token_weight, need_cond)
    _lora.check_rank(lora_a)
    n_tok, dim = state.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    acc = probs.dtype
    need_tw = need_token_weight and token_weight is not None
    need_logits = need_cond or need_tw or (need_state and token_weight is not None)
    stats = dict(mean=mean, rstd=rstd) if normalize else dict(mean=None, rstd=None)
    dh_r = state.new_empty(n_tok, n_slice * rank, dtype=torch.float32)  # m * B_e^T dy, token order
    dgp = state.new_empty(n_tok, n_slice, dtype=torch.float32) if need_logits else None
    dgate = state.new_empty(n_tok, dtype=acc) if need_logits else None
    dh = torch.empty_like(state) if need_state else None  # d LN(state) through the LoRA
    da = torch.empty_like(lora_a) if need_w else None
    db = torch.empty_like(lora_b) if need_w else None
    for launch in _lora.backward_launches(grad_qkv.to(state.dtype), state, perm, offsets, lora_a, lora_b, None,
                                          lora_h, float(scale), dh_r, dgp, dh, da, db, dgate, **stats):
        launch()
    dlogits = torch.empty_like(probs) if need_logits else None
    d_state = torch.empty_like(state) if need_state else None
    block_t = _row_blocks(n_exp)[0]
    d_tw_parts = state.new_empty(cdiv(n_tok, block_t), n_exp, dim, dtype=torch.float32) if need_tw else None
    if need_logits or need_state:
        gate_ln_bwd_launch(dh, dgate, grad_weight, state, stats["mean"], stats["rstd"], token_weight, probs, idx,
                           float(tau), dlogits, d_state, d_tw_parts)()
    d_cond = dlogits.view(n_groups, n_tok // n_groups if n_groups else 0, n_exp).sum(1) if need_cond else None
    d_tw = d_tw_parts.sum(0).to(token_weight.dtype) if need_tw else None
    return tuple(state.new_empty(0) if g is None else g for g in (d_state, da, db, d_tw, d_cond))
