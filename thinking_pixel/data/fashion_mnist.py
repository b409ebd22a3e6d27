"""Fashion-MNIST from local IDX files (28x28 grey, 10 classes), resized to the requested size.

Looks in ``/usr/share/datasets/fashion-mnist`` (the Debian package ``dataset-fashion-mnist``) unless a
directory is given. Files may be gzipped or not: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .base import ImageDataset, resize_batch, to_unit_range

__all__ = ["FashionMNISTDataset", "read_idx", "DEFAULT_ROOT", "CLASS_NAMES"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {root}. Install the Debian package with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_ROOT}) or pass the directory holding "
        "the IDX files with --data-dir (root= in Python)."
    )


class FashionMNISTDataset(ImageDataset):
    """Fashion-MNIST ``split`` ("train" 60k or "test" 10k) as (C, S, S) in [-1, 1] (black background)."""

    def __init__(self, image_size: int = 32, root: str | Path | None = None, split: str = "train",
                 num_channels: int = 1):
        if split not in _SPLIT_PREFIX:
            raise ValueError(f"split must be one of {tuple(_SPLIT_PREFIX)}, got {split!r}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        root = Path(root if root is not None else DEFAULT_ROOT)
        prefix = _SPLIT_PREFIX[split]
        self.images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))  # (N, 28, 28) uint8
        self.labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)  # (N,)
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise ValueError(f"{root}: expected (N, H, W) images and N labels, "
                             f"got {self.images.shape} and {self.labels.shape}")
        self.image_size, self.num_channels = image_size, num_channels
        self.class_names = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = to_unit_range(self.images[index])[None, None]  # (1, 1, 28, 28)
        image = resize_batch(image, self.image_size)[0].clamp_(-1, 1)  # (1, S, S)
        return image.expand(self.num_channels, -1, -1).contiguous(), int(self.labels[index])
