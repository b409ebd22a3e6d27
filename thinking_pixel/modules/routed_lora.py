"""RoutedLoRA: a bank of LoRA experts over a fused projection; each token uses the expert it was routed to."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import tp_kernels

from ._checks import is_int, is_number

__all__ = ["RoutedLoRA"]


class RoutedLoRA(nn.Module):
    """E LoRA experts, each a pair (A_e, B_e) per slice of a fused projection (S = 3 for a qkv Linear).

    forward(x (..., D_in), expert_idx (...), gate=None) -> (..., S * D_out) with slice s in columns
    [s * D_out, (s + 1) * D_out): ``gate * scale * B_{e,s} A_{e,s} x`` for each token's expert e.

    Parameters: lora_a (E, S, R, D_in), kaiming-uniform like peft's lora_A (bound 1 / sqrt(D_in));
    lora_b (E, S, D_out, R), zero-initialised, so the module outputs exactly zero until training moves it.
    scale: 1.0 when alpha is None, else alpha / rank (LoRA's convention).
    """

    def __init__(self, num_experts, in_features, out_features, rank, slices=3, alpha=None):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("in_features", in_features),
                            ("out_features", out_features), ("rank", rank), ("slices", slices)):
            if not is_int(value) or value < 1:
                raise ValueError(f"RoutedLoRA {name} must be an int >= 1, got {value!r}")
        if alpha is not None and (not is_number(alpha) or alpha <= 0):
            raise ValueError(f"RoutedLoRA alpha must be None or a number > 0, got {alpha!r}")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.rank, self.slices, self.alpha = rank, slices, alpha
        self.scale = 1.0 if alpha is None else float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(num_experts, slices, rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(num_experts, slices, out_features, rank))
        self.reset_parameters()

    def reset_parameters(self):
        # Each (R, D_in) matrix like nn.Linear / peft's lora_A: fan_in = D_in.
        nn.init.kaiming_uniform_(self.lora_a.view(-1, self.in_features), a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x, expert_idx, gate=None):
        # Weights follow the activation dtype (autocast leaves custom ops' inputs alone).
        a = self.lora_a.to(x.dtype)  # (E, S, R, D_in)
        b = self.lora_b.to(x.dtype)  # (E, S, D_out, R)
        if gate is not None:
            gate = gate.to(x.dtype)
        return tp_kernels.routed_lora(x, expert_idx, a, b, scale=self.scale, gate=gate)  # (..., S * D_out)

    def extra_repr(self):
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, slices={self.slices}, scale={self.scale:g}")
