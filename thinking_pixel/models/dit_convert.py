"""Pretrained DiT weights from elsewhere: diffusers' DiTTransformer2DModel and the reference code's ``.pt`` files.

- dit_from_diffusers(transformer): our DiT with the weights of a diffusers DiTTransformer2DModel (e.g.
  ``facebook/DiT-XL-2-256``'s ``transformer/``), computing its outputs (to float rounding). diffusers splits the
  fused qkv into to_q / to_k / to_v, gives every block its own copy of the timestep and class embedders (identical
  in converted checkpoints; we keep one and check the others equal it), uses sinusoid frequencies shifted by one and
  its config's norm_eps before the MLP: DiTConfig.timestep_freq_shift / mlp_norm_eps carry those two.
- load_original_dit(path): a state dict saved by facebookresearch/DiT (``DiT-XL-2-256x256.pt``, or a train.py
  checkpoint's "ema" / "model" entry), read with ``torch.load(weights_only=True)``. Our DiT shares its parameter
  names, so this is key checking and config inference: everything but num_heads follows from the shapes (the DiT
  presets name num_heads for their depth and width; other models pass it).
"""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import torch

from .dit import DIT_CONFIGS, DiT, DiTConfig
from .pretrained import state_mismatches

__all__ = ["config_from_original_state_dict", "dit_from_diffusers", "load_original_dit"]

_DIFFUSERS_REQUIRED = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                           norm_elementwise_affine=False)


def dit_from_diffusers(transformer) -> DiT:
    """A DiT holding the weights of diffusers ``DiTTransformer2DModel`` ``transformer`` (same device and dtype)."""
    from diffusers import DiTTransformer2DModel

    if not isinstance(transformer, DiTTransformer2DModel):
        raise TypeError(f"dit_from_diffusers expects a diffusers DiTTransformer2DModel, "
                        f"got {type(transformer).__name__}")
    cfg = transformer.config
    wrong = {k: cfg[k] for k, v in _DIFFUSERS_REQUIRED.items() if cfg[k] != v}
    if wrong:
        raise ValueError(f"dit_from_diffusers: this DiTTransformer2DModel has {wrong}; DiT needs {_DIFFUSERS_REQUIRED}")
    blocks = transformer.transformer_blocks
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = transformer.out_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"dit_from_diffusers: out_channels ({out_channels}) must be in_channels ({cfg.in_channels}) "
                         "or twice it (learned sigma)")
    config = DiTConfig(
        input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=hidden,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads,
        mlp_ratio=blocks[0].ff.net[0].proj.out_features / hidden,
        class_dropout_prob=blocks[0].norm1.emb.class_embedder.dropout_prob, num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * cfg.in_channels, timestep_freq_shift=float(
            blocks[0].norm1.emb.time_proj.downscale_freq_shift), mlp_norm_eps=blocks[0].norm3.eps,
    )
    embedders = blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(blocks):
        for name, value in block.norm1.emb.state_dict().items():
            if not torch.equal(value, embedders[name]):
                raise ValueError(f"dit_from_diffusers: transformer_blocks[{i}].norm1.emb.{name} differs from "
                                 "transformer_blocks[0]'s; DiT has one timestep and class embedder for all blocks")
    state = {
        "x_embedder.proj.weight": transformer.pos_embed.proj.weight,
        "x_embedder.proj.bias": transformer.pos_embed.proj.bias,
        "pos_embed": transformer.pos_embed.pos_embed,  # the fixed sin-cos table (a buffer in diffusers)
        "t_embedder.mlp.0.weight": embedders["timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": embedders["timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": embedders["timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": embedders["timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": embedders["class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": transformer.proj_out_1.weight,
        "final_layer.adaLN_modulation.1.bias": transformer.proj_out_1.bias,
        "final_layer.linear.weight": transformer.proj_out_2.weight,
        "final_layer.linear.bias": transformer.proj_out_2.bias,
    }
    for i, block in enumerate(blocks):
        attn = block.attn1
        ours = {
            "adaLN_modulation.1": block.norm1.linear, "attn.proj": attn.to_out[0],
            "mlp.fc1": block.ff.net[0].proj, "mlp.fc2": block.ff.net[2],
        }
        for name, linear in ours.items():
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = linear.weight, linear.bias
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    return _assign(config, {k: v.detach().clone() for k, v in state.items()}, "the DiTTransformer2DModel")


def _assign(config: DiTConfig, state: dict, source: str) -> DiT:
    """A DiT of ``config`` holding ``state`` (built on the meta device, tensors assigned), in eval mode."""
    with torch.device("meta"):
        model = DiT(config)
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not match a DiT of {config}: " + "; ".join(problems))
    model.load_state_dict(state, assign=True)
    return model.eval()


def _preset_heads(depth: int, hidden: int):
    heads = {(c["depth"], c["hidden_size"]): c["num_heads"] for c in DIT_CONFIGS.values()}
    return heads.get((depth, hidden))


def config_from_original_state_dict(state: dict, num_heads=None, **overrides) -> DiTConfig:
    """The DiTConfig of a reference-layout DiT state dict, read off its shapes.

    num_heads is not in the shapes: by default the DiT preset of the same depth and width says it (S: 6, B: 12,
    L / XL: 16); otherwise pass it. class_dropout_prob > 0 (the default 0.1) means the label table holds a null class
    (num_classes + 1 rows). ``overrides`` set any other DiTConfig field (e.g. class_dropout_prob=0).
    """
    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight",
                "final_layer.linear.weight"):
        if key not in state:
            raise ValueError(f"not a DiT state dict (facebookresearch/DiT layout): no {key!r}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape  # (D, C, p, p)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(state["pos_embed"].shape[1])
    if grid * grid != state["pos_embed"].shape[1]:
        raise ValueError(f"pos_embed has {state['pos_embed'].shape[1]} positions, not a square grid")
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer.linear has {out_channels} channels per patch position; expected "
                         f"{in_channels} or {2 * in_channels} (learned sigma) for {in_channels} input channels")
    if num_heads is None:
        num_heads = _preset_heads(depth, hidden)
        if num_heads is None:
            raise ValueError(f"num_heads cannot be read off the weights and no DiT preset has depth {depth} and "
                             f"hidden size {hidden}: pass num_heads")
    dropout = overrides.get("class_dropout_prob", DiTConfig.class_dropout_prob)
    fields = dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
                  num_heads=num_heads, mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                  num_classes=state["y_embedder.embedding_table.weight"].shape[0] - (dropout > 0),
                  learn_sigma=out_channels == 2 * in_channels)
    return DiTConfig(**{**fields, **overrides})


def load_original_dit(path, num_heads=None, **overrides) -> DiT:
    """Load a facebookresearch/DiT checkpoint (see the module doc) as our DiT, in eval mode on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py checkpoints keep their args
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path} cannot be read as tensors only (torch.load weights_only=True): {e}") from None
    if isinstance(state, dict) and ("ema" in state or "model" in state):
        state = state["ema"] if "ema" in state else state["model"]  # a train.py checkpoint: the EMA weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    config = config_from_original_state_dict(state, num_heads, **overrides)
    return _assign(config, state, str(path))
