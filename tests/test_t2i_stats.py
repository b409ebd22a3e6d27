"""Statistics of the compositional benchmark: SEs with the prompt as the unit, paired bootstrap CIs, McNemar,
ceiling and chance rows."""

import json
import math

import numpy as np
import pytest

from thinking_pixel.text_to_image.stats import (SplitVerdicts, load_verdicts, mcnemar_exact, paired_difference,
                                                pool, reference_result, split_scores)


def _verdicts(correct_by_prompt, tags):
    """correct_by_prompt: (P, K) verdicts of K images per prompt; tags: (P,) the prompts' tags."""
    correct = np.asarray(correct_by_prompt, bool)
    p, k = correct.shape
    return SplitVerdicts(tuple(t for t in tags for _ in range(k)), np.repeat(np.arange(p), k), correct.ravel(),
                         tuple(f"caption {i}" for i in range(p) for _ in range(k)))


def test_split_scores_use_the_prompt_as_the_unit():
    v = _verdicts([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], ["a", "a", "b", "b"])
    s = split_scores(v)
    assert s["a"]["score"] == 0.5 and s["b"]["score"] == 0.375
    # two prompt means 1 and 0: sd 0.707, se 0.5 (an image-level binomial SE would be 0.19)
    assert s["a"]["se"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert s["b"]["se"] == pytest.approx(np.std([0.5, 0.25], ddof=1) / math.sqrt(2))
    assert s["overall"]["score"] == pytest.approx(0.4375)
    assert s["overall"]["se"] == pytest.approx(math.hypot(s["a"]["se"], s["b"]["se"]) / 2)
    assert (s["a"]["prompts"], s["a"]["images"]) == (2, 8)


def test_mcnemar_exact_matches_the_binomial_test():
    from scipy.stats import binomtest

    a = np.array([1] * 9 + [0] * 2 + [1] * 30 + [0] * 40, bool)
    b = np.array([0] * 9 + [1] * 2 + [1] * 30 + [0] * 40, bool)
    m = mcnemar_exact(a, b)
    assert (m["only_a"], m["only_b"]) == (9, 2)
    assert m["p"] == pytest.approx(binomtest(2, 11, 0.5).pvalue)
    assert mcnemar_exact(a, a)["p"] == 1.0


def test_paired_difference_ci_covers_the_difference_and_excludes_zero_only_when_it_should():
    rng = np.random.default_rng(0)
    tags = ["a"] * 30 + ["b"] * 30
    base = rng.random((60, 4)) < 0.4
    same = paired_difference(_verdicts(base, tags), _verdicts(base, tags))
    assert same["overall"]["diff"] == 0 and same["overall"]["ci"] == [0, 0]
    better = base | (rng.random((60, 4)) < 0.5)  # a strictly better model on the same prompts and noise
    d = paired_difference(_verdicts(better, tags), _verdicts(base, tags), num_bootstrap=2000)
    lo, hi = d["overall"]["ci"]
    assert 0 < lo < d["overall"]["diff"] < hi
    assert d["overall"]["mcnemar"]["only_b"] == 0 and d["overall"]["mcnemar"]["p"] < 1e-6
    noisy = rng.random((60, 4)) < 0.4  # an unrelated model of the same quality
    n = paired_difference(_verdicts(noisy, tags), _verdicts(base, tags), num_bootstrap=2000)
    assert n["overall"]["ci"][0] < 0 < n["overall"]["ci"][1]


def test_pooled_seeds_keep_the_prompt_as_the_unit():
    tags = ["a"] * 3
    runs = [_verdicts([[1, 0], [0, 0], [1, 1]], tags), _verdicts([[1, 1], [0, 0], [0, 1]], tags)]
    pooled = split_scores(pool(runs))["a"]
    assert pooled["score"] == pytest.approx(0.5) and pooled["prompts"] == 3 and pooled["images"] == 12
    assert pooled["se"] == pytest.approx(np.std([0.75, 0.0, 0.75], ddof=1) / math.sqrt(3))


def test_paired_difference_refuses_different_prompts():
    a = _verdicts([[1, 0]], ["a"])
    b = SplitVerdicts(a.tags, a.prompt, a.correct, ("other", "other"))
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(a, b)


def test_reference_rows_ceiling_and_chance(tmp_path):
    ceiling = reference_result("ceiling", prompts_per_tag=3, images_per_prompt=2)
    chance = reference_result("chance", prompts_per_tag=3, images_per_prompt=2)
    assert ceiling["seen"]["overall"] == 1.0 and ceiling["heldout"]["overall"] == 1.0
    assert chance["seen"]["overall"] < 0.5
    path = tmp_path / "chance.json"
    details = tmp_path / "chance_details.jsonl"
    details.write_text("".join(json.dumps(r) + "\n" for r in chance["details"]))
    path.write_text(json.dumps({**chance, "details": "/moved/elsewhere.jsonl"}))
    loaded = load_verdicts(path)  # a details path that moved: found next to its JSON
    assert set(loaded) == {"seen", "heldout"}
    assert split_scores(loaded["seen"])["overall"]["score"] == pytest.approx(chance["seen"]["overall"])
    with pytest.raises(ValueError, match="kind"):
        reference_result("oracle", prompts_per_tag=1)
