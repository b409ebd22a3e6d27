"""torch.library registration of the top-1 gate: schema, fake, autograd, dispatch by backend.

    tp_kernels::gate_top1_fwd(logits, noise, tau, hard, checked=False) -> (weight, idx, probs)
checked: the caller (the public wrapper) validated the arguments; called directly, the op checks them
(tp_kernels._validate).
idx = argmax(logits + noise); probs = softmax((logits + noise) / tau) in fp32 (fp64 for fp64).
hard: weight = 1 (N,), probs kept for the straight-through backward.
soft: weight = probs (N, E), probs returned empty (weight is saved instead).
The backward is a few elementwise torch ops, so it stays in the compiled graph.
Backends return (idx, weight, probs); the op puts the float output first (opcheck sums
outputs into the first one's dtype).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._dispatch import implementation
from .._validate import acc_dtype, check_gate_top1_fwd_op
from . import reference as _reference
from . import torch as _torch


def _backend(device):
    return implementation(device, __package__, reference=_reference, torch_ops=_torch,
                          cpu=lambda: _ext.gate_cpu() or _torch)


@torch.library.custom_op("tp_kernels::gate_top1_fwd", mutates_args=())
def gate_top1_fwd(logits: Tensor, noise: Optional[Tensor], tau: float, hard: bool,
                  checked: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    if not checked:
        check_gate_top1_fwd_op(logits, noise, tau)
    idx, weight, probs = _backend(logits.device).forward(logits, noise, tau, hard)
    return weight, idx, probs


@gate_top1_fwd.register_fake
def _(logits, noise, tau, hard, checked=False):
    acc = acc_dtype(logits.dtype)
    n, e = logits.shape
    idx = logits.new_empty(n, dtype=torch.int64)
    if hard:
        return logits.new_empty(n, dtype=acc), idx, logits.new_empty(n, e, dtype=acc)
    return logits.new_empty(n, e, dtype=acc), idx, logits.new_empty(0, dtype=acc)


def _setup_context(ctx, inputs, output):
    logits, noise, tau, hard, *_ = inputs
    weight, idx, probs = output
    ctx.tau, ctx.hard = tau, hard
    ctx.save_for_backward(idx, probs if hard else weight)
    ctx.mark_non_differentiable(idx, probs)


def _backward(ctx, grad_weight, grad_idx, grad_probs):
    idx, probs = ctx.saved_tensors  # probs (N, E)
    if ctx.hard:
        # weight = 1 + p_e - sg(p_e): d/dz_j = p_e (onehot_j - p_j) / tau
        p_sel = probs.gather(1, idx[:, None])  # (N, 1)
        onehot = torch.zeros_like(probs).scatter_(1, idx[:, None], 1.0)
        grad = (grad_weight[:, None] * p_sel) * (onehot - probs) / ctx.tau
    else:
        grad = probs * (grad_weight - (grad_weight * probs).sum(-1, keepdim=True)) / ctx.tau
    return (grad, *(None,) * (len(ctx.needs_input_grad) - 1))


gate_top1_fwd.register_autograd(_backward, setup_context=_setup_context)
