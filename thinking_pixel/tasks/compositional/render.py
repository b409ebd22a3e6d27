"""Scenes that satisfy a prompt, rendered at any resolution.

A scene is 1-4 shapes on black, none overlapping (a gap of at least ``GAP`` of the side between their bounding
circles), each with a colour from the palette (with a little jitter), a size (circumradius as a fraction of the
side, smaller when there are more objects), a position and a small rotation. Prompts fix what their rules say
(shapes, counts, colours, one relation); everything else is drawn at random. Relations are drawn with a margin
so that GenEval's position rule (see :mod:`.score`) holds with room to spare.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...data.shapes import COLOURS, render_shape
from .grammar import COLOUR_NAMES, Prompt

__all__ = ["SceneObject", "render", "render_scene", "sample_scene"]

# Circumradius range (fraction of the image side) by number of objects.
RADIUS_RANGE = {1: (0.22, 0.36), 2: (0.16, 0.25), 3: (0.14, 0.2), 4: (0.13, 0.18)}
BOUND = 1.15  # bounding-circle radius of any shape, in units of its circumradius (the triangle's)
GAP = 0.06  # minimum gap between bounding circles, fraction of the side
MAX_ANGLE = 10.0  # degrees of rotation either way
COLOUR_JITTER = 15  # max per-channel change (0-255)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y), fractions of the side, y down
    radius: float  # circumradius, fraction of the side
    angle: float  # degrees
    rgb: tuple[int, int, int]  # the jittered colour actually drawn


def _relation_offset(relation: str, rng: np.random.Generator) -> tuple[float, float]:
    """A unit direction for "A <relation> B" (A - B), at most ~27 degrees off the axis."""
    along, across = 1.0, rng.uniform(-0.5, 0.5)
    dx, dy = {"left of": (-along, across), "right of": (along, across),
              "above": (across, -along), "below": (across, along)}[relation]
    norm = math.hypot(dx, dy)
    return dx / norm, dy / norm


def _try_place(radii: list[float], rng: np.random.Generator, relation: str | None) -> list | None:
    """Centres for objects with ``radii`` (object 1 placed ``relation`` of object 0), or None if they did not fit."""
    centres = []
    for i, r in enumerate(radii):
        lo, hi = BOUND * r, 1.0 - BOUND * r
        if lo > hi:
            return None
        if i == 1 and relation is not None:
            dx, dy = _relation_offset(relation, rng)
            dist = BOUND * (radii[0] + r) + GAP + rng.uniform(0.0, 0.25)
            c = (centres[0][0] + dx * dist, centres[0][1] + dy * dist)
            if not (lo <= c[0] <= hi and lo <= c[1] <= hi):
                return None
        else:
            c = tuple(rng.uniform(lo, hi, size=2))
        for (x, y), rj in zip(centres, radii):
            if math.hypot(c[0] - x, c[1] - y) < BOUND * (r + rj) + GAP:
                return None
        centres.append(c)
    return centres


def sample_scene(prompt: Prompt, rng: np.random.Generator, *,
                 avoid_bindings: frozenset = frozenset()) -> list[SceneObject]:
    """Objects satisfying ``prompt``: one per count of each include rule, nothing else.

    Colours a rule leaves open are drawn uniformly, never a (colour, shape) in ``avoid_bindings`` (the held-out
    bindings, when rendering training data). For a position prompt, object 0 is the reference (rule 0) and
    object 1 lies in the asked direction from it.
    """
    wanted = []  # (shape, colour or None)
    for rule in prompt.include:
        wanted += [(rule.shape, rule.colour)] * rule.count
    relation = next((r.position[0] for r in prompt.include if r.position is not None), None)
    lo, hi = RADIUS_RANGE[len(wanted)]
    for attempt in range(1000):
        shrink = 0.97 ** (attempt // 50)  # rarely needed: shrink a little if nothing fits
        radii = [rng.uniform(lo, hi) * shrink for _ in wanted]
        centres = _try_place(radii, rng, relation)
        if centres is not None:
            break
    else:
        raise RuntimeError(f"could not place the objects of {prompt.caption!r}")
    objects = []
    for (shape, colour), c, r in zip(wanted, centres, radii):
        if colour is None:
            choices = [name for name in COLOUR_NAMES if (name, shape) not in avoid_bindings]
            colour = choices[rng.integers(len(choices))]
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255))
        objects.append(SceneObject(shape, colour, (float(c[0]), float(c[1])), float(r),
                                   float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)), rgb))
    return objects


def render_scene(objects: list[SceneObject], size: int = 32, supersample: int = 4) -> np.ndarray:
    """The scene as (size, size, 3) uint8 on black."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    canvas = np.zeros((3, size, size), dtype=np.uint8)
    for o in objects:  # objects never overlap, so the max composes them exactly
        layer = render_shape(o.shape, o.rgb, size, o.center, o.radius, math.radians(o.angle), supersample)
        np.maximum(canvas, layer, out=canvas)
    return canvas.transpose(1, 2, 0)


def render(prompt: Prompt, *, size: int = 32, seed: int = 0) -> Image.Image:
    """An RGB image of ``size`` x ``size`` pixels that satisfies ``prompt``, deterministic by ``seed``."""
    # crc32, not hash(): Python salts str hashes per process.
    objects = sample_scene(prompt, np.random.default_rng([seed, zlib.crc32(prompt.caption.encode())]))
    return Image.fromarray(render_scene(objects, size))
