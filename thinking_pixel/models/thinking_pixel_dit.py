"""ThinkingPixelDiT: a DiT whose chosen blocks think in T latent steps with routed LoRA experts.

ThinkingPixelDiT subclasses DiT: the same constructor config, forward(x, t, y) and forward_with_cfg, the same
parameter names for everything DiT has (a DiT state dict loads into it), plus, in each block of
``recursion.layers``, a RecursiveAttention in place of the block's attention (keeping its qkv and proj).
Build one fresh with ``ThinkingPixelDiT(config, recursion)`` or wrap a trained DiT with ``from_dit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..modules._checks import is_int, is_number
from ..modules.halting import check_halting
from ..modules.recursive_attention import RecursiveAttention
from .dit import DiT, DiTConfig
from .pretrained import config_from_dict

__all__ = ["GATE_INPUTS", "RecursionConfig", "RoutingRecord", "ThinkingPixelDiT"]

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
    halting: per-token adaptive depth at inference (thinking_pixel.modules.halting): "none" (every token takes
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
                    halt_prior=self.halt_prior, halt_kl_weight=self.halt_kl_weight)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["gate_inputs"] = list(self.gate_inputs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecursionConfig":
        return config_from_dict(cls, d)


class RoutingRecord:
    """Routing decisions collected by ThinkingPixelDiT.record_routing.

    entries: one dict per (forward call, recursive layer, step), in execution order:
        layer (int), step (int, 1..T), expert_idx (N, T) int64, timestep (N,), condition (N,) the labels passed
        to forward (before train-time class dropout), and with states=True, state (N, T, D): the state a^{step-1}
        entering that step. All tensors are detached and stay on the model's device.
    """

    def __init__(self, states: bool = False):
        self.states = states
        self.entries: list[dict] = []
        self._t = self._y = None

    def _begin(self, t, y):
        self._t, self._y = t.detach(), y.detach()

    def _add(self, layer, step, expert_idx, state):
        entry = dict(layer=layer, step=step, expert_idx=expert_idx.detach(), timestep=self._t, condition=self._y)
        if self.states:
            entry["state"] = state.detach()
        self.entries.append(entry)


class ThinkingPixelDiT(DiT):
    """DiT with recursive sparse reasoning in the blocks listed by ``recursion.layers``.

    forward(x (N, C, H, W), t (N,), y (N,), context=None, cond_image=None) -> (N, C_out, H, W), like DiT's.
    context: optional (N, L, D) extra tokens that the recursive blocks attend to (see RecursiveAttention).
    The recursive blocks' gate sees the sum of the timestep and/or label embeddings named in gate_inputs.

    A DiT subclass: every DiT parameter keeps its name, and the new ones are ``blocks.{i}.attn.lora.*`` and
    ``blocks.{i}.attn.gate.*``. A freshly built (or from_pretrained-loaded) model trains everything; call
    ``freeze_base()`` to train only the experts and gates (from_dit does so by default).
    """

    def __init__(self, config: DiTConfig, recursion: RecursionConfig):
        super().__init__(config)
        if not isinstance(recursion, RecursionConfig):
            raise TypeError(f"recursion must be a RecursionConfig, got {type(recursion).__name__}")
        self.recursion = recursion
        self.recursive_layers = recursion.resolve_layers(config.depth)
        for i in self.recursive_layers:
            block = self.blocks[i]
            block.attn = RecursiveAttention.from_attention(block.attn, config.hidden_size,
                                                           **recursion.module_kwargs())
        self._routing_record = None

    @classmethod
    def from_dit(cls, dit: DiT, recursion: RecursionConfig, freeze_base: bool = True) -> "ThinkingPixelDiT":
        """A ThinkingPixelDiT holding a copy of ``dit``'s weights (on its device and dtype), experts at zero-B init.

        With freeze_base, only the experts and gates require grad. The result computes exactly dit's output
        until the experts' LoRA B move away from zero.
        """
        if type(dit) is not DiT:
            raise TypeError(f"from_dit expects a DiT, got {type(dit).__name__}")
        param = next(dit.parameters())
        with torch.device(param.device):
            model = cls(dit.config, recursion).to(param.dtype)
        missing, unexpected = model.load_state_dict(dit.state_dict(), strict=False)
        new = {name for name, _ in model.expert_named_parameters()}
        if unexpected or set(missing) != new:
            raise RuntimeError(f"DiT weights do not line up with ThinkingPixelDiT: unexpected {unexpected}, "
                               f"missing {sorted(set(missing) - new)}")
        model.train(dit.training)
        if freeze_base:
            model.freeze_base()
        return model

    def recursive_attentions(self):
        """(layer index, RecursiveAttention) pairs, in block order."""
        return [(i, self.blocks[i].attn) for i in self.recursive_layers]

    def expert_named_parameters(self):
        """(name, parameter) of the new parameters: every recursive block's LoRA experts and gate."""
        return [(f"blocks.{i}.attn.{name}", p)
                for i, attn in self.recursive_attentions()
                for name, p in attn.recursion_parameters()]

    def expert_parameters(self):
        return [p for _, p in self.expert_named_parameters()]

    def freeze_base(self, frozen: bool = True) -> "ThinkingPixelDiT":
        """Freeze (or unfreeze) every base DiT parameter; experts and gates always stay trainable.
        pos_embed is a fixed embedding and never trains."""
        experts = {id(p) for p in self.expert_parameters()}
        for name, p in self.named_parameters():
            if id(p) in experts:
                p.requires_grad_(True)
            elif name != "pos_embed":
                p.requires_grad_(not frozen)
        return self

    def _gate_condition(self, t_emb, y_emb):
        """The gate's conditioning vector (N, D): the sum of the embeddings named in gate_inputs, or None."""
        parts = [emb for name, emb in (("timestep", t_emb), ("condition", y_emb)) if name in self.recursion.gate_inputs]
        return sum(parts[1:], parts[0]) if parts else None

    def forward(self, x, t, y, context=None, cond_image=None):
        x_t = x
        x, t_emb, y_emb = self.embed(x, t, y, cond_image)
        c = t_emb + y_emb  # (N, D)
        gate_cond = self._gate_condition(t_emb, y_emb)  # (N, D) or None
        if self._routing_record is not None:
            self._routing_record._begin(t, y)
        recursive = set(self.recursive_layers)
        for i, block in enumerate(self.blocks):
            if i in recursive:
                x = block(x, c, cond=gate_cond, context=context)  # (N, T, D)
            else:
                x = block(x, c)
        return self.as_eps(self.head(x, c), x_t, t)  # (N, C_out, H, W)

    def set_halting(self, mode: str | None = None, threshold: float | None = None) -> "ThinkingPixelDiT":
        """Switch every recursive block's inference halting rule (and self.recursion, so checkpoints keep it).
        mode None keeps the current one; threshold None takes the mode's default."""
        mode = self.recursion.halting if mode is None else mode
        self.recursion = dataclasses.replace(self.recursion, halting=mode, halt_threshold=threshold)
        for _, attn in self.recursive_attentions():
            attn.halting.set_rule(mode, threshold)
        return self

    def reset_recursion_stats(self) -> None:
        """Start counting the recursion steps taken anew (see mean_recursion_steps)."""
        for _, attn in self.recursive_attentions():
            attn.halting.reset_count()

    def mean_recursion_steps(self) -> float | None:
        """Mean number of recursion steps a token took per recursive block call. Without a halting rule every token
        takes its block's T steps; with one, the mean over the eval-mode forward passes since reset_recursion_stats
        (None if there were none), read from the device counters: one host sync."""
        attns = [attn for _, attn in self.recursive_attentions()]
        if all(attn.halting.mode == "none" for attn in attns):
            return sum(attn.steps for attn in attns) / len(attns)
        steps, tokens = torch.stack([attn.halting.steps_taken for attn in attns
                                     if attn.halting.mode != "none"]).sum(0).tolist()
        return steps / tokens if tokens else None

    def auxiliary_loss(self):
        """The loss terms the last training forward added besides the diffusion loss (the learned halting
        head's KL to its prior), summed; 0.0 when there are none."""
        terms = [attn.halting.loss for _, attn in self.recursive_attentions() if attn.halting.loss is not None]
        return sum(terms[1:], terms[0]) if terms else 0.0

    @contextlib.contextmanager
    def record_routing(self, states: bool = False):
        """Record every routing decision of the forward passes run inside the block:

            with model.record_routing() as rec:
                model(x, t, y)
            rec.entries  # [{layer, step, expert_idx, timestep, condition(, state)}, ...]

        Meant for analysis in eager mode; outside the block the forward pass records nothing and costs nothing.
        """
        if self._routing_record is not None:
            raise RuntimeError("record_routing is already active on this model")
        record = RoutingRecord(states=states)
        self._routing_record = record
        for layer, attn in self.recursive_attentions():
            attn.recorder = lambda step, idx, state, layer=layer: record._add(layer, step, idx, state)
        try:
            yield record
        finally:
            self._routing_record = None
            for _, attn in self.recursive_attentions():
                attn.recorder = None

    def _config_dict(self) -> dict:
        return {"dit": self.config.to_dict(), "recursion": self.recursion.to_dict()}

    @classmethod
    def _from_config_dict(cls, d: dict) -> "ThinkingPixelDiT":
        return cls(DiTConfig.from_dict(d["dit"]), RecursionConfig.from_dict(d["recursion"]))
