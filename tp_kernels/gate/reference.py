"""The definition of the top-1 Gumbel-softmax gate, in plain PyTorch.

logits (N, E), noise (N, E) Gumbel samples or None.
    z     = logits + noise
    idx   = argmax(z), ties to the lowest index
    probs = softmax(z / tau)            (float32, float64 for float64 input)
Hard mode: weight = 1 in the forward pass, d weight / d logits = d probs[idx] / d logits
(straight-through). Soft mode: weight = probs.
"""

from __future__ import annotations

import torch

from .._validate import acc_dtype


def gate_top1_reference(logits, noise=None, tau=1.0, hard=True):
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc)
    if noise is not None:
        z = z + noise.to(acc)
    idx = torch.argmax(z, dim=-1)  # torch.argmax returns the first maximal index
    probs = torch.softmax(z / tau, dim=-1)
    if not hard:
        return idx, probs
    p_sel = probs.gather(-1, idx[..., None])[..., 0]
    return idx, 1.0 + (p_sel - p_sel.detach())


def gumbel_noise(shape, *, generator=None, device=None, dtype=torch.float32):
    """Gumbel(0, 1) samples, as torch.nn.functional.gumbel_softmax draws them."""
    e = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    return -e.log()
