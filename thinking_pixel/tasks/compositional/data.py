"""Compositional shape scenes with GenEval captions (``--dataset compositional``), rendered procedurally.

Interface, for a class-conditional or a caption-conditioned trainer:

- ``ds[i] -> (image (3, H, W) float32 in [-1, 1], label int)``, like every :class:`ImageDataset`. ``label``
  indexes the split's caption vocabulary: ``ds.class_names[label]`` (or ``ds.caption(label)``) is the caption
  string, ``ds.prompts[label]`` its :class:`~thinking_pixel.tasks.compositional.Prompt` (tag and GenEval rules).
  A caption-conditioned trainer maps a batch of labels to text with
  ``[ds.class_names[y] for y in labels.tolist()]`` (or embeds the vocabulary once and indexes it).
- Sample ``i`` is a pure function of (seed, i), at any ``image_size``: its tag is ``TAGS[i % 6]`` (balanced
  tags), its prompt is drawn uniformly from that tag's prompts in the split, and the scene is drawn at random
  subject to the prompt (:func:`~thinking_pixel.tasks.compositional.sample_scene`).
- ``split="train"`` (default) holds every prompt that is not held out; ``split="test"`` only the held-out ones
  (tags with no held-out prompt, single_object and counting, do not appear there). The held-out compositions
  (:class:`~thinking_pixel.tasks.compositional.HeldOut`, from ``heldout_seed``) are three shape pairs and six
  colour-shape bindings; training images never show a held-out pair together and never draw a held-out binding,
  not even where a caption leaves the colour open. Evaluate generalisation with
  ``make_prompts(n, seed=s, split="test")`` and :func:`~thinking_pixel.tasks.compositional.score`.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.base import ImageDataset, to_unit_range
from .grammar import TAGS, HeldOut, all_prompts
from .render import SceneObject, render_scene, sample_scene

__all__ = ["CompositionalDataset"]


class CompositionalDataset(ImageDataset):
    """Scenes of 1-4 coloured shapes captioned with GenEval's templates; see the module docstring.

    Args:
        image_size: side in pixels (any size >= 16; objects are drawn as fractions of the side).
        num_samples: length of the dataset.
        seed: with the index, determines every sample.
        split: "train" (everything not held out) or "test" (the held-out compositions only).
        heldout_seed: which compositions are held out (the same for both splits).
    """

    def __init__(self, image_size: int = 32, num_samples: int = 50_000, seed: int = 0, split: str = "train",
                 heldout_seed: int = 0):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for scenes of up to 4 objects, got {image_size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.image_size, self.num_channels = image_size, 3
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.heldout = HeldOut(heldout_seed)
        self.prompts = tuple(all_prompts(split=split, heldout=self.heldout))
        self.class_names = tuple(p.caption for p in self.prompts)
        self.tags = tuple(t for t in TAGS if any(p.tag == t for p in self.prompts))
        self._labels_by_tag = {t: np.array([i for i, p in enumerate(self.prompts) if p.tag == t]) for t in self.tags}
        # Open colours in training never form a held-out binding (the test split may show any colour).
        self._avoid = self.heldout.bindings if split == "train" else frozenset()

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[list[SceneObject], int]:
        """The objects of sample ``index`` (shapes, colours, positions, sizes) and its label."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        labels = self._labels_by_tag[self.tags[index % len(self.tags)]]
        label = int(labels[rng.integers(len(labels))])
        return sample_scene(self.prompts[label], rng, avoid_bindings=self._avoid), label

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """Sample ``index`` as (3, H, W) uint8 and its label."""
        objects, label = self.scene(index)
        return render_scene(objects, self.image_size).transpose(2, 0, 1), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.render(index)
        return to_unit_range(np.ascontiguousarray(image)), label
