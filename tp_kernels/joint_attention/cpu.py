"""Joint attention through the compiled extension (csrc/attention.cpp), the ``cpu`` backend: fp32, each softmax row's
logsumexp kept for the backward; op.py registers it as custom ops."""

from __future__ import annotations

import torch

from .. import _ext


def _sources(qkv, context_q, context_k, context_v, dim):
    """The extension's 6 x (address, batch stride, row stride, rows) int64 table: q, k, v, each the vision rows of
    the fused qkv (N, T, 3D) then the context's (N, L, D) rows (none for a missing tensor)."""
    def rows(t, offset):
        if t is None:
            return [0, 0, 0, 0]
        return [t.data_ptr() + 4 * offset, t.stride(0), t.stride(1), t.shape[1]]

    table = []
    for part, context in enumerate((context_q, context_k, context_v)):
        table += rows(qkv, part * dim) + rows(context, 0)
    return torch.tensor(table, dtype=torch.int64)


def forward(qkv, context_q, context_k, context_v, num_heads):
    """-> out (N, T [+ L], D), lse (N, H, T [+ L]) float32: the logsumexp of each row of scaled scores."""
    n, t, three_d = qkv.shape
    dim = three_d // 3
    nq = t + (0 if context_q is None else context_q.shape[1])
    out = qkv.new_empty(n, nq, dim)
    lse = qkv.new_empty(n, num_heads, nq)
    src = _sources(qkv, context_q, context_k, context_v, dim)
    status = _ext.library().tp_attention_fwd(src.data_ptr(), n, num_heads, dim // num_heads,
                                             (dim // num_heads) ** -0.5, out.data_ptr(), lse.data_ptr(),
                                             torch.get_num_threads())
    _ext.check(status, "joint_attention")
    return out, lse


def backward(grad_out, qkv, context_q, context_k, context_v, out, lse, num_heads):
    """-> d qkv (N, T, 3D), d context_q, d context_k, d context_v (N, L, D; empty for a missing one)."""
    n, _, three_d = qkv.shape
    dim = three_d // 3
    context = (context_q, context_k, context_v)
    d_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    d_context = [None if c is None else torch.empty(c.shape, dtype=c.dtype) for c in context]
    src = _sources(qkv, *context, dim)
    dst = _sources(d_qkv, *d_context, dim)
    status = _ext.library().tp_attention_bwd(src.data_ptr(), dst.data_ptr(), n, num_heads, dim // num_heads,
                                             (dim // num_heads) ** -0.5, grad_out.data_ptr(), out.data_ptr(),
                                             lse.data_ptr(), torch.get_num_threads())
    _ext.check(status, "joint_attention backward")
    return (d_qkv, *(qkv.new_empty(0) if g is None else g for g in d_context))
