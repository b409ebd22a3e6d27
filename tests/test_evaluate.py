"""Resumable, seeded sample generation of ``thinking-pixel evaluate``."""

import argparse

import pytest
import torch

from thinking_pixel import datasets, evaluate
from thinking_pixel.models import DiT, dit_config


def _tiny_dit():
    torch.manual_seed(0)
    model = DiT(dit_config("DiT-T/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                           num_classes=3))
    with torch.no_grad():  # non-zero output layer, so samples depend on the weights
        model.final_layer.linear.weight.normal_(std=0.02)
    return model.eval()


GEN = dict(batch_size=3, seed=7, sampler="ddim", num_steps=2, cfg_scale=1.5, progress=False)


def test_interrupted_generation_resumes_to_the_same_samples(tmp_path, monkeypatch):
    model = _tiny_dit()
    whole, labels = evaluate.generate_samples(model, tmp_path / "whole", 7, **GEN)
    assert whole.shape == (7, 1, 8, 8) and whole.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert sorted(p.name for p in (tmp_path / "whole").glob("chunk_*.pt")) == \
        ["chunk_00000.pt", "chunk_00001.pt", "chunk_00002.pt"]

    real_chunk = evaluate._generate_chunk
    calls = []

    def interrupted_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_generate_chunk", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate.generate_samples(model, tmp_path / "resumed", 7, **GEN)
    assert [p.name for p in (tmp_path / "resumed").glob("chunk_*.pt")] == ["chunk_00000.pt"]

    generated = []
    monkeypatch.setattr(evaluate, "_generate_chunk",
                        lambda *a, **k: generated.append(1) or real_chunk(*a, **k))
    resumed, resumed_labels = evaluate.generate_samples(model, tmp_path / "resumed", 7, **GEN)
    assert len(generated) == 2  # only the two missing chunks were sampled
    assert torch.equal(resumed, whole) and torch.equal(resumed_labels, labels)


def test_samples_depend_on_seed_and_other_settings_are_refused(tmp_path):
    model = _tiny_dit()
    a, _ = evaluate.generate_samples(model, tmp_path / "a", 3, **GEN)
    b, _ = evaluate.generate_samples(model, tmp_path / "b", 3, **{**GEN, "seed": 8})
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        evaluate.generate_samples(model, tmp_path / "a", 3, **{**GEN, "cfg_scale": 2.0})
    with pytest.raises(ValueError, match="num_samples"):
        evaluate.generate_samples(model, tmp_path / "c", 0, **GEN)


def test_samples_of_other_weights_at_the_same_path_are_refused(tmp_path):
    """A run retrained into the same directory has new weights at the old checkpoint path: its samples are new."""
    model = _tiny_dit()
    weights = tmp_path / "ckpt"
    model.save_pretrained(weights)
    first, _, _ = evaluate._timed_samples(model, weights, tmp_path / "samples", 3, **GEN)
    again, _, _ = evaluate._timed_samples(model, weights, tmp_path / "samples", 3, **GEN)  # resumed: same weights
    assert torch.equal(first, again)
    with torch.no_grad():
        model.final_layer.linear.weight.add_(0.1)
    model.save_pretrained(weights)
    with pytest.raises(ValueError, match="weights_sha256"):
        evaluate._timed_samples(model, weights, tmp_path / "samples", 3, **GEN)


def test_cli_arguments():
    parser = evaluate.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--checkpoint", "run", "--output", "e.json", "--num-samples", "10"])
    assert args.dataset is None and args.split == "test" and args.num_samples == 10 and args.use_ema
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "run", "--output", "e.json", "--sampler", "nope"])


def test_real_subset_is_seeded_and_checked():
    images, labels = datasets.real_subset("shapes", 6, image_size=8, num_channels=3)
    again, labels_again = datasets.real_subset("shapes", 6, image_size=8, num_channels=3)
    assert images.shape == (6, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert datasets.reference_images("shapes", 6, image_size=8, num_channels=3).dtype == torch.uint8
    with pytest.raises(ValueError, match="has no splits"):
        datasets.real_subset("shapes", 6, image_size=8, num_channels=3, split="train")
    with pytest.raises(ValueError, match="model works on"):
        datasets.real_subset("shapes", 2, image_size=8, num_channels=1)
