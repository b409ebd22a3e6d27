"""Sampling a text-to-image checkpoint from prompts.

    thinking-pixel sample --checkpoint RUN --prompt "a photo of a red circle" --prompt ... --output grid.png

Pixel-space models integrate the rectified flow with diffusers' FlowMatchEulerDiscreteScheduler, guided by the
empty caption. Models built on a diffusers SD3 pipeline sample through ``StableDiffusion3Pipeline`` itself with
the trained (recursive) transformer in place. Each image has its own noise, seeded by (seed, its key), so an
image does not depend on the batch it was generated in or on how many others were asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import _run_dir as ckpt
from .._runtime import resolve_device, torch_threads
from ..datasets import make_dataset
from ..diffusion import RectifiedFlow
from ..models.pretrained import _load_weights, read_config
from ..sample import save_grid
from ..text import CaptionEmbeddings
from .conditioning import PipelineVAE, load_text_encoder, null_caption_embedding
from .model import SD3TextToImage

CAPTION_CACHE = "caption_embeddings.safetensors"  # in a training run directory

__all__ = ["PromptSampler", "grid_prompts", "image_seed", "load_text_model", "read_prompts", "sample_prompts"]


def image_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])


def load_text_model(checkpoint: str | Path, *, use_ema: bool = True, device="cpu",
                    pipeline: str | None = None) -> SD3TextToImage:
    """The SD3TextToImage in ``checkpoint``; ``pipeline`` replaces the pipeline directory stored in it (moved files).

    A checkpoint of a class-conditional model is refused with a one-line error.
    """
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    try:
        config = read_config(weights)
    except (FileNotFoundError, ValueError) as e:
        raise ckpt.CheckpointError(f"cannot load a model from {weights}: {e}") from None
    if config["class"] != SD3TextToImage.__name__:
        raise ValueError(f"--checkpoint {checkpoint} holds a class-conditional {config['class']}, which cannot "
                         "follow --prompt; sample it with --classes, or train a text-to-image model "
                         "(--dataset compositional / captions)")
    if pipeline is not None:
        config["pipeline"] = str(pipeline)
    try:
        with torch.device("cpu" if config.get("pipeline") else "meta"):
            model = SD3TextToImage._from_config_dict(config)
        _load_weights(model, weights, device)
    except (FileNotFoundError, ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise ckpt.CheckpointError(f"cannot load a model from {weights}: {e}") from None
    return model.to(device).eval()


class PromptSampler:
    """A text-to-image model with its text encoder and (for pipeline models) VAE, ready to sample prompts."""

    def __init__(self, model: SD3TextToImage, cache: str | Path | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.embeddings = CaptionEmbeddings(load_text_encoder(model.text, model.pipeline, self.device))
        if cache is not None:
            self.embeddings.load(cache)
        self.flow = RectifiedFlow()
        self.vae = PipelineVAE(model.pipeline, self.device) if model.pipeline is not None else None

    def latent_shape(self) -> tuple:
        cfg = self.model.transformer_config
        size = cfg["sample_size"]
        return cfg["in_channels"], size, size

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], keys: Sequence[tuple], *, cfg_scale: float = 4.0, num_steps: int = 28,
                 seed: int = 0, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """One image per (prompt, key): (len(prompts), C, H, W) in [-1, 1]; image i's noise is seeded by
        (seed, *keys[i])."""
        if len(prompts) != len(keys):
            raise ValueError(f"one key per prompt expected, got {len(prompts)} prompts and {len(keys)} keys")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.model.pipeline is not None:
            return self._generate_pipeline(prompts, keys, cfg_scale, num_steps, seed, progress)
        shape = self.latent_shape()
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_keys = list(prompts[i:i + batch_size]), keys[i:i + batch_size]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, *k)))
                                 for k in chunk_keys]).to(self.device)  # (B, C, H, W)
            hidden, pooled = self.embeddings.lookup(chunk, device=self.device)
            null_hidden, null_pooled = null_caption_embedding(self.embeddings, len(chunk), self.device)
            x = self.flow.sample(self.model, noise, {"hidden": hidden, "pooled": pooled},
                                 {"hidden": null_hidden, "pooled": null_pooled}, cfg_scale=cfg_scale,
                                 num_steps=num_steps, progress=progress)
            out.append(x.clamp(-1, 1))
        return torch.cat(out)

    def _generate_pipeline(self, prompts, keys, cfg_scale, num_steps, seed, progress) -> torch.Tensor:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(self.model.pipeline, transformer=self.model.transformer,
                                                        local_files_only=True).to(self.device)
        pipe.set_progress_bar_config(disable=not progress)
        size = self.model.transformer_config["sample_size"] * pipe.vae_scale_factor
        images = []
        for prompt, key in zip(prompts, keys):
            generator = torch.Generator(self.device).manual_seed(image_seed(seed, *key))
            image = pipe(prompt, height=size, width=size, num_inference_steps=num_steps, guidance_scale=cfg_scale,
                         generator=generator, output_type="pt").images  # (1, 3, H, W) in [0, 1]
            images.append(image * 2 - 1)
        return torch.cat(images).float()


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | Path | None = None) -> list[str]:
    """The --prompt values followed by the lines of --prompts-file (blank lines skipped); at least one is required."""
    found = list(prompts or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not found:
        raise ValueError("no prompts given: pass --prompt \"a red circle\" (repeatable) or a non-empty --prompts-file")
    return found


def grid_prompts(cfg) -> list[str]:
    """A few captions of the run's data for the end-of-training grid (TrainConfig ``cfg``)."""
    dataset = make_dataset(cfg.data.dataset, root=cfg.data.data_dir, image_size=cfg.data.image_size,
                           seed=cfg.run.seed)
    captions = list(dataset.class_names)
    step = max(1, len(captions) // 8)
    return captions[::step][:8]


def sample_prompts(checkpoint: str | Path, output: str | Path, prompts: Sequence[str], *, per_prompt: int = 4,
                   cfg_scale: float = 4.0, num_steps: int = 28, seed: int = 0, use_ema: bool = True,
                   device: str = "auto", batch_size: int = 32, scale: int | None = None, pipeline: str | None = None,
                   num_threads: int | None = None, progress: bool = False) -> Path:
    """Write a PNG grid: one row per prompt, ``per_prompt`` samples each."""
    prompts = read_prompts(prompts)
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    with torch_threads(num_threads):
        model = load_text_model(checkpoint, use_ema=use_ema, device=resolve_device(device), pipeline=pipeline)
        step_dir = ckpt.find_step_dir(ckpt.resolve_weights_dir(checkpoint, ema=use_ema))
        cache = None if step_dir is None else step_dir.parent.parent / CAPTION_CACHE
        sampler = PromptSampler(model, cache=cache)
        rows = [p for p in prompts for _ in range(per_prompt)]
        keys = [(i, j) for i in range(len(prompts)) for j in range(per_prompt)]
        images = sampler.generate(rows, keys, cfg_scale=cfg_scale, num_steps=num_steps, seed=seed,
                                  batch_size=batch_size, progress=progress)
        return save_grid(images, output, ncol=per_prompt, scale=scale)
