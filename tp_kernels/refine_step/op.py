"""torch.library registration of the refinement step: schema, fake, autograd, dispatch by backend.

Two custom ops, both opaque to torch.compile:
    tp_kernels::refine_step_fwd(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps,
        normalize, active) -> (qkv, weight, idx, probs, lora_h, perm, offsets, mean, rstd)
    tp_kernels::refine_step_bwd(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h,
        perm, offsets, mean, rstd, n_groups, tau, scale, eps, normalize, need_state, need_w, need_token_weight,
        need_cond)
        -> (d_state, d_lora_a, d_lora_b, d_token_weight, d_cond_logits)
normalize=False: state already is LN(a) and the op skips its LayerNorm (the CPU path: see refine_step).
checked=True (a trailing argument of both ops): the caller validated the arguments -- the public wrapper, or the
autograd backward passing the forward's own tensors -- and the op body does not check them again; called
directly, an op checks its raw layout (and the backward its expert indices; tp_kernels._validate).
active (N,) bool or None: inactive tokens get idx -1 (the LoRA skips them), weight 0 and qkv = base (or 0); the
backward knows them by idx -1 and gives them no gradient but the base's.
probs = softmax(z / tau) (N, E) and lora_h = A_idx LN(state) (N, S*R) are saved for the backward
(float32; float64 for float64 state), and the LoRA's token grouping (perm (N,), offsets (E+1,) int64) so the
backward does not sort again, and the LayerNorm's mean and rstd (N,) (empty when normalize=False), so it does not
normalise again where its kernels can read the statistics (the Triton backend). The base's gradient is grad_qkv itself, passed through in Python.
Every backend module (reference, torch, cpu, triton) provides forward()/backward() with these signatures.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import implementation
from .._validate import acc_dtype, check_refine_step_bwd_op, check_refine_step_fwd_op
from ..routed_lora import cpu as _lora_cpu
from . import cpu as _cpu
from . import reference as _reference
from . import torch as _torch
from .deferred import collector_for


def _backend(device):
    return implementation(device, __package__, reference=_reference, torch_ops=_torch, cpu=lambda: _cpu)


@torch.library.custom_op("tp_kernels::refine_step_fwd", mutates_args=())
def refine_step_fwd(
    state: Tensor, lora_a: Tensor, lora_b: Tensor, token_weight: Optional[Tensor], cond_logits: Optional[Tensor],
    noise: Optional[Tensor], base: Optional[Tensor], tau: float, scale: float, eps: float, normalize: bool,
    active: Optional[Tensor] = None, checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not checked:
        check_refine_step_fwd_op(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps,
                                 active)
    return _backend(state.device).forward(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale,
                                          eps, normalize, active)


@refine_step_fwd.register_fake
def _(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize, active=None,
      checked=False):
    n_tok = state.shape[0]
    n_exp, n_slice, rank, _ = lora_a.shape
    acc = acc_dtype(state.dtype)
    return (state.new_empty(n_tok, n_slice * lora_b.shape[2]), state.new_empty(n_tok, dtype=acc),
            state.new_empty(n_tok, dtype=torch.int64), state.new_empty(n_tok, n_exp, dtype=acc),
            state.new_empty(n_tok, n_slice * rank, dtype=acc), state.new_empty(n_tok, dtype=torch.int64),
            state.new_empty(n_exp + 1, dtype=torch.int64), state.new_empty(n_tok if normalize else 0, dtype=acc),
            state.new_empty(n_tok if normalize else 0, dtype=acc))


@torch.library.custom_op("tp_kernels::refine_step_bwd", mutates_args=())
def refine_step_bwd(
    grad_qkv: Tensor, grad_weight: Optional[Tensor], state: Tensor, lora_a: Tensor, lora_b: Tensor,
    token_weight: Optional[Tensor], idx: Tensor, probs: Tensor, lora_h: Tensor, perm: Tensor, offsets: Tensor,
    mean: Tensor, rstd: Tensor, n_groups: int, tau: float,
    scale: float, eps: float, normalize: bool, need_state: bool, need_w: bool, need_token_weight: bool,
    need_cond: bool, checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # upstream gradients come in any layout (weight.sum() gives a stride-0 one): the kernels index rows densely
    grad_qkv, grad_weight = (g.contiguous() if isinstance(g, Tensor) else g for g in (grad_qkv, grad_weight))
    if not checked:
        check_refine_step_bwd_op(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm,
                                 offsets, mean, rstd, n_groups, tau, scale, eps, normalize, need_cond)
    return _backend(state.device).backward(
        grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean, rstd,
        n_groups, tau, scale, eps, normalize, need_state, need_w, need_token_weight, need_cond,
    )


@refine_step_bwd.register_fake
def _(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean, rstd,
      n_groups, tau, scale, eps, normalize, need_state, need_w, need_token_weight, need_cond, checked=False):
    def empty_or(need, like):
        return torch.empty_like(like) if need else state.new_empty(0)

    return (empty_or(need_state, state), empty_or(need_w, lora_a), empty_or(need_w, lora_b),
            empty_or(need_token_weight, token_weight),
            probs.new_empty(n_groups, lora_a.shape[0]) if need_cond else state.new_empty(0))


def _setup_context(ctx, inputs, output):
    state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize, *_ = inputs
    qkv, weight, idx, probs, lora_h, perm, offsets, mean, rstd = output
    ctx.save_for_backward(state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean, rstd)
    ctx.n_groups = 0 if cond_logits is None else cond_logits.shape[0]
    ctx.cond_dtype = None if cond_logits is None else cond_logits.dtype
    ctx.tau, ctx.scale, ctx.eps, ctx.normalize = tau, scale, eps, normalize
    ctx.deferred = collector_for(lora_a)  # weights from deferred.defer_weight_grads: dA, dB reduced after all steps
    ctx.packs = _lora_cpu.PACKED.current()  # the recursion's packed experts, for its steps' backward
    ctx.mark_non_differentiable(idx, probs, lora_h, perm, offsets, mean, rstd)
    ctx.qkv_shape = qkv.shape
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nothing differentiates


def _backward(ctx, grad_qkv, grad_weight, *_, bwd=None):
    """The gradients through ``bwd`` (the backend's backward), or the registered backward op if None."""
    with _lora_cpu.resumed(ctx.packs):  # the T steps' backward pack the experts once between them
        return _gradients(ctx, grad_qkv, grad_weight, bwd)


def _gradients(ctx, grad_qkv, grad_weight, bwd):
    state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean, rstd = ctx.saved_tensors
    need_state, need_a, need_b, need_tw, need_cond, _, need_base = ctx.needs_input_grad[:7]
    need_w = need_a or need_b
    need_cond = bool(need_cond and ctx.n_groups)
    need_tw = bool(need_tw and token_weight is not None)
    grads = [None] * len(ctx.needs_input_grad)
    if grad_qkv is None:  # only the gate weight reaches the loss
        grad_qkv = state.new_zeros(ctx.qkv_shape)
    if need_w and ctx.deferred is not None:  # eager CPU: the input gradients now, the weights' after the last step
        d_state, _, _, d_tw, d_cond = _cpu.backward_with(
            ctx.deferred, grad_qkv.contiguous(), None if grad_weight is None else grad_weight.contiguous(), state,
            lora_a, lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean, rstd, ctx.n_groups, ctx.tau,
            ctx.scale, ctx.eps, ctx.normalize, need_state, True, need_tw, need_cond,
        )
        need_a = need_b = False  # the weights' aliases return dA, dB (deferred.DeferredWeightGrads.reduce)
        da = db = None
    elif need_state or need_w or need_tw or need_cond:
        args = (grad_qkv.contiguous(), None if grad_weight is None else grad_weight.contiguous(), state, lora_a,
                lora_b, token_weight, idx, probs, lora_h, perm, offsets, mean, rstd, ctx.n_groups, ctx.tau, ctx.scale,
                ctx.eps, ctx.normalize, need_state, need_w, need_tw, need_cond)
        # the forward's own tensors: nothing to check again
        d_state, da, db, d_tw, d_cond = refine_step_bwd(*args, True) if bwd is None else bwd(*args)
    if need_state or need_w or need_tw or need_cond:
        grads[:5] = (d_state if need_state else None, da if need_a else None, db if need_b else None,
                     d_tw if need_tw else None, d_cond.to(ctx.cond_dtype) if need_cond else None)
    if need_base:
        grads[6] = grad_qkv
    return tuple(grads)


refine_step_fwd.register_autograd(_backward, setup_context=_setup_context)


class RefineStep(torch.autograd.Function):
    """refine_step_fwd's eager path: the same backend forward and backward and the same autograd glue, without the
    custom ops' dispatch; torch.compile takes the custom ops, which it keeps opaque (see routed_lora/op.py's
    RoutedLoRA)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _backend(inputs[0].device).forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.device = inputs[0].device  # ctx.saved_tensors may be unpacked only once (torch.utils.checkpoint)
        return output

    @staticmethod
    def backward(ctx, grad_qkv, grad_weight, *_):
        return _backward(ctx, grad_qkv, grad_weight, bwd=_backend(ctx.device).backward)
