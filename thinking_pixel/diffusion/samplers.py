"""Samplers for a learned-sigma eps model, built on diffusers' schedulers.

- ``ddpm``: ancestral sampling with the model's learned variance (diffusers' DDPMScheduler with
  ``variance_type="learned_range"``, which is DiT's interpolation between beta_t and the posterior variance),
  on DiT's respacing: ``num_steps`` timesteps evenly spaced from 999 down to 0.
- ``ddim``: deterministic DDIM (eta = 0) on the eps half; "trailing" spacing so the first step is t = 999.
- ``dpm``: DPM-Solver++(2M), a fast multistep ODE solver on the eps half (good at 10-25 steps).

All three take the same betas as :class:`GaussianDiffusion`, so the model sees the noise levels it was trained on.
Classifier-free guidance is applied here, not in the model: the batch is doubled with the null class
(``num_classes``) and guidance mixes the eps half only; the variance half comes from the conditional branch.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .gaussian import GaussianDiffusion

__all__ = ["SAMPLERS", "make_scheduler", "guided_model_fn", "in_guidance_interval", "sample"]

SAMPLERS = ("ddpm", "ddim", "dpm")

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(name: str, diffusion: GaussianDiffusion, num_steps: int, clip_sample: bool = True):
    """A diffusers scheduler for ``name`` on ``diffusion``'s betas, with its timesteps set for ``num_steps`` steps.

    ``clip_sample`` clamps the predicted x_0 to [-1, 1] (right for pixel data, wrong for latents).
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    T = diffusion.num_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    betas = diffusion.betas.numpy()
    if name == "ddpm":
        scheduler = DDPMScheduler(
            num_train_timesteps=T, trained_betas=betas, variance_type="learned_range", clip_sample=clip_sample
        )
        # DiT's space_timesteps: evenly spaced, always including 999 and 0.
        timesteps = np.unique(np.round(np.linspace(0, T - 1, num_steps)).astype(np.int64))[::-1]
        scheduler.set_timesteps(timesteps=timesteps.tolist())
    elif name == "ddim":
        scheduler = DDIMScheduler(
            num_train_timesteps=T, trained_betas=betas, clip_sample=clip_sample, set_alpha_to_one=True,
            timestep_spacing="trailing",
        )
        scheduler.set_timesteps(num_steps)
    else:
        # With sample_max_value=1, dynamic thresholding reduces to clamping x_0 to [-1, 1].
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=T, trained_betas=betas, algorithm_type="dpmsolver++", solver_order=2,
            thresholding=clip_sample, sample_max_value=1.0,
        )
        with warnings.catch_warnings():  # diffusers calls np.array(torch tensor), numpy 2 warns: harmless here
            warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                    category=DeprecationWarning)
            scheduler.set_timesteps(num_steps)
    return scheduler


def in_guidance_interval(t, interval: tuple[int, int] | None):
    """Whether timestep(s) ``t`` (an int, or a tensor elementwise) lie in the guidance interval lo <= t <= hi; every
    timestep does when ``interval`` is None."""
    return True if interval is None else (t >= interval[0]) & (t <= interval[1])


def guided_model_fn(model: torch.nn.Module, cfg_scale: float, null_class: int,
                    interval: tuple[int, int] | None = None) -> ModelFn:
    """Wrap ``model(x, t, y) -> (N, 2C, H, W)`` with classifier-free guidance on the eps half.

    ``interval`` = (lo, hi): guide only at timesteps lo <= t <= hi, the plain conditional prediction elsewhere
    (guidance in a limited interval, Kynkäänniemi et al. 2024: guiding the noisiest steps, where the layout is
    decided, collapses the position and size of the objects to their mean).
    """
    if cfg_scale == 1.0:
        return model

    def model_fn(x, t, y):
        C = x.shape[1]
        y_null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2N, 2C, H, W)
        cond, uncond = out.chunk(2)  # (N, 2C, H, W) each
        eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
        if interval is not None:
            inside = in_guidance_interval(t, interval).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
            eps = torch.where(inside, eps, cond[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1)

    return model_fn


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    diffusion: GaussianDiffusion | None = None,
    sampler: str = "ddpm",
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[int, int] | None = None,
    null_class: int | None = None,
    clip_sample: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Draw ``len(labels)`` samples of ``shape`` = (C, H, W) for class ``labels`` (N,) -> (N, C, H, W).

    ``null_class`` (the model's ``num_classes``) is required when ``cfg_scale != 1``; ``cfg_interval`` = (lo, hi)
    limits guidance to timesteps lo <= t <= hi (see :func:`guided_model_fn`).
    ``generator`` (on ``labels.device``) makes the result reproducible.
    ``callback(t, x_t)``: called before each step with the timestep and the current noisy sample (for figures).
    """
    if cfg_scale != 1.0 and null_class is None:
        raise ValueError("null_class (the model's num_classes) is required for classifier-free guidance "
                         "(cfg_scale != 1)")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    diffusion = diffusion or GaussianDiffusion()
    scheduler = make_scheduler(sampler, diffusion, num_steps, clip_sample)
    if cfg_interval is not None and not (len(cfg_interval) == 2 and 0 <= cfg_interval[0] <= cfg_interval[1]):
        raise ValueError(f"cfg_interval must be (lo, hi) timesteps with 0 <= lo <= hi, got {cfg_interval!r}")
    guided = guided_model_fn(model, cfg_scale, null_class)
    device = labels.device
    C = shape[0]

    # DDIM re-derives eps from the clipped x_0 (guided-diffusion's DDIM): diffusers' default keeps the raw eps,
    # which no longer matches the clipped x_0 and turns strongly guided samples into noise.
    step_kwargs = {"use_clipped_model_output": True} if sampler == "ddim" else {"generator": generator}
    x = torch.randn(len(labels), *shape, device=device, generator=generator)  # (N, C, H, W)
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=f"sampling ({sampler})", leave=False)
    for t in timesteps:
        t_batch = torch.full((len(labels),), int(t), device=device, dtype=torch.long)
        if callback is not None:
            callback(int(t), x)
        # outside the guidance interval the step needs only the conditional prediction: one pass, not two
        # outside the guidance interval the step needs only the conditional prediction: one pass, not two
        model_fn = guided if in_guidance_interval(int(t), cfg_interval) else model
        out = model_fn(x, t_batch, labels).float()  # (N, 2C, H, W)
        if out.shape[1] != 2 * C:
            raise ValueError(f"the model must predict eps and variance (2*C = {2 * C} channels), got {out.shape[1]}")
        x = scheduler.step(out if sampler == "ddpm" else out[:, :C], t, x, **step_kwargs).prev_sample
    return x
