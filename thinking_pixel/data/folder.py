"""An image folder with one subdirectory per class (``root/<class name>/*.png``), like torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import ImageDataset, to_unit_range

__all__ = ["ImageFilesDataset", "ImageFolderDataset", "center_crop_resize", "IMAGE_EXTENSIONS", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM/DiT preprocessing: box-downsample while the short side is >= 2 * size, bicubic to short side = size,
    then centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int, num_channels: int) -> torch.Tensor:
    """An image file -> (C, size, size) float32 in [-1, 1], centre-cropped and resized (RGB, or L for 1 channel)."""
    with Image.open(path) as image:
        image = center_crop_resize(image.convert("RGB" if num_channels == 3 else "L"), size)
        array = np.asarray(image)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, S, S)
    return to_unit_range(array)


class ImageFilesDataset(ImageDataset):
    """Images read from files on access: subclasses fill ``samples`` with (path, label) pairs."""

    samples: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.image_size, self.num_channels), label


class ImageFolderDataset(ImageFilesDataset):
    """Images under ``root/<class>/``; classes are the sorted subdirectory names, labels their indices."""

    def __init__(self, root: str | Path, image_size: int = 32, num_channels: int = 3):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected {root}/<class name>/<images>)")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        self.samples: list[tuple[Path, int]] = []
        for label, d in enumerate(class_dirs):
            files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((f, label) for f in files)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in class subdirectories of {root}")
        self.class_names = tuple(d.name for d in class_dirs)
        self.image_size, self.num_channels = image_size, num_channels
