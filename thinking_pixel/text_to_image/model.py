"""SD3TextToImage: diffusers' SD3Transformer2DModel (MMDiT) as a text-to-image model, with presets for pixel space.

The presets size an ``SD3Transformer2DModel`` for small images trained from scratch in pixel space (no VAE ships
offline): 3 image channels in and out, a position-embedding grid of exactly ``image_size / patch`` tokens per side,
and the text dimensions of the encoder that conditions it (all-MiniLM-L6-v2: 384-d tokens, 384-d pooled).

    preset        blocks  heads x dim  width   params at 16 px, patch 2, MiniLM text
    SD3-N/p       2       2 x 32       64      ~0.3M
    SD3-T/p       4       4 x 32       128     ~2.4M
    SD3-S/p       12      6 x 64       384     ~29M
    SD3-B/p       12      12 x 64      768     ~115M
    (p in 1, 2, 4: the patch size)

SD3TextToImage holds the transformer, the recursion applied to it (``thinking_pixel.apply_recursion``: routed LoRA
experts on the vision stream's Q/K/V of ``recursion.layers``, indices into ``transformer_blocks``) and a
description of its text encoder, and saves / loads like the other models of this package (config.json +
model.safetensors, dispatched by class name). A model built on a local diffusers SD3 pipeline (``pipeline``)
saves only the parameters that train when its base is frozen (the experts and gates): the base weights stay
in the pipeline directory, which is loaded again when the checkpoint is.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .._presets import SD3_CONFIGS
from ..models.pretrained import PretrainedMixin
from ..recursion import RecursionConfig, add_peft_lora, apply_recursion

__all__ = ["SD3_CONFIGS", "SD3TextToImage", "init_adaln_zero", "sd3_config"]


def sd3_config(name: str, *, image_size: int, in_channels: int = 3, text_dim: int = 384, pooled_dim: int = 384,
               **overrides) -> dict:
    """``SD3Transformer2DModel`` constructor arguments of preset ``name`` for ``image_size`` px inputs.

    ``overrides``: num_layers, num_attention_heads, attention_head_dim, patch_size (None values are ignored).
    """
    if name not in SD3_CONFIGS:
        raise ValueError(f"unknown SD3 preset {name!r}; expected one of {sorted(SD3_CONFIGS)}")
    arch = {**SD3_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(arch) - set(SD3_CONFIGS[name])
    if unknown:
        raise ValueError(f"sd3_config: unknown overrides {sorted(unknown)}; "
                         f"expected a subset of {sorted(SD3_CONFIGS[name])}")
    if image_size % arch["patch_size"]:
        raise ValueError(f"image_size ({image_size}) must be divisible by the patch size ({arch['patch_size']})")
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    return dict(arch, sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                joint_attention_dim=text_dim, caption_projection_dim=width, pooled_projection_dim=pooled_dim,
                pos_embed_max_size=image_size // arch["patch_size"])


@torch.no_grad()
def init_adaln_zero(transformer) -> None:
    """DiT's adaLN-Zero init for a fresh ``SD3Transformer2DModel``, in place: every block's modulation Linears
    (image and text stream) and the output layer's modulation and projection start at zero, so each block's
    residual branches start gated off and the model predicts 0."""
    modulations = [m.linear for block in transformer.transformer_blocks for m in (block.norm1, block.norm1_context)]
    for layer in (*modulations, transformer.norm_out.linear, transformer.proj_out):
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def _apply_recursion(transformer, recursion: RecursionConfig) -> set:
    """Apply the recursion to ``transformer`` in place; -> the names of the parameters it added."""
    was_trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    apply_recursion(transformer, recursion, freeze_base=True)  # only the new parameters require grad now
    added = {n for n, p in transformer.named_parameters() if p.requires_grad}
    for n, p in transformer.named_parameters():
        p.requires_grad_(n in added or n in was_trainable)
    return added


class SD3TextToImage(PretrainedMixin, nn.Module):
    """forward(x (N, C, H, W), t (N,) in [0, 1000], hidden (N, L, D_text), pooled (N, D_pooled)) -> v (N, C, H, W).

    transformer_config: SD3Transformer2DModel arguments (``sd3_config``); ignored in favour of the pipeline's
        own transformer when ``pipeline`` is set.
    recursion: where the model recurses, or None for the plain transformer.
    text: how captions become (hidden, pooled): {"encoder": "minilm", "max_length": L} or {"encoder": "pipeline"}.
    pipeline: a local diffusers StableDiffusion3Pipeline directory the transformer (and text encoders, VAE) come from.
    peft_lora: {"rank": r, "layers": [...]}: a plain peft LoRA on to_q/to_k/to_v of those transformer_blocks (the
        baseline the recursion is compared with: M = 1, T = 1, no gate), or None.
    """

    def __init__(self, transformer_config: dict, recursion: Optional[RecursionConfig] = None, text: dict | None = None,
                 pipeline: str | None = None, transformer=None, peft_lora: dict | None = None):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        if recursion is not None and not isinstance(recursion, RecursionConfig):
            raise TypeError(f"recursion must be a RecursionConfig or None, got {type(recursion).__name__}")
        self.pipeline = None if pipeline is None else str(Path(pipeline).resolve())
        if transformer is None:
            transformer = (SD3Transformer2DModel.from_pretrained(self.pipeline, subfolder="transformer",
                                                                 local_files_only=True)
                           if self.pipeline is not None else SD3Transformer2DModel(**transformer_config))
        self.transformer = transformer
        # its constructor's arguments only: a config may carry more (e.g. the recursion's entry, which a plain
        # from_pretrained of a directory saved with the recursion keeps)
        init_args = inspect.signature(SD3Transformer2DModel.__init__).parameters
        self.transformer_config = {k: v for k, v in dict(transformer.config).items() if k in init_args}
        self.text = dict(text or {"encoder": "minilm", "max_length": 32})
        self.recursion = recursion
        self.peft_lora = None if peft_lora is None else {"rank": int(peft_lora["rank"]),
                                                         "layers": sorted(int(i) for i in peft_lora["layers"])}
        if recursion is not None and peft_lora is not None:
            raise ValueError("a model has either the recursion or a peft LoRA, not both")
        self._expert_names = set()
        if recursion is not None:
            self._expert_names = {f"transformer.{n}" for n in _apply_recursion(self.transformer, recursion)}
        if self.peft_lora is not None:
            self._inject_peft_lora()

    def _inject_peft_lora(self) -> None:
        trainable = {n for n, p in self.transformer.named_parameters() if p.requires_grad}
        add_peft_lora(self.transformer, self.peft_lora["layers"], self.peft_lora["rank"])
        for n, p in self.transformer.named_parameters():  # like the recursion: freeze_base decides what trains
            p.requires_grad_(n.replace(".base_layer", "") in trainable or ".lora_" in n)

    # ---- shapes -------------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.transformer_config["sample_size"]

    @property
    def in_channels(self) -> int:
        return self.transformer_config["in_channels"]

    def set_latent_size(self, image_size: int) -> None:
        """Pipeline models: record that images are ``image_size`` px, i.e. latents of image_size / (VAE factor) (the
        transformer's ``sample_size``, which the pipeline samples at by default)."""
        import json

        vae_config = json.loads((Path(self.pipeline) / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if image_size % factor:
            raise ValueError(f"--image-size {image_size} must be divisible by the VAE's downsampling factor {factor}")
        self.transformer.register_to_config(sample_size=image_size // factor)
        self.transformer_config["sample_size"] = image_size // factor

    def forward(self, x, t, hidden, pooled):
        return self.transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                                timestep=t, return_dict=False)[0]  # (N, C, H, W)

    # ---- fine-tuning --------------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: "SD3TextToImage", recursion: RecursionConfig | None = None, freeze_base: bool = True,
                  peft_lora: dict | None = None):
        """``base``'s transformer (taken over, not copied) with ``recursion`` (or ``peft_lora``) applied; new
        weights start with zero B, so the result computes exactly what ``base`` did until they train."""
        if base.recursion is not None or base.peft_lora is not None:
            raise ValueError("from_base expects a model without recursion or LoRA (the base to fine-tune)")
        model = cls(base.transformer_config, recursion, base.text, base.pipeline, transformer=base.transformer,
                    peft_lora=peft_lora)
        model.train(base.training)
        if freeze_base:
            model.freeze_base()
        return model

    def expert_named_parameters(self):
        """(name, parameter) of the recursion's experts and gates (or the peft LoRA's A and B)."""
        if self.peft_lora is not None:
            return [(n, p) for n, p in self.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        return [(n, p) for n, p in self.named_parameters() if n in self._expert_names]

    def freeze_base(self, frozen: bool = True) -> "SD3TextToImage":
        """Freeze (or unfreeze) the transformer's own weights; experts and gates always train."""
        experts = {id(p) for _, p in self.expert_named_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in experts or not frozen)
        return self

    # ---- serialisation ------------------------------------------------------------------------------------------
    def _saves_experts_only(self) -> bool:
        return self.pipeline is not None and (self.recursion is not None or self.peft_lora is not None)

    def state_dict(self, *args, **kwargs):
        """The full state, or for a pipeline model with a frozen base only the experts' and gates' tensors."""
        state = super().state_dict(*args, **kwargs)
        if self._saves_experts_only():
            experts = {n for n, _ in self.expert_named_parameters()}
            state = type(state)((k, v) for k, v in state.items() if k in experts)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self._saves_experts_only():
            missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
            experts = {n for n, _ in self.expert_named_parameters()}
            if unexpected or experts & set(missing):
                raise RuntimeError(f"expert weights do not match the recursion: unexpected {unexpected[:3]}, "
                                   f"missing {sorted(experts & set(missing))[:3]}")
            return missing, unexpected
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _config_dict(self) -> dict:
        return {"transformer": self.transformer_config, "text": self.text, "pipeline": self.pipeline,
                "recursion": None if self.recursion is None else self.recursion.to_dict(), "peft_lora": self.peft_lora}

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        # A pipeline model's base weights come from the pipeline directory on the CPU: move them along.
        return super().from_pretrained(path, device=device).to(device)

    @classmethod
    def _from_config_dict(cls, d: dict) -> "SD3TextToImage":
        recursion = None if d.get("recursion") is None else RecursionConfig.from_dict(d["recursion"])
        args = (d["transformer"], recursion, d["text"], d.get("pipeline"))
        if d.get("pipeline") is not None:
            with torch.device("cpu"):  # the pipeline's weights are real: never build them on the meta device
                return cls(*args, peft_lora=d.get("peft_lora"))
        return cls(*args, peft_lora=d.get("peft_lora"))
