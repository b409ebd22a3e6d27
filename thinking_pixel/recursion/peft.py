"""peft interop: an expert as a standard peft LoRA adapter, and the peft-built baselines.

- export_peft(model, directory, expert=k): expert k of every recursive layer as one peft LoRA adapter.
- add_peft_lora(model, layers, rank): the plain-LoRA fine-tuning baseline (the paper's "SFT"), built by peft.
- add_peft_experts(model, recursion, mode): the recursion as a user would write it with diffusers + peft: M peft
  LoRA adapters on to_q / to_k / to_v, the same gate and T-step loop, and the experts run either all on every token
  and mixed by the one-hot gate ("dense") or one boolean-masked slice of tokens per expert ("masked").
  copy_experts_to_peft makes it compute the same function as a recursion model (benchmarks check they agree).

The adapter directory: ``adapter_config.json`` (peft's LoraConfig) and ``adapter_model.safetensors`` (peft's key
names, ``base_model.model.<module>.lora_A.weight``), loadable with ``PeftModel.from_pretrained(base, directory)``;
for diffusers models that load LoRAs (SD3; diffusers' DiT has no LoRA loader) also ``pytorch_lora_weights.safetensors``
(diffusers' names, ``transformer.<module>...``), which ``model.load_lora_adapter(directory, weight_name=
"pytorch_lora_weights.safetensors")`` and an SD3 pipeline's ``load_lora_weights(directory)`` read.
LoRA's scale is folded into B and lora_alpha = r, so every loader applies it the same way (scale 1).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .._fileio import atomic_write
from .._checks import is_int
from ..models import DiT
from .config import RecursionConfig
from .dit import ThinkingPixelDiT
from .diffusers import RecursionAttnProcessor, _processors, _sites, install_processors, recursion_config

__all__ = ["PeftExpertsProcessor", "add_peft_experts", "add_peft_lora", "copy_experts_to_peft", "export_peft"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EXPERT_ADAPTER = "expert_{}"  # the adapter name of expert e in add_peft_experts


def _attention_paths(model, layers):
    """The module names of the attentions of blocks ``layers``."""
    if isinstance(model, DiT):
        return [f"blocks.{i}.attn" for i in layers]
    sites, _ = _sites(model)
    return [sites[i][1] for i in layers]


def _qkv_projections(model, attention_path):
    """{module name: slices} of one attention's Q/K/V Linears: diffusers' to_q / to_k / to_v (one slice each), or
    our DiT's fused qkv (slices 0, 1, 2)."""
    if isinstance(model, DiT):
        return {f"{attention_path}.qkv": (0, 1, 2)}
    return {f"{attention_path}.{proj}": (s,) for s, proj in enumerate(("to_q", "to_k", "to_v"))}


def _qkv_targets(model, layers):
    return {name: slices for path in _attention_paths(model, layers)
            for name, slices in _qkv_projections(model, path).items()}


def _recursion_modules(model):
    """{attention path: the LatentRecursion holding its experts} of a model with the recursion."""
    if isinstance(model, ThinkingPixelDiT):
        return {f"blocks.{i}.attn": attn for i, attn in model.recursive_attentions()}
    return _processors(model)


def _lora_config(rank, alpha, targets):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0, bias="none")


def export_peft(model, directory, expert: int = 0):
    """Write expert ``expert`` of a model with the recursion as a standard peft LoRA adapter (see the module doc).

    The adapter is exactly the recursion with T = 1, norm_first_step=False and the gate forced to this expert; for
    other configs it is the expert's weights as a plain LoRA on x~ (a warning says so).
    """
    config = recursion_config(model)
    if not is_int(expert) or not 0 <= expert < config.experts:
        raise ValueError(f"expert must be an int in [0, {config.experts}), got {expert!r}")
    if config.steps != 1 or config.norm_first_step:
        warnings.warn(f"export_peft: a LoRA adapter computes B A x~, which equals this recursion's expert only with "
                      f"steps=1 and norm_first_step=False (here steps={config.steps}, "
                      f"norm_first_step={config.norm_first_step}): the export holds the expert's weights as a plain "
                      "LoRA", stacklevel=2)
    state = {}
    for path, mod in _recursion_modules(model).items():
        lora = mod.lora
        gain = lora.scale if mod.final_gain is None else lora.scale * mod.final_gain  # the base-adding step's LoRA
        for target, slices in _qkv_projections(model, path).items():
            a = torch.cat([lora.lora_a[expert, s] for s in slices])  # (S * R, D)
            b = torch.block_diag(*(lora.lora_b[expert, s] for s in slices)) * gain  # (S * D, S * R)
            state[f"{target}.lora_A.weight"] = a.detach().float().contiguous()
            state[f"{target}.lora_B.weight"] = b.detach().float().contiguous()
    targets = _qkv_targets(model, config.layers)
    rank = config.rank * len(next(iter(targets.values())))
    peft_config = _lora_config(rank, rank, targets)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefixes = {PEFT_WEIGHTS_NAME: "base_model.model."}
    if hasattr(model, "load_lora_adapter"):  # diffusers models with PeftAdapterMixin (SD3; not DiT)
        prefixes[DIFFUSERS_WEIGHTS_NAME] = "transformer."
    for file_name, prefix in prefixes.items():
        tensors = {prefix + k: v for k, v in state.items()}
        atomic_write(directory / file_name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    atomic_write(directory / PEFT_CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n"))
    return directory


def add_peft_lora(model, layers, rank: int, *, lora_alpha=None, adapter_name: str = "default"):
    """The plain-LoRA fine-tuning baseline: a peft LoRA (LoraConfig + inject_adapter_in_model) on the Q/K/V
    projections of blocks ``layers``; only its parameters train. Returns the model (changed in place)."""
    from peft import inject_adapter_in_model

    depth = len(model.blocks) if isinstance(model, DiT) else len(_sites(model)[0])
    layers = RecursionConfig(layers=layers).resolve_layers(depth)
    inject_adapter_in_model(_lora_config(rank, rank if lora_alpha is None else lora_alpha,
                                         _qkv_targets(model, layers)), model, adapter_name=adapter_name)
    return model


class PeftExpertsProcessor(RecursionAttnProcessor):
    """The recursion's processor with its experts held by peft: adapters ``expert_0 .. expert_{M-1}`` injected in
    the attention's to_q / to_k / to_v. Same loop, gate and attention as RecursionAttnProcessor; each step's
    LN + gate + experts are plain torch ops the way a user would write them:

    dense:  every expert on every token, mixed by the one-hot gate (straight-through weight on the chosen one);
    masked: per expert, the tokens routed to it (boolean mask), their LoRA, written back into place.

    Both compute refine_step's function (forward and gradients); they differ in cost.
    """

    def __init__(self, *args, projections=(), mode="dense", **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in ("dense", "masked"):
            raise ValueError(f"mode must be 'dense' or 'masked', got {mode!r}")
        self.mode = mode
        self.lora = None  # the experts are the peft adapters of the attention's to_q / to_k / to_v
        self.projections = tuple(projections)  # peft LoRA layers, not submodules (the attention owns them)

    @classmethod
    def for_attention(cls, attn, recursion, cond_inputs=(), mode="dense"):
        return super().for_attention(attn, recursion, cond_inputs, projections=(attn.to_q, attn.to_k, attn.to_v),
                                     mode=mode)

    def base_projection(self, attn, x):
        return torch.cat([layer.get_base_layer()(x) for layer in self.projections], dim=-1)  # adapters off

    def expert(self, e, h):
        """Expert e's [q | k | v] LoRA of tokens h (..., D) -> (..., 3D), by peft's modules."""
        name = EXPERT_ADAPTER.format(e)
        return torch.cat([layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](h))) * layer.scaling[name]
                          for layer in self.projections], dim=-1)

    def refine(self, a, gate_terms, noise, base, normalize, active=None):
        h = F.layer_norm(a, (self.dim,), eps=self.eps) if normalize else a  # (N, T, D)
        token_weight, cond_logits = gate_terms
        logits = cond_logits if token_weight is None else F.linear(h, token_weight) + cond_logits  # (N, T, M)
        z = logits if noise is None else logits + noise
        expert_idx = z.expand(*h.shape[:-1], -1).argmax(-1)  # (N, T)
        p = torch.softmax(z / self.gate.tau, dim=-1).expand(*h.shape[:-1], -1).gather(-1, expert_idx[..., None])
        weight = (1 + p - p.detach()).to(h.dtype)  # (N, T, 1): 1.0 forward, gradient into the gate
        if active is not None:  # halted tokens (adaptive halting): no expert, as refine_step(active=) does
            expert_idx = torch.where(active, expert_idx, -1)  # (N, T)
            weight = weight * active[..., None]
        num_experts = self.gate.num_experts
        if self.mode == "dense":
            mix = F.one_hot(expert_idx.clamp_min(0), num_experts).to(h.dtype) * weight  # (N, T, M)
            lora = sum(mix[..., e:e + 1] * self.expert(e, h) for e in range(num_experts))  # (N, T, 3D)
        else:
            lora = h.new_zeros(*h.shape[:-1], 3 * self.dim)  # (N, T, 3D)
            for e in range(num_experts):
                mask = expert_idx == e  # (N, T)
                lora[mask] = self.expert(e, h[mask]) * weight[mask]  # (n_e, 3D)
        return (lora if base is None else base + lora), expert_idx


def add_peft_experts(model, recursion: RecursionConfig, *, mode: str = "dense", freeze_base: bool = True):
    """The diffusers + peft version of apply_recursion (a baseline): M peft adapters on the Q/K/V of the chosen
    blocks, a PeftExpertsProcessor running them. Only the adapters and gates train with freeze_base."""
    from peft import inject_adapter_in_model

    if recursion.lora_b_std:
        raise ValueError(f"add_peft_experts: recursion.lora_b_std must be 0 (peft adapters start with B = 0 and have "
                         f"no final-step gain), got {recursion.lora_b_std!r}")
    sites, _ = _sites(model)
    layers = recursion.resolve_layers(len(sites))
    alpha = recursion.rank if recursion.lora_alpha is None else recursion.lora_alpha
    config = _lora_config(recursion.rank, alpha, _qkv_targets(model, layers))
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: M adapters is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for e in range(recursion.experts):
            inject_adapter_in_model(config, model, adapter_name=EXPERT_ADAPTER.format(e))
    install_processors(model, recursion, PeftExpertsProcessor, freeze_base=False, mode=mode)
    if freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name or ".processor.gate." in name)
    return model


def copy_experts_to_peft(source, baseline):
    """Give ``baseline`` (add_peft_experts) the experts and gates of ``source`` (apply_recursion), so that both
    compute the same function."""
    pairs = list(zip(_processors(source).values(), _processors(baseline).values(), strict=True))
    with torch.no_grad():
        for src, dst in pairs:
            if not isinstance(dst, PeftExpertsProcessor):
                raise TypeError(f"baseline must come from add_peft_experts, got a {type(dst).__name__}")
            dst.gate.load_state_dict(src.gate.state_dict())
            for e in range(src.lora.num_experts):
                name = EXPERT_ADAPTER.format(e)
                for s, layer in enumerate(dst.projections):
                    layer.lora_A[name].weight.copy_(src.lora.lora_a[e, s])
                    layer.lora_B[name].weight.copy_(src.lora.lora_b[e, s] * (src.lora.scale / layer.scaling[name]))
    return baseline
