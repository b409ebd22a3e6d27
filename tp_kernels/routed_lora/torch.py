"""Routed LoRA with composed torch ops: the ``torch`` backend, the path of any device without Triton (the
per-token-weight reference would materialise (N, S, R, D) weights), and the ``cpu`` backend's path where the
extension is not built or does not take the dtype (cpu.py).

Tokens are grouped by expert once (stable sort), gathered into one contiguous
buffer, and each expert runs two GEMMs on its contiguous slice (in fixed
row blocks, :func:`mm_rows`, so a token's result never depends on the batch); the gate and
scale are applied on the rank-R intermediate, which is D_out/R times cheaper
than scaling the output.  Offsets are read on the host: free for CPU tensors,
one sync per call on other devices (CUDA with Triton never comes here).
"""

from __future__ import annotations

import torch

from .._grouping import group_by_expert, mm_rows
from .._validate import acc_dtype


def _token_scale(gate, perm, scale):
    """(n, 1) float32 multipliers in grouped order, or None when it is all ones."""
    if gate is None:
        return None
    return (gate.index_select(0, perm).to(acc_dtype(gate.dtype)) * scale)[:, None]


def forward(x, idx, lora_a, lora_b, gate, scale):
    """x (N, D_in), idx (N,), lora_a (E, S, R, D_in), lora_b (E, S, D_out, R)
    -> y (N, S*D_out) in x.dtype, h (N, S*R) in acc_dtype (= A_e x, unscaled, token order), perm, offsets."""
    n_tok, d_in = x.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    perm, offsets = group_by_expert(idx, n_exp)
    bounds = offsets.tolist()  # free on CPU; one sync elsewhere (see the docstring)
    xs = x.index_select(0, perm)  # (N, D_in) grouped
    hs = x.new_empty(n_tok, n_slice * rank)
    ys = x.new_empty(n_tok, n_slice, d_out)
    hs[:bounds[0]] = 0  # skipped tokens (index -1): no compute, zero output
    ys[:bounds[0]] = 0
    mult = _token_scale(gate, perm, scale)
    for e in range(n_exp):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        hs[lo:hi] = mm_rows(xs[lo:hi], lora_a[e].reshape(n_slice * rank, d_in).t())  # (n, S*R)
        h = hs[lo:hi]
        if mult is not None:
            h = h * mult[lo:hi].to(h.dtype)
        elif scale != 1.0:
            h = h * scale
        h = h.view(-1, n_slice, rank)
        for s in range(n_slice):
            ys[lo:hi, s] = mm_rows(h[:, s], lora_b[e, s].t())  # (n, D_out)
    y = x.new_empty(n_tok, n_slice * d_out)
    y.index_copy_(0, perm, ys.view(n_tok, n_slice * d_out))
    h_tok = x.new_empty(n_tok, n_slice * rank, dtype=acc_dtype(x.dtype))
    h_tok.index_copy_(0, perm, hs.to(h_tok.dtype))
    return y, h_tok, perm, offsets


def backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w, need_gate):
    """Gradients for forward(), with its grouping; unneeded ones come back as empty tensors."""
    n_tok, d_in = x.shape
    n_exp, n_slice, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    wdt = lora_a.dtype
    bounds = offsets.tolist()  # free on CPU; one sync elsewhere (see the docstring)
    gy = grad_y.index_select(0, perm).view(n_tok, n_slice, d_out)  # (N, S, D_out)
    acc = acc_dtype(x.dtype)
    hs = h.index_select(0, perm).view(n_tok, n_slice, rank)  # (N, S, R) acc
    mult = _token_scale(gate, perm, scale)
    if mult is None:
        mult = x.new_full((n_tok, 1), float(scale), dtype=acc)
    xs = x.index_select(0, perm) if need_w else None
    dxs = x.new_empty(n_tok, d_in) if need_x else None
    if need_x:
        dxs[:bounds[0]] = 0  # skipped tokens
    da = torch.zeros_like(lora_a) if need_w else None
    db = torch.zeros_like(lora_b) if need_w else None
    dgs = x.new_zeros(n_tok, dtype=acc) if need_gate else None
    for e in range(n_exp):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        u = gy[lo:hi].to(wdt)  # (n, S, D_out)
        m = mult[lo:hi]  # (n, 1)
        dhg = torch.stack([mm_rows(u[:, s], lora_b[e, s]) for s in range(n_slice)], 1).to(acc)  # (n, S, R)
        # d loss / d (m h)
        if need_gate:
            dgs[lo:hi] = (dhg * hs[lo:hi]).sum((1, 2)) * scale  # y = B (g * scale * h)
        dh = (dhg * m[:, :, None]).to(wdt)  # (n, S, R)
        if need_w:
            hg = (hs[lo:hi] * m[:, :, None]).to(wdt)  # (n, S, R)
            db[e] = torch.einsum("nso,nsr->sor", u, hg)
            da[e] = torch.einsum("nsr,nd->srd", dh, xs[lo:hi])
        if need_x:
            dxs[lo:hi] = mm_rows(dh.reshape(hi - lo, n_slice * rank), lora_a[e].reshape(n_slice * rank, d_in))
    dx = x.new_empty(0)
    if need_x:
        dx = torch.empty_like(dxs)
        dx.index_copy_(0, perm, dxs)
    dg = x.new_empty(0)
    if need_gate:
        dg = gate.new_empty(n_tok)
        dg.index_copy_(0, perm, dgs.to(gate.dtype))
    # distinct empties: custom-op outputs may not alias each other
    return dx, (da if need_w else x.new_empty(0)), (db if need_w else x.new_empty(0)), dg
