"""Image datasets that belong to no task: :class:`ImageDataset` subclasses giving ((C, H, W) in [-1, 1], label)
(shapes, digits, Fashion-MNIST, image folders, latents, captioned images), and the base class and batch sampler.

The datasets of a task live with the task (``thinking_pixel.tasks.compositional.data``,
``thinking_pixel.tasks.frozenlake.data``); :mod:`thinking_pixel.datasets` lists and builds every dataset by name.
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
