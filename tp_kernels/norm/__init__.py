"""LayerNorm without affine parameters, statistics in fp32 for fp32 and bf16 inputs (the recursion normalises each
step's state before its gate and LoRA).

On CPU the compiled extension's kernel (csrc/layer_norm.cpp) reads a bf16 input once and writes its output once,
where the composed path upcasts the whole input, normalises it and casts it back; elsewhere (GPU, torch.compile, no
extension) the composed path runs. Both compute the same function, each row on its own (a row's result does not
depend on the others in its tensor, nor on whether a gradient is needed).
"""

from __future__ import annotations

import torch

from .. import _ext
from .._dispatch import resolve
from .._validate import FLOAT_DTYPES, check_finite_number, check_tensor
from .function import LayerNormFunction
from .reference import layer_norm_composed, layer_norm_reference

__all__ = ["layer_norm", "layer_norm_reference"]


def _kernel_applies(x):
    if torch.compiler.is_compiling():
        return False  # compiled graphs fuse the composed path themselves; the extension's loader is not traceable
    return (x.device.type == "cpu" and x.dtype in _ext.DTYPE_CODES and x.numel() > 0 and resolve(x.device) == "cpu"
            and _ext.library() is not None)


def layer_norm(x, eps=1e-6):
    """(x - mean) / sqrt(var + eps) over the last dim of x (..., D), in x's dtype, the statistics in fp32 (fp64 for
    fp64). No affine parameters."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    check_finite_number("eps", eps, positive=True)
    if _kernel_applies(x):
        return LayerNormFunction.apply(x.reshape(-1, x.shape[-1]).contiguous(), float(eps)).view(x.shape)
    return layer_norm_composed(x, eps)
