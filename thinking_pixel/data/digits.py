"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), upsampled to the requested size."""

from __future__ import annotations

import torch

from .base import ImageDataset, resize_batch

__all__ = ["DigitsDataset"]


class DigitsDataset(ImageDataset):
    """Grey digits in [-1, 1] (0 = black background), ``num_channels`` 1 or 3 (grey repeated)."""

    def __init__(self, image_size: int = 32, num_channels: int = 1):
        from sklearn.datasets import load_digits

        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        images, labels = load_digits(return_X_y=True)  # (1797, 64) values 0..16, (1797,)
        images = torch.from_numpy(images).float().reshape(-1, 1, 8, 8) / 16.0  # [0, 1]
        images = resize_batch(images, image_size).clamp_(0, 1) * 2 - 1  # (N, 1, S, S) in [-1, 1]
        self.images = images.expand(-1, num_channels, -1, -1).contiguous()
        self.labels = torch.from_numpy(labels).long()
        self.image_size, self.num_channels = image_size, num_channels
        self.class_names = tuple(f"the digit {d}" for d in range(10))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
