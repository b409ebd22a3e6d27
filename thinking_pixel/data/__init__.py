"""Datasets: ``make_dataset(name, ...)`` -> an :class:`ImageDataset` of ((C, H, W) in [-1, 1], label).

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

import inspect

from .base import ImageDataset, StepBatchSampler, resize_batch, to_unit_range
from .captions import CaptionFolderDataset
from .compositional import CompositionalDataset
from .digits import DigitsDataset
from .fashion_mnist import FashionMNISTDataset, read_idx
from .folder import ImageFolderDataset
from .latents import LatentDataset, load_latents
from .frozenlake import FrozenLakeDataset
from .shapes import COLOURS, SHAPES, ShapesDataset, render_shape

__all__ = [
    "CaptionFolderDataset",
    "COLOURS",
    "CompositionalDataset",
    "DATASETS",
    "DigitsDataset",
    "FashionMNISTDataset",
    "FrozenLakeDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "SHAPES",
    "ShapesDataset",
    "StepBatchSampler",
    "load_latents",
    "make_dataset",
    "read_idx",
    "render_shape",
    "resize_batch",
    "to_unit_range",
]

DATASETS: dict[str, type[ImageDataset]] = {
    "shapes": ShapesDataset,
    "compositional": CompositionalDataset,
    "digits": DigitsDataset,
    "fashion_mnist": FashionMNISTDataset,
    "folder": ImageFolderDataset,
    "latents": LatentDataset,
    "captions": CaptionFolderDataset,
    "frozenlake": FrozenLakeDataset,
}


def make_dataset(name: str, *, root=None, image_size: int | None = None, seed: int = 0, **options) -> ImageDataset:
    """Build dataset ``name`` from the registry.

    ``root`` is the data location (required for ``folder`` and ``latents``, optional for ``fashion_mnist``);
    ``seed`` is used by datasets that generate their samples; other ``options`` go to the dataset's constructor.
    Arguments a dataset does not take are rejected with a clear error.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = dict(options)
    if image_size is not None:
        kwargs["image_size"] = image_size
    if "seed" in accepted:
        kwargs["seed"] = seed
    if root is not None:
        kwargs["root"] = root
    elif "root" in accepted and inspect.signature(cls.__init__).parameters["root"].default is inspect.Parameter.empty:
        raise ValueError(f"dataset {name!r} needs a data directory (root / --data-dir)")
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"dataset {name!r} does not take option(s) {sorted(unknown)}; it accepts {sorted(accepted)}")
    return cls(**kwargs)
