"""GenEval's scoring rules (djghosh13/geneval, evaluation/evaluate_images.py and summary_scores.py) on
:mod:`.detect`'s detections.

- Objects of a class are taken best-fit first (GenEval: most confident first). Include rule ``i`` takes the first
  ``count`` objects of its shape; fewer than ``count`` fails it. Its colour, if any, must be the colour of all of
  them. Its position (relation, j) must hold between each of them and each object matched by include rule j
  (a rule whose reference rule failed fails too).
- An exclude rule fails the image when at least ``count`` objects of its shape are found (counting: n + 1).
- Position compares box centres after shrinking the offset by 0.1 x (sum of the two boxes' widths / heights) per
  axis; the relation holds when the shrunk offset along its axis exceeds half the length of the raw offset.
- An image is correct iff every include rule holds and no exclude rule fails it; a tag's score is the mean over
  its images; ``overall`` is the unweighted mean of the tags present.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .detect import Detection, detect_objects
from .grammar import TAGS, Prompt

__all__ = ["POSITION_THRESHOLD", "evaluate_image", "relative_position", "score"]

POSITION_THRESHOLD = 0.1


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations of ``a`` to ``b`` ("left of", "right of", "above", "below"; y grows downwards)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    shrunk = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate_image(detections: list[Detection], prompt: Prompt) -> tuple[bool, str]:
    """(correct, reason) of one image's detections against ``prompt``."""
    by_shape = defaultdict(list)
    for d in sorted(detections, key=lambda d: -d.fit):
        if d.shape is not None:
            by_shape[d.shape].append(d)
    correct, reasons, matched_groups = True, [], []
    for rule in prompt.include:
        found = by_shape[rule.shape][: rule.count]
        matched = len(found) >= rule.count
        if not matched:
            reasons.append(f"expected {rule.shape} >= {rule.count}, found {len(found)}")
        elif rule.colour is not None:
            colours = [d.colour for d in found]
            if colours.count(rule.colour) < rule.count:
                matched = False
                reasons.append(f"expected {rule.colour} {rule.shape} >= {rule.count}, found {', '.join(colours)}")
        if matched and rule.position is not None:
            relation, target = rule.position
            if matched_groups[target] is None:
                matched = False
                reasons.append(f"no target for {rule.shape} to be {relation}")
            else:
                for obj in found:
                    bad = [rel for t in matched_groups[target] if relation not in (rel := relative_position(obj, t))]
                    if bad:
                        matched = False
                        reasons.append(f"expected {rule.shape} {relation} target, found {' and '.join(sorted(bad[0]))}")
                        break
        correct &= matched
        matched_groups.append(found if matched else None)
    for rule in prompt.exclude:
        if len(by_shape[rule.shape]) >= rule.count:
            correct = False
            reasons.append(f"expected {rule.shape} < {rule.count}, found {len(by_shape[rule.shape])}")
    return correct, "; ".join(reasons)


def score(images, prompts: list[Prompt], *, details: bool = False, **detector_options) -> dict:
    """GenEval scores of ``images`` (one per prompt; repeat a prompt for several images of it).

    Returns {tag: score for each tag present, "overall": mean of those, "num_images": {tag: n}}, and with
    ``details`` a "results" list of {tag, caption, correct, reason, objects} per image. ``detector_options`` go to
    :func:`~.detect.detect_objects`. Images: PIL images, or uint8 / [0, 1] arrays or tensors, (H, W, 3) or (3, H, W).
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have the same length, got {len(images)} and {len(prompts)}")
    if not prompts:
        raise ValueError("score needs at least one image")
    bad = [p for p in prompts if not isinstance(p, Prompt) or p.tag not in TAGS]
    if bad:
        raise ValueError(f"prompts must be Prompt objects with a tag in {TAGS}, got {bad[0]!r}")
    per_tag = defaultdict(list)
    results = []
    for image, prompt in zip(images, prompts):
        detections = detect_objects(image, **detector_options)
        correct, reason = evaluate_image(detections, prompt)
        per_tag[prompt.tag].append(correct)
        if details:
            results.append({"tag": prompt.tag, "caption": prompt.caption, "correct": correct, "reason": reason,
                            "objects": [f"{d.colour} {d.shape or 'blob'}" for d in detections]})
    out = {tag: float(np.mean(per_tag[tag])) for tag in TAGS if tag in per_tag}
    out["overall"] = float(np.mean([out[tag] for tag in TAGS if tag in per_tag]))
    out["num_images"] = {tag: len(per_tag[tag]) for tag in TAGS if tag in per_tag}
    if details:
        out["results"] = results
    return out
