"""layer_norm's public wrapper: LayerNorm without affine parameters, statistics in fp32 for fp32 and bf16 inputs
(the recursion normalises each step's state before its gate and LoRA).

On CPU the compiled extension's kernel (cpu.py, csrc/layer_norm.cpp) reads a bf16 input once and writes its output
once, where the composed path (torch.py) upcasts the whole input, normalises it and casts it back; elsewhere (GPU,
torch.compile, no extension) the composed path runs. Both compute the same function, each row on its own (a row's
result does not depend on the others in its tensor, nor on whether a gradient is needed).
"""

from __future__ import annotations

import torch

from .. import _ext
from .._dispatch import resolve
from .._validate import check_layer_norm
from .op import LayerNormFunction
from .torch import layer_norm_composed


def _kernel_applies(x):
    if torch.compiler.is_compiling():
        return False  # compiled graphs fuse the composed path themselves; the extension's loader is not traceable
    return (x.device.type == "cpu" and x.dtype in _ext.DTYPE_CODES and x.numel() > 0 and resolve(x.device) == "cpu"
            and _ext.library() is not None)


def layer_norm(x, eps=1e-6):
    """(x - mean) / sqrt(var + eps) over the last dim of x (..., D), in x's dtype, the statistics in fp32 (fp64 for
    fp64). No affine parameters."""
    check_layer_norm(x, eps)
    if _kernel_applies(x):
        return LayerNormFunction.apply(x.reshape(-1, x.shape[-1]).contiguous(), float(eps)).view(x.shape)
    return layer_norm_composed(x, eps)
