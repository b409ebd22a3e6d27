"""Every dataset by name: ``make_dataset(name, ...)`` -> an :class:`~thinking_pixel.data.ImageDataset` of
((C, H, W) in [-1, 1], label), and fixed seeded subsets of real images for evaluation.

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

import torch

from ._checks import check_positive_ints
from .data import (CaptionFolderDataset, DigitsDataset, FashionMNISTDataset, ImageDataset, ImageFolderDataset,
                   LatentDataset, ShapesDataset)
from .metrics import to_uint8
from .tasks.compositional.data import CompositionalDataset
from .tasks.frozenlake.data import FrozenLakeDataset

__all__ = ["DATASETS", "make_dataset", "real_subset", "reference_images"]

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


def _dataset_options(name: str, **wanted) -> dict:
    """The subset of ``wanted`` constructor options that dataset ``name`` accepts."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    accepted = set(inspect.signature(DATASETS[name].__init__).parameters)
    return {k: v for k, v in wanted.items() if k in accepted}


def real_subset(dataset: str, num_images: int, *, image_size: int, num_channels: int, split: str = "test",
                data_dir: str | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed seeded subset of ``num_images`` real images, preprocessed like training data.

    Returns (images (N, C, S, S) float in [-1, 1], labels (N,) int64).
    """
    check_positive_ints(num_images=num_images)
    options = _dataset_options(dataset, split=split, num_channels=num_channels)
    if split != "test" and "split" not in options:
        raise ValueError(f"dataset {dataset!r} has no splits; --split {split!r} cannot be used")
    ds = make_dataset(dataset, root=data_dir, image_size=image_size, **options)
    if ds.is_latent:
        raise ValueError(f"dataset {dataset!r} holds VAE latents; only pixel datasets are supported here")
    if num_images > len(ds):
        raise ValueError(f"{num_images} images requested but {dataset}/{split} has only {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num_images]
    items = [ds[i] for i in order.tolist()]
    images = torch.stack([image for image, _ in items])  # (N, C, S, S)
    if images.shape[1:] != (num_channels, image_size, image_size):
        raise ValueError(f"{dataset} gives images of shape {tuple(images.shape[1:])}, the model works on "
                         f"{(num_channels, image_size, image_size)}")
    return images, torch.tensor([label for _, label in items], dtype=torch.long)


def reference_images(dataset: str, num_images: int, **kwargs) -> torch.Tensor:
    """:func:`real_subset`'s images rounded to uint8 like generated samples: (N, C, S, S)."""
    return to_uint8(real_subset(dataset, num_images, **kwargs)[0])
