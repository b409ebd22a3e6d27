"""Architecture presets by name: the class-conditional DiT's and the text-to-image SD3 model's.

Plain data, without torch, so that the command line lists and checks preset names without importing the models;
``thinking_pixel.models.dit_config`` and ``sd3_config`` build configs from them.
"""

__all__ = ["DIT_CONFIGS", "RECIPES", "SD3_CONFIGS", "SD3_INITS"]

# DiT: (depth, hidden_size, num_heads) x patch size. S/B/L/XL are DiT's; they keep DiTConfig's latent-space defaults
# (32x32x4 latents, 1000 classes). T ("tiny") and N ("nano") are ours, for pixel-space runs on a 2-core CPU at 16x16
# RGB: DiT-T/2 has 64 tokens and ~4M parameters; DiT-N/4 (the CPU training default) has 16 tokens and ~1.3M
# parameters, a few minutes per thousand steps. Override any field with dit_config(name, ...).
_DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "T": dict(depth=6, hidden_size=192, num_heads=3, input_size=16, in_channels=3, num_classes=10),
    "N": dict(depth=4, hidden_size=128, num_heads=4, input_size=16, in_channels=3, num_classes=10),
}
DIT_CONFIGS = {f"DiT-{size}/{patch}": dict(arch, patch_size=patch) for size, arch in _DIT_SIZES.items()
               for patch in (2, 4, 8)}

# SD3 (thinking_pixel.text_to_image.model): the transformer's blocks and heads x head dim, x patch size.
_SD3_SIZES = {
    "N": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32),
    "T": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32),
    "S": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
}
SD3_CONFIGS = {f"SD3-{size}/{patch}": dict(arch, patch_size=patch) for size, arch in _SD3_SIZES.items()
               for patch in (1, 2, 4)}

# A fresh SD3 transformer's init (TrainConfig.text_to_image.init): diffusers' own, or DiT's adaLN-Zero
# (thinking_pixel.text_to_image.model.init_adaln_zero).
SD3_INITS = ("diffusers", "adaln-zero")

# Training recipes by name (``thinking-pixel train --recipe NAME``): the options of a run whose result RESULTS.md
# reports; options given explicitly win. t2i-compositional: the text-to-image base of RESULTS.md's "Text-to-image"
# section, found by its recipe search (SD3-T/4 from scratch at 32 px on the compositional shapes world: 49.0 overall
# on seen compositions after 16000 steps, 57.0 after 24000, 25 prompts x 4 images per tag; ~1.5 h on one CPU core).
# t2i-compositional-cooldown: its second stage, all weights from the first's EMA weights (--finetune-from, required)
# with the lr decayed to 0 over 2000 steps (58.3 overall from step 24000, every target met).
RECIPES = {
    "t2i-compositional": dict(dataset="compositional", image_size=32, preset="SD3-T/4", init="adaln-zero", lr=4e-3,
                              warmup_steps=200, lr_schedule="constant", batch_size=32, max_steps=24000),
    "t2i-compositional-cooldown": dict(dataset="compositional", image_size=32, preset="SD3-T/4", recursion=False,
                                       lr=4e-3, warmup_steps=50, lr_schedule="cosine", batch_size=32, max_steps=2000),
}
RECIPE_NEEDS = {"t2i-compositional-cooldown": "finetune_from"}  # options a recipe cannot run without
