"""ThinkingPixelDiT: a DiT whose chosen blocks think in T latent steps with routed LoRA experts.

ThinkingPixelDiT subclasses DiT: the same constructor config, forward(x, t, y) and forward_with_cfg, the same
parameter names for everything DiT has (a DiT state dict loads into it), plus, in each block of
``recursion.layers``, a RecursiveAttention in place of the block's attention (keeping its qkv and proj).
Build one fresh with ``ThinkingPixelDiT(config, recursion)`` or wrap a trained DiT with ``from_dit``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..models.dit import DiT, DiTConfig
from .config import RecursionConfig
from .layers import RecursiveAttention

__all__ = ["RoutingRecord", "ThinkingPixelDiT"]


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
