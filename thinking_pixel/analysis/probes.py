"""Model probes for routing analysis: record routing decisions over noised images, the recursion's states, and
the prediction decoded after each recursion step (the paper's Figs. 3, 4 and 6)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion import GaussianDiffusion

__all__ = ["collect_routing", "decode_steps", "noised", "recursion_states", "timestep_grid"]


def timestep_grid(num_timesteps: int, diffusion: GaussianDiffusion) -> list[int]:
    if num_timesteps < 1:
        raise ValueError(f"--num-timesteps must be >= 1, got {num_timesteps}")
    return sorted(set(np.linspace(0, diffusion.num_timesteps - 1, num_timesteps).round().astype(int).tolist()))


def noised(images, t: int, diffusion, seed: int):
    """x_t for all ``images`` at timestep ``t`` with noise seeded by (seed, t)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, t]).generate_state(1)[0]))
    noise = torch.randn(images.shape, generator=gen).to(images.device)
    tt = torch.full((len(images),), t, dtype=torch.long, device=images.device)
    return diffusion.q_sample(images, tt, noise), tt


@torch.no_grad()
def collect_routing(model, images, labels, timesteps, *, diffusion=None, batch_size=50, seed=0) -> dict:
    """Route ``images`` noised to each of ``timesteps``; -> {(layer, step): counts (K, C, N, M) int64 ndarray}."""
    diffusion = diffusion or GaussianDiffusion()
    num_classes, num_experts = model.config.num_classes, model.recursion.experts
    counts = {}
    for k, t in enumerate(timesteps):
        x_t, tt = noised(images, t, diffusion, seed)
        for xb, tb, yb in zip(x_t.split(batch_size), tt.split(batch_size), labels.split(batch_size)):
            with model.record_routing() as record:
                model(xb, tb, yb)
            for entry in record.entries:
                key = (entry["layer"], entry["step"])
                onehot = F.one_hot(entry["expert_idx"], num_experts).long()  # (B, N, M)
                per_class = torch.zeros(num_classes, *onehot.shape[1:], dtype=torch.long, device=onehot.device)
                per_class.index_add_(0, entry["condition"], onehot)  # (C, N, M)
                if key not in counts:
                    counts[key] = np.zeros((len(timesteps), *per_class.shape), dtype=np.int64)
                counts[key][k] += per_class.cpu().numpy()
    return counts


@torch.no_grad()
def recursion_states(model, x_t, t, y, layer: int, **model_kwargs) -> torch.Tensor:
    """The states a^0 .. a^T of recursive block ``layer`` -> (T + 1, B, N, D); a^T = out_T + x~.
    model_kwargs go to the model (e.g. cond_image)."""
    attn = dict(model.recursive_attentions())[layer]
    final = {}
    hook = attn.proj.register_forward_pre_hook(lambda m, inputs: final.update(out=inputs[0]))
    try:
        with model.record_routing(states=True) as record:
            model(x_t, t, y, **model_kwargs)
    finally:
        hook.remove()
    states = [e["state"] for e in record.entries if e["layer"] == layer]  # a^0 .. a^{T-1}, each (B, N, D)
    return torch.stack(states + [final["out"] + states[0]])


@torch.no_grad()
def decode_steps(model, x_t, t, y, layer: int, diffusion=None, **model_kwargs) -> torch.Tensor:
    """x^_0 predicted when block ``layer``'s recursion stops after each step -> (T, B, C, H, W); see module doc."""
    diffusion = diffusion or GaussianDiffusion()
    states = recursion_states(model, x_t, t, y, layer, **model_kwargs)  # (T + 1, B, N, D)
    attn = dict(model.recursive_attentions())[layer]
    decoded = []
    for s in range(1, len(states)):
        out_s = states[s] - states[0]  # step s's attention output (B, N, D)
        hook = attn.proj.register_forward_pre_hook(lambda m, inputs, out_s=out_s: (out_s,))
        try:
            eps = model(x_t, t, y, **model_kwargs)[:, : x_t.shape[1]]  # (B, C, H, W)
        finally:
            hook.remove()
        decoded.append(diffusion.predict_xstart_from_eps(x_t, t, eps).clamp(-1, 1))
    return torch.stack(decoded)
