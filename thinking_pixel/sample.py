"""Sampling: load a checkpoint (EMA weights by default) and write a PNG grid, one row per class."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import _run_dir as ckpt
from .checkpoints import load_model_dir
from ._arguments import GUIDANCE_INTERVAL, check_image_output
from ._runtime import resolve_device, torch_threads
from .diffusion import GaussianDiffusion, sample
from .train_config import TrainConfig

__all__ = ["apply_halting", "generate", "make_grid", "sample_checkpoint", "save_grid"]


@torch.no_grad()
def generate(model, classes: Sequence[int], per_class: int, *, sampler: str = "ddpm", num_steps: int = 100,
             cfg_scale: float = 4.0, cfg_interval: tuple[int, int] | None = None, seed: int = 0,
             clip_sample: bool = True, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """``per_class`` samples of each class in ``classes``, class-major: (len(classes) * per_class, C, H, W).

    Seeded: the same arguments give the same images. Generation runs in chunks of ``batch_size`` samples,
    each with its own generator seeded from (seed, chunk index). Non-finite samples (NaN / Inf, from broken
    weights) raise a ValueError instead of being returned, so no caller writes them as a black image.
    """
    config = model.config
    bad = [c for c in classes if not 0 <= c < config.num_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range for a model with {config.num_classes} classes")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    device = next(model.parameters()).device
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)  # (K * per_class,)
    shape = (config.in_channels, config.input_size, config.input_size)
    diffusion = GaussianDiffusion()
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for i, chunk in enumerate(labels.split(batch_size)):
            generator = torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            chunks.append(sample(model, chunk, shape, diffusion=diffusion, sampler=sampler, num_steps=num_steps,
                                 cfg_scale=cfg_scale, cfg_interval=cfg_interval, null_class=config.num_classes,
                                 clip_sample=clip_sample, generator=generator, progress=progress))
    finally:
        model.train(was_training)
    images = torch.cat(chunks)
    if not torch.isfinite(images).all():  # one host sync per call, after all the sampling work
        bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
        raise ValueError(f"{bad} of {len(images)} sampled images hold NaN or Inf: the model's weights are "
                         "broken (a diverged or corrupted checkpoint)")
    return images


def make_grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> an (rows * H', ncol * W', 3) uint8 grid, row-major, ``scale``x nearest upsampling."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels to be shown, got {images.shape[1]}")
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, _, h, w = images.shape
    rows = -(-n // ncol)
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    return grid


def save_grid(images: torch.Tensor, path: str | Path, ncol: int, scale: int | None = None) -> Path:
    """Write ``images`` as a PNG grid into an existing directory; ``scale`` None upsamples small images to at
    least 64 px."""
    path = check_image_output(path, "path")
    if scale is None:
        scale = max(1, -(-64 // images.shape[-1]))
    Image.fromarray(make_grid(images, ncol, scale=scale)).save(path)
    return path


def _decode_latents(latents: torch.Tensor, vae_dir: str | None) -> torch.Tensor:
    """Decode latents stored as scaling_factor * z with a local diffusers AutoencoderKL (no downloads)."""
    if vae_dir is None:
        raise ValueError("this checkpoint generates VAE latents; pass a local diffusers AutoencoderKL directory "
                         "(--vae DIR) to decode them")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).to(latents.device).eval()
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def apply_halting(model, halting: dict | None, checkpoint) -> bool:
    """Set a ThinkingPixelDiT's inference halting rule (``halting``: set_halting's mode / threshold, or None to keep
    the checkpoint's); returns whether ``model`` recurses (and so counts the recursion steps it takes)."""
    recursive = hasattr(model, "set_halting")
    if halting:
        if not recursive:
            raise ValueError(f"halting settings need a ThinkingPixelDiT, {checkpoint} holds a {type(model).__name__}")
        model.set_halting(**halting)
    return recursive


def sample_checkpoint(checkpoint: str | Path, output: str | Path, *, sampler: str = "ddpm", num_steps: int = 100,
                      cfg_scale: float = 4.0, cfg_interval: tuple[int, int] | None = GUIDANCE_INTERVAL, seed: int = 0,
                      classes: Sequence[int] | None = None,
                      per_class: int = 8, use_ema: bool = True, device: str = "auto", batch_size: int = 64,
                      scale: int | None = None, vae: str | None = None, num_threads: int | None = None,
                      progress: bool = False, halting: dict | None = None) -> Path:
    """Sample a grid from ``checkpoint`` (training output dir, step dir or save_pretrained dir) into ``output``.

    Rows are ``classes`` (default: all), ``per_class`` samples each. ``output`` is checked before any work.
    Guidance acts at timesteps ``cfg_interval`` (lo, hi) only, by default the low-noise ones (GUIDANCE_INTERVAL);
    None guides every step.
    ``halting``: set_halting arguments (mode, threshold) for a ThinkingPixelDiT; the mean recursion steps a token
    took is printed for one.
    """
    check_image_output(output, "output")
    with torch_threads(num_threads):
        weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
        model = load_model_dir(weights, device=resolve_device(device))
        if not hasattr(getattr(model, "config", None), "num_classes"):
            raise ValueError(f"{checkpoint} holds a text-to-image model ({type(model).__name__}): pass --prompt \"...\"")
        recursive = apply_halting(model, halting, checkpoint)
        step_dir = ckpt.find_step_dir(weights)
        is_latent = step_dir is not None and TrainConfig.load(step_dir).data.dataset == "latents"
        classes = list(range(model.config.num_classes)) if classes is None else list(classes)
        images = generate(model, classes, per_class, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale,
                          cfg_interval=cfg_interval, seed=seed, clip_sample=not is_latent, batch_size=batch_size,
                          progress=progress)
        if recursive:
            print(f"mean recursion steps per token: {model.mean_recursion_steps():.3f} "
                  f"(of {model.recursion.steps}, halting {model.recursion.halting})")
        if is_latent:
            images = _decode_latents(images, vae)
        return save_grid(images, output, ncol=per_class, scale=scale)
