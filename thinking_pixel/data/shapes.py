"""Embedded toy data: coloured geometric shapes, rendered procedurally (no files, no download).

Class = (shape, colour), label = shape_index * num_colours + colour_index, so e.g. 4 shapes x 4 colours
give 16 classes and ``caption(label)`` reads "a red circle". Each sample is a single anti-aliased shape
on a black background with random position, size, rotation and a little colour jitter; sample ``i`` is
a pure function of (seed, i), at any resolution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import ImageDataset, to_unit_range

__all__ = ["SHAPES", "COLOURS", "ShapesDataset", "inside_shape", "render_shape"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 210, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
}


def inside_shape(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Boolean mask of points (in the shape's own frame, circumradius ~1) inside ``shape``.

    Extents are chosen so that all shapes cover a similar area and none is mistaken for another at 16 px.
    """
    if shape == "circle":
        return px**2 + py**2 <= 0.85**2
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) <= 0.72
    if shape == "triangle":
        # Equilateral, circumradius 1.15: inside all three edges at distance 1.15/2 from the centre.
        inradius = 0.575
        inside = np.ones_like(px, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3
            inside &= px * math.cos(a) + py * math.sin(a) <= inradius
        return inside
    if shape == "cross":
        arm, half_width = 0.95, 0.3
        ax, ay = np.abs(px), np.abs(py)
        return ((ax <= half_width) & (ay <= arm)) | ((ay <= half_width) & (ax <= arm))
    if shape == "ring":
        r2 = px**2 + py**2
        return (r2 <= 0.95**2) & (r2 >= 0.55**2)
    if shape == "diamond":
        # Taller than wide, so that a near-upright diamond is never a rotated square.
        return np.abs(px) / 0.75 + np.abs(py) / 1.05 <= 1.0
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render_shape(
    shape: str,
    colour: tuple[int, int, int],
    image_size: int,
    center: tuple[float, float],
    radius: float,
    angle: float,
    supersample: int = 4,
) -> np.ndarray:
    """Render one shape on black: (3, image_size, image_size) uint8.

    ``center`` and ``radius`` are fractions of the image side; ``angle`` is in radians.
    Anti-aliasing averages a ``supersample`` x ``supersample`` grid of points per pixel.
    """
    n = image_size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n  # sample points in [0, 1]
    gy, gx = np.meshgrid(coords, coords, indexing="ij")  # (n, n) each
    dx, dy = (gx - center[0]) / radius, (gy - center[1]) / radius
    c, s = math.cos(angle), math.sin(angle)
    px, py = c * dx + s * dy, -s * dx + c * dy  # rotate the sample points by -angle
    coverage = inside_shape(shape, px, py).reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))
    rgb = np.asarray(colour, dtype=np.float32)[:, None, None] * coverage[None]  # (3, H, W)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class ShapesDataset(ImageDataset):
    """Procedural coloured shapes: ``num_shapes`` x ``num_colours`` classes, ``num_samples`` samples per epoch.

    Args:
        image_size: side in pixels (any size >= 8).
        num_shapes / num_colours: use the first k of :data:`SHAPES` / :data:`COLOURS`.
        num_samples: length of the dataset; labels cycle through the classes so classes are balanced.
        seed: with the index, determines every sample.
        min_radius / max_radius: shape circumradius as a fraction of the image side.
        max_angle: rotation drawn uniformly from [-max_angle, max_angle] degrees. The default keeps shapes near
            upright, so a 16 px model learns to tell them apart in minutes (a rotated square is a diamond and a
            rotated cross an X, which at 16 px blur into one blob class); 180 gives any orientation.
        colour_jitter: max absolute per-channel change of the colour (0-255 scale).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_shapes: int = 4,
        num_colours: int = 4,
        num_samples: int = 50_000,
        seed: int = 0,
        min_radius: float = 0.3,
        max_radius: float = 0.45,
        colour_jitter: int = 20,
        max_angle: float = 15.0,
        supersample: int = 4,
    ):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if not 1 <= num_shapes <= len(SHAPES):
            raise ValueError(f"num_shapes must be in [1, {len(SHAPES)}], got {num_shapes}")
        if not 1 <= num_colours <= len(COLOURS):
            raise ValueError(f"num_colours must be in [1, {len(COLOURS)}], got {num_colours}")
        if not 0 < min_radius <= max_radius <= 0.5:
            raise ValueError(f"need 0 < min_radius <= max_radius <= 0.5, got {min_radius}, {max_radius}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= max_angle <= 180:
            raise ValueError(f"max_angle must be in [0, 180] degrees, got {max_angle}")
        self.image_size, self.num_channels = image_size, 3
        self.shapes = SHAPES[:num_shapes]
        self.colours = tuple(COLOURS)[:num_colours]
        self.class_names = tuple(f"a {c} {s}" for s in self.shapes for c in self.colours)
        self.num_samples, self.seed = num_samples, seed
        self.min_radius, self.max_radius = min_radius, max_radius
        self.colour_jitter, self.supersample = colour_jitter, supersample
        self.max_angle = float(max_angle)

    def __len__(self) -> int:
        return self.num_samples

    def label_parts(self, label: int) -> tuple[str, str]:
        """(shape, colour) of class ``label``."""
        self.caption(label)  # validates the label
        return self.shapes[label // len(self.colours)], self.colours[label % len(self.colours)]

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """Sample ``index`` as (3, H, W) uint8 and its label."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        label = index % self.num_classes
        shape, colour_name = self.label_parts(label)
        rng = np.random.default_rng([self.seed, index])
        radius = rng.uniform(self.min_radius, self.max_radius)
        center = tuple(rng.uniform(radius, 1.0 - radius, size=2))
        angle = math.radians(rng.uniform(-self.max_angle, self.max_angle))
        jitter = rng.integers(-self.colour_jitter, self.colour_jitter + 1, 3)
        colour = np.clip(np.asarray(COLOURS[colour_name]) + jitter, 0, 255)
        image = render_shape(shape, tuple(colour), self.image_size, center, radius, angle, self.supersample)
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.render(index)
        return to_unit_range(image), label
