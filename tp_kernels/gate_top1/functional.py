"""gate_top1's public wrapper: the fused Gumbel-softmax top-1 router."""

from __future__ import annotations

from .._validate import check_gate_top1
from .op import gate_top1_fwd
from .reference import gumbel_noise


def gate_top1(logits, *, tau=1.0, noise=None, generator=None, hard=True, gumbel=None):
    """Pick one expert per row of ``logits (..., E)``.

    ``z = logits + noise``; ``expert_idx = argmax(z)`` (ties to the lowest index).
    Noise: ``noise`` if given (Gumbel samples, shape of logits); else Gumbel(0, 1)
    drawn from ``generator`` when ``gumbel`` is True, or when ``gumbel`` is None and a
    ``generator`` is given; else none (deterministic argmax, the inference default).

    Returns ``(expert_idx (...) int64, gate)``. With ``hard=True`` gate is ``(...)``,
    exactly 1.0 in the forward pass, with the straight-through gradient of
    ``softmax(z / tau)[expert_idx]`` flowing into logits. With ``hard=False`` gate is
    the soft weights ``softmax(z / tau)`` of shape ``(..., E)``. Gate is float32
    (float64 for float64 logits).
    """
    check_gate_top1(logits, tau, noise)
    if noise is None and (gumbel or (gumbel is None and generator is not None)):
        noise = gumbel_noise(logits.shape, generator=generator, device=logits.device)
    n_exp = logits.shape[-1]
    lead = logits.shape[:-1]
    weight, idx, _ = gate_top1_fwd(
        logits.reshape(-1, n_exp).contiguous(),
        None if noise is None else noise.reshape(-1, n_exp).contiguous(),
        float(tau),
        bool(hard),
        True,  # checked here
    )
    gate = weight.reshape(*lead) if hard else weight.reshape(*lead, n_exp)
    return idx.reshape(lead), gate
