"""The definition of routed LoRA, in plain PyTorch.

Shapes (flattened tokens, stacked slices):
    x        (N, D_in)
    idx      (N,)               int, each in [0, E)
    lora_a   (E, S, R, D_in)    shrink weights, S slices (S = 3 for fused Q/K/V)
    lora_b   (E, S, D_out, R)   expand weights
    gate     (N,) or None       per-token multiplier
    returns  (N, S * D_out)     slice s at columns [s * D_out, (s + 1) * D_out)

y[n, s] = gate[n] * scale * lora_b[e, s] @ (lora_a[e, s] @ x[n]),  e = idx[n].

This gathers each token's expert weights, which wastes memory but is obviously
right; it is the spec the fast paths are tested against (use float64).
"""

from __future__ import annotations

import torch

from .._validate import acc_dtype


def routed_lora_reference(x, idx, lora_a, lora_b, gate=None, scale=1.0):
    acc = acc_dtype(x.dtype)
    a = lora_a.to(acc)[idx]  # (N, S, R, D_in)
    b = lora_b.to(acc)[idx]  # (N, S, D_out, R)
    h = torch.einsum("nsrd,nd->nsr", a, x.to(acc))  # (N, S, R)
    y = torch.einsum("nsor,nsr->nso", b, h) * scale  # (N, S, D_out)
    if gate is not None:
        y = y * gate.to(acc)[:, None, None]
    return y.reshape(x.shape[0], -1).to(x.dtype)


def routed_lora_backward_reference(grad_y, x, idx, lora_a, lora_b, gate=None, scale=1.0):
    """Gradients of :func:`routed_lora_reference` by autograd on float64 copies."""
    xs = x.detach().double().requires_grad_()
    a = lora_a.detach().double().requires_grad_()
    b = lora_b.detach().double().requires_grad_()
    g = None if gate is None else gate.detach().double().requires_grad_()
    y = routed_lora_reference(xs, idx, a, b, g, scale)
    inputs = [xs, a, b] + ([g] if g is not None else [])
    grads = torch.autograd.grad(y, inputs, grad_y.double())
    dx, da, db = (t.to(ref.dtype) for t, ref in zip(grads[:3], (x, lora_a, lora_b)))
    dg = grads[3].to(gate.dtype) if g is not None else None
    return dx, da, db, dg
