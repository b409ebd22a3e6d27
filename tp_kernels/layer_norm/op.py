"""The LayerNorm kernel's autograd: a plain torch.autograd.Function over the extension (cpu.py).

Not a torch.library custom op, unlike the package's other kernels: a LayerNorm's work is small next to a custom op's
Python autograd wrapper. At the default preset's 1024 x 128 (fp32, forward + backward) this Function and torch's
LayerNorm both take ~0.13 ms (benchmarks/test_layer_norm.py); a custom op around the same kernel took ~0.2 ms when
this was chosen. Compiled graphs take the composed path, which inductor fuses.
"""

from __future__ import annotations

import torch

from . import cpu


class LayerNormFunction(torch.autograd.Function):
    """x (N, D) contiguous float32 / bfloat16 CPU tensor -> LN(x) in x's dtype; mean and rstd (fp32) kept."""

    @staticmethod
    def forward(ctx, x, eps):
        y, mean, rstd = cpu.forward(x, eps)
        ctx.save_for_backward(x, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd = ctx.saved_tensors
        return cpu.backward(grad_y.to(x.dtype).contiguous(), x, mean, rstd), None
