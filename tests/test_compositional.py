"""The compositional shapes world: prompts, renderer, GenEval-style scorer (validity), dataset and held-out split."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from thinking_pixel.tasks.compositional import (TAGS, Detection, HeldOut, all_prompts, detect_objects, make_prompts,
                                          relative_position, render, score)
from thinking_pixel.data import ShapesDataset
from thinking_pixel.datasets import make_dataset
from thinking_pixel.tasks.compositional.data import CompositionalDataset

PROMPTS = make_prompts(12, seed=0)


@pytest.fixture(scope="module")
def renders():
    return [render(p, size=32, seed=i) for i, p in enumerate(PROMPTS)]


def _tag_scores(result):
    return {t: result[t] for t in TAGS}


def test_prompts_follow_geneval():
    assert [p.tag for p in PROMPTS] == [t for t in TAGS for _ in range(12)]
    assert make_prompts(12, seed=0) == PROMPTS and make_prompts(12, seed=1) != PROMPTS
    by_caption = {p.caption: p for p in all_prompts()}
    assert len(by_caption) == len(all_prompts()) == 6 + 30 + 18 + 36 + 120 + 900
    three = by_caption["a photo of three triangles"]
    assert three.to_dict() == {"tag": "counting", "prompt": "a photo of three triangles",
                               "include": [{"class": "triangle", "count": 3}],
                               "exclude": [{"class": "triangle", "count": 4}]}
    left = by_caption["a photo of a circle left of a square"].to_dict()
    assert left["include"] == [{"class": "square", "count": 1},
                               {"class": "circle", "count": 1, "position": ["left of", 0]}]
    assert by_caption["a photo of a red circle and a blue square"].to_dict()["include"] == [
        {"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]
    assert "a photo of two crosses" in by_caption
    with pytest.raises(ValueError, match="n_per_tag"):
        make_prompts(0, seed=0)


def test_position_rule_has_geneval_margin():
    def obj(x0, y0, x1, y1):
        return Detection("circle", "red", (x0, y0, x1, y1), ((x0 + x1) / 2, (y0 + y1) / 2), 1.0, 1.0, 1.0)

    a, b = obj(0, 10, 4, 14), obj(10, 10, 14, 14)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position(obj(0, 0, 4, 4), b) == {"left of", "above"}  # diagonal: both
    assert relative_position(obj(8, 10, 12, 14), b) == {"left of"}  # offset 2, shrunk by 0.1 * (4 + 4) to 1.2
    assert relative_position(obj(8.8, 10, 12.8, 14), b) == set()  # offset 1.2, shrunk to 0.4 < 0.5 * 1.2


def test_renders_score_high_in_every_category(renders):
    result = score(renders, PROMPTS)
    assert min(_tag_scores(result).values()) >= 0.95, result
    assert result["num_images"] == {t: 12 for t in TAGS}


def test_mismatched_captions_score_low(renders):
    swapped = []
    for tag in TAGS:  # each image with the next different caption of its own tag
        idx = [i for i, p in enumerate(PROMPTS) if p.tag == tag]
        for j, i in enumerate(idx):
            k = next(idx[(j + d) % len(idx)] for d in range(1, len(idx)) if
                     PROMPTS[idx[(j + d) % len(idx)]].caption != PROMPTS[i].caption)
            swapped.append(PROMPTS[k])
    assert score(renders, swapped)["overall"] <= 0.5


def test_blank_and_noise_score_zero():
    rng = np.random.default_rng(0)
    blank = [Image.new("RGB", (32, 32))] * len(PROMPTS)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in PROMPTS]
    assert score(blank, PROMPTS)["overall"] == 0.0
    assert score(noise, PROMPTS)["overall"] <= 0.05


def test_noisy_blurred_renders_still_score(renders):
    rng = np.random.default_rng(0)
    degraded = []
    for image in renders:
        a = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64) / 255
        degraded.append(np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1))  # float images in [0, 1]
    assert score(degraded, PROMPTS)["overall"] >= 0.9


def test_detector_reads_the_class_shapes_dataset():
    ds = ShapesDataset(image_size=16, num_samples=64)
    hits = 0
    for i in range(len(ds)):
        image, label = ds.render(i)  # (3, H, W) uint8
        found = max(detect_objects(image), key=lambda d: d.area)
        hits += (found.shape, found.colour) == ds.label_parts(label)
    assert hits >= 63


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        score([Image.new("RGB", (32, 32))], PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        score([np.zeros((32, 32))], PROMPTS[:1])


def test_dataset_is_seeded_and_keeps_the_held_out_compositions_out():
    ds = make_dataset("compositional", image_size=24, seed=3, num_samples=300)
    image, label = ds[5]
    assert image.shape == (3, 24, 24) and -1 <= image.min() and image.max() <= 1
    assert ds.caption(label) == ds.prompts[label].caption
    again = CompositionalDataset(image_size=24, seed=3, num_samples=300)
    assert np.array_equal(ds.render(5)[0], again.render(5)[0])
    heldout = HeldOut(0)
    test = CompositionalDataset(split="test")
    assert set(ds.class_names).isdisjoint(test.class_names)
    assert all(heldout.holds_out(p) for p in test.prompts) and not any(heldout.holds_out(p) for p in ds.prompts)
    assert set(test.tags) == {"two_object", "colors", "position", "color_attr"}
    for i in range(len(ds)):
        objects, _ = ds.scene(i)
        assert not any((o.colour, o.shape) in heldout.bindings for o in objects)
        assert not any(frozenset((a.shape, b.shape)) in heldout.pairs for a in objects for b in objects)
    assert [p.tag for p in make_prompts(2, seed=0, split="test")] == [
        t for t in TAGS if t in test.tags for _ in range(2)]
