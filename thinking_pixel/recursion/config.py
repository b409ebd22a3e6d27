"""RecursionConfig: where and how a model recurses (blocks, experts, steps, rank, gate inputs, halting)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .._checks import is_int, is_number
from ..models.pretrained import config_from_dict
from .layers import check_halting

__all__ = ["GATE_INPUTS", "RecursionConfig"]

GATE_INPUTS = ("tokens", "timestep", "condition")


@dataclass
class RecursionConfig:
    """Where and how the model recurses. JSON-serialisable (to_dict / from_dict).

    layers: indices of the blocks that get a RecursiveAttention (0-based, checked against the model's depth
        when applied). None: the middle block, depth // 2 (the paper does not say which DiT layer it used).
    experts: number of LoRA experts M (paper: 1 / 2 / 5).
    steps: latent recursion steps T (paper: 1 / 2 / 5); T = 1 is routed-LoRA fine-tuning of qkv.
    rank: LoRA rank (paper: 128).
    tau: Gumbel-softmax temperature of the gate (paper: 5.0).
    gate_inputs: what the gate sees, a non-empty subset of ("tokens", "timestep", "condition"); the timestep
        and condition embeddings are summed into one conditioning vector (paper's ablation: all three).
    lora_alpha: None -> LoRA scale 1.0; a number -> scale alpha / rank (LoRA's convention).
    gate_noise_at_eval: draw Gumbel noise in eval mode too (default: deterministic argmax at inference).
    norm_first_step: LayerNorm the state at every step (the paper). False: the first step's gate and experts see
        the block's modulated input x~ itself, so T = 1 is exactly a LoRA on Q/K/V (as export_peft writes it).
    halting: per-token adaptive depth at inference (thinking_pixel.recursion.layers.Halting): "none" (every token takes
        T steps, the paper), "learned" (a PonderNet halting head; needs halt_head) or "delta" (training-free: stop
        when ||a^t - a^(t-1)|| / ||a^t|| < halt_threshold).
    halt_threshold: None for the mode's default (learned: 0.5 cumulative halting probability; delta: 0.05).
    halt_head: build the learned halting head (default: when halting == "learned"); trained with the pondering
        expectation and a KL to a geometric(halt_prior) prior on the number of steps, weighted halt_kl_weight.
    """

    layers: Optional[tuple] = None
    experts: int = 2
    steps: int = 2
    rank: int = 128
    tau: float = 5.0
    gate_inputs: tuple = GATE_INPUTS
    lora_alpha: Optional[float] = None
    gate_noise_at_eval: bool = False
    norm_first_step: bool = True
    halting: str = "none"
    halt_threshold: Optional[float] = None
    halt_head: Optional[bool] = None
    halt_prior: float = 0.5
    halt_kl_weight: float = 0.01
    lora_b_std: float = 0.0

    def __post_init__(self):
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"RecursionConfig.layers must be None or a sequence of block indices, "
                                 f"got {self.layers!r}")
            self.layers = tuple(self.layers)
            if not self.layers or not all(is_int(i) and i >= 0 for i in self.layers):
                raise ValueError(f"RecursionConfig.layers must be non-empty block indices (ints >= 0), "
                                 f"got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"RecursionConfig.layers has duplicates: {self.layers!r}")
        for name in ("experts", "steps", "rank"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"RecursionConfig.{name} must be an int >= 1, got {value!r}")
        if not is_number(self.tau) or not self.tau > 0:
            raise ValueError(f"RecursionConfig.tau must be a number > 0, got {self.tau!r}")
        if isinstance(self.gate_inputs, str) or not hasattr(self.gate_inputs, "__iter__"):
            raise ValueError(f"RecursionConfig.gate_inputs must be a sequence of names such as ('tokens',), "
                             f"got {self.gate_inputs!r}")
        self.gate_inputs = tuple(self.gate_inputs)
        if not self.gate_inputs or any(g not in GATE_INPUTS for g in self.gate_inputs) \
                or len(set(self.gate_inputs)) != len(self.gate_inputs):
            raise ValueError(f"RecursionConfig.gate_inputs must be a non-empty subset of {GATE_INPUTS} without "
                             f"repeats, got {self.gate_inputs!r}")
        if self.lora_alpha is not None and (not is_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"RecursionConfig.lora_alpha must be None or a number > 0, got {self.lora_alpha!r}")
        for name in ("gate_noise_at_eval", "norm_first_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RecursionConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not is_number(self.lora_b_std) or not self.lora_b_std >= 0:
            raise ValueError(f"RecursionConfig.lora_b_std must be a number >= 0, got {self.lora_b_std!r}")
        if self.halt_head is None:
            self.halt_head = self.halting == "learned"
        if not isinstance(self.halt_head, bool):
            raise ValueError(f"RecursionConfig.halt_head must be None or a bool, got {self.halt_head!r}")
        check_halting(self.halting, self.halt_threshold, self.halt_head, self.halt_prior, self.halt_kl_weight,
                      owner="RecursionConfig")

    def resolve_layers(self, depth: int) -> tuple:
        """The block indices for a model of ``depth`` blocks, checked to be in range."""
        layers = (depth // 2,) if self.layers is None else self.layers
        bad = [i for i in layers if i >= depth]
        if bad:
            raise ValueError(f"RecursionConfig.layers {bad} out of range for a model with depth {depth} "
                             f"(valid: 0..{depth - 1})")
        return tuple(sorted(layers))

    def module_kwargs(self) -> dict:
        """The keyword arguments of LatentRecursion (and RecursiveAttention) for this config."""
        return dict(experts=self.experts, steps=self.steps, rank=self.rank, tau=self.tau, lora_alpha=self.lora_alpha,
                    gate_tokens="tokens" in self.gate_inputs,
                    gate_cond="timestep" in self.gate_inputs or "condition" in self.gate_inputs,
                    gate_noise_at_eval=self.gate_noise_at_eval, norm_first_step=self.norm_first_step,
                    halting=self.halting, halt_threshold=self.halt_threshold, halt_head=self.halt_head,
                    halt_prior=self.halt_prior, halt_kl_weight=self.halt_kl_weight, lora_b_std=self.lora_b_std)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["gate_inputs"] = list(self.gate_inputs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecursionConfig":
        return config_from_dict(cls, d)
