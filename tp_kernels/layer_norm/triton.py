"""layer_norm's ``triton`` backend: no kernel of its own. On CUDA tensors layer_norm runs torch.py's composed path
(torch's LayerNorm in the accumulation dtype, which inductor fuses in compiled graphs); refine_step's Triton kernels
fold the LayerNorm into themselves (refine_step/triton.py) and never call it."""

from __future__ import annotations

from .torch import layer_norm_composed

__all__ = ["layer_norm_composed"]
