"""LayerNorm without affine parameters in plain torch: the specification the CPU kernel is tested against, and the
composed path that runs wherever the kernel does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import acc_dtype


def layer_norm_reference(x, eps):
    """(x - mean) / sqrt(var + eps) over the last dim, written out in x's dtype (float64 in the tests)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)  # biased, as LayerNorm's
    return (x - mean) * torch.rsqrt(var + eps)


def layer_norm_composed(x, eps):
    """torch's LayerNorm in the accumulation dtype, cast back: a bf16 input's statistics stay fp32."""
    return F.layer_norm(x.to(acc_dtype(x.dtype)), (x.shape[-1],), eps=float(eps)).to(x.dtype)
