"""LayerNorm without affine parameters in plain torch: the specification the CPU kernel is tested against.

The ``reference`` backend has no implementation of its own: layer_norm runs torch.py's composed path there (torch's
LayerNorm in the accumulation dtype), as on every backend where the CPU kernel does not run.
"""

from __future__ import annotations

import torch


def layer_norm_reference(x, eps):
    """(x - mean) / sqrt(var + eps) over the last dim, written out in x's dtype (float64 in the tests)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)  # biased, as LayerNorm's
    return (x - mean) * torch.rsqrt(var + eps)
