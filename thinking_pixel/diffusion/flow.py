"""SD3's rectified flow: the training objective with logit-normal timesteps, and Euler sampling with guidance.

x_t = (1 - s) x_0 + s e with e ~ N(0, I) and noise level s in [0, 1]; the model sees t = 1000 s and predicts the
velocity v = e - x_0 (Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 paper). Training draws
s = sigmoid(m + d u), u ~ N(0, 1) (logit-normal, m = 0, d = 1 in the paper), optionally shifted
s' = shift s / (1 + (shift - 1) s) towards noise for large images (SD3 uses shift 3 at 1024 px; small pixel-space
images need none). Sampling integrates dx/ds = v from s = 1 to 0 with diffusers' FlowMatchEulerDiscreteScheduler
on the same shift, with classifier-free guidance v = v_u + w (v_c - v_u).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

__all__ = ["RectifiedFlow"]

ModelFn = Callable[..., torch.Tensor]


class RectifiedFlow:
    num_train_timesteps = 1000

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0):
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        self.logit_mean, self.logit_std, self.shift = float(logit_mean), float(logit_std), float(shift)

    def sample_sigmas(self, n: int, device=None, generator=None) -> torch.Tensor:
        """(n,) noise levels in (0, 1), logit-normal, shifted."""
        u = torch.randn(n, device=device, generator=generator)
        s = torch.sigmoid(self.logit_mean + self.logit_std * u)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, model_kwargs: dict | None = None) -> dict:
        """{"loss": (N,) per-sample MSE of the velocity, "sigma_mean": (1,)}; model_fn(x_t, t, **model_kwargs)."""
        sigma = self.sample_sigmas(x0.shape[0], device=x0.device)  # (N,)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - s) * x0 + s * noise  # (N, C, H, W)
        v = model_fn(x_t, sigma * self.num_train_timesteps, **(model_kwargs or {}))
        loss = (v.float() - (noise - x0).float()).pow(2).mean(dim=tuple(range(1, x0.dim())))  # (N,)
        return {"loss": loss}

    def scheduler(self, num_steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        scheduler.set_timesteps(num_steps)
        return scheduler

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, cond: dict, uncond: dict | None = None,
               cfg_scale: float = 1.0, num_steps: int = 28, progress: bool = False) -> torch.Tensor:
        """Integrate from ``noise`` (N, C, H, W) at s = 1 to s = 0.

        ``cond`` / ``uncond``: keyword tensors of model_fn for the conditional and the null branch (each with
        batch N); with cfg_scale != 1 both branches run in one doubled batch.
        """
        scheduler = self.scheduler(num_steps)
        guided = uncond is not None and cfg_scale != 1.0
        kwargs = {k: torch.cat([uncond[k], v]) for k, v in cond.items()} if guided else cond
        x = noise
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
            x_in = torch.cat([x, x]) if guided else x
            v = model_fn(x_in, t.to(x.device).expand(x_in.shape[0]), **kwargs)
            if guided:
                v_u, v_c = v.chunk(2)
                v = v_u + cfg_scale * (v_c - v_u)
            x = scheduler.step(v, t, x).prev_sample
        return x
