"""routed_lora's public wrappers: per-token top-1 LoRA expert dispatch."""

from __future__ import annotations

import torch

from .._validate import check_expert_idx, routed_lora_signature
from .cpu import PACKED
from .op import RoutedLoRA, routed_lora_fwd


def reuse_packed_weights():
    """Context manager: the CPU extension's routed_lora calls inside share one packed copy of each (lora_a, lora_b)
    (the weights rearranged into panels, a pass over every expert). The caller promises the weights do not change
    inside; a recursion's T steps run in one (thinking_pixel's LatentRecursion). Outside, every call packs."""
    return PACKED.reuse()


def routed_lora(x, expert_idx, lora_a, lora_b, *, scale=1.0, gate=None):
    """Each token through the LoRA of its own expert: ``gate * scale * B_e (A_e x)``.

    Args:
        x: ``(..., D_in)`` activations (fp32, bf16, fp16 or fp64; accumulation is fp32 or better).
        expert_idx: ``(...)`` int32/int64, each in ``[0, E)``, or -1: skip the token (its output row is 0,
            nothing is computed for it, and it contributes to no gradient).
        lora_a: ``(E, R, D_in)``, or stacked ``(E, S, R, D_in)`` for S slices sharing one routing.
        lora_b: ``(E, D_out, R)``, or stacked ``(E, S, D_out, R)``.
        scale: a float multiplier (LoRA's alpha / r).
        gate: optional ``(...)`` per-token multiplier (the router's straight-through weight).

    Returns:
        ``(..., D_out)``, or ``(..., S * D_out)`` for the stacked form with slice ``s`` in
        columns ``[s * D_out, (s + 1) * D_out)`` -- the layout of a fused qkv ``nn.Linear``.

    Only each token's own expert is computed. Differentiable in x, lora_a, lora_b and gate.
    """
    routed_lora_signature(x, expert_idx, lora_a, lora_b, gate, scale)
    stacked = lora_a.dim() == 4
    a = lora_a if stacked else lora_a.unsqueeze(1)  # (E, S, R, D_in)
    b = lora_b if stacked else lora_b.unsqueeze(1)  # (E, S, D_out, R)
    n_exp, n_slice, rank, d_in = a.shape
    # eager: the index range checked here and the autograd.Function; compiled: the custom op, opaque to the graph,
    # which checks the index range (data: traced, the check would break the graph)
    eager = not torch.compiler.is_compiling()
    if eager:
        check_expert_idx(expert_idx, n_exp)

    lead = x.shape[:-1]
    args = (x.reshape(-1, d_in).contiguous(), expert_idx.reshape(-1).to(torch.int64).contiguous(), a.contiguous(),
            b.contiguous(), None if gate is None else gate.reshape(-1).contiguous(), float(scale))
    # meta tensors take the custom op too: its fake implementation gives their shapes
    y, *_ = RoutedLoRA.apply(*args) if eager and x.device.type != "meta" else routed_lora_fwd(*args, True)
    return y.reshape(*lead, n_slice * b.shape[2])
