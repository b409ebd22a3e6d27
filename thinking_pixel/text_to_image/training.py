"""The text-to-image task of the training loop (thinking_pixel.train): SD3 + rectified flow on captioned images.

The loop, checkpoints, resumption, EMA, progress bar and metrics.jsonl are train.py's; this module supplies what
differs from the class-conditional DiT (the ``task`` seam there):

- data: any dataset, its labels' ``class_names`` being the captions (``captions``: an imagefolder with
  metadata.jsonl; ``compositional``: the shapes world's scenes with GenEval captions; the class datasets work too,
  captioned by their class names);
- model: ``SD3TextToImage`` from an SD3-* preset in pixel space, or a local diffusers SD3 pipeline's transformer
  (``--pipeline DIR``, trained in its VAE's latent space with its own text encoders); ``--finetune-from`` wraps a
  trained model (the paper's setting: base frozen, experts and gates train), ``--peft-lora`` puts a plain peft
  LoRA on the same layers instead (the M = 1, T = 1 baseline without a gate);
- loss: rectified flow with logit-normal timesteps (``RectifiedFlow``), the caption replaced by the empty caption
  with probability ``class_dropout_prob`` (classifier-free guidance). The DiT's objective options
  (``min_snr_gamma``, ``prediction``) shape its eps loss and do not apply here: the flow has its own timestep
  density and velocity target;
- text: embeddings computed once per caption (``CaptionEmbeddings``) and kept in ``caption_embeddings.safetensors``
  in the run directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import _run_dir as ckpt
from ..checkpoints import load_model_dir
from ..datasets import make_dataset
from ..diffusion import RectifiedFlow
from ..text import CaptionEmbeddings, MiniLMTextEncoder
from .conditioning import PipelineVAE, load_text_encoder, null_caption_embedding
from .model import SD3TextToImage, init_adaln_zero, sd3_config
from .sampling import CAPTION_CACHE, grid_prompts, sample_prompts

__all__ = ["CAPTION_CACHE", "TextToImageTask", "build_text_model"]


def _minilm_max_length(dataset) -> int:
    """Tokens kept per caption: the dataset's longest caption, rounded up to 8 (at least 8, at most 128)."""
    longest = max(MiniLMTextEncoder.token_lengths_of(dataset.class_names))
    return min(128, max(8, -(-longest // 8) * 8))


def build_text_model(cfg, dataset) -> SD3TextToImage:
    """A fresh text-to-image model for ``cfg`` (a TrainConfig) shaped for ``dataset``."""
    recursion, m, pipeline = cfg.recursion, cfg.model, cfg.text_to_image.pipeline
    peft_lora = cfg.text_to_image.peft_lora
    if peft_lora is not None:
        peft_lora = {"rank": peft_lora.rank, "layers": peft_lora.layers}
    if m.finetune_from is not None or pipeline is not None:
        if cfg.text_to_image.init != "diffusers":
            raise ValueError(f"--init {cfg.text_to_image.init} initialises a fresh transformer; --finetune-from and "
                             "--pipeline start from trained weights")
        if m.finetune_from is not None:
            base = load_model_dir(ckpt.resolve_weights_dir(m.finetune_from, ema=True))
            if not isinstance(base, SD3TextToImage) or base.recursion is not None or base.peft_lora is not None:
                raise ValueError(f"--finetune-from {m.finetune_from} must hold a text-to-image model without "
                                 f"recursion or LoRA (got {type(base).__name__}); to continue a run, rerun it on "
                                 "its output dir")
            if base.pipeline is None and (base.image_size, base.in_channels) != (dataset.image_size,
                                                                                dataset.num_channels):
                raise ValueError(f"the model in {m.finetune_from} works on {base.image_size} px, {base.in_channels} "
                                 f"channels; the data has {dataset.image_size} px, {dataset.num_channels} channels")
        else:
            base = SD3TextToImage({}, text={"encoder": "pipeline"}, pipeline=pipeline)
            base.set_latent_size(cfg.data.image_size)
            if not m.freeze_base:
                raise ValueError("--pipeline trains the recursion (or LoRA) on a frozen transformer; "
                                 "--no-freeze-base is not supported with --pipeline")
        if recursion is None and peft_lora is None:
            return base.train()  # plain continued training of the whole transformer
        if peft_lora is not None and peft_lora["layers"] is None:
            peft_lora["layers"] = [base.transformer_config["num_layers"] // 2]
        return SD3TextToImage.from_base(base, recursion, freeze_base=m.freeze_base, peft_lora=peft_lora).train()
    if not m.preset.startswith("SD3"):
        raise ValueError(f"text-to-image training needs an SD3 preset (e.g. SD3-T/2), got --preset {m.preset}")
    head_dim = None
    if m.hidden_size is not None:
        heads = m.num_heads or sd3_config(m.preset, image_size=dataset.image_size)["num_attention_heads"]
        if m.hidden_size % heads:
            raise ValueError(f"--hidden-size {m.hidden_size} must be divisible by the number of heads ({heads})")
        head_dim = m.hidden_size // heads
    config = sd3_config(m.preset, image_size=dataset.image_size, in_channels=dataset.num_channels,
                        num_layers=m.depth, num_attention_heads=m.num_heads, attention_head_dim=head_dim,
                        patch_size=m.patch_size)
    if peft_lora is not None and peft_lora["layers"] is None:
        peft_lora["layers"] = [config["num_layers"] // 2]
    text = {"encoder": "minilm", "max_length": _minilm_max_length(dataset)}
    model = SD3TextToImage(config, recursion, text, peft_lora=peft_lora)
    if cfg.text_to_image.init == "adaln-zero":
        init_adaln_zero(model.transformer)
    return model


class TextToImageTask:
    """The text-to-image counterpart of train.DiTTask (same interface)."""

    @staticmethod
    def make_dataset(cfg):
        return make_dataset(cfg.data.dataset, root=cfg.data.data_dir, image_size=cfg.data.image_size,
                            seed=cfg.run.seed)

    build_model = staticmethod(build_text_model)

    def __init__(self, cfg, dataset, model: SD3TextToImage, device: torch.device, output_dir: Path):
        self.device, self.dropout, self.captions = device, cfg.model.class_dropout_prob, dataset.class_names
        self.flow = RectifiedFlow()
        cache = Path(output_dir) / CAPTION_CACHE
        # A pipeline's T5 states are (333, 4096) per caption: kept in bf16, half the memory of fp32.
        dtype = torch.float32 if model.pipeline is None else torch.bfloat16
        self.embeddings = CaptionEmbeddings(load_text_encoder(model.text, model.pipeline, device), dtype).load(cache)
        # Every caption of the data in one sorted pass: the same embeddings whether or not the run resumed.
        self.embeddings.add(["", *dataset.class_names])
        self.embeddings.save(cache)
        self.null = null_caption_embedding(self.embeddings, 1, device)  # (1, L, D), (1, D_p)
        self.vae = PipelineVAE(model.pipeline, device) if model.pipeline is not None else None

    def losses(self, model, x, labels) -> dict:
        captions = [self.captions[i] for i in labels.tolist()]
        hidden, pooled = self.embeddings.lookup(captions, device=self.device)  # (N, L, D), (N, D_p)
        drop = torch.rand(x.shape[0], device=self.device) < self.dropout  # (N,): train the null condition too
        hidden = torch.where(drop[:, None, None], self.null[0], hidden)
        pooled = torch.where(drop[:, None], self.null[1], pooled)
        if self.vae is not None:
            x = self.vae.encode(x)  # (N, C_latent, h, w)
        return self.flow.training_losses(model, x, {"hidden": hidden, "pooled": pooled})

    @staticmethod
    def sample_grid(cfg, output_dir: Path, device: torch.device) -> Path | None:
        prompts = grid_prompts(cfg)
        if not prompts:
            return None
        return sample_prompts(output_dir, output_dir / "samples.png", prompts, per_prompt=4, seed=cfg.run.seed,
                              device=str(device), pipeline=cfg.text_to_image.pipeline, progress=cfg.run.progress)
