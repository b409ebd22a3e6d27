"""The recursion as a user writes it without tp_kernels: diffusers attention processors whose step is plain torch.

Both subclass apply_recursion's RecursionAttnProcessor and replace only ``refine`` (one step's LayerNorm, gate and
experts), so the loop, the attention, the gate's parameters and the experts' parameters (``lora.lora_a``
(M, 3, R, D), ``lora.lora_b`` (M, 3, D, R)) are the same: a state dict of one loads into the other, and with equal
weights and noise they compute the same function as refine_step.

    DenseEinsumProcessor  every expert on every token in three einsums (down, up, mix by the one-hot gate)
    MaskedLoopProcessor   per expert, a boolean mask of its tokens, their LoRA, written back into place
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tp_kernels
from thinking_pixel.recursion.diffusers import RecursionAttnProcessor


class _TorchStepProcessor(RecursionAttnProcessor):
    """refine in plain torch; subclasses give ``experts(h, idx, weight)`` -> the weighted LoRA outputs (N, T, 3D)."""

    def refine(self, a, gate_terms, noise, base, normalize, active=None):
        if active is not None:
            raise NotImplementedError("the benchmark processors run without halting")
        h = F.layer_norm(a, (self.dim,), eps=self.eps) if normalize else a  # (N, T, D)
        token_weight, cond_logits = gate_terms
        logits = cond_logits.expand(*h.shape[:-1], -1)  # (N, T, M)
        if token_weight is not None:
            logits = F.linear(h, token_weight.to(h.dtype)) + cond_logits
        idx, probs = tp_kernels.gate_top1_reference(logits, noise, self.gate.tau, hard=False)  # (N, T), (N, T, M)
        p = probs.gather(-1, idx[..., None])  # (N, T, 1)
        weight = (1 + p - p.detach()).to(h.dtype)  # 1.0 forward; the gate's straight-through gradient
        lora = self.experts(h, idx, weight)  # (N, T, 3D)
        return (lora if base is None else base + lora), idx

    def _weights(self, dtype):
        return self.lora.lora_a.to(dtype), self.lora.lora_b.to(dtype) * self.lora.scale


class DenseEinsumProcessor(_TorchStepProcessor):
    def experts(self, h, idx, weight):
        lora_a, lora_b = self._weights(h.dtype)  # (M, 3, R, D), (M, 3, D, R)
        down = torch.einsum("ntd,esrd->ntesr", h, lora_a)  # (N, T, M, 3, R)
        up = torch.einsum("ntesr,esor->nteso", down, lora_b)  # (N, T, M, 3, D)
        mix = F.one_hot(idx, lora_a.shape[0]).to(h.dtype) * weight  # (N, T, M)
        return torch.einsum("nteso,nte->ntso", up, mix).flatten(-2)  # (N, T, 3D)


class MaskedLoopProcessor(_TorchStepProcessor):
    def experts(self, h, idx, weight):
        lora_a, lora_b = self._weights(h.dtype)
        out = h.new_zeros(*h.shape[:-1], 3, self.dim)  # (N, T, 3, D)
        for e in range(lora_a.shape[0]):
            mask = idx == e  # (N, T); boolean indexing reads the count on the host
            down = torch.einsum("nd,srd->nsr", h[mask], lora_a[e])  # (n_e, 3, R)
            out[mask] = torch.einsum("nsr,sor->nso", down, lora_b[e]) * weight[mask][..., None]  # (n_e, 3, D)
        return out.flatten(-2)  # (N, T, 3D)


PROCESSORS = {"dense einsum": DenseEinsumProcessor, "masked loop": MaskedLoopProcessor}
