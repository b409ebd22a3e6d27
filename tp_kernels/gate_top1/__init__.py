"""Fused Gumbel-softmax top-1 router: ``gate_top1`` (functional.py), its reference, and the registered op."""

from .functional import gate_top1
from .op import gate_top1_fwd
from .reference import gate_top1_reference, gumbel_noise

__all__ = ["gate_top1", "gate_top1_reference", "gumbel_noise", "gate_top1_fwd"]
