"""What every dataset provides, and the seeded data order used by training."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = ["ImageDataset", "StepBatchSampler", "resize_batch", "to_unit_range"]


class ImageDataset(Dataset):
    """A class-conditional image dataset: ``ds[i] -> (image (C, H, W) float32 in [-1, 1], label int)``.

    Subclasses set ``class_names`` (one per label), ``num_channels`` and ``image_size``.
    ``is_latent`` marks datasets whose "images" are VAE latents (not in [-1, 1], must not be clipped).
    """

    class_names: tuple[str, ...] = ()
    num_channels: int = 3
    image_size: int = 32
    is_latent: bool = False
    cond_channels: int = 0  # > 0: items are (image, label, conditioning image (cond_channels, H, W))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def caption(self, label: int) -> str:
        """A short text description of class ``label`` (for text conditioning and figure labels)."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label must be in [0, {self.num_classes}), got {label}")
        return self.class_names[label]


def to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], same shape."""
    return torch.from_numpy(images_uint8.astype(np.float32)).div_(127.5).sub_(1.0)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size); antialiased when shrinking, bilinear when growing."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


class StepBatchSampler(Sampler[list[int]]):
    """An endless stream of batches of indices, a pure function of (seed, global step).

    Epoch ``e`` is a permutation drawn from a generator seeded with (seed, e); step ``s`` is batch
    ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch`` (the incomplete last batch is dropped).
    Resuming at step ``s`` therefore reproduces exactly the batches an uninterrupted run would have seen,
    without replaying the ones before it.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, start_step: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than batch_size={batch_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples, self.batch_size, self.seed, self.start_step = num_samples, batch_size, seed, start_step
        self.batches_per_epoch = num_samples // batch_size

    def position(self, step: int) -> dict[str, int]:
        """Where global step ``step`` falls in the data order."""
        return {"epoch": step // self.batches_per_epoch, "batch": step % self.batches_per_epoch}

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self):
        pos = self.position(self.start_step)
        epoch, batch = pos["epoch"], pos["batch"]
        while True:
            perm = self.permutation(epoch)
            for b in range(batch, self.batches_per_epoch):
                yield perm[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            epoch, batch = epoch + 1, 0
