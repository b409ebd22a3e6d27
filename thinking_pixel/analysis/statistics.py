"""Routing statistics: expert usage, the entropy H(E) of the chosen expert and its mutual information with the
timestep, the condition and the token position, in bits (plug-in estimates from joint counts)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mutual_information", "routing_statistics"]


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.0" for a single outcome


def mutual_information(joint: np.ndarray) -> float:
    """I(X; E) in bits from a joint count (or probability) table (|X|, |E|)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if joint.ndim != 2 or total <= 0:
        raise ValueError(f"joint must be a non-empty 2-D table of counts, got shape {joint.shape}, sum {total}")
    p = joint / total
    return max(0.0, _entropy(p.sum(0)) + _entropy(p.sum(1)) - _entropy(p.ravel()))


def routing_statistics(counts: np.ndarray) -> dict:
    """Usage, entropy and mutual information from counts (timesteps K, classes C, positions N, experts M)."""
    if counts.ndim != 4:
        raise ValueError(f"counts must have shape (timesteps, classes, positions, experts), got {counts.shape}")
    n = counts.sum()
    num_experts = counts.shape[-1]
    usage = counts.sum((0, 1, 2)) / n  # (M,)
    h = _entropy(usage)
    out = {"tokens": int(n), "usage": usage.tolist(), "entropy_bits": h,
           "max_entropy_bits": math.log2(num_experts)}
    for name, axis in (("timestep", 0), ("class", 1), ("position", 2)):
        joint = np.moveaxis(counts, axis, 0).reshape(counts.shape[axis], -1, num_experts).sum(1)  # (|X|, M)
        joint = joint[joint.sum(1) > 0]  # values of X never seen (e.g. a class absent from the subset)
        mi = mutual_information(joint)
        out[f"mi_{name}_bits"] = mi
        out[f"nmi_{name}"] = mi / h if h > 0 else 0.0
        out[f"mi_bias_bits_{name}"] = (len(joint) - 1) * (num_experts - 1) / (2 * n * math.log(2))
    return out
