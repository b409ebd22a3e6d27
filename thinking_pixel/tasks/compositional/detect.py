"""A classical-vision detector for shapes on a dark background (no learned weights).

1. Colour space: each pixel bright and saturated enough (HSV value >= ``v_min``, saturation >= ``s_min``) is
   labelled with the palette entry nearest in hue; everything else is background.
2. Connected components (8-connected) of each colour label. Components smaller than ``min_area_frac`` of the
   image, without a core of pixels that win a 3x3 majority vote for their colour, or not on a dark ground
   (most pixels two steps outside them bright and saturated), are speckle or noise and are dropped.
3. Each component's soft coverage: its pixels and a one-pixel ring around them (the anti-aliased or blurred
   edge), as the projection of the pixel colour on the component's own colour, clipped to [0, 1]. Its mass is
   the object's area and its first moments the centroid, both unchanged by blur.
4. Shape from geometry: for every shape, the template of that area centred on the centroid (over a few
   rotations for shapes that have one) is rasterised and compared with the coverage by soft IoU
   (sum of minima / sum of maxima); the best template names the shape. A component no template fits with
   IoU >= ``min_fit`` is a blob of unknown shape (``shape=None``): it is never counted as any class.
5. Colour: the palette entry nearest in HSV hue to the component's brightest pixels.

Position and counts are read off the detections by :mod:`.score`, with GenEval's rules.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ...data.shapes import COLOURS, SHAPES, inside_shape

__all__ = ["Detection", "detect_objects", "to_rgb_array"]

# Rotations tried per shape (degrees): the renderers tilt shapes by at most 15.
_ANGLES = {"circle": (0.0,), "ring": (0.0,)}
_DEFAULT_ANGLES = tuple(float(a) for a in range(-20, 21, 5))
_SUPERSAMPLE = 4
_PALETTE_HUES = np.array([colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0] * 360.0 for rgb in COLOURS.values()])


@dataclass(frozen=True)
class Detection:
    """One object. Coordinates are in pixels, x right, y down; ``box`` is (x0, y0, x1, y1), edges of its pixels."""

    shape: str | None  # None: no shape template fits
    colour: str
    box: tuple[float, float, float, float]
    center: tuple[float, float]  # centroid of the coverage
    area: float  # coverage mass in pixels
    radius: float  # circumradius of the fitted template, pixels
    fit: float  # soft IoU of the best template, in [0, 1]


@functools.cache
def _unit_area(shape: str) -> float:
    """Area of ``shape`` at circumradius 1 (the frame of :func:`inside_shape`)."""
    n, half = 1200, 1.3
    g = (np.arange(n) + 0.5) / n * 2 * half - half
    gx, gy = np.meshgrid(g, g)
    return float(inside_shape(shape, gx, gy).mean() * (2 * half) ** 2)


def to_rgb_array(image) -> np.ndarray:
    """A PIL image, or a uint8 / [0, 1] float array or tensor (H, W, 3) or (3, H, W) -> (H, W, 3) float64 in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if hasattr(image, "detach"):  # torch
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.min() < -1e-6 or a.max() > 1 + 1e-6:
        raise ValueError(f"float images must be in [0, 1], got values in [{a.min():.3g}, {a.max():.3g}]")
    return a.astype(np.float64)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value of (H, W, 3) RGB in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-12), 0.0)
    d = np.maximum(delta, 1e-12)
    h = np.where(v == r, (g - b) / d % 6, np.where(v == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return h, s, v


def _nearest_colour(hue: np.ndarray) -> np.ndarray:
    """Index of the palette colour nearest in hue (circular distance)."""
    diff = np.abs(hue[..., None] - _PALETTE_HUES)  # (..., K)
    return np.minimum(diff, 360.0 - diff).argmin(-1)


def _fit_shape(cover: np.ndarray, x0: int, y0: int, center: tuple[float, float], mass: float):
    """Best (shape, radius, iou) of templates with ``mass`` at ``center`` against ``cover`` (h, w) at (x0, y0)."""
    h, w = cover.shape
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    xs = (x0 + np.arange(w)[:, None] + offsets).ravel() - center[0]  # (w * ss,)
    ys = (y0 + np.arange(h)[:, None] + offsets).ravel() - center[1]  # (h * ss,)
    gx, gy = np.meshgrid(xs, ys)  # (h * ss, w * ss)
    best = (None, 0.0, -1.0)
    for shape in SHAPES:
        radius = float(np.sqrt(mass / _unit_area(shape)))
        theta = np.radians(_ANGLES.get(shape, _DEFAULT_ANGLES))[:, None, None]  # (A, 1, 1)
        c, s = np.cos(theta), np.sin(theta)
        px, py = (c * gx + s * gy) / radius, (-s * gx + c * gy) / radius  # (A, h * ss, w * ss)
        template = inside_shape(shape, px, py).reshape(len(theta), h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean((2, 4))
        iou = np.minimum(template, cover).sum((1, 2)) / np.maximum(template, cover).sum((1, 2))  # (A,)
        if iou.max() > best[2]:
            best = (shape, radius, float(iou.max()))
    return best


def _on_dark_ground(mask: np.ndarray, foreground: np.ndarray) -> bool:
    """Whether most pixels two steps outside ``mask`` are background (objects lie on a dark ground; noise does not)."""
    near = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))
    ring = ndimage.binary_dilation(near, structure=np.ones((3, 3))) & ~near
    return not ring.any() or foreground[ring].mean() < 0.5


def detect_objects(image, *, v_min: float = 0.3, s_min: float = 0.35, min_area_frac: float = 0.008,
                   min_fit: float = 0.5) -> list[Detection]:
    """The objects in ``image`` (see :func:`to_rgb_array` for accepted forms), best-fitting first."""
    rgb = to_rgb_array(image)  # (H, W, 3)
    height, width = rgb.shape[:2]
    hue, sat, val = _hsv(rgb)
    foreground = (val >= v_min) & (sat >= s_min)
    colour_of = np.where(foreground, _nearest_colour(hue), -1)  # (H, W)
    min_area = max(4.0, min_area_frac * height * width)

    owner = np.zeros((height, width), dtype=np.int64)  # component id per pixel, 0: none
    components = []
    for k in range(len(_PALETTE_HUES)):
        is_k = colour_of == k
        # Majority vote: a pixel is core when at least 5 of its 3x3 neighbourhood have colour k. Pure noise and
        # speckle have no core; a component of colour k is kept when it has some (and is not too small).
        core = ndimage.uniform_filter(is_k.astype(np.float64), size=3, mode="constant") * 9 >= 4.5
        labels, n = ndimage.label(is_k | core, structure=np.ones((3, 3)))
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        cores = np.bincount(labels.ravel(), weights=core.ravel(), minlength=n + 1)
        for j in np.flatnonzero((sizes >= min_area) & (cores >= min_area / 2)):
            mask = labels == j
            if j == 0 or not _on_dark_ground(mask, foreground):
                continue
            components.append((k, mask))
            owner[mask] = len(components)

    names = tuple(COLOURS)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    detections = []
    for cid, (k, mask) in enumerate(components, start=1):
        region = ndimage.binary_dilation(mask, structure=np.ones((3, 3))) & ((owner == 0) | (owner == cid))
        bright = rgb[mask][val[mask] >= np.quantile(val[mask], 0.75)]
        ref = bright.mean(0)  # (3,) the object's full colour
        cover = np.where(region, np.clip(rgb @ ref / (ref @ ref), 0.0, 1.0), 0.0)  # (H, W)
        mass = float(cover.sum())
        center = (float((cover * xx).sum() / mass), float((cover * yy).sum() / mass))
        reach = 1.3 * np.sqrt(mass / min(_unit_area(s) for s in SHAPES))
        ys, xs = np.nonzero(region)
        x0 = int(max(0, min(xs.min(), np.floor(center[0] - reach))))
        x1 = int(min(width, max(xs.max() + 1, np.ceil(center[0] + reach))))
        y0 = int(max(0, min(ys.min(), np.floor(center[1] - reach))))
        y1 = int(min(height, max(ys.max() + 1, np.ceil(center[1] + reach))))
        shape, radius, fit = _fit_shape(cover[y0:y1, x0:x1], x0, y0, center, mass)
        ys, xs = np.nonzero(mask)
        colour = names[int(_nearest_colour(np.array(_hsv(ref[None, None])[0]))[0, 0])]
        detections.append(Detection(shape if fit >= min_fit else None, colour,
                                    (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                                    center, mass, radius, fit))
    return sorted(detections, key=lambda d: -d.fit)
