"""The diffusion planner: an image-conditioned model samples the next frame given the current one.

``thinking-pixel evaluate --benchmark frozenlake --checkpoint RUN`` rolls it out (see :func:`evaluate_checkpoint`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ... import _run_dir as ckpt
from ..._runtime import resolve_device
from ...checkpoints import load_model_dir
from ...diffusion import sample
from ...train_config import TrainConfig
from .data import CELL, FrozenLakeDataset, frame_tensor
from .maps import make_maps
from .rollout import evaluate_planner

__all__ = ["DiffusionPlanner", "EVAL_MAP_SEED", "evaluate_checkpoint", "evaluation_maps", "frames_to_images"]

EVAL_MAP_SEED = 10_007  # held-out maps are drawn from this seed (and never equal a training map)


def frames_to_images(frames: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N RGB PIL images."""
    pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p, "RGB") for p in pixels]


class DiffusionPlanner:
    """``planner(frames) -> next frames``: samples each next frame from an image-conditioned model.

    Batched (``batched = True``): called with the frames of every unfinished rollout at once. Call ``i`` draws its
    noise from a generator seeded with (seed, i), so a rollout is reproducible.
    """

    batched = True

    def __init__(self, model, *, sampler: str = "ddim", num_steps: int = 20, seed: int = 0, batch_size: int = 256):
        if getattr(model.config, "cond_channels", 0) != 3:
            raise ValueError("the planner needs an image-conditioned model (config.cond_channels == 3), trained with "
                             "--dataset frozenlake")
        self.model, self.sampler, self.num_steps, self.seed, self.batch_size = model, sampler, num_steps, seed, batch_size
        self.calls = 0

    @torch.no_grad()
    def next_frames(self, current: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) current frames in [-1, 1] -> (N, 3, H, W) sampled next frames."""
        device = next(self.model.parameters()).device
        generator = torch.Generator(device).manual_seed(
            int(np.random.SeedSequence([self.seed, self.calls]).generate_state(1)[0]))
        self.calls += 1
        out = []
        for chunk in current.to(device).split(self.batch_size):
            labels = torch.zeros(len(chunk), dtype=torch.long, device=device)
            fn = functools.partial(self.model, cond_image=chunk)
            out.append(sample(fn, labels, tuple(chunk.shape[1:]), sampler=self.sampler, num_steps=self.num_steps,
                              generator=generator))
        return torch.cat(out)

    def __call__(self, frames):
        current = torch.stack([frame_tensor(f) for f in frames])  # (N, 3, H, W)
        return frames_to_images(self.next_frames(current))


def evaluation_maps(train_config: dict, canvas: int, num_maps: int, sizes=None) -> dict[int, list]:
    """Held-out maps per size: the training size and every larger one up to the canvas (default), never a map
    the run trained on (the training maps are rebuilt from the run's settings: ``train_config``, its
    train_config.json, or {} for weights saved outside a run, trained on the whole canvas with seed 0)."""
    image_size, seed = canvas * CELL, 0
    if train_config:
        saved = TrainConfig.from_dict(train_config)
        image_size, seed = saved.data.image_size, saved.run.seed
    train = FrozenLakeDataset(image_size=image_size, seed=seed, num_samples=1)
    sizes = list(range(train.map_size, canvas + 1)) if sizes is None else list(sizes)
    bad = [s for s in sizes if not 2 <= s <= canvas]
    if bad:
        raise ValueError(f"map sizes must be in [2, {canvas}] (the model's canvas), got {bad}")
    return {s: make_maps(num_maps, size=s, seed=EVAL_MAP_SEED, exclude=train.maps) for s in sizes}


def evaluate_checkpoint(checkpoint, output=None, *, num_maps: int = 100, sizes=None, max_steps=None,
                        sampler: str = "ddim", num_steps: int = 20, seed: int = 0, use_ema: bool = True,
                        device: str = "auto", halting: dict | None = None) -> dict:
    """Roll the checkpoint's planner out on held-out maps of each size; -> {size: evaluate_planner's rates}.

    ``halting``: RecursionConfig halting settings to use instead of the checkpoint's (see
    ThinkingPixelDiT.set_halting); the result reports the mean recursion steps taken per token.
    """
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    step_dir = ckpt.find_step_dir(weights)
    train_config = ckpt.load_train_config(step_dir) if step_dir is not None else {}
    model = load_model_dir(weights, device=resolve_device(device)).eval()
    recursive = hasattr(model, "recursion")
    if halting is not None:
        if not recursive:
            raise ValueError(f"halting settings need a ThinkingPixelDiT checkpoint, {checkpoint} holds a "
                             f"{type(model).__name__}")
        model.set_halting(**halting)
    canvas = model.config.input_size // CELL
    result = {"checkpoint": str(weights), "model_class": type(model).__name__,
              "recursion": model.recursion.to_dict() if recursive else None,
              "sampler": sampler, "num_steps": num_steps, "seed": seed, "sizes": {}}
    for size, maps in evaluation_maps(train_config, canvas, num_maps, sizes).items():
        if recursive:
            model.reset_recursion_stats()
        planner = DiffusionPlanner(model, sampler=sampler, num_steps=num_steps, seed=seed)
        rates = evaluate_planner(planner, maps, max_steps=max_steps, cell=CELL, canvas=canvas)
        rates["mean_recursion_steps"] = model.mean_recursion_steps() if recursive else None
        result["sizes"][str(size)] = rates
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1) + "\n")
    return result
