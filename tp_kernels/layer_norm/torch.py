"""LayerNorm in composed torch ops: the ``torch`` backend, and what runs wherever the CPU kernel does not (the
``reference`` and ``triton`` backends, torch.compile, no extension)."""

from __future__ import annotations

import torch.nn.functional as F

from .._validate import acc_dtype


def layer_norm_composed(x, eps):
    """torch's LayerNorm in the accumulation dtype, cast back: a bf16 input's statistics stay fp32."""
    return F.layer_norm(x.to(acc_dtype(x.dtype)), (x.shape[-1],), eps=float(eps)).to(x.dtype)
