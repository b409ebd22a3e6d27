"""The recursion core: T latent steps of routed-LoRA attention inside one transformer block (the method).

Given the block's adaLN-modulated input x~ (N, T, D):

    a^0 = x~
    for t = 1 .. T-1:   e = gate(a), qkv = LoRA_e(LN(a))             -> attention -> a = attn_out + x~
    final step T:       e = gate(a), qkv = LoRA_e(LN(a)) + W^ x~      -> attention -> out proj

W^ is the block's frozen Q/K/V projection, used only at the last step (the paper: applying it at every step
compounds artefacts). The gate's straight-through weight multiplies the LoRA output, so the gate trains through
the experts' outputs. Intermediate states live before the out projection (heads merged). With every LoRA B at
zero (their init) the output is exactly the base attention's, for any T and M.

``lora_b_std > 0`` starts the experts' B away from zero (N(0, lora_b_std^2)), so the intermediate steps move the
state from the first update on, and multiplies the LoRA of the final step (the one added to W^ x~) by a learned
scalar ``final_gain`` that starts at zero: at init the output is still exactly the base attention's, and the
gain's gradient <dL/dqkv, LoRA_e(LN(a^(T-1)))> is non-zero from the first step, so training opens it.

Its classes:
- LatentRecursion holds the experts and the gate and runs the loop (``recurse``). It knows nothing about how
  a model stores its projections or runs its attention: the caller hands it ``base_projection`` (W^ x~, called
  once, at the last step, so separate q/k/v Linears cost three GEMMs per call, never a weight concatenation)
  and ``attend`` (the attention of one step). Our DiT's RecursiveAttention and the diffusers processors
  (thinking_pixel.recursion.diffusers) are thin users of it.
- RecursiveAttention: LatentRecursion over an Attention's fused qkv Linear (our DiT's blocks).
- RoutedLoRA: the bank of LoRA experts over a fused projection; each token uses the expert it was routed to.
- Gate: the per-token top-1 router that picks one expert for each visual token.
- Halting: per-token halting of the loop (below).

Each step's LN + gate + routed LoRA (+ W^ x~) is one call of tp_kernels.refine_step (on GPU, Triton kernels that
never write LN(a)); the gate's token-independent logits (biases and conditioning) are computed once per call,
not once per step.

``norm_first_step=False`` feeds x~ itself (not LN(x~)) to the first step's gate and experts. x~ already is a
modulated LayerNorm output; with it, T = 1 is exactly a LoRA on the Q/K/V projections (what a peft adapter
computes, so thinking_pixel.export_peft reproduces an expert exactly). The paper's definition, and the default,
normalises every step.

Per-token halting (adaptive depth, ``halting=`` "learned" or "delta") is described in
the Halting section below; with the default "none" the loop is the method's.

Halting -- Per-token halting of the latent recursion (adaptive depth; the paper names fixed depth as a limitation).

Each token decides, before each intermediate step t = 1 .. T-1, whether to stop recursing. A halted token keeps
its state a^(t-1), its last keys/values stay the context the others attend to, and the final step (frozen base
projection + its expert's LoRA on the kept state) reads it out like any other token, so a token that halts
before step t takes t steps in all (T without halting). Two rules:

- ``learned`` (PonderNet, Banino et al. 2021): a halting head gives lambda_t = sigmoid(w . LN(a^(t-1)) + b), the
  probability of stopping before step t given that the token got there (lambda_T = 1). In training the block
  output is the expectation over the stopping step, sum_t p_t out_t with p_t = lambda_t prod_{j<t} (1 -
  lambda_j) and out_t the final step read out from a^(t-1) (the mean-field form of PonderNet's expected loss:
  one network pass instead of T), and KL(p || geometric(halt_prior) truncated at T), times halt_kl_weight, is
  added to the loss. At inference a token halts once its cumulative halting probability reaches the threshold
  (0.5 = the median stopping step).
- ``delta`` (training-free): a token halts once its state stops moving, ||a^t - a^(t-1)|| / ||a^t|| < threshold.
  It needs one intermediate step to measure a change, so it takes at least 2 steps (for T >= 2).

Halting applies in eval mode (training runs all T steps, or the pondering expectation for ``learned``). The
decisions are tensors: no host synchronisation, so the loop always runs T iterations; a halted token keeps its
state and its last keys/values, and tp_kernels.refine_step(active=...) gives it expert -1, which the routed-LoRA
kernels skip inside (no multiply, no gather or scatter of the other tokens; its LoRA rows come back zero and the
kept keys/values are selected back in with one elementwise where). Its LayerNorm and gate logits are still
computed, and attention still runs over every token: the others attend to its kept keys/values, and its own query
row is computed and discarded (an attention kernel that skips query rows would save that share).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_kernels
from tp_kernels.refine_step.deferred import defer_weight_grads

from .._checks import is_int, is_number
from ..models.attention import Attention, attend

__all__ = ["DEFAULT_THRESHOLDS", "HALTING_MODES", "Gate", "Halting", "LatentRecursion", "RecursiveAttention",
           "RoutedLoRA", "check_halting", "full_precision"]


class RoutedLoRA(nn.Module):
    """E LoRA experts, each a pair (A_e, B_e) per slice of a fused projection (S = 3 for a qkv Linear).

    forward(x (..., D_in), expert_idx (...), gate=None) -> (..., S * D_out) with slice s in columns
    [s * D_out, (s + 1) * D_out): ``gate * scale * B_{e,s} A_{e,s} x`` for each token's expert e.

    Parameters: lora_a (E, S, R, D_in), kaiming-uniform like peft's lora_A (bound 1 / sqrt(D_in));
    lora_b (E, S, D_out, R), zero-initialised, so the module outputs exactly zero until training moves it
    (b_std > 0: drawn from N(0, b_std^2) instead).
    scale: 1.0 when alpha is None, else alpha / rank (LoRA's convention).
    """

    def __init__(self, num_experts, in_features, out_features, rank, slices=3, alpha=None, b_std=0.0):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("in_features", in_features),
                            ("out_features", out_features), ("rank", rank), ("slices", slices)):
            if not is_int(value) or value < 1:
                raise ValueError(f"RoutedLoRA {name} must be an int >= 1, got {value!r}")
        if alpha is not None and (not is_number(alpha) or alpha <= 0):
            raise ValueError(f"RoutedLoRA alpha must be None or a number > 0, got {alpha!r}")
        if not is_number(b_std) or not b_std >= 0:
            raise ValueError(f"RoutedLoRA b_std must be a number >= 0, got {b_std!r}")
        self.b_std = float(b_std)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.rank, self.slices, self.alpha = rank, slices, alpha
        self.scale = 1.0 if alpha is None else float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(num_experts, slices, rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(num_experts, slices, out_features, rank))
        self.reset_parameters()

    def reset_parameters(self):
        # Each (R, D_in) matrix like nn.Linear / peft's lora_A: fan_in = D_in.
        nn.init.kaiming_uniform_(self.lora_a.view(-1, self.in_features), a=math.sqrt(5))
        if self.b_std > 0:
            nn.init.normal_(self.lora_b, std=self.b_std)
        else:
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


def full_precision(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is float32 or float64, else float32: the precision the recursion's own weights and its
    gate's conditioning term keep under a low-precision model, or under weights stored in a low precision
    (diffusers' layerwise casting stores them in fp8 or fp16 between forwards)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class Gate(nn.Module):
    """Routes each token to one of M experts from the token itself and a conditioning vector.

    logits = token_proj(h) + cond_proj(SiLU(cond))      # (N, T, M)
    where h (N, T, D) are the (layer-normalised) current tokens and cond (N, D_c) the sum of the timestep
    and/or condition embeddings; either term is absent when the gate is built without it (ablations).
    The choice is tp_kernels.gate_top1: Gumbel(0, 1) noise in training (and at eval only if noise_at_eval),
    softmax(z / tau), hard argmax with a straight-through weight (exactly 1.0 forward) whose gradient flows
    into the logits; multiply an expert's output by that weight to train the gate.

    Init: small normal (std 0.02, like DiT's embedders), so routing starts token-dependent rather than all ties.
    This changes no output at init, because every expert's LoRA B starts at zero.
    """

    def __init__(self, dim, cond_dim, num_experts, tau=5.0, use_tokens=True, use_cond=True, noise_at_eval=False):
        super().__init__()
        if not is_int(num_experts) or num_experts < 1:
            raise ValueError(f"Gate num_experts must be an int >= 1, got {num_experts!r}")
        if not is_number(tau) or not tau > 0:
            raise ValueError(f"Gate tau must be a number > 0, got {tau!r}")
        if not (use_tokens or use_cond):
            raise ValueError("Gate needs at least one input: use_tokens and/or use_cond")
        self.num_experts = num_experts
        self.tau = float(tau)
        self.noise_at_eval = bool(noise_at_eval)
        self.token_proj = nn.Linear(dim, num_experts) if use_tokens else None
        self.cond_proj = nn.Linear(cond_dim, num_experts) if use_cond else None
        self.reset_parameters()

    def reset_parameters(self):
        for proj in (self.token_proj, self.cond_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)

    @property
    def noisy(self) -> bool:
        """Whether routing adds Gumbel noise now: in training, and at eval only if noise_at_eval."""
        return self.training or self.noise_at_eval

    def fused_terms(self, cond=None):
        """The gate in the form tp_kernels.refine_step takes: (token_weight (M, D) or None, cond_logits).

        logits(h, cond) == h @ token_weight^T + cond_logits, where cond_logits (N, 1, M) -- or (M,) without a
        conditioning input -- holds everything that does not depend on the tokens: the token projection's bias
        and cond_proj(SiLU(cond)). It is the same at every recursion step, so callers compute it once.

        token_weight comes as stored (callers cast it to their tokens' dtype); cond_logits are computed in
        full_precision of the weights' dtype, whatever the dtypes of cond and of the stored weights.
        """
        token_weight = None if self.token_proj is None else self.token_proj.weight
        bias = None if self.token_proj is None else self.token_proj.bias  # (M,)
        if bias is not None:
            bias = bias.to(full_precision(bias.dtype))
        if self.cond_proj is None:
            return token_weight, bias
        if cond is None:
            raise ValueError("this Gate uses a conditioning vector: pass cond (N, D_c)")
        weight = self.cond_proj.weight
        dtype = full_precision(weight.dtype)
        cond_logits = F.linear(F.silu(cond.to(dtype)), weight.to(dtype), self.cond_proj.bias.to(dtype))  # (N, M)
        if bias is not None:
            cond_logits = cond_logits + bias
        return token_weight, cond_logits.unsqueeze(1)  # (N, 1, M)

    def logits(self, h, cond=None):
        """h (N, T, D), cond (N, D_c) or None -> (N, T, M) routing logits."""
        token_weight, cond_logits = self.fused_terms(cond)
        if token_weight is None:
            return cond_logits.expand(*h.shape[:-1], self.num_experts)
        return F.linear(h, token_weight.to(h.dtype)) + cond_logits

    def forward(self, h, cond=None):
        """-> (expert_idx (N, T) int64, gate weight (N, T) fp32: 1.0 forward, straight-through backward)."""
        return tp_kernels.gate_top1(self.logits(h, cond), tau=self.tau, gumbel=self.noisy)

    def extra_repr(self):
        return f"experts={self.num_experts}, tau={self.tau:g}, noise_at_eval={self.noise_at_eval}"


HALTING_MODES = ("none", "learned", "delta")
DEFAULT_THRESHOLDS = {"none": None, "learned": 0.5, "delta": 0.05}


def check_halting(mode, threshold, head: bool, prior, kl_weight, owner: str = "halting"):
    """Validate halting settings (named after ``owner``'s fields); -> the threshold with its mode's default."""
    if mode not in HALTING_MODES:
        raise ValueError(f"{owner}: halting must be one of {HALTING_MODES}, got {mode!r}")
    if mode == "learned" and not head:
        raise ValueError(f"{owner}: halting='learned' needs a halting head (halt_head=True, trained with it)")
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[mode]
    elif not is_number(threshold) or not threshold > 0 or (mode == "learned" and threshold > 1):
        raise ValueError(f"{owner}: halt_threshold must be None or a number > 0 (<= 1 for 'learned'), "
                         f"got {threshold!r}")
    if not is_number(prior) or not 0 < prior < 1:
        raise ValueError(f"{owner}: halt_prior must be a number in (0, 1), got {prior!r}")
    if not is_number(kl_weight) or kl_weight < 0:
        raise ValueError(f"{owner}: halt_kl_weight must be a number >= 0, got {kl_weight!r}")
    return None if threshold is None else float(threshold)


class Halting(nn.Module):
    """The halting rule of one recursive block, its optional learned head, and its step counter.

    ``head``: Linear(dim, 1) on the layer-normalised state, or None; zero weights and bias logit(halt_prior),
    so training starts from the prior. ``steps_taken``: a (2,) int64 buffer (sum of steps over tokens, tokens),
    allocated here and added to in place by ``count`` (no host sync, no new tensor on the module: a compiled
    forward keeps one graph); only eval forwards with a halting rule count, since without one every token takes
    all T steps. Not part of the state dict.
    """

    def __init__(self, dim: int, *, mode="none", threshold=None, head=False, prior=0.5, kl_weight=0.01, eps=1e-6):
        super().__init__()
        self.threshold = check_halting(mode, threshold, head, prior, kl_weight)
        self.mode, self.prior, self.kl_weight, self.eps = mode, float(prior), float(kl_weight), eps
        self.head = nn.Linear(dim, 1) if head else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, math.log(self.prior / (1 - self.prior)))
        self.register_buffer("steps_taken", torch.zeros(2, dtype=torch.int64), persistent=False)
        self.loss = None  # the KL term of the last training forward (learned halting), for the training loss

    def set_rule(self, mode=None, threshold=None):
        """Switch the inference rule (threshold None: the mode's default)."""
        mode = self.mode if mode is None else mode
        self.threshold = check_halting(mode, threshold, self.head is not None, self.prior, self.kl_weight)
        self.mode = mode

    def active_at_inference(self) -> bool:
        return not self.training and self.mode != "none"

    def pondering(self) -> bool:
        """Whether this forward pass trains the learned head (the expectation over stopping steps)."""
        return self.training and self.head is not None

    def halt_probability(self, a):
        """lambda = P(stop before the next step | got here) from the state a (N, T, D) -> (N, T) fp32."""
        h = F.layer_norm(a.float(), (a.shape[-1],), eps=self.eps)
        return torch.sigmoid(F.linear(h, self.head.weight.float(), self.head.bias.float()))[..., 0]

    def prior_log_probs(self, steps: int, device) -> torch.Tensor:
        """log of the geometric(prior) distribution over stopping steps 1..T, truncated (mass of > T on T)."""
        t = torch.arange(steps, device=device, dtype=torch.float32)
        log_p = math.log(self.prior) + t * math.log1p(-self.prior)
        log_p[-1] = (steps - 1) * math.log1p(-self.prior)
        return log_p  # (T,)

    def kl_to_prior(self, p):
        """KL(p || prior) averaged over tokens, for p (..., T) stopping-step distributions."""
        log_prior = self.prior_log_probs(p.shape[-1], p.device)
        return (p * (p.clamp_min(1e-12).log() - log_prior)).sum(-1).mean()

    @torch.no_grad()
    def count(self, steps):
        """Add the steps (N, T) (int64) the tokens of a forward pass took to steps_taken, in place."""
        self.steps_taken[0] += steps.sum()
        self.steps_taken[1] += steps.numel()

    def reset_count(self):
        self.steps_taken.zero_()

    def extra_repr(self):
        return f"mode={self.mode}, threshold={self.threshold}, prior={self.prior:g}, kl_weight={self.kl_weight:g}"


class LatentRecursion(nn.Module):
    """The experts, the gate and the T-step loop of the method, for a block of width ``dim``.

    Parameters (their names are part of the checkpoint format): ``lora`` (RoutedLoRA, 3 slices: Q, K, V, each
    (dim -> dim)), ``gate`` (Gate over dim-wide tokens and a cond_dim-wide conditioning vector).

    ``halting`` (Halting): the per-token halting rule, its optional learned head (``halting.head``, a parameter
    of the recursion) and the count of steps taken.

    ``final_gain`` (scalar parameter, zero-initialised; only with ``lora_b_std > 0``, else None): multiplies the
    LoRA of every step that adds the base projection (see the module docstring).

    ``recorder``: None, or a callable(step, expert_idx (N, T), state (N, T, D)) called at each step with the
    routing and the state entering it (used by ThinkingPixelDiT.record_routing; costs nothing when None). A
    halted token's expert_idx is -1.
    """

    def __init__(self, dim: int, cond_dim=None, *, base_modules=None, experts=2, steps=2, rank=128, tau=5.0,
                 lora_alpha=None, gate_tokens=True, gate_cond=True, gate_noise_at_eval=False, norm_first_step=True,
                 halting="none", halt_threshold=None, halt_head=None, halt_prior=0.5, halt_kl_weight=0.01,
                 lora_b_std=0.0):
        super().__init__()
        for name, module in (base_modules or {}).items():  # a wrapper's own modules come first in parameters()
            self.add_module(name, module)
        if not is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.dim = dim
        self.steps = steps
        self.norm_first_step = bool(norm_first_step)
        self.eps = 1e-6  # of the LayerNorm (no affine) applied to each step's input
        self.lora = RoutedLoRA(experts, dim, dim, rank, slices=3, alpha=lora_alpha, b_std=lora_b_std)
        # the final step's LoRA gain: zero at init keeps the output the base's while B starts away from zero
        self.final_gain = nn.Parameter(torch.zeros(())) if lora_b_std > 0 else None
        self.gate = Gate(dim, dim if cond_dim is None else cond_dim, experts, tau=tau, use_tokens=gate_tokens,
                         use_cond=gate_cond, noise_at_eval=gate_noise_at_eval)
        self.halting = Halting(dim, mode=halting, threshold=halt_threshold,
                               head=halting == "learned" if halt_head is None else halt_head, prior=halt_prior,
                               kl_weight=halt_kl_weight, eps=self.eps)
        self.recorder = None
        self._step_weights = None  # (lora_a, lora_b) as this forward's steps use them (see recurse)
        self._noise = []  # the gate's Gumbel noise left for this forward's refinements (see recurse)

    def recurse(self, x, cond, base_projection, attend_step):
        """Run the T steps on x~ (N, T, D); returns the last step's attention output.

        cond: (N, D_c) the gate's conditioning vector, or None if the gate does not use one.
        base_projection(): -> (N, T, 3D) the frozen [q | k | v] projection of x~; called once, at the last step.
        attend_step(qkv (N, T, 3D), last: bool) -> the attention output of the step, heads merged, before the
            output projection. Its first T rows (dim 1) are the vision tokens' (N, T, D); at the last step a joint
            attention may append the context tokens' rows, which come back to the caller as they are.
        """
        token_weight, cond_logits = self.gate.fused_terms(cond)  # (M, D) or None, (N, 1, M) or (M,)
        # cast to the tokens' dtype once per call, not once per step (autocast leaves custom ops' inputs alone)
        gate_terms = (None if token_weight is None else token_weight.to(x.dtype), cond_logits)
        halting = self.halting
        halting.loss = None
        # the experts' weights for this call's steps: in the tokens' dtype, cast once per call; aliases that reduce
        # their T gradients in one pass where the extension can (defer_weight_grads)
        lora = self.lora
        if lora is None:
            self._step_weights = None
        elif self.steps > 1 and x.dtype == lora.lora_a.dtype:
            self._step_weights = defer_weight_grads(lora.lora_a, lora.lora_b)
        else:
            self._step_weights = (lora.lora_a.to(x.dtype), lora.lora_b.to(x.dtype))
        # the gate's Gumbel noise for every refinement of this call, drawn at once (one draw, not one per step)
        self._noise = []
        if self.gate.noisy:
            draws = 2 * self.steps - 1 if halting.pondering() and self.steps > 1 else self.steps
            self._noise = list(tp_kernels.gumbel_noise((draws, *x.shape[:-1], self.gate.num_experts),
                                                       device=x.device).unbind(0))  # each (N, T, M)
        try:
            if torch.compiler.is_compiling():
                return self._recurse(x, gate_terms, base_projection, attend_step)
            with tp_kernels.reuse_packed_weights():  # the T steps' experts packed once (CPU extension)
                return self._recurse(x, gate_terms, base_projection, attend_step)
        finally:
            self._step_weights = None
            self._noise = []

    def _recurse(self, x, gate_terms, base_projection, attend_step):
        halting = self.halting
        if halting.pondering() and self.steps > 1:
            return self._ponder(x, gate_terms, base_projection, attend_step)
        rule = halting.mode if halting.active_at_inference() else "none"
        a = x  # a^0 = x~, (N, T, D)
        halted = None  # (N, T) bool once a token may have halted
        kept_qkv = 0.0  # what a halted token shows the others: its last keys / values (none before step 1)
        # (N, T) P(halted so far), learned rule only
        cum_halt = torch.zeros(x.shape[:-1], device=x.device) if rule == "learned" else None
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
        (see the Halting section of this module's docstring); sets halting.loss, the KL term to the geometric prior."""
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
        noise = self._noise.pop(0) if self._noise else None  # (N, T, M), drawn in recurse
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
        if base is not None and self.final_gain is not None:
            # the plain weights, not deferred aliases: the gain and B each need their own share of this gradient
            lora_a, lora_b = self.lora.lora_a, self.lora.lora_b * self.final_gain
        qkv, expert_idx, _ = tp_kernels.refine_step(
            a, lora_a.to(dtype), lora_b.to(dtype),
            token_weight=None if token_weight is None else token_weight.to(dtype), cond_logits=cond_logits,
            tau=self.gate.tau, noise=noise, scale=self.lora.scale, base=base, eps=self.eps, normalize=normalize,
            **skip,
        )
        return qkv, expert_idx

    def recursion_parameters(self):
        """(name, parameter) of what the recursion adds: the experts, the gate, the halting head and the final
        step's gain (names relative to self)."""
        gain = [] if self.final_gain is None else [("final_gain", self.final_gain)]
        return [(f"{part}.{name}", p) for part in ("lora", "gate", "halting") if getattr(self, part) is not None
                for name, p in getattr(self, part).named_parameters()] + gain

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
