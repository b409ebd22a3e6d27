"""The refinement step in composed torch ops: the ``torch`` backend, and the driver every backend's step runs.

:func:`step_forward` and :func:`backward_with` take the routed-LoRA and gate backend modules that do the work (this
module's :func:`forward` / :func:`backward` pass the composed-torch ones, cpu.py the extension's, reference.py the
reference's for the backward; triton.py passes its routed-LoRA kernels and its fused gate + LayerNorm backward kernel
to :func:`backward_with`).

Forward: h = LN(a) (native_layer_norm in the accumulation dtype) unless the state comes normalised, the gate's
logits h W^T + the conditioning rows, top-1, then the routed LoRA with the base added in place into its output.
The gate's weight is exactly 1 forward, so the LoRA runs without a gate multiplier.

Backward (:func:`backward_with`): h (recomputed with native_layer_norm if the op normalised), the routed-LoRA
backward (d h, dA, dB and the gate's d weight in one call), then the ``tail``, :func:`gate_ln_backward` or a
kernel with its interface: the straight-through gate gradient on (N, E), the token term's d h accumulated in place,
and native_layer_norm_backward if the op normalised. Here the token term's products are mm_rows GEMMs in the
state's dtype.
"""

from __future__ import annotations

import functools

import torch

from .._validate import acc_dtype
from ..gate_top1 import torch as _gate_torch
from ..routed_lora import torch as _lora_torch


def layer_norm(state, eps):
    """LN(state) (N, D) in state's dtype, with mean and rstd (N, 1) in the accumulation dtype.

    Computed in the accumulation dtype: torch's CPU LayerNorm keeps a bf16/fp16 input's statistics in that
    dtype, and the backward through them loses the gradient when |mean| >> std."""
    h, mean, rstd = torch.native_layer_norm(state.to(acc_dtype(state.dtype)), [state.shape[1]], None, None, eps)
    return h.to(state.dtype), mean, rstd


def gate_logits(h, token_weight, cond_logits, n_exp, gate):
    """h (N, D) -> logits (N, E) in the accumulation dtype: h W^T (by ``gate``, a gate backend module) + cond rows."""
    n_tok = h.shape[0]
    acc = acc_dtype(h.dtype)
    if token_weight is not None:
        logits = gate.logits(h, token_weight).to(acc)  # (N, E)
    else:
        logits = h.new_zeros(n_tok, n_exp, dtype=acc)
    if cond_logits is not None and n_tok:
        groups = cond_logits.shape[0]
        logits.view(groups, n_tok // groups, n_exp).add_(cond_logits.to(acc)[:, None])
    return logits


def step_forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize,
                 active=None, *, lora, gate):
    """state (N, D) -> qkv (N, S*D_out), weight (N,) ones, idx (N,) int64, probs (N, E), lora_h (N, S*R), the
    LoRA's grouping perm (N,), offsets (E+1,), and the LayerNorm's mean, rstd (N,) (empty if not normalize).
    ``lora`` / ``gate``: the routed-LoRA and gate backend modules that run the step's parts."""
    n_exp = lora_a.shape[0]
    if normalize:
        h, mean, rstd = layer_norm(state, eps)  # (N, D), (N, 1), (N, 1)
        mean, rstd = mean.view(-1), rstd.view(-1)
    else:
        h, mean, rstd = state, *(state.new_empty(0, dtype=acc_dtype(state.dtype)) for _ in range(2))
    logits = gate_logits(h, token_weight, cond_logits, n_exp, gate)  # (N, E)
    idx, weight, probs = gate.forward(logits, noise, tau, True)
    if active is not None:  # inactive tokens: expert -1, which the LoRA skips, and weight 0
        idx = torch.where(active, idx, -1)
        weight = active.to(weight.dtype)
    qkv, lora_h, perm, offsets = lora.forward(h, idx, lora_a, lora_b, None, scale)  # weight == 1
    if base is not None:
        qkv.add_(base)
    return qkv, weight, idx, probs, lora_h, perm, offsets, mean, rstd


def gate_ln_backward(dh, dgate, grad_weight, state, mean, rstd, token_weight, probs, idx, tau, need_logits,
                     need_state, *, gate):
    """The step's backward after the LoRA, in torch ops -> (d logits (N, E) or None, d state or None).

    dh (N, D): d loss / d h through the LoRA; dgate (N,): through the gate weight's use in the LoRA.
    mean, rstd: native_layer_norm's, or None when h = state (normalize=False: no LayerNorm backward).
    gate: the gate backend module adding d logits W into dh.
    """
    dlogits = d_state = None
    if need_logits:
        acc = probs.dtype
        dweight = dgate.to(acc) if grad_weight is None else dgate.to(acc) + grad_weight.to(acc)  # (N,)
        # weight = 1 + p_e - sg(p_e): d weight / d z_j = p_e (onehot_j - p_j) / tau; an inactive token (idx -1)
        # has the constant weight 0
        live = idx >= 0
        chosen = idx.clamp(min=0)[:, None]
        p_sel = torch.where(live[:, None], probs.gather(1, chosen), 0)  # (N, 1)
        onehot = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
        dlogits = (dweight[:, None] * p_sel) * (onehot - probs) / tau  # (N, E)
        if need_state and token_weight is not None:
            gate.add_logits_grad(dh, dlogits, token_weight)  # + d logits / d LN(state)
    if need_state:
        acc = mean.dtype if mean is not None else None
        d_state = dh if mean is None else torch.ops.aten.native_layer_norm_backward(
            dh.to(acc), state.to(acc), [state.shape[1]], mean, rstd, None, None, [True, False, False])[0].to(
            state.dtype)
    return dlogits, d_state


def backward_with(lora, grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets,
                  mean, rstd, n_groups, tau, scale, eps, normalize, need_state, need_w, need_token_weight, need_cond,
                  *, tail):
    """Gradients of step_forward() -> (d state, dA, dB, d token_weight, d cond (G, E) in the accumulation dtype).

    The forward's saved ``mean`` / ``rstd`` go unused here: h and its statistics are recomputed together
    (native_layer_norm), bit-identical to the forward's (the Triton backend's kernels read the saved ones).

    ``lora`` is a routed-LoRA backend module (its backward(): routed_lora's cpu.py, torch.py, triton.py or
    reference.py) and ``tail`` the gate + LayerNorm backward (:func:`gate_ln_backward` with a gate backend module,
    or a kernel with its interface).
    Unneeded gradients come back as distinct empty tensors (custom-op outputs may not alias).
    """
    n_tok, dim = state.shape
    n_exp = lora_a.shape[0]
    need_logits = need_cond or need_token_weight or (need_state and token_weight is not None)
    if normalize:  # recomputed: bit-identical to the forward's, and one (N, D) tensor less kept per step
        h, mean, rstd = layer_norm(state, eps)  # (N, D), (N, 1), (N, 1)
    else:
        h, mean, rstd = state, None, None
    gate = torch.ones(n_tok, dtype=probs.dtype, device=state.device) if need_logits else None
    dh, da, db, dgate = lora.backward(grad_qkv.to(state.dtype), h, idx, lora_a, lora_b, gate, lora_h, perm, offsets,
                                      scale, need_state, need_w, need_logits)
    dlogits, d_state = tail(dh, dgate, grad_weight, state, mean, rstd, token_weight, probs, idx, tau, need_logits,
                            need_state)
    d_tw = d_cond = None
    if need_cond:
        d_cond = dlogits.view(n_groups, n_tok // n_groups if n_groups else 0, n_exp).sum(1)  # (G, E)
    if need_token_weight:
        d_tw = torch.mm(dlogits.t().to(h.dtype), h).to(token_weight.dtype)  # (E, D)
    return tuple(state.new_empty(0) if g is None else g for g in (d_state, da if need_w else None,
                                                                  db if need_w else None, d_tw, d_cond))


# gate_ln_backward on composed torch ops only (the token term's gradient too)
composed_gate_ln_backward = functools.partial(gate_ln_backward, gate=_gate_torch)


def forward(*args):
    """The step in composed torch ops only, never the extension: the path of devices without Triton."""
    return step_forward(*args, lora=_lora_torch, gate=_gate_torch)


def backward(*args):
    return backward_with(_lora_torch, *args, tail=composed_gate_ln_backward)
