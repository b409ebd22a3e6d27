"""Diagnostics that a text-to-image model's recursion is engaged: an idle recursion (every LoRA B at zero) reads
as idle, a trained one does not; the evaluation-time truncation to T' steps."""

import pytest
import torch

from thinking_pixel.text_to_image.model import SD3TextToImage, sd3_config
from thinking_pixel.recursion import RecursionConfig
from thinking_pixel.tasks.compositional import make_prompts
from thinking_pixel.text_to_image.diagnostics import (caption_words, recursion_diagnostics, recursion_steps,
                                                      recursions)


class FakeEmbeddings:
    """(hidden (N, 4, 384), pooled (N, 384)) fixed per caption."""

    def lookup(self, captions, device=None):
        rows = [torch.Generator().manual_seed(sum(map(ord, c))) for c in captions]
        hidden = torch.stack([torch.randn(4, 384, generator=g) for g in rows])
        return hidden, hidden.mean(1)


def _model(steps=3):
    torch.manual_seed(0)
    config = sd3_config("SD3-N/2", image_size=16)
    return SD3TextToImage(config, RecursionConfig(layers=(0, 1), experts=2, steps=steps, rank=4)).eval()


def _diagnose(model):
    return recursion_diagnostics(model, FakeEmbeddings(), make_prompts(1, seed=0), sigmas=[0.3, 0.8],
                                 image_size=16, batch_size=4)


def test_an_idle_recursion_reads_as_idle_and_a_trained_one_does_not():
    model = _model()
    idle = _diagnose(model)
    assert set(idle["blocks"]) == {"0", "1"} and idle["trained_steps"] == 3
    for block in idle["blocks"].values():
        # B = 0: the intermediate Q/K/V are zero; step 1's vision rows attend uniformly over [vision; text] and
        # take the text's mean value (a constant shift of x~), after which the state stays put
        assert block["state_change"][0] > 0 and block["state_change"][1] == 0.0
        assert block["lora_to_base"]["mean"] == 0.0
        assert len(block["expert_usage"]) == 3 and all(sum(u) == pytest.approx(1) for u in block["expert_usage"])
    mse = idle["truncation_mse"]
    assert mse["1"] == pytest.approx(mse["2"], rel=1e-6) == pytest.approx(mse["3"], rel=1e-6)
    assert set(idle["word_mi"]) == {"colour", "shape", "relation", "tag"}

    with torch.no_grad():
        for _, m in recursions(model):
            m.lora.lora_b.normal_(0, 0.5)
    engaged = _diagnose(model)
    for block in engaged["blocks"].values():
        assert min(block["state_change"]) > 0.01 and block["lora_to_base"]["mean"] > 0.01
    mse = engaged["truncation_mse"]
    assert abs(mse["1"] - mse["3"]) > 1e-4 * mse["3"]
    assert all(m.steps == 3 for _, m in recursions(model))  # truncation restored the trained T


def test_recursion_steps_override_truncates_and_restores():
    model = _model()
    with recursion_steps(model, 1):
        assert [m.steps for _, m in recursions(model)] == [1, 1]
    assert [m.steps for _, m in recursions(model)] == [3, 3]
    with pytest.raises(ValueError, match="exceeds the trained T"):
        with recursion_steps(model, 4):
            pass
    with pytest.raises(ValueError, match="--recursion-steps"):
        with recursion_steps(model, 0):
            pass
    plain = SD3TextToImage(sd3_config("SD3-N/2", image_size=16)).eval()
    with pytest.raises(ValueError, match="no recursion"):
        with recursion_steps(plain, 1):
            pass


def test_caption_words():
    assert caption_words("a photo of a red circle and a blue square") == {
        "colour": "red", "shape": "circle", "relation": "none"}
    assert caption_words("a photo of a cross left of a triangle") == {
        "colour": "none", "shape": "cross", "relation": "left of"}
    assert caption_words("a photo of three crosses")["shape"] == "cross"
