"""torch.library registration of the LayerNorm's CPU kernel: schema, fake, autograd.

    tp_kernels::layer_norm_fwd(x, eps) -> (y, mean, rstd)
    tp_kernels::layer_norm_bwd(grad_y, x, mean, rstd) -> d_x
x (N, D) float32 or bfloat16 on CPU; y in x's dtype; mean, rstd (N,) float32. No affine parameters. Only the compiled
extension implements the ops: layer_norm() calls them where it is loaded and otherwise runs the composed torch path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_ext

DTYPES = (torch.float32, torch.bfloat16)


def _check_x(op, x):
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in DTYPES or x.device.type != "cpu":
        got = (x.dtype, tuple(x.shape), str(x.device)) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a float32 or bfloat16 CPU tensor (N, D), got {got}")


def _check_stats(op, x, mean, rstd):
    for name, s in (("mean", mean), ("rstd", rstd)):
        if not isinstance(s, Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (x.shape[0],):
            got = (s.dtype, tuple(s.shape)) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"{op}: {name} must be a float32 tensor ({x.shape[0]},), got {got}")


@torch.library.custom_op("tp_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_x("tp_kernels.layer_norm_fwd", x)
    return cpu_ext.forward(x.contiguous(), eps)


@layer_norm_fwd.register_fake
def _(x, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0],
                                                                                           dtype=torch.float32)


@torch.library.custom_op("tp_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    op = "tp_kernels.layer_norm_bwd"
    _check_x(op, x)
    if not isinstance(grad_y, Tensor) or grad_y.shape != x.shape:
        raise ValueError(f"{op}: grad_y must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(grad_y.shape) if isinstance(grad_y, Tensor) else type(grad_y).__name__}")
    _check_stats(op, x, mean, rstd)
    return cpu_ext.backward(grad_y.to(x.dtype).contiguous(), x.contiguous(), mean.contiguous(), rstd.contiguous())


@layer_norm_bwd.register_fake
def _(grad_y, x, mean, rstd):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, mean, rstd = ctx.saved_tensors
    if grad_y is None or not ctx.needs_input_grad[0]:
        return None, None
    return layer_norm_bwd(grad_y, x, mean, rstd), None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
