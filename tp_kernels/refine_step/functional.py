"""refine_step's public wrapper: one fused recursive refinement step, LayerNorm, top-1 gate and routed LoRA (plus the
base) in one op."""

from __future__ import annotations

import torch

from .._dispatch import resolve
from .._validate import cond_groups, refine_step_signature
from ..layer_norm import layer_norm
from .op import RefineStep, refine_step_fwd


def refine_step(state, lora_a, lora_b, *, token_weight=None, cond_logits=None, tau=1.0, noise=None, scale=1.0,
                base=None, eps=1e-6, normalize=True, active=None):
    """One refinement step of recursive routed-LoRA attention: returns ``(qkv, expert_idx, gate_weight)``.

    With ``h = LayerNorm(state)`` (no affine, ``eps``) over the last dim::

        logits     = h @ token_weight^T + cond_logits                       (either term optional; none = 0)
        z          = logits + noise                                         (noise optional)
        expert_idx = argmax(z), ties to the lowest index
        gate_weight = 1 + p - stop_grad(p),  p = softmax(z / tau)[expert_idx]  (exactly 1.0 forward)
        qkv        = base + gate_weight * scale * B_e (A_e h),  e = expert_idx  (base optional)

    i.e. ``tp_kernels.gate_top1`` on the logits followed by ``tp_kernels.routed_lora`` on ``h`` with the
    gate weight, plus ``base``, in one op. The Triton path never writes ``h`` (it is rebuilt from per-token
    mean and rstd inside the kernels that consume it). The CPU path runs ``tp_kernels.layer_norm`` first and
    the fused op on its output: the extension's kernels read ``h`` anyway, and autograd keeps it for the backward.

    Args:
        state: ``(..., D)`` tokens (fp32, bf16, fp16 or fp64; accumulation fp32 or better).
        lora_a: ``(E, S, R, D)`` (or ``(E, R, D)`` for S = 1), state's dtype.
        lora_b: ``(E, S, D_out, R)`` (or ``(E, D_out, R)``), state's dtype.
        token_weight: ``(E, D)`` the gate's token projection (no bias), state's dtype, or None.
        cond_logits: logits added to every token, broadcastable to ``(..., E)``: per token, or per sample
            ``(N, 1, E)`` for ``(N, T, D)`` state; holds the gate's biases and conditioning term. Or None.
        tau: softmax temperature of the straight-through gradient, > 0.
        noise: ``(..., E)`` Gumbel samples (``tp_kernels.gumbel_noise``), or None for the plain argmax.
        scale: LoRA's multiplier (alpha / rank).
        base: ``(..., S * D_out)`` added to the output (the frozen projection at the last step), state's dtype.
        eps: LayerNorm epsilon, > 0.
        normalize: False skips the LayerNorm: ``h = state`` (a state that needs no normalising, e.g. an
            adaLN-modulated block input at a recursion's first step).
        active: optional ``(...)`` bool mask (state's lead shape). Inactive tokens (adaptive halting: they have
            stopped refining) get expert_idx -1, gate_weight 0 and qkv = base (0 without a base); the LoRA does no
            work for them and they receive no gradient except the base's. No host sync.

    Returns:
        qkv ``(..., S * D_out)`` in state's dtype (slice s in columns ``[s * D_out, (s + 1) * D_out)``),
        expert_idx ``(...)`` int64, gate_weight ``(...)`` float32 (float64 for float64 state).

    Differentiable in state, lora_a, lora_b, token_weight, cond_logits and base (the gate's gradient reaches
    token_weight, cond_logits and state through the straight-through weight).
    """
    refine_step_signature(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize,
                          active)
    a = lora_a if lora_a.dim() == 4 else lora_a.unsqueeze(1)  # (E, S, R, D)
    b = lora_b if lora_b.dim() == 4 else lora_b.unsqueeze(1)  # (E, S, D_out, R)
    n_exp, n_slice, _, dim = a.shape
    lead = tuple(state.shape[:-1])
    d_out = b.shape[2]
    if cond_logits is not None:
        cond_logits = cond_groups(cond_logits, lead, n_exp)

    def flat(t, width):
        return None if t is None else t.reshape(-1, width).contiguous()

    fused_norm = normalize and resolve(state.device) not in ("cpu", "torch")
    if normalize and not fused_norm:
        # (..., D) h, kept by autograd with its statistics, which are fp32: torch's CPU LayerNorm keeps a bf16/fp16
        # input's mean and rstd in that dtype, and its backward then loses digits of the gradient when
        # |mean| >> std (found by tests/test_fuzz_ops.py; tests/test_layer_norm.py).
        state = layer_norm(state, float(eps))
    args = (flat(state, dim), a.contiguous(), b.contiguous(),
            None if token_weight is None else token_weight.contiguous(), cond_logits, flat(noise, n_exp),
            flat(base, n_slice * d_out), float(tau), float(scale), float(eps), fused_norm,
            None if active is None else active.reshape(-1).contiguous())
    # eager: the autograd.Function (arguments checked here); compiled: the custom op, opaque to the graph, and on
    # meta tensors the custom op's fake implementation
    qkv, weight, idx, *_ = (refine_step_fwd(*args, True) if torch.compiler.is_compiling() or state.device.type == "meta"
                            else RefineStep.apply(*args))
    return qkv.reshape(*lead, n_slice * d_out), idx.reshape(lead), weight.reshape(lead)
