"""The refinement step on CPU, the ``cpu`` backend: the compiled extension's gate and routed LoRA, with the glue
folded (torch.py's driver with the extension's modules; without the extension, the composed torch ones).

refine_step runs the LayerNorm before this op on CPU (tp_kernels.layer_norm, normalize=False here): its output
feeds the extension's kernels anyway, and autograd then keeps it and its statistics for the backward, which saves a
LayerNorm pass there. Called with normalize=True, the op runs it itself.

Forward, three passes over the tokens' activations:
    1. h = LN(a) in one pass (statistics and output together; torch.native_layer_norm);
    2. gate logits h W^T (N, E): the extension's row-by-row kernel (fp32 accumulation, rounded to the state's
       dtype as the gate's Linear's output would be), the conditioning rows added in place (G, 1, E) -> (N, E);
       top-1 in the extension's one-pass gate kernel;
    3. routed LoRA in the extension (tokens grouped, shrink + expand per cache-resident tile), with the base
       added in place into its output (no separate output allocation: the add touches pages already hot).

Backward: torch.py's backward_with, the token term's d h accumulated in place by the extension's row kernel (fp32,
one rounding).
"""

from __future__ import annotations

from .. import _ext
from ..gate_top1 import torch as _gate_torch
from ..routed_lora import torch as _lora_torch
from .torch import backward_with as _backward_with
from .torch import gate_ln_backward, step_forward


def _lora():
    return _ext.routed_lora_cpu() or _lora_torch


def _gate():
    return _ext.gate_cpu() or _gate_torch


def _gate_ln_backward(*args):
    return gate_ln_backward(*args, gate=_gate())


def forward(*args):
    return step_forward(*args, lora=_lora(), gate=_gate())


def backward_with(lora, *args):
    """torch.backward_with with ``lora``'s routed-LoRA backward (the extension's, or deferred.DeferredWeightGrads)
    and the extension's token-term gradient."""
    return _backward_with(lora, *args, tail=_gate_ln_backward)


def backward(*args):
    return backward_with(_lora(), *args)
