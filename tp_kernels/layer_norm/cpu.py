"""LayerNorm through the compiled extension (csrc/layer_norm.cpp), the ``cpu`` backend: fp32 or bf16 rows, fp32
statistics. op.py's autograd.Function calls these kernels."""

from __future__ import annotations

import torch

from .. import _ext


def forward(x, eps):
    """x (N, D) contiguous -> y (N, D) in x's dtype, mean (N,), rstd (N,) float32."""
    n, d = x.shape
    y = torch.empty_like(x)
    mean = x.new_empty(n, dtype=torch.float32)
    rstd = x.new_empty(n, dtype=torch.float32)
    status = _ext.library().tp_layer_norm_fwd(x.data_ptr(), _ext.DTYPE_CODES[x.dtype], n, d, float(eps),
                                              y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), torch.get_num_threads())
    _ext.check(status, "layer_norm")
    return y, mean, rstd


def backward(grad_y, x, mean, rstd):
    """grad_y, x (N, D) contiguous in x's dtype -> d x (N, D)."""
    n, d = x.shape
    dx = torch.empty_like(x)
    status = _ext.library().tp_layer_norm_bwd(grad_y.data_ptr(), x.data_ptr(), _ext.DTYPE_CODES[x.dtype], n, d,
                                              mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), torch.get_num_threads())
    _ext.check(status, "layer_norm backward")
    return dx
