"""Shared by the DiT and ThinkingPixelDiT tests."""

import torch


def randomize(model, std=0.1, seed=0):
    """Move every trainable parameter off its init (adaLN-Zero and the final layer start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y
