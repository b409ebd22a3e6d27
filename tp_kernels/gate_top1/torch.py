"""Top-1 gate with composed torch ops: the ``torch`` backend (any device without Triton), and the ``cpu`` backend's
path where the extension is not built or does not take the dtype (cpu.py)."""

from __future__ import annotations

import torch

from .._grouping import mm_rows
from .._validate import acc_dtype


def forward(logits, noise, tau, hard):
    """logits (N, E) -> idx (N,) int64, weight (N,) ones if hard else (N, E) probs, probs (N, E) or empty."""
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc)
    if noise is not None:
        z = z + noise.to(acc)
    idx = torch.argmax(z, dim=-1)
    probs = torch.softmax(z / tau, dim=-1)
    if hard:
        return idx, z.new_ones(z.shape[0]), probs
    return idx, probs, probs.new_empty(0)


def logits(h, weight):
    """The gate's token term: h (N, D) @ weight (E, D)^T -> (N, E) in the accumulation dtype (the product in h's
    dtype, as the gate's Linear runs it; batch-invariant: mm_rows)."""
    return mm_rows(h, weight.t()).to(acc_dtype(h.dtype))


def add_logits_grad(dh, dlogits, weight):
    """dh (N, D) += dlogits (N, E) @ weight (E, D), in dh's dtype (batch-invariant: mm_rows)."""
    dh.add_(mm_rows(dlogits.to(dh.dtype), weight))
