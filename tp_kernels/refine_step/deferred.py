"""Weight gradients of a recursion's T refinement steps, reduced in one pass after the last step's backward.

Each step's backward would otherwise reduce dA and dB over its own tokens (K = the tokens per expert of one step:
short GEMMs) and autograd would add the T results. :func:`defer_weight_grads` hands the steps aliases of the
weights: their refine_step backward then computes only the input gradients, keeping the rows each reduction
needs, and the aliases' own backward, which autograd runs after every step's (each step uses them), reduces all
steps' rows at once. Eager CPU with the compiled extension and float32 only; anywhere else the weights come back
unchanged and every step reduces its own.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._dispatch import resolve
from ..routed_lora import cpu as _lora_cpu

_ATTR = "_tp_deferred_weight_grads"


class DeferredWeightGrads:
    """The rows the steps' backward kept for the weight gradients of one (lora_a, lora_b) pair."""

    def __init__(self, lora_a, lora_b):
        self.lora_a, self.lora_b = lora_a, lora_b
        self.rows = []

    def backward(self, grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w, need_gate):
        """The routed-LoRA backward's interface (routed_lora/cpu.py's backward): computes dx and the
        gate's gradient now, keeps the weight-gradient rows, and returns empty dA, dB."""
        dx, dgate, rows = _lora_cpu.backward_rows(grad_y, x, idx, lora_a, lora_b, gate, h, scale, need_x,
                                                  need_gate)
        if need_w:
            self.rows.append(rows)
        return dx, x.new_empty(0), x.new_empty(0), dgate

    def reduce(self):
        """-> dA, dB summed over the kept steps (zeros when none kept any)."""
        rows, self.rows = self.rows[::-1], []  # the steps' backward ran last step first: sum in step order
        if not rows:
            return torch.zeros_like(self.lora_a), torch.zeros_like(self.lora_b)
        return _lora_cpu.weight_grads(rows, self.lora_a, self.lora_b)


class _Defer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lora_a, lora_b, collector):
        ctx.collector = collector
        ctx.set_materialize_grads(False)  # the steps return no gradient for the aliases
        return lora_a.view_as(lora_a), lora_b.view_as(lora_b)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        da, db = ctx.collector.reduce()
        return da if grad_a is None else da + grad_a, db if grad_b is None else db + grad_b, None


def defer_weight_grads(lora_a, lora_b):
    """(lora_a, lora_b) -> aliases whose use in refine_step defers the weight gradients as described above, or the
    weights themselves where that does not apply (no gradient wanted, torch.compile, not float32, not the CPU
    extension)."""
    if (not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad)
            or torch.compiler.is_compiling() or lora_a.dtype != torch.float32 or lora_b.dtype != torch.float32
            or lora_a.device.type != "cpu" or resolve(lora_a.device) != "cpu" or _ext.library() is None):
        return lora_a, lora_b
    collector = DeferredWeightGrads(lora_a, lora_b)
    a_alias, b_alias = _Defer.apply(lora_a, lora_b, collector)
    setattr(a_alias, _ATTR, collector)
    return a_alias, b_alias


def collector_for(lora_a):
    """The DeferredWeightGrads a refine_step's lora_a belongs to, or None."""
    return getattr(lora_a, _ATTR, None)
