"""The definition of the top-1 Gumbel-softmax gate, in plain PyTorch.

logits (N, E), noise (N, E) Gumbel samples or None.
    z     = logits + noise
    idx   = argmax(z), ties to the lowest index
    probs = softmax(z / tau)            (float32, float64 for float64 input)
Hard mode: weight = 1 in the forward pass, d weight / d logits = d probs[idx] / d logits
(straight-through). Soft mode: weight = probs.

:func:`forward` is the ``reference`` backend (the interface of torch.py).
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


def forward(logits, noise, tau, hard):
    """The backend interface (torch.py's forward) on the definition."""
    idx, weight = gate_top1_reference(logits, noise, tau, hard)
    if not hard:
        return idx, weight, weight.new_empty(0)
    z = logits.to(weight.dtype) + (0 if noise is None else noise.to(weight.dtype))
    # the forward weight is exactly 1 (1 + p - sg(p) would be NaN on a row of NaN logits)
    return idx, torch.ones_like(weight.detach()), torch.softmax(z / tau, dim=-1)
