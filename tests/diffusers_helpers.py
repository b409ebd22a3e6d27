"""Tiny random configurations of the real diffusers transformers (and our DiT), base weights moved off their init."""

import torch

from thinking_pixel import DiT, DiTConfig

SD3_KW = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
              pos_embed_max_size=8)
DIT_KW = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
              patch_size=2, num_embeds_ada_norm=10)
KINDS = ("sd3", "sd3_qk_norm", "dit_diffusers", "dit")


def perturb(model, std=0.1, seed=0):
    """Add noise to every parameter, so a test cannot pass on an init that happens to hide a mistake (zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
    return model


def make_base(kind, seed=0):
    """A perturbed base model of ``kind`` in eval mode."""
    torch.manual_seed(seed)
    if kind.startswith("sd3"):
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(**SD3_KW, qk_norm="rms_norm" if kind == "sd3_qk_norm" else None)
    elif kind == "dit_diffusers":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(**DIT_KW)
    else:
        model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=3, num_heads=2,
                              num_classes=10))
    return perturb(model, seed=seed).eval()


def make_inputs(kind, n=2, seed=1):
    """Positional inputs of the model's forward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    if kind.startswith("sd3"):
        return x, torch.randn(n, 5, 12, generator=g), torch.randn(n, 10, generator=g), t
    return x, t, torch.randint(0, 10, (n,), generator=g)


def run(model, inputs):
    """The model's output tensor (diffusers models return a Transformer2DModelOutput)."""
    out = model(*inputs)
    return out if torch.is_tensor(out) else out.sample


def block_outputs(model, inputs):
    """Every transformer block's outputs (both streams for SD3) during one forward: [(tensor or None, ...), ...]."""
    blocks = getattr(model, "transformer_blocks", None) or model.blocks
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out if isinstance(out, tuple) else (out,)))
               for b in blocks]
    try:
        final = run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return final, seen
