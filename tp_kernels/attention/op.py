"""torch.library registration of the joint attention's CPU kernel: schema, fake, autograd.

    tp_kernels::joint_attention_fwd(qkv, context_q, context_k, context_v, num_heads) -> (out, lse)
    tp_kernels::joint_attention_bwd(grad_out, qkv, context_q, context_k, context_v, out, lse, num_heads)
        -> (d_qkv, d_context_q, d_context_k, d_context_v)
qkv (N, T, 3D) fp32 CPU; context_* (N, L, D) or None; out (N, T [+ L], D); lse (N, H, T [+ L]) is each softmax
row's logsumexp, from which the backward rebuilds the probabilities. Missing context tensors get empty gradients.
Only the compiled extension implements the ops: joint_attention() calls them where it is loaded and otherwise runs
the composed torch path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu_ext


def check_inputs(op, qkv, context_q, context_k, context_v, num_heads):
    """Shapes and dtypes of a joint attention's inputs (any device), with errors naming the argument."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"{op}: qkv must be a tensor (N, T, 3D), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    dim = qkv.shape[-1] // 3
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"{op}: num_heads must be a positive int dividing D = {dim}, got {num_heads!r}")
    if (context_k is None) != (context_v is None) or (context_q is not None and context_k is None):
        raise ValueError(f"{op}: context_k and context_v come together, and context_q needs them")
    for name, c in (("context_q", context_q), ("context_k", context_k), ("context_v", context_v)):
        if c is not None and (not isinstance(c, Tensor) or c.dtype != qkv.dtype or c.device != qkv.device
                              or c.dim() != 3 or c.shape[0] != qkv.shape[0] or c.shape[2] != dim
                              or c.shape[1] != context_k.shape[1]):
            raise ValueError(f"{op}: {name} must be a {qkv.dtype} tensor on {qkv.device} of shape (N={qkv.shape[0]}, "
                             f"L, D={dim}) with context_k's L, got "
                             f"{(c.dtype, tuple(c.shape), str(c.device)) if isinstance(c, Tensor) else c!r}")


def _check(op, qkv, context_q, context_k, context_v, num_heads):
    check_inputs(op, qkv, context_q, context_k, context_v, num_heads)
    if qkv.dtype != torch.float32 or qkv.device.type != "cpu":
        raise ValueError(f"{op}: the CPU kernel takes float32 CPU tensors, got {qkv.dtype} on {qkv.device}")


def _contiguous(*ts):
    return tuple(None if t is None else t.contiguous() for t in ts)


@torch.library.custom_op("tp_kernels::joint_attention_fwd", mutates_args=())
def joint_attention_fwd(qkv: Tensor, context_q: Optional[Tensor], context_k: Optional[Tensor],
                        context_v: Optional[Tensor], num_heads: int) -> tuple[Tensor, Tensor]:
    _check("tp_kernels.joint_attention_fwd", qkv, context_q, context_k, context_v, num_heads)
    return cpu_ext.forward(*_contiguous(qkv, context_q, context_k, context_v), num_heads)


@joint_attention_fwd.register_fake
def _(qkv, context_q, context_k, context_v, num_heads):
    n, t, three_d = qkv.shape
    nq = t + (0 if context_q is None else context_q.shape[1])
    return qkv.new_empty(n, nq, three_d // 3), qkv.new_empty(n, num_heads, nq)


@torch.library.custom_op("tp_kernels::joint_attention_bwd", mutates_args=())
def joint_attention_bwd(grad_out: Tensor, qkv: Tensor, context_q: Optional[Tensor], context_k: Optional[Tensor],
                        context_v: Optional[Tensor], out: Tensor, lse: Tensor,
                        num_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check("tp_kernels.joint_attention_bwd", qkv, context_q, context_k, context_v, num_heads)
    if grad_out.shape != out.shape:
        raise ValueError(f"tp_kernels.joint_attention_bwd: grad_out must have out's shape {tuple(out.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    return cpu_ext.backward(grad_out.to(qkv.dtype).contiguous(), *_contiguous(qkv, context_q, context_k, context_v),
                            out, lse, num_heads)


@joint_attention_bwd.register_fake
def _(grad_out, qkv, context_q, context_k, context_v, out, lse, num_heads):
    return (torch.empty_like(qkv),) + tuple(qkv.new_empty(0) if c is None else torch.empty_like(c)
                                            for c in (context_q, context_k, context_v))


def _setup_context(ctx, inputs, output):
    qkv, context_q, context_k, context_v, num_heads = inputs
    out, lse = output
    ctx.save_for_backward(qkv, context_q, context_k, context_v, out, lse)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero-filled tensor for it


def _backward(ctx, grad_out, _grad_lse):
    qkv, context_q, context_k, context_v, out, lse = ctx.saved_tensors
    grads = joint_attention_bwd(grad_out, qkv, context_q, context_k, context_v, out, lse, ctx.num_heads)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None,)


joint_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
