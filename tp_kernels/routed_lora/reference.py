"""The definition of routed LoRA, in plain PyTorch.

Shapes (flattened tokens, stacked slices):
    x        (N, D_in)
    idx      (N,)               int, each in [0, E)
    lora_a   (E, S, R, D_in)    shrink weights, S slices (S = 3 for fused Q/K/V)
    lora_b   (E, S, D_out, R)   expand weights
    gate     (N,) or None       per-token multiplier
    returns  (N, S * D_out)     slice s at columns [s * D_out, (s + 1) * D_out)

y[n, s] = gate[n] * scale * lora_b[e, s] @ (lora_a[e, s] @ x[n]),  e = idx[n];  y[n] = 0 where idx[n] = -1
(a skipped token, which contributes to no gradient either).

Each token's expert weights are gathered, which wastes memory but is obviously
right; this is the spec the fast paths are tested against (use float64). The
per-token contractions are products reduced over their last dims, never a batched
GEMM, whose kernel choice would depend on N: a token's result is the same whatever
batch it is in.

:func:`forward` / :func:`backward` are the ``reference`` backend (the interface of torch.py), and what the
triton backend runs for float64.
"""

from __future__ import annotations

import torch

from .._grouping import group_by_expert
from .._validate import acc_dtype


def shrink(a, x):
    """a (N, S, R, D) per-token weights, x (N, D) -> (N, S, R) = a x per token, reduced over D."""
    return (a * x[:, None, None, :]).sum(-1)


def routed_lora_reference(x, idx, lora_a, lora_b, gate=None, scale=1.0):
    acc = acc_dtype(x.dtype)
    n_tok, n_slice, d_out = x.shape[0], lora_a.shape[1], lora_b.shape[2]
    live = (idx >= 0)[:, None]  # (N, 1): False for skipped tokens, whose inputs are never read
    a = lora_a.to(acc)[idx.clamp(min=0)]  # (N, S, R, D_in)
    b = lora_b.to(acc)[idx.clamp(min=0)]  # (N, S, D_out, R)
    h = shrink(a, torch.where(live, x.to(acc), 0))  # (N, S, R)
    y = (b * h[:, :, None, :]).sum(-1) * scale  # (N, S, D_out)
    if gate is not None:
        y = y * torch.where(live, gate.to(acc)[:, None], 0)[:, :, None]
    return y.reshape(n_tok, n_slice * d_out).to(x.dtype)


def routed_lora_backward_reference(grad_y, x, idx, lora_a, lora_b, gate=None, scale=1.0):
    """Gradients of :func:`routed_lora_reference`, written out (runs inside custom-op kernels,
    where autograd does not record). Returns (dx, da, db, dgate or None) in the inputs' dtypes."""
    acc = acc_dtype(x.dtype)
    n_exp, n_slice, rank, d_in = lora_a.shape
    d_out = lora_b.shape[2]
    live = (idx >= 0)[:, None]  # (N, 1): skipped tokens get and give no gradient; their inputs are never read
    xa = torch.where(live, x.to(acc), 0)
    idx = idx.clamp(min=0)
    a = lora_a.to(acc)[idx]  # (N, S, R, D_in)
    b = lora_b.to(acc)[idx]  # (N, S, D_out, R)
    gy = torch.where(live, grad_y.to(acc), 0).reshape(-1, n_slice, d_out)  # (N, S, D_out)
    m = (torch.full((x.shape[0],), float(scale), dtype=acc) if gate is None
         else torch.where(live[:, 0], gate.to(acc), 0) * scale)  # (N,)
    h = shrink(a, xa)  # (N, S, R)
    dhg = (gy[..., None] * b).sum(2)  # (N, S, R): d loss / d (m h)
    dh = dhg * m[:, None, None]
    dx = (dh[..., None] * a).sum((1, 2))  # (N, D_in)
    da = torch.zeros(n_exp, n_slice, rank, d_in, dtype=acc).index_add_(0, idx, torch.einsum("nsr,nd->nsrd", dh, xa))
    db = torch.zeros(n_exp, n_slice, d_out, rank, dtype=acc).index_add_(
        0, idx, torch.einsum("nso,nsr->nsor", gy, h * m[:, None, None])
    )
    dg = None if gate is None else ((dhg * h).sum((1, 2)) * scale).to(gate.dtype)
    return dx.to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype), dg


def forward(x, idx, lora_a, lora_b, gate, scale):
    """The backend interface (torch.py's forward) on the definition: y, h = A_e x, and the token grouping."""
    y = routed_lora_reference(x, idx, lora_a, lora_b, gate, scale)
    acc = acc_dtype(x.dtype)
    h = shrink(lora_a.to(acc)[idx.clamp(min=0)], torch.where((idx >= 0)[:, None], x.to(acc), 0))  # (N, S, R)
    return y, h.reshape(x.shape[0], lora_a.shape[1] * lora_a.shape[2]), *group_by_expert(idx, lora_a.shape[0])


def backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w, need_gate):
    """The backend interface (torch.py's backward) on :func:`routed_lora_backward_reference`."""
    dx, da, db, dg = routed_lora_backward_reference(grad_y, x, idx, lora_a, lora_b, gate, scale)
    return (dx if need_x else x.new_empty(0), da if need_w else x.new_empty(0),
            db if need_w else x.new_empty(0), dg if need_gate else x.new_empty(0))
