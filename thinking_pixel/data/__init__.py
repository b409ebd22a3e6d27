"""Image datasets: :class:`ImageDataset` subclasses giving ((C, H, W) in [-1, 1], label).

The datasets of a task live with the task (``thinking_pixel.tasks.compositional.data``,
``thinking_pixel.tasks.frozenlake.data``); :mod:`thinking_pixel.datasets` builds any of them by name:

- ``shapes``: embedded procedural coloured shapes (the default; no files needed)
- ``compositional``: scenes of 1-4 shapes captioned with GenEval's templates, with a held-out split
- ``digits``: scikit-learn's bundled 8x8 digits, upsampled
- ``fashion_mnist``: Fashion-MNIST IDX files (Debian ``dataset-fashion-mnist`` or a directory)
- ``folder``: an image folder with one subdirectory per class
- ``latents``: precomputed VAE latents with labels
- ``captions``: captioned images (metadata.jsonl with file_name, text); labels index the distinct captions
- ``frozenlake``: FrozenLake planning steps, (next frame, label, current frame) for image-conditioned models
"""

from __future__ import annotations

from .base import ImageDataset, StepBatchSampler, resize_batch, to_unit_range
from .captions import CaptionFolderDataset
from .digits import DigitsDataset
from .fashion_mnist import FashionMNISTDataset, read_idx
from .folder import ImageFolderDataset
from .latents import LatentDataset, load_latents
from .shapes import COLOURS, SHAPES, ShapesDataset, render_shape

__all__ = [
    "CaptionFolderDataset",
    "COLOURS",
    "DigitsDataset",
    "FashionMNISTDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "SHAPES",
    "ShapesDataset",
    "StepBatchSampler",
    "load_latents",
    "read_idx",
    "render_shape",
    "resize_batch",
    "to_unit_range",
]
