"""Per-token top-1 LoRA expert dispatch."""

from __future__ import annotations

import torch

from .._validate import (FLOAT_DTYPES, INDEX_DTYPES, CheckedSignatures, check_finite_number, check_index_range,
                         check_same_device, check_tensor)
from .op import RoutedLoRA, _triton_checks, routed_lora_bwd, routed_lora_fwd
from .reference import routed_lora_reference

__all__ = ["routed_lora", "routed_lora_reference", "routed_lora_fwd", "routed_lora_bwd", "reuse_packed_weights"]


def reuse_packed_weights():
    """Context manager: the CPU extension's routed_lora calls inside share one packed copy of each (lora_a, lora_b)
    (the weights rearranged into panels, a pass over every expert). The caller promises the weights do not change
    inside; a recursion's T steps run in one (thinking_pixel's LatentRecursion). Outside, every call packs."""
    from .cpu_ext import PACKED

    return PACKED.reuse()


def _check(x, expert_idx, lora_a, lora_b, gate, scale):
    """routed_lora's arguments, but for the index range (data, checked per call)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("expert_idx", expert_idx, dtypes=INDEX_DTYPES)
    check_tensor("lora_a", lora_a, dim=(3, 4))
    check_tensor("lora_b", lora_b, dim=(3, 4))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., D_in)")
    if lora_a.dim() != lora_b.dim():
        raise ValueError(f"lora_a and lora_b must both be 3-D or both 4-D, got {lora_a.dim()} and {lora_b.dim()}")
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise TypeError(f"lora_a and lora_b must have x's dtype {x.dtype}, got {lora_a.dtype} and {lora_b.dtype}")
    stacked = lora_a.dim() == 4
    n_exp, n_slice, rank, d_in = lora_a.shape if stacked else (lora_a.shape[0], 1, *lora_a.shape[1:])
    if x.shape[-1] != d_in:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal lora_a's D_in ({d_in})")
    b = lora_b.shape if stacked else (lora_b.shape[0], 1, *lora_b.shape[1:])
    if b[0] != n_exp or b[1] != n_slice or b[3] != rank:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
            f"expected (E={n_exp}{f', S={n_slice}' if stacked else ''}, D_out, R={rank})"
        )
    if n_exp < 1 or rank < 1:
        raise ValueError(f"lora_a must have at least one expert and rank >= 1, got shape {tuple(lora_a.shape)}")
    if expert_idx.shape != x.shape[:-1]:
        raise ValueError(f"expert_idx must have shape {tuple(x.shape[:-1])} (x without its last dim), "
                         f"got {tuple(expert_idx.shape)}")
    if gate is not None:
        check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
        if gate.shape != x.shape[:-1]:
            raise ValueError(f"gate must have shape {tuple(x.shape[:-1])}, got {tuple(gate.shape)}")
    check_finite_number("scale", scale)
    check_same_device(x=x, expert_idx=expert_idx, lora_a=lora_a, lora_b=lora_b, gate=gate)


_check_signature = CheckedSignatures(_check)


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
    _check_signature(x, expert_idx, lora_a, lora_b, gate, scale)
    stacked = lora_a.dim() == 4
    a = lora_a if stacked else lora_a.unsqueeze(1)  # (E, S, R, D_in)
    b = lora_b if stacked else lora_b.unsqueeze(1)  # (E, S, D_out, R)
    n_exp, n_slice, rank, d_in = a.shape
    # eager: the arguments checked here and the autograd.Function; compiled: the custom op, opaque to the graph,
    # which checks the index range (data: traced, the check would break the graph)
    checked = not torch.compiler.is_compiling()
    if checked and not _triton_checks(expert_idx):
        check_index_range("expert_idx", expert_idx, n_exp, allow_skip=True)

    lead = x.shape[:-1]
    args = (x.reshape(-1, d_in).contiguous(), expert_idx.reshape(-1).to(torch.int64).contiguous(), a.contiguous(),
            b.contiguous(), None if gate is None else gate.reshape(-1).contiguous(), float(scale))
    # meta tensors take the custom op too: its fake implementation gives their shapes
    y, *_ = RoutedLoRA.apply(*args) if checked and x.device.type != "meta" else routed_lora_fwd(*args, checked)
    return y.reshape(*lead, n_slice * b.shape[2])
