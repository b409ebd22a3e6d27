"""AdamW over a recursion's trainable parameters: torch's default implementation (one pass over the parameters per
elementwise op), foreach (the same ops over lists) and fused (one pass per parameter), which the fine-tuning
benchmark's step uses for every variant. Parameters: apply_recursion's experts and gates at DiT-XL/2 width
(D = 1152, M = 5, rank 128, 2 layers); --quick: DiT-S/2 width, rank 16."""

from __future__ import annotations

import pytest
import torch

from thinking_pixel import RecursionConfig

from . import flop_model


@pytest.mark.parametrize("impl", ["default", "foreach", "fused"])
def test_adamw_step(bench, device, quick, impl):
    dim, recursion = (384, RecursionConfig(experts=5, steps=5, rank=16)) if quick else (
        1152, RecursionConfig(experts=5, steps=5, rank=128))
    layers = 2
    g = torch.Generator().manual_seed(0)
    shapes = [(recursion.experts, 3, recursion.rank, dim), (recursion.experts, 3, dim, recursion.rank),
              (recursion.experts, dim), (recursion.experts, dim)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for _ in range(layers) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    kwargs = {"default": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, **kwargs)
    count = sum(p.numel() for p in params)
    bench(opt.step, group=f"AdamW step | {count / 1e6:.1f}M parameters (D={dim}, M={recursion.experts}, "
          f"rank {recursion.rank}, {layers} layers) | float32", impl=impl,
          cost=flop_model.Cost(12 * count, 28 * count), dtype=torch.float32, op="adamw")
