"""torch.library registration of the joint attention's CPU kernel: schema, fake, autograd.

    tp_kernels::joint_attention_fwd(qkv, context_q, context_k, context_v, num_heads, checked=False) -> (out, lse)
    tp_kernels::joint_attention_bwd(grad_out, qkv, context_q, context_k, context_v, out, lse, num_heads,
        checked=False) -> (d_qkv, d_context_q, d_context_k, d_context_v)
checked: the caller validated the arguments (the public wrapper; the autograd backward, whose tensors the forward
made); called directly, an op checks them (tp_kernels._validate).
qkv (N, T, 3D) fp32 CPU; context_* (N, L, D) or None; out (N, T [+ L], D); lse (N, H, T [+ L]) is each softmax
row's logsumexp, from which the backward rebuilds the probabilities. Missing context tensors get empty gradients.
Only the compiled extension implements the ops: joint_attention() calls them where it is loaded and otherwise runs
the composed torch path (torch.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import check_joint_attention_op
from . import cpu


def _contiguous(*ts):
    return tuple(None if t is None else t.contiguous() for t in ts)


@torch.library.custom_op("tp_kernels::joint_attention_fwd", mutates_args=())
def joint_attention_fwd(qkv: Tensor, context_q: Optional[Tensor], context_k: Optional[Tensor],
                        context_v: Optional[Tensor], num_heads: int, checked: bool = False) -> tuple[Tensor, Tensor]:
    if not checked:
        check_joint_attention_op("tp_kernels.joint_attention_fwd", qkv, context_q, context_k, context_v, num_heads)
    return cpu.forward(*_contiguous(qkv, context_q, context_k, context_v), num_heads)


@joint_attention_fwd.register_fake
def _(qkv, context_q, context_k, context_v, num_heads, checked=False):
    n, t, three_d = qkv.shape
    nq = t + (0 if context_q is None else context_q.shape[1])
    return qkv.new_empty(n, nq, three_d // 3), qkv.new_empty(n, num_heads, nq)


@torch.library.custom_op("tp_kernels::joint_attention_bwd", mutates_args=())
def joint_attention_bwd(grad_out: Tensor, qkv: Tensor, context_q: Optional[Tensor], context_k: Optional[Tensor],
                        context_v: Optional[Tensor], out: Tensor, lse: Tensor,
                        num_heads: int, checked: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not checked:
        check_joint_attention_op("tp_kernels.joint_attention_bwd", qkv, context_q, context_k, context_v, num_heads)
        if grad_out.shape != out.shape:
            raise ValueError(f"tp_kernels.joint_attention_bwd: grad_out must have out's shape {tuple(out.shape)}, "
                             f"got {tuple(grad_out.shape)}")
    return cpu.backward(grad_out.to(qkv.dtype).contiguous(), *_contiguous(qkv, context_q, context_k, context_v),
                            out, lse, num_heads)


@joint_attention_bwd.register_fake
def _(grad_out, qkv, context_q, context_k, context_v, out, lse, num_heads, checked=False):
    return (torch.empty_like(qkv),) + tuple(qkv.new_empty(0) if c is None else torch.empty_like(c)
                                            for c in (context_q, context_k, context_v))


def _setup_context(ctx, inputs, output):
    qkv, context_q, context_k, context_v, num_heads, *_ = inputs
    out, lse = output
    ctx.save_for_backward(qkv, context_q, context_k, context_v, out, lse)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero-filled tensor for it


def _backward(ctx, grad_out, _grad_lse):
    qkv, context_q, context_k, context_v, out, lse = ctx.saved_tensors
    # the forward's own tensors: nothing to check again
    grads = joint_attention_bwd(grad_out, qkv, context_q, context_k, context_v, out, lse, ctx.num_heads, True)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + \
        (None,) * (len(ctx.needs_input_grad) - 4)


joint_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
