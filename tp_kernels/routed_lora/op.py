"""torch.library registration of routed LoRA: schema, fake, autograd, dispatch by backend.

Two custom ops, both opaque to torch.compile (no graph break, no retrace):
    tp_kernels::routed_lora_fwd(x, idx, lora_a, lora_b, gate, scale, checked=False) -> (y, h, perm, offsets)
    tp_kernels::routed_lora_bwd(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, ..., checked=False)
        -> (dx, da, db, dgate)
checked: the caller has validated the arguments (the public wrapper; the autograd backward, whose tensors the
forward made), so the op body does not check them again; called directly, an op checks its raw layout
(tp_kernels._validate). The forward checks the expert indices (data) on every call: the public wrapper's eager path
checks them itself and never reaches the op body, its compiled path does.
h = A_e x (N, S*R, float32; float64 for float64 x) is saved by the forward so the backward need not recompute it,
and so is the forward's token grouping: perm (N,) int64 with idx[perm] sorted, offsets (E+1,) int64 (expert e's
tokens are perm[offsets[e]:offsets[e+1]]), so the backward does not sort again.
Every backend module (reference, torch, cpu, triton) provides forward()/backward() with these signatures.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._dispatch import implementation
from .._validate import acc_dtype, check_expert_idx, check_routed_lora_bwd_op, check_routed_lora_fwd_op
from . import cpu as _cpu
from . import reference as _reference
from . import torch as _torch


def _backend(device):
    return implementation(device, __package__, reference=_reference, torch_ops=_torch,
                          cpu=lambda: _ext.routed_lora_cpu() or _torch)


@torch.library.custom_op("tp_kernels::routed_lora_fwd", mutates_args=())
def routed_lora_fwd(
    x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, gate: Optional[Tensor], scale: float,
    checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not checked:
        check_routed_lora_fwd_op(x, idx, lora_a, lora_b, gate, scale)
    check_expert_idx(idx, lora_a.shape[0])  # data: every call that reaches the op (compiled graphs, direct calls)
    return _backend(x.device).forward(x, idx, lora_a, lora_b, gate, scale)


@routed_lora_fwd.register_fake
def _(x, idx, lora_a, lora_b, gate, scale, checked=False):
    n_slice, rank, d_out = lora_a.shape[1], lora_a.shape[2], lora_b.shape[2]
    return (x.new_empty(x.shape[0], n_slice * d_out), x.new_empty(x.shape[0], n_slice * rank, dtype=acc_dtype(x.dtype)),
            x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(lora_a.shape[0] + 1, dtype=torch.int64))


@torch.library.custom_op("tp_kernels::routed_lora_bwd", mutates_args=())
def routed_lora_bwd(
    grad_y: Tensor, x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, gate: Optional[Tensor],
    h: Tensor, perm: Tensor, offsets: Tensor, scale: float, need_x: bool, need_w: bool, need_gate: bool,
    checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_y = grad_y.contiguous() if isinstance(grad_y, Tensor) else grad_y  # autograd hands over any layout
    if not checked:
        check_routed_lora_bwd_op(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale)
    return _backend(x.device).backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w,
                                       need_gate)


@routed_lora_bwd.register_fake
def _(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w, need_gate, checked=False):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(lora_a) if need_w else x.new_empty(0),
        torch.empty_like(lora_b) if need_w else x.new_empty(0),
        torch.empty_like(gate) if need_gate else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, idx, lora_a, lora_b, gate, scale, *_ = inputs
    y, h, perm, offsets = output
    ctx.save_for_backward(x, idx, lora_a, lora_b, gate, h, perm, offsets)
    ctx.scale = scale
    ctx.packs = _cpu.PACKED.current()  # a reuse_packed_weights scope's copies, for the backward to share
    ctx.mark_non_differentiable(h, perm, offsets)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nothing differentiates


def _backward(ctx, grad_y, *_, bwd=None):
    """The gradients through ``bwd`` (the registered backward op, or the backend's backward)."""
    x, idx, lora_a, lora_b, gate, h, perm, offsets = ctx.saved_tensors
    need_x, _, need_a, need_b, need_gate = ctx.needs_input_grad[:5]
    need_w = need_a or need_b
    need_gate = bool(need_gate and gate is not None)
    none = (None,) * (len(ctx.needs_input_grad) - 5)  # scale (and checked)
    if grad_y is None or not (need_x or need_w or need_gate):
        return (None,) * 5 + none
    with _cpu.resumed(ctx.packs):
        if bwd is None:  # the forward's own tensors: nothing to check again
            dx, da, db, dg = routed_lora_bwd(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets,
                                             ctx.scale, need_x, need_w, need_gate, True)
        else:
            dx, da, db, dg = bwd(grad_y.contiguous(), x, idx, lora_a, lora_b, gate, h, perm, offsets, ctx.scale,
                                 need_x, need_w, need_gate)
    return (dx if need_x else None, None, da if need_a else None, db if need_b else None,
            dg if need_gate else None, *none)


routed_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


class RoutedLoRA(torch.autograd.Function):
    """routed_lora_fwd's eager path: the same backend forward and backward and the same autograd glue, without the
    custom ops' dispatch (which costs about as much host time as the rest of a forward + backward at a few hundred
    tokens). torch.compile takes the custom ops, which it keeps opaque."""

    @staticmethod
    def forward(ctx, x, idx, lora_a, lora_b, gate, scale):
        output = _backend(x.device).forward(x, idx, lora_a, lora_b, gate, scale)
        _setup_context(ctx, (x, idx, lora_a, lora_b, gate, scale), output)
        ctx.device = x.device  # ctx.saved_tensors may be unpacked only once (torch.utils.checkpoint)
        return output

    @staticmethod
    def backward(ctx, grad_y, *_):
        return _backward(ctx, grad_y, bwd=_backend(ctx.device).backward)
