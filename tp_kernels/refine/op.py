"""torch.library registration of the refinement step: schema, fake, autograd, dispatch by backend.

Two custom ops, both opaque to torch.compile:
    tp_kernels::refine_step_fwd(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps,
        normalize) -> (qkv, weight, idx, probs, lora_h)
    tp_kernels::refine_step_bwd(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h,
        n_groups, tau, scale, eps, normalize, need_state, need_w, need_token_weight, need_cond)
        -> (d_state, d_lora_a, d_lora_b, d_token_weight, d_cond_logits)
normalize=False: state already is LN(a) and the op skips its LayerNorm (the CPU path: see refine_step).
probs = softmax(z / tau) (N, E) and lora_h = A_idx LN(state) (N, S*R) are saved for the backward
(float32; float64 for float64 state). The base's gradient is grad_qkv itself, passed through in Python.
Every backend module (reference, cpu, triton) provides forward()/backward() with these signatures.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from .._dispatch import resolve
from .._validate import acc_dtype
from ..routed_lora.op import _Reference as _LoraReference
from . import cpu as _cpu
from .reference import refine_step_parts


class _Reference:
    """The reference as a backend: the spec's forward; the backward composed with routed LoRA's reference."""

    @staticmethod
    def forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize):
        p = refine_step_parts(state, lora_a, lora_b, token_weight, cond_logits, tau, noise, scale, base, eps,
                              normalize=normalize)
        a = lora_a.to(p["h"].dtype)[p["idx"]]  # (N, S, R, D)
        lora_h = torch.einsum("nsrd,nd->nsr", a, p["h"]).flatten(1)  # (N, S*R)
        return p["qkv"].to(state.dtype), p["weight"].detach().clone(), p["idx"], p["probs"], lora_h

    @staticmethod
    def backward(*args):
        return _cpu.backward_with(_LoraReference, *args)


def _backend(device):
    name = resolve(device)
    if name == "reference":
        return _Reference
    if name == "cpu":
        return _cpu
    return importlib.import_module(".triton", __package__)


@torch.library.custom_op("tp_kernels::refine_step_fwd", mutates_args=())
def refine_step_fwd(
    state: Tensor, lora_a: Tensor, lora_b: Tensor, token_weight: Optional[Tensor], cond_logits: Optional[Tensor],
    noise: Optional[Tensor], base: Optional[Tensor], tau: float, scale: float, eps: float, normalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backend(state.device).forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale,
                                          eps, normalize)


@refine_step_fwd.register_fake
def _(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize):
    n_tok = state.shape[0]
    n_exp, n_slice, rank, _ = lora_a.shape
    acc = acc_dtype(state.dtype)
    return (state.new_empty(n_tok, n_slice * lora_b.shape[2]), state.new_empty(n_tok, dtype=acc),
            state.new_empty(n_tok, dtype=torch.int64), state.new_empty(n_tok, n_exp, dtype=acc),
            state.new_empty(n_tok, n_slice * rank, dtype=acc))


@torch.library.custom_op("tp_kernels::refine_step_bwd", mutates_args=())
def refine_step_bwd(
    grad_qkv: Tensor, grad_weight: Optional[Tensor], state: Tensor, lora_a: Tensor, lora_b: Tensor,
    token_weight: Optional[Tensor], idx: Tensor, probs: Tensor, lora_h: Tensor, n_groups: int, tau: float,
    scale: float, eps: float, normalize: bool, need_state: bool, need_w: bool, need_token_weight: bool,
    need_cond: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # upstream gradients come in any layout (weight.sum() gives a stride-0 one): the kernels index rows densely
    return _backend(state.device).backward(
        grad_qkv.contiguous(), None if grad_weight is None else grad_weight.contiguous(), state, lora_a, lora_b, token_weight, idx, probs, lora_h, n_groups, tau,
        scale, eps, normalize, need_state, need_w, need_token_weight, need_cond,
    )


@refine_step_bwd.register_fake
def _(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, n_groups, tau, scale, eps,
      normalize, need_state, need_w, need_token_weight, need_cond):
    def empty_or(need, like):
        return torch.empty_like(like) if need else state.new_empty(0)

    return (empty_or(need_state, state), empty_or(need_w, lora_a), empty_or(need_w, lora_b),
            empty_or(need_token_weight, token_weight),
            probs.new_empty(n_groups, lora_a.shape[0]) if need_cond else state.new_empty(0))


def _setup_context(ctx, inputs, output):
    state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize = inputs
    qkv, weight, idx, probs, lora_h = output
    ctx.save_for_backward(state, lora_a, lora_b, token_weight, idx, probs, lora_h)
    ctx.n_groups = 0 if cond_logits is None else cond_logits.shape[0]
    ctx.cond_dtype = None if cond_logits is None else cond_logits.dtype
    ctx.tau, ctx.scale, ctx.eps, ctx.normalize = tau, scale, eps, normalize
    ctx.mark_non_differentiable(idx, probs, lora_h)


def _backward(ctx, grad_qkv, grad_weight, grad_idx, grad_probs, grad_lora_h):
    state, lora_a, lora_b, token_weight, idx, probs, lora_h = ctx.saved_tensors
    need_state, need_a, need_b, need_tw, need_cond, _, need_base = ctx.needs_input_grad[:7]
    need_w = need_a or need_b
    need_cond = bool(need_cond and ctx.n_groups)
    need_tw = bool(need_tw and token_weight is not None)
    grads = [None] * 11
    if need_state or need_w or need_tw or need_cond:
        d_state, da, db, d_tw, d_cond = refine_step_bwd(
            grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, ctx.n_groups, ctx.tau,
            ctx.scale, ctx.eps, ctx.normalize, need_state, need_w, need_tw, need_cond,
        )
        grads[:5] = (d_state if need_state else None, da if need_a else None, db if need_b else None,
                     d_tw if need_tw else None, d_cond.to(ctx.cond_dtype) if need_cond else None)
    if need_base:
        grads[6] = grad_qkv
    return tuple(grads)


refine_step_fwd.register_autograd(_backward, setup_context=_setup_context)
