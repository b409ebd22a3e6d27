"""The definition of one recursive refinement step, in plain PyTorch.

Shapes (flattened tokens, stacked slices):
    state        (N, D)              the tokens a entering the step
    lora_a       (E, S, R, D)        shrink weights of the E experts (S = 3: Q, K, V)
    lora_b       (E, S, D_out, R)    expand weights
    token_weight (E, D) or None      the gate's token projection (no bias)
    cond_logits  (G, E) or None      per-group logit offsets (the gate's biases and conditioning term);
                                     token n uses row n // (N / G): G = N per token, G = batch per sample
    noise        (N, E) or None      Gumbel samples
    base         (N, S * D_out) or None

    h      = LayerNorm(state)                          no affine, eps (h = state when normalize=False)
    logits = h token_weight^T + cond_logits
    z      = logits + noise
    idx    = argmax(z), ties to the lowest index
    weight = 1 + p - sg(p),  p = softmax(z / tau)[idx]  (straight-through: exactly 1 forward)
    qkv    = base + weight * scale * B_idx (A_idx h)   slice s at columns [s * D_out, (s + 1) * D_out)

The gate is tp_kernels.gate_top1's and the LoRA routed_lora's; this is the spec the fast paths are
tested against (use float64).

:func:`forward` / :func:`backward` are the ``reference`` backend: the spec's forward, and torch.py's backward
driver composed with routed LoRA's reference backward; triton.py runs them for float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._grouping import group_by_expert
from .._validate import acc_dtype
from ..gate_top1.reference import gate_top1_reference
from ..routed_lora import reference as _lora_reference
from ..routed_lora.reference import routed_lora_reference, shrink
from .torch import backward_with, composed_gate_ln_backward


def refine_logits_reference(h, token_weight=None, cond_logits=None, num_experts=None):
    """h (N, D) normalised tokens -> logits (N, E) in h's dtype."""
    n_tok = h.shape[0]
    logits = h.new_zeros(n_tok, num_experts)
    if token_weight is not None:
        logits = logits + (h[:, None, :] * token_weight.to(h.dtype)).sum(-1)  # per token: batch invariant
    if cond_logits is not None:
        groups = cond_logits.shape[0]
        logits = logits + cond_logits.to(h.dtype).repeat_interleave(n_tok // groups if groups else 0, dim=0)
    return logits


def refine_step_parts(state, lora_a, lora_b, token_weight=None, cond_logits=None, tau=1.0, noise=None, scale=1.0,
                      base=None, eps=1e-6, expert_idx=None, normalize=True, active=None):
    """The step with its intermediates: dict of h (N, D), probs (N, E), idx (N,), weight (N,), qkv (N, S*D_out),
    all in the accumulation dtype (float32; float64 for float64 state). See refine_step_reference."""
    acc = acc_dtype(state.dtype)
    h = F.layer_norm(state.to(acc), (state.shape[-1],), eps=eps) if normalize else state.to(acc)  # (N, D)
    logits = refine_logits_reference(h, token_weight, cond_logits, lora_a.shape[0])  # (N, E)
    idx, probs = gate_top1_reference(logits, noise, tau, hard=False)  # argmax, softmax(z / tau)
    if expert_idx is not None:
        idx = expert_idx.to(torch.int64)
    if active is not None:  # inactive tokens: expert -1 (skipped by the LoRA), weight 0
        idx = torch.where(active, idx, -1)
    p_sel = probs.gather(1, idx.clamp(min=0)[:, None])[:, 0]  # (N,)
    weight = 1.0 + (p_sel - p_sel.detach())
    if active is not None:
        weight = torch.where(active, weight, 0.0)
    qkv = routed_lora_reference(h, idx, lora_a.to(acc), lora_b.to(acc), weight, scale)  # (N, S*D_out)
    if base is not None:
        qkv = qkv + base.to(acc)
    return dict(h=h, probs=probs, idx=idx, weight=weight, qkv=qkv)


def refine_step_reference(state, lora_a, lora_b, token_weight=None, cond_logits=None, tau=1.0, noise=None,
                          scale=1.0, base=None, eps=1e-6, expert_idx=None, normalize=True, active=None):
    """-> (qkv (N, S*D_out) in state's dtype, idx (N,) int64, weight (N,) float32/float64).

    expert_idx: None routes by the argmax (the definition). Given, it forces the routing, for tests of
    low-precision paths whose logits may break a near-tie the other way; weight then uses its p.
    normalize=False: state already is LN(a) (the caller ran the LayerNorm); h = state.
    active: (N,) bool or None; inactive tokens get idx -1, weight 0 and qkv = base (0 without a base).
    """
    parts = refine_step_parts(state, lora_a, lora_b, token_weight, cond_logits, tau, noise, scale, base, eps,
                              expert_idx, normalize, active)
    return parts["qkv"].to(state.dtype), parts["idx"], parts["weight"]


def forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize, active=None):
    """The backend interface (torch.py's forward) on :func:`refine_step_parts`."""
    p = refine_step_parts(state, lora_a, lora_b, token_weight, cond_logits, tau, noise, scale, base, eps,
                          normalize=normalize, active=active)
    a = lora_a.to(p["h"].dtype)[p["idx"]]  # (N, S, R, D)
    lora_h = shrink(a, p["h"]).flatten(1)  # (N, S*R)
    # the forward weight is exactly 1 (1 + p - sg(p) would be NaN on a row of NaN logits)
    weight = torch.ones_like(p["weight"]) if active is None else active.to(p["weight"].dtype)
    return (p["qkv"].to(state.dtype), weight, p["idx"], p["probs"], lora_h,
            *group_by_expert(p["idx"], lora_a.shape[0]), *layer_norm_stats(state, eps, normalize))


def layer_norm_stats(state, eps, normalize):
    """The LayerNorm's mean and rstd (N,) in the accumulation dtype, or two empty tensors if not ``normalize``."""
    if not normalize:
        return state.new_empty(0, dtype=acc_dtype(state.dtype)), state.new_empty(0, dtype=acc_dtype(state.dtype))
    a = state.to(acc_dtype(state.dtype))
    mean = a.mean(1)
    return mean, torch.rsqrt((a - mean[:, None]).square().mean(1) + eps)


def backward(*args):
    """The backend interface (torch.py's backward) with routed LoRA's reference backward."""
    return backward_with(_lora_reference, *args, tail=composed_gate_ln_backward)
