"""Per-token halting of the latent recursion (adaptive depth; the paper names fixed depth as a limitation).

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

from ._checks import is_number

__all__ = ["DEFAULT_THRESHOLDS", "HALTING_MODES", "Halting"]

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
