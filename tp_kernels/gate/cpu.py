"""Top-1 gate with composed torch ops (the CPU fallback when csrc/ is not built; any device without Triton)."""

from __future__ import annotations

import torch

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
