"""Statistics of the compositional benchmark: standard errors, paired differences, reference rows.

The benchmark (``thinking-pixel evaluate --benchmark compositional``) writes one verdict per image to its
``_details.jsonl``, in the order (prompt i, image j). Everything here works on those verdicts:

- :func:`split_scores`: a tag's score and its standard error with the prompt as the unit (images of one prompt
  are not independent: they share the caption), and the overall score (unweighted mean of the tags) with its SE.
- :func:`paired_difference`: two evaluations of the same prompts with the same noise (same ``--prompt-seed``,
  ``--seed``, images per prompt): the difference per tag and overall, a prompt-level bootstrap CI (prompts
  resampled within each tag, so every replicate keeps the benchmark's design), and McNemar's exact test on the
  paired images.
- :func:`reference_result`: the ceiling row (the renderer's own images for the benchmark's prompts, scored) and
  the chance row (the same images scored against a shuffled assignment of the split's captions).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ..tasks.compositional import render, score
from .geneval import benchmark_prompts

__all__ = ["SplitVerdicts", "load_verdicts", "mcnemar_exact", "paired_difference", "pool", "reference_result",
           "split_scores"]

SPLITS = ("seen", "heldout")


@dataclass(frozen=True)
class SplitVerdicts:
    """One split of one evaluation: per image its tag, prompt index (within the split) and verdict."""

    tags: tuple[str, ...]  # (n_images,)
    prompt: np.ndarray  # (n_images,) int, prompt index within the split
    correct: np.ndarray  # (n_images,) bool
    captions: tuple[str, ...]  # (n_images,)


def _verdicts(records: list[dict], images_per_prompt: int) -> SplitVerdicts:
    if len(records) % images_per_prompt:
        raise ValueError(f"{len(records)} verdicts are not a whole number of prompts of {images_per_prompt} images")
    return SplitVerdicts(tuple(r["tag"] for r in records), np.arange(len(records)) // images_per_prompt,
                         np.array([bool(r["correct"]) for r in records]), tuple(r["caption"] for r in records))


def load_verdicts(result: str | Path | dict) -> dict[str, SplitVerdicts]:
    """{split: SplitVerdicts} of an evaluation: its result JSON (path or dict) with ``details``: a jsonl path
    (relative: to the JSON's folder; missing: the JSON's ``<stem>_details.jsonl``) or the records as a list."""
    if not isinstance(result, dict):
        path = Path(result)
        result = json.loads(path.read_text())
        details = result["details"]
        if isinstance(details, str):
            details = path.parent / details  # a relative path is relative to the JSON (an absolute one stays)
            if not details.is_file():
                details = path.with_name(path.stem + "_details.jsonl")  # moved with its JSON
        result = {**result, "details": details}
    details = result["details"]
    if isinstance(details, (str, Path)):
        details = [json.loads(line) for line in Path(details).read_text().splitlines() if line]
    per = result["images_per_prompt"]
    return {s: _verdicts([r for r in details if r["split"] == s], per) for s in SPLITS
            if any(r["split"] == s for r in details)}


def pool(runs: list[SplitVerdicts]) -> SplitVerdicts:
    """Several evaluations of the same prompts (e.g. one per training seed) as one: a prompt's images are all of
    theirs, so the prompt stays the unit of the SEs and of the bootstrap."""
    for r in runs[1:]:
        _check_paired(runs[0], r)
    return SplitVerdicts(sum((r.tags for r in runs), ()), np.concatenate([r.prompt for r in runs]),
                         np.concatenate([r.correct for r in runs]), sum((r.captions for r in runs), ()))


def _prompt_means(v: SplitVerdicts) -> dict[str, np.ndarray]:
    """{tag: (P,) fraction correct per prompt}, tags in benchmark order."""
    out = {}
    for tag in dict.fromkeys(v.tags):
        mask = np.array([t == tag for t in v.tags])
        prompts, inverse = np.unique(v.prompt[mask], return_inverse=True)
        out[tag] = np.bincount(inverse, weights=v.correct[mask]) / np.bincount(inverse)
    return out


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def split_scores(v: SplitVerdicts) -> dict:
    """{tag: {score, se, prompts, images}, "overall": {score, se}}; SE with the prompt as the unit."""
    out = {}
    for tag, means in _prompt_means(v).items():
        score, se = _mean_se(means)
        out[tag] = {"score": score, "se": se, "prompts": len(means), "images": int(sum(t == tag for t in v.tags))}
    tags = list(out)
    out["overall"] = {"score": float(np.mean([out[t]["score"] for t in tags])),
                      "se": math.sqrt(sum(out[t]["se"] ** 2 for t in tags)) / len(tags)}
    return out


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """McNemar's exact test on paired verdicts: {only_a, only_b, p} (two-sided binomial on the discordant pairs)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_a": only_a, "only_b": only_b, "p": p}


def _check_paired(a: SplitVerdicts, b: SplitVerdicts) -> None:
    if a.captions != b.captions or not np.array_equal(a.prompt, b.prompt):
        raise ValueError("paired comparison needs the same prompts in the same order (same --prompts-per-tag, "
                         "--prompt-seed and --images-per-prompt)")


def paired_difference(a: SplitVerdicts, b: SplitVerdicts, *, num_bootstrap: int = 10000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """a - b per tag and overall (score points in [-1, 1]): {diff, se, ci: [lo, hi], mcnemar}. The CI is the
    percentile interval of a bootstrap over prompts, stratified by tag; the SE is analytic (prompt as the unit)."""
    _check_paired(a, b)
    diff = SplitVerdicts(a.tags, a.prompt, a.correct.astype(float) - b.correct.astype(float), a.captions)
    per_prompt = _prompt_means(diff)  # {tag: (P,) paired difference per prompt}
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    out, boot_tags = {}, []
    for tag, d in per_prompt.items():
        boot = d[rng.integers(0, len(d), (num_bootstrap, len(d)))].mean(1)  # (B,)
        boot_tags.append(boot)
        mask = np.array([t == tag for t in a.tags])
        mean, se = _mean_se(d)
        out[tag] = {"diff": mean, "se": se, "ci": np.quantile(boot, [alpha, 1 - alpha]).tolist(),
                    "mcnemar": mcnemar_exact(a.correct[mask], b.correct[mask])}
    boot = np.mean(boot_tags, axis=0)
    tags = list(per_prompt)
    out["overall"] = {"diff": float(np.mean([out[t]["diff"] for t in tags])),
                      "se": math.sqrt(sum(out[t]["se"] ** 2 for t in tags)) / len(tags),
                      "ci": np.quantile(boot, [alpha, 1 - alpha]).tolist(),
                      "mcnemar": mcnemar_exact(a.correct, b.correct)}
    return out


def reference_result(kind: str, *, prompts_per_tag: int, images_per_prompt: int = 4, prompt_seed: int = 0,
                     seed: int = 0, image_size: int = 32) -> dict:
    """An evaluation-shaped result (scores + ``details`` records) of a reference row, on the benchmark's prompts.

    kind "ceiling": image j of prompt i is the renderer's scene for that prompt (seeded by (seed, i, j));
    "chance": the same images, each split's prompts shuffled (seeded), so an image is scored against another
    prompt's caption: what a model that ignores the caption but draws well-formed scenes would score.
    """
    if kind not in ("ceiling", "chance"):
        raise ValueError(f"kind must be 'ceiling' or 'chance', got {kind!r}")
    seen, heldout = benchmark_prompts(prompts_per_tag, prompt_seed)
    result = {"benchmark": "compositional", "reference": kind, "prompts_per_tag": prompts_per_tag,
              "images_per_prompt": images_per_prompt, "prompt_seed": prompt_seed, "seed": seed, "details": []}
    offset = 0
    for split, prompts in (("seen", seen), ("heldout", heldout)):
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        drawn = prompts if kind == "ceiling" else [prompts[k] for k in rng.permutation(len(prompts))]
        images = [render(drawn[i], size=image_size, seed=seed * 1_000_003 + (offset + i) * 1009 + j)
                  for i in range(len(prompts)) for j in range(images_per_prompt)]
        targets = [p for p in prompts for _ in range(images_per_prompt)]
        scores = score(images, targets, details=True)
        result["details"] += [{"split": split, **r} for r in scores.pop("results")]
        result["seen" if split == "seen" else "heldout"] = scores
        offset += len(prompts)
    return result
