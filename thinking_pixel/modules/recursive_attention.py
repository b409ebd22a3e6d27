"""The recursion core: T latent steps of routed-LoRA attention inside one transformer block (the method).

Given the block's adaLN-modulated input x~ (N, T, D):

    a^0 = x~
    for t = 1 .. T-1:   e = gate(a), qkv = LoRA_e(LN(a))             -> attention -> a = attn_out + x~
    final step T:       e = gate(a), qkv = LoRA_e(LN(a)) + W^ x~      -> attention -> out proj

W^ is the block's frozen Q/K/V projection, used only at the last step (the paper: applying it at every step
compounds artefacts). The gate's straight-through weight multiplies the LoRA output, so the gate trains through
the experts' outputs. Intermediate states live before the out projection (heads merged). With every LoRA B at
zero (their init) the output is exactly the base attention's, for any T and M.

Two classes:
- LatentRecursion holds the experts and the gate and runs the loop (``recurse``). It knows nothing about how
  a model stores its projections or runs its attention: the caller hands it ``base_projection`` (W^ x~, called
  once, at the last step, so separate q/k/v Linears cost three GEMMs per call, never a weight concatenation)
  and ``attend`` (the attention of one step). Our DiT's RecursiveAttention and the diffusers processors
  (thinking_pixel.integrations.diffusers) are thin users of it.
- RecursiveAttention: LatentRecursion over an Attention's fused qkv Linear (our DiT's blocks).

Each step's LN + gate + routed LoRA (+ W^ x~) is one call of tp_kernels.refine_step (on GPU, Triton kernels that
never write LN(a)); the gate's token-independent logits (biases and conditioning) are computed once per call,
not once per step.

``norm_first_step=False`` feeds x~ itself (not LN(x~)) to the first step's gate and experts. x~ already is a
modulated LayerNorm output; with it, T = 1 is exactly a LoRA on the Q/K/V projections (what a peft adapter
computes, so thinking_pixel.export_peft reproduces an expert exactly). The paper's definition, and the default,
normalises every step.

Per-token halting (adaptive depth, ``halting=`` "learned" or "delta") is described in
:mod:`thinking_pixel.modules.halting`; with the default "none" the loop is the method's.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_kernels
from tp_kernels.refine_step.deferred import defer_weight_grads

from ._checks import is_int
from .attention import Attention, attend
from .gate import Gate
from .halting import Halting
from .routed_lora import RoutedLoRA

__all__ = ["LatentRecursion", "RecursiveAttention"]


class LatentRecursion(nn.Module):
    """The experts, the gate and the T-step loop of the method, for a block of width ``dim``.

    Parameters (their names are part of the checkpoint format): ``lora`` (RoutedLoRA, 3 slices: Q, K, V, each
    (dim -> dim)), ``gate`` (Gate over dim-wide tokens and a cond_dim-wide conditioning vector).

    ``halting`` (Halting): the per-token halting rule, its optional learned head (``halting.head``, a parameter
    of the recursion) and the count of steps taken.

    ``recorder``: None, or a callable(step, expert_idx (N, T), state (N, T, D)) called at each step with the
    routing and the state entering it (used by ThinkingPixelDiT.record_routing; costs nothing when None). A
    halted token's expert_idx is -1.
    """

    def __init__(self, dim: int, cond_dim=None, *, base_modules=None, experts=2, steps=2, rank=128, tau=5.0,
                 lora_alpha=None, gate_tokens=True, gate_cond=True, gate_noise_at_eval=False, norm_first_step=True,
                 halting="none", halt_threshold=None, halt_head=None, halt_prior=0.5, halt_kl_weight=0.01):
        super().__init__()
        for name, module in (base_modules or {}).items():  # a wrapper's own modules come first in parameters()
            self.add_module(name, module)
        if not is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.dim = dim
        self.steps = steps
        self.norm_first_step = bool(norm_first_step)
        self.eps = 1e-6  # of the LayerNorm (no affine) applied to each step's input
        self.lora = RoutedLoRA(experts, dim, dim, rank, slices=3, alpha=lora_alpha)
        self.gate = Gate(dim, dim if cond_dim is None else cond_dim, experts, tau=tau, use_tokens=gate_tokens,
                         use_cond=gate_cond, noise_at_eval=gate_noise_at_eval)
        self.halting = Halting(dim, mode=halting, threshold=halt_threshold,
                               head=halting == "learned" if halt_head is None else halt_head, prior=halt_prior,
                               kl_weight=halt_kl_weight, eps=self.eps)
        self.recorder = None
        self._step_weights = None  # (lora_a, lora_b) as this forward's steps use them (see recurse)

    def recurse(self, x, cond, base_projection, attend_step):
        """Run the T steps on x~ (N, T, D); returns the last step's attention output.

        cond: (N, D_c) the gate's conditioning vector, or None if the gate does not use one.
        base_projection(): -> (N, T, 3D) the frozen [q | k | v] projection of x~; called once, at the last step.
        attend_step(qkv (N, T, 3D), last: bool) -> the attention output of the step, heads merged, before the
            output projection. Its first T rows (dim 1) are the vision tokens' (N, T, D); at the last step a joint
            attention may append the context tokens' rows, which come back to the caller as they are.
        """
        gate_terms = self.gate.fused_terms(cond)  # token_weight (M, D) or None, cond_logits (N, 1, M) or (M,)
        halting = self.halting
        halting.loss = None
        # the experts' weights for this call's steps: aliases that reduce their T gradients in one pass where the
        # extension can (defer_weight_grads), else the weights themselves
        lora = self.lora
        self._step_weights = (defer_weight_grads(lora.lora_a, lora.lora_b)
                              if lora is not None and self.steps > 1 and x.dtype == lora.lora_a.dtype else None)
        try:
            if torch.compiler.is_compiling():
                return self._recurse(x, gate_terms, base_projection, attend_step)
            with tp_kernels.reuse_packed_weights():  # the T steps' experts packed once (CPU extension)
                return self._recurse(x, gate_terms, base_projection, attend_step)
        finally:
            self._step_weights = None

    def _recurse(self, x, gate_terms, base_projection, attend_step):
        halting = self.halting
        if halting.pondering() and self.steps > 1:
            return self._ponder(x, gate_terms, base_projection, attend_step)
        rule = halting.mode if halting.active_at_inference() else "none"
        a = x  # a^0 = x~, (N, T, D)
        halted = None  # (N, T) bool once a token may have halted
        kept_qkv = 0.0  # what a halted token shows the others: its last keys / values (none before step 1)
        cum_halt = torch.zeros(x.shape[:-1], device=x.device)  # (N, T) P(halted so far), learned rule
        # (N, T) steps taken, the final step counted for all; without a rule every token takes T: nothing to count
        ran = None if rule == "none" else torch.ones(x.shape[:-1], dtype=torch.int64, device=x.device)
        for step in range(1, self.steps):  # intermediate steps
            if rule == "learned":
                lam = halting.halt_probability(a)  # (N, T)
                cum_halt = cum_halt + (1 - cum_halt) * lam
                halted = cum_halt >= halting.threshold
            active = None if halted is None else ~halted  # (N, T)
            qkv, _ = self._refine(a, step, gate_terms, active=active)
            if active is not None:
                qkv = torch.where(active[..., None], qkv, kept_qkv)
            if ran is not None:
                ran = ran + (1 if active is None else active)
            new_a = attend_step(qkv, False) + x  # residual back to the block input, (N, T, D)
            if active is not None:
                new_a = torch.where(active[..., None], new_a, a)  # a halted token keeps its state
            if rule == "delta":
                change = (new_a - a).float().norm(dim=-1) / new_a.float().norm(dim=-1).clamp_min(1e-12)
                halted = change < halting.threshold  # a halted token did not move: it stays halted
            a, kept_qkv = new_a, qkv
        if ran is not None:
            halting.count(ran)
        qkv, _ = self._refine(a, self.steps, gate_terms, base=base_projection())  # final step: W^ x~ + LoRA
        return attend_step(qkv, True)  # (N, T, D); maybe (N, T + L, D)

    def _ponder(self, x, gate_terms, base_projection, attend_step):
        """Training with the learned halting head: the expectation of the output over the stopping step
        (see thinking_pixel.modules.halting); sets halting.loss, the KL term to the geometric prior."""
        halting = self.halting
        n_tok = x.shape[1]
        base = base_projection()  # W^ x~, shared by every readout
        a = x
        remaining = torch.ones(x.shape[:-1], device=x.device)  # (N, T) P(not halted before step t)
        probs, mixed = [], 0.0
        for step in range(1, self.steps + 1):
            lam = halting.halt_probability(a) if step < self.steps else torch.ones_like(remaining)  # (N, T)
            p = remaining * lam  # P(stop before step t) = P(readout from a^(t-1))
            readout_qkv, _ = self._refine(a, step, gate_terms, base=base)
            readout = attend_step(readout_qkv, True)  # (N, T, D); maybe (N, T + L, D)
            vision = readout[:, :n_tok] * p[..., None].to(readout.dtype)
            # context rows (joint attention) come from the full-depth readout
            mixed = mixed + vision if step < self.steps else torch.cat([mixed + vision, readout[:, n_tok:]], dim=1)
            probs.append(p)
            remaining = remaining * (1 - lam)
            if step < self.steps:
                qkv, _ = self._refine(a, step, gate_terms)
                a = attend_step(qkv, False) + x
        halting.loss = halting.kl_weight * halting.kl_to_prior(torch.stack(probs, dim=-1))
        return mixed

    def _refine(self, a, step, gate_terms, base=None, active=None):
        """Step ``step`` on the states a (N, T, D): its Gumbel noise, refine, the halted tokens' expert -1 (active
        (N, T) bool: the tokens still recursing), the recorder. -> (qkv (N, T, 3D), expert_idx (N, T))."""
        gate_shape = (*a.shape[:-1], self.gate.num_experts)  # (N, T, M)
        noise = tp_kernels.gumbel_noise(gate_shape, device=a.device) if self.gate.noisy else None
        skip = {} if active is None else {"active": active}  # halted tokens: no expert, no LoRA work
        qkv, expert_idx = self.refine(a, gate_terms, noise, None if base is None else base.to(a.dtype),
                                      normalize=self.norm_first_step or step > 1, **skip)
        if self.recorder is not None:
            self.recorder(step, expert_idx, a)
        return qkv, expert_idx

    def refine(self, a, gate_terms, noise, base, normalize, **skip):
        """One step's LN + gate + routed LoRA (+ base): -> qkv (N, T, 3D) = base + weight * LoRA_e(LN(a)), and
        expert_idx e (N, T). One tp_kernels.refine_step call; subclasses may compute it another way (baselines).
        ``skip``: {"active": (N, T) bool} under halting, else empty: an inactive token gets no LoRA work and
        expert_idx -1 (refine_step's contract; overrides of refine keep it)."""
        dtype = a.dtype  # weights follow the activations (autocast leaves custom ops' inputs alone)
        token_weight, cond_logits = gate_terms
        lora_a, lora_b = self._step_weights or (self.lora.lora_a, self.lora.lora_b)
        qkv, expert_idx, _ = tp_kernels.refine_step(
            a, lora_a.to(dtype), lora_b.to(dtype),
            token_weight=None if token_weight is None else token_weight.to(dtype), cond_logits=cond_logits,
            tau=self.gate.tau, noise=noise, scale=self.lora.scale, base=base, eps=self.eps, normalize=normalize,
            **skip,
        )
        return qkv, expert_idx

    def recursion_parameters(self):
        """(name, parameter) of what the recursion adds: the experts and the gate (names relative to self)."""
        return [(f"{part}.{name}", p) for part in ("lora", "gate", "halting") if getattr(self, part) is not None
                for name, p in getattr(self, part).named_parameters()]

    def extra_repr(self):
        return f"steps={self.steps}, norm_first_step={self.norm_first_step}"


class RecursiveAttention(LatentRecursion):
    """Drop-in replacement of an Attention: keeps its qkv and proj Linears, adds experts and a gate.

    forward(x (N, T, D), cond (N, D_c) or None, context (N, L, D) or None) -> (N, T, D)
      cond: the gate's conditioning vector (timestep and/or condition embedding); required if the gate uses it.
      context: optional extra tokens (e.g. text). Their K/V come from the frozen qkv projection, are computed
        once per call and reused at every step; vision queries attend jointly over [vision; context]. The
        context's own attention output is not needed (it would be discarded), so its queries are not computed.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, cond_dim=None, **kwargs):
        dim = proj.out_features
        if qkv.in_features != dim or qkv.out_features != 3 * dim:
            raise ValueError(f"qkv must be a Linear({dim}, {3 * dim}) fused projection, "
                             f"got Linear({qkv.in_features}, {qkv.out_features})")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, cond_dim, base_modules={"qkv": qkv, "proj": proj}, **kwargs)
        self.num_heads = num_heads

    @classmethod
    def from_attention(cls, attn: Attention, cond_dim=None, **kwargs) -> "RecursiveAttention":
        """Wrap an Attention, sharing its qkv and proj modules."""
        return cls(attn.qkv, attn.proj, attn.num_heads, cond_dim, **kwargs)

    def context_kv(self, context):
        """Context tokens (N, L, D) -> their frozen keys and values, each (N, L, D)."""
        d = self.dim
        bias = None if self.qkv.bias is None else self.qkv.bias[d:]
        kv = F.linear(context, self.qkv.weight[d:], bias)  # (N, L, 2D): the k and v columns only
        return tuple(kv.chunk(2, dim=-1))

    def forward(self, x, cond=None, context=None):
        context_kv = None
        if context is not None:
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.dim:
                raise ValueError(f"context must have shape ({x.shape[0]}, L, {self.dim}), got {tuple(context.shape)}")
            context_kv = self.context_kv(context)
        out = self.recurse(x, cond, lambda: self.qkv(x),
                           lambda qkv, last: attend(qkv, self.num_heads, context_kv))  # (N, T, D)
        return self.proj(out)  # (N, T, D)

    def extra_repr(self):
        return f"{super().extra_repr()}, num_heads={self.num_heads}"
