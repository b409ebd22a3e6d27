"""Class accuracy of samples from a class-conditional shapes model, read by the classical-vision detector.

Each image's object is its largest detection (by coverage); it is right when its shape and colour are the
class's. ``placement`` summarises where objects sit and how large they are, and ``placement_match`` compares a
model's distributions of position and size with the data's (two-sample Kolmogorov-Smirnov).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..tasks.compositional.detect import detect_objects

__all__ = ["class_accuracy", "main_objects", "object_coordinates", "placement", "placement_match"]


def main_objects(images) -> list:
    """The largest detection of each image (None where nothing was detected)."""
    found = []
    for image in images:
        detections = detect_objects(image)
        found.append(max(detections, key=lambda d: d.area) if detections else None)
    return found


def class_accuracy(objects: list, labels, class_parts: list[tuple[str, str]], class_names: list[str]) -> dict:
    """Accuracy of ``objects`` (from :func:`main_objects`) against (shape, colour) ``class_parts[label]``.

    Returns {"accuracy" (shape and colour right), "shape_accuracy", "color_accuracy", "detected" (fraction with
    an object), "per_class": {name: the same four plus "n" and the most frequent "predicted" labels}}.
    """
    labels = [int(y) for y in labels]
    if len(objects) != len(labels):
        raise ValueError(f"objects and labels must have the same length, got {len(objects)} and {len(labels)}")
    rows = []
    for obj, y in zip(objects, labels):
        shape, colour = class_parts[y]
        rows.append((y, obj is not None and obj.shape == shape, obj is not None and obj.colour == colour,
                     obj is not None, "nothing" if obj is None else f"{obj.colour} {obj.shape or 'blob'}"))

    def summary(subset):
        return {"accuracy": float(np.mean([s and c for _, s, c, _, _ in subset])),
                "shape_accuracy": float(np.mean([s for _, s, _, _, _ in subset])),
                "color_accuracy": float(np.mean([c for _, _, c, _, _ in subset])),
                "detected": float(np.mean([d for _, _, _, d, _ in subset]))}

    per_class = {}
    for y, name in enumerate(class_names):
        subset = [r for r in rows if r[0] == y]
        if subset:
            predicted = Counter(r[4] for r in subset).most_common(3)
            per_class[name] = {**summary(subset), "n": len(subset), "predicted": dict(predicted)}
    return {**summary(rows), "per_class": per_class}


def object_coordinates(objects: list, image_size: int) -> dict:
    """{"x", "y", "size"}: arrays over the detected objects, as fractions of the side (size: sqrt(area))."""
    found = [o for o in objects if o is not None]
    return {"x": np.array([o.center[0] for o in found]) / image_size,
            "y": np.array([o.center[1] for o in found]) / image_size,
            "size": np.sqrt(np.array([o.area for o in found], dtype=float)) / image_size}


def placement(objects: list, image_size: int) -> dict:
    """Mean and standard deviation of the object centres (x, y) and sizes (sqrt(area)), as fractions of the side."""
    coords = object_coordinates(objects, image_size)
    if not len(coords["x"]):
        return {"n": 0}
    return {"n": len(coords["x"]), **{f"{name}_{stat}": float(fn(v)) for name, v in coords.items()
                                      for stat, fn in (("mean", np.mean), ("std", np.std))}}


def placement_match(samples: list, data: list, image_size: int) -> dict:
    """How the samples' object positions and sizes compare with the data's: per coordinate (x, y, size), the
    two-sample Kolmogorov-Smirnov statistic ``ks`` (the largest gap between the two CDFs) and its ``p`` value, and
    ``std_ratio`` = samples' std / data's std. Empty when either side has fewer than two detections."""
    from scipy.stats import ks_2samp

    ours, theirs = object_coordinates(samples, image_size), object_coordinates(data, image_size)
    if len(ours["x"]) < 2 or len(theirs["x"]) < 2:
        return {}
    result = {}
    for name in ("x", "y", "size"):
        test = ks_2samp(ours[name], theirs[name])
        result[name] = {"ks": float(test.statistic), "p": float(test.pvalue),
                        "std_ratio": float(np.std(ours[name]) / max(np.std(theirs[name]), 1e-12))}
    return result
