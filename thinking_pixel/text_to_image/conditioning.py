"""The text encoders and the image codec of a text-to-image model, chosen by its checkpoint config.

- Pixel-space models (``text = {"encoder": "minilm", "max_length": L}``): frozen all-MiniLM-L6-v2, images as they are.
- Pipeline models (``text = {"encoder": "pipeline"}``, ``pipeline = DIR``): the pipeline's own CLIP-L, CLIP-G and T5
  through ``StableDiffusion3Pipeline.encode_prompt`` (so the embeddings are exactly the ones the pipeline samples
  with), and its VAE: images are trained as SD3 latents ``(z - shift_factor) * scaling_factor``.
Everything loads with ``local_files_only=True``; nothing is downloaded.
"""

from __future__ import annotations

import os

import torch
from ..text import MiniLMTextEncoder

__all__ = ["PipelineTextEncoder", "PipelineVAE", "load_text_encoder", "null_caption_embedding"]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()


class PipelineTextEncoder:
    """The text encoders of a local StableDiffusion3Pipeline: captions -> (prompt_embeds, pooled_prompt_embeds)."""

    def __init__(self, pipeline_dir: str, device="cpu", max_sequence_length: int = 256):
        _offline()
        from diffusers import StableDiffusion3Pipeline

        # bf16 on GPU: T5-XXL alone is 19 GB in fp32; the embeddings are computed once per caption anyway.
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, transformer=None, vae=None,
                                                             dtype=dtype, local_files_only=True).to(device)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, captions, batch_size: int = 64):
        hidden, pooled = [], []
        for i in range(0, len(captions), batch_size):
            chunk = list(captions[i:i + batch_size])
            h, _, p, _ = self.pipe.encode_prompt(chunk, chunk, chunk, do_classifier_free_guidance=False,
                                                 max_sequence_length=self.max_sequence_length)
            hidden.append(h)
            pooled.append(p)
        return torch.cat(hidden), torch.cat(pooled)


class PipelineVAE:
    """A pipeline's AutoencoderKL: images in [-1, 1] <-> SD3 latents (shifted and scaled as the pipeline does)."""

    def __init__(self, pipeline_dir: str, device="cpu"):
        _offline()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae", local_files_only=True)
        self.vae = self.vae.to(device).eval().requires_grad_(False)
        self.scale = self.vae.config.scaling_factor
        self.shift = self.vae.config.shift_factor or 0.0
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C_latent, H / f, W / f); a sample of the posterior (global torch RNG)."""
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample.float().clamp(-1, 1)


def load_text_encoder(text: dict, pipeline: str | None, device="cpu"):
    """The encoder a model's ``text`` spec names (see the module docstring)."""
    kind = text.get("encoder")
    if kind == "minilm":
        _offline()

        return MiniLMTextEncoder(max_length=text["max_length"], device=device)
    if kind == "pipeline":
        if pipeline is None:
            raise ValueError("this model uses a pipeline's text encoders: pass the pipeline directory (--pipeline)")
        return PipelineTextEncoder(pipeline, device=device, max_sequence_length=text.get("max_length", 256))
    raise ValueError(f"unknown text encoder {kind!r} in the model's config; expected 'minilm' or 'pipeline'")


def null_caption_embedding(embeddings, n: int, device):
    """The empty caption's (hidden (n, L, D), pooled (n, D_p)): classifier-free guidance's null condition."""
    hidden, pooled = embeddings.lookup([""], device=device)
    return hidden.expand(n, -1, -1), pooled.expand(n, -1)
