"""Gate: the per-token top-1 router that picks one LoRA expert for each visual token."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_kernels

from ._checks import is_int, is_number

__all__ = ["Gate", "full_precision"]


def full_precision(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is float32 or float64, else float32: the precision the recursion's own weights and its
    gate's conditioning term keep under a low-precision model, or under weights stored in a low precision
    (diffusers' layerwise casting stores them in fp8 or fp16 between forwards)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class Gate(nn.Module):
    """Routes each token to one of M experts from the token itself and a conditioning vector.

    logits = token_proj(h) + cond_proj(SiLU(cond))      # (N, T, M)
    where h (N, T, D) are the (layer-normalised) current tokens and cond (N, D_c) the sum of the timestep
    and/or condition embeddings; either term is absent when the gate is built without it (ablations).
    The choice is tp_kernels.gate_top1: Gumbel(0, 1) noise in training (and at eval only if noise_at_eval),
    softmax(z / tau), hard argmax with a straight-through weight (exactly 1.0 forward) whose gradient flows
    into the logits; multiply an expert's output by that weight to train the gate.

    Init: small normal (std 0.02, like DiT's embedders), so routing starts token-dependent rather than all ties.
    This changes no output at init, because every expert's LoRA B starts at zero.
    """

    def __init__(self, dim, cond_dim, num_experts, tau=5.0, use_tokens=True, use_cond=True, noise_at_eval=False):
        super().__init__()
        if not is_int(num_experts) or num_experts < 1:
            raise ValueError(f"Gate num_experts must be an int >= 1, got {num_experts!r}")
        if not is_number(tau) or not tau > 0:
            raise ValueError(f"Gate tau must be a number > 0, got {tau!r}")
        if not (use_tokens or use_cond):
            raise ValueError("Gate needs at least one input: use_tokens and/or use_cond")
        self.num_experts = num_experts
        self.tau = float(tau)
        self.noise_at_eval = bool(noise_at_eval)
        self.token_proj = nn.Linear(dim, num_experts) if use_tokens else None
        self.cond_proj = nn.Linear(cond_dim, num_experts) if use_cond else None
        self.reset_parameters()

    def reset_parameters(self):
        for proj in (self.token_proj, self.cond_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)

    @property
    def noisy(self) -> bool:
        """Whether routing adds Gumbel noise now: in training, and at eval only if noise_at_eval."""
        return self.training or self.noise_at_eval

    def fused_terms(self, cond=None):
        """The gate in the form tp_kernels.refine_step takes: (token_weight (M, D) or None, cond_logits).

        logits(h, cond) == h @ token_weight^T + cond_logits, where cond_logits (N, 1, M) -- or (M,) without a
        conditioning input -- holds everything that does not depend on the tokens: the token projection's bias
        and cond_proj(SiLU(cond)). It is the same at every recursion step, so callers compute it once.

        token_weight comes as stored (callers cast it to their tokens' dtype); cond_logits are computed in
        full_precision of the weights' dtype, whatever the dtypes of cond and of the stored weights.
        """
        token_weight = None if self.token_proj is None else self.token_proj.weight
        bias = None if self.token_proj is None else self.token_proj.bias  # (M,)
        if bias is not None:
            bias = bias.to(full_precision(bias.dtype))
        if self.cond_proj is None:
            return token_weight, bias
        if cond is None:
            raise ValueError("this Gate uses a conditioning vector: pass cond (N, D_c)")
        weight = self.cond_proj.weight
        dtype = full_precision(weight.dtype)
        cond_logits = F.linear(F.silu(cond.to(dtype)), weight.to(dtype), self.cond_proj.bias.to(dtype))  # (N, M)
        if bias is not None:
            cond_logits = cond_logits + bias
        return token_weight, cond_logits.unsqueeze(1)  # (N, 1, M)

    def logits(self, h, cond=None):
        """h (N, T, D), cond (N, D_c) or None -> (N, T, M) routing logits."""
        token_weight, cond_logits = self.fused_terms(cond)
        if token_weight is None:
            return cond_logits.expand(*h.shape[:-1], self.num_experts)
        return F.linear(h, token_weight.to(h.dtype)) + cond_logits

    def forward(self, h, cond=None):
        """-> (expert_idx (N, T) int64, gate weight (N, T) fp32: 1.0 forward, straight-through backward)."""
        return tp_kernels.gate_top1(self.logits(h, cond), tau=self.tau, gumbel=self.noisy)

    def extra_repr(self):
        return f"experts={self.num_experts}, tau={self.tau:g}, noise_at_eval={self.noise_at_eval}"
