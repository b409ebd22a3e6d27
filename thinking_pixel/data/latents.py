"""Precomputed latents with labels (fast-DiT style), for training a DiT in a VAE's latent space.

Accepted layouts of ``path``:
- a ``.safetensors`` file with tensors ``latents`` (N, C, h, w) and ``labels`` (N,);
- a ``.npy``/``.npz`` pair: a directory holding ``latents.npy`` and ``labels.npy`` (or a ``.npz`` with both keys);
- fast-DiT's extraction output: a directory with ``*_features/`` and ``*_labels/`` subdirectories holding one
  ``<i>.npy`` per sample ((1, C, h, w) or (C, h, w) features, (1,) or () labels).

Latents are returned multiplied by ``scale`` (fast-DiT already stores them times 0.18215, so the default is 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import ImageDataset

__all__ = ["LatentDataset", "load_latents"]


def _load_fast_dit(root: Path) -> tuple[list[Path], list[Path]] | None:
    features = sorted(root.glob("*_features"))
    labels = sorted(root.glob("*_labels"))
    if len(features) != 1 or len(labels) != 1:
        return None
    key = lambda p: (len(p.stem), p.stem)  # numeric order for 0.npy, 1.npy, ..., 10.npy
    f_files, l_files = sorted(features[0].glob("*.npy"), key=key), sorted(labels[0].glob("*.npy"), key=key)
    if [p.name for p in f_files] != [p.name for p in l_files]:
        raise ValueError(f"{features[0]} and {labels[0]} must hold the same file names")
    return f_files, l_files


def load_latents(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (latents (N, C, h, w) float32, labels (N,) int64) from any layout described in the module docstring."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        missing = {"latents", "labels"} - tensors.keys()
        if missing:
            raise ValueError(f"{path} must contain tensors 'latents' and 'labels'; missing {sorted(missing)}")
        latents, labels = tensors["latents"], tensors["labels"]
    elif path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if not {"latents", "labels"} <= set(data.files):
                raise ValueError(f"{path} must contain arrays 'latents' and 'labels', has {data.files}")
            latents, labels = torch.from_numpy(data["latents"]), torch.from_numpy(data["labels"])
    elif path.is_dir() and (path / "latents.npy").is_file() and (path / "labels.npy").is_file():
        latents = torch.from_numpy(np.load(path / "latents.npy"))
        labels = torch.from_numpy(np.load(path / "labels.npy"))
    elif path.is_dir() and (found := _load_fast_dit(path)) is not None:
        f_files, l_files = found
        features = [np.load(f) for f in f_files]
        latents = torch.from_numpy(np.stack([a.reshape(a.shape[-3:]) for a in features]))
        labels = torch.from_numpy(np.stack([np.load(f).reshape(()) for f in l_files]))
    else:
        raise FileNotFoundError(
            f"no latents found at {path}: expected a .safetensors/.npz with 'latents' and 'labels', a directory with "
            "latents.npy + labels.npy, or a fast-DiT directory with *_features/ and *_labels/"
        )
    if latents.ndim != 4 or labels.ndim != 1 or len(latents) != len(labels):
        raise ValueError(f"expected latents (N, C, h, w) and labels (N,), "
                         f"got {tuple(latents.shape)} and {tuple(labels.shape)}")
    return latents.float(), labels.long()


class LatentDataset(ImageDataset):
    """Latents (C, h, w) and labels; ``num_classes`` defaults to max(label) + 1."""

    is_latent = True

    def __init__(self, root: str | Path, scale: float = 1.0, num_classes: int | None = None,
                 image_size: int | None = None):
        self.latents, self.labels = load_latents(root)
        self.latents = self.latents * scale
        if self.latents.shape[-1] != self.latents.shape[-2]:
            raise ValueError(f"latents must be square, got {tuple(self.latents.shape[-2:])}")
        if image_size is not None and image_size != self.latents.shape[-1]:
            raise ValueError(f"image_size={image_size} does not match the latents' size {self.latents.shape[-1]}")
        max_label = int(self.labels.max())
        num_classes = max_label + 1 if num_classes is None else num_classes
        if int(self.labels.min()) < 0 or max_label >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(self.labels.min())}, {max_label}]")
        self.class_names = tuple(f"class {i}" for i in range(num_classes))
        self.num_channels, self.image_size = self.latents.shape[1], self.latents.shape[-1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.latents[index], int(self.labels[index])
