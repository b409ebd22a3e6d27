"""``thinking-pixel analyze`` on tiny random ThinkingPixelDiTs: figures, routing statistics, state probes."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from thinking_pixel import analysis, analyze
from thinking_pixel.diffusion import GaussianDiffusion
from thinking_pixel.models import dit_config
from thinking_pixel.recursion import RecursionConfig, ThinkingPixelDiT


def _tiny(gate_inputs=("tokens", "timestep", "condition"), steps=2, experts=3):
    config = dit_config("DiT-T/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                        num_classes=16)  # the embedded shapes dataset: 16 classes, RGB
    model = ThinkingPixelDiT(config, RecursionConfig(layers=(1,), experts=experts, steps=steps, rank=4,
                                                     gate_inputs=gate_inputs))
    with torch.no_grad():  # move off the zero init so experts differ, routing varies and outputs are non-trivial
        for _, attn in model.recursive_attentions():
            attn.lora.lora_b.normal_(std=0.2)
            attn.gate.token_proj.weight.normal_(std=1.0)
            if attn.gate.cond_proj is not None:
                attn.gate.cond_proj.weight.normal_(std=1.0)
        model.final_layer.linear.weight.normal_(std=0.05)
        for block in model.blocks:
            block.adaLN_modulation[-1].bias.normal_(std=0.1)
    return model.eval()


def test_mutual_information_and_statistics():
    assert analysis.mutual_information(np.array([[10, 0], [0, 10]])) == pytest.approx(1.0)
    assert analysis.mutual_information(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0)
    # Expert fully determined by timestep, independent of class and position.
    counts = np.zeros((2, 3, 4, 2), dtype=np.int64)
    counts[0, :, :, 0] = 7
    counts[1, :, :, 1] = 7
    stats = analysis.routing_statistics(counts)
    assert stats["entropy_bits"] == pytest.approx(1.0)
    assert stats["mi_timestep_bits"] == pytest.approx(1.0) and stats["nmi_timestep"] == pytest.approx(1.0)
    assert stats["mi_class_bits"] == pytest.approx(0.0) and stats["mi_position_bits"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="counts"):
        analysis.routing_statistics(counts[0])


def test_states_and_decode_are_consistent():
    model = _tiny()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([500, 20])
    y = torch.tensor([1, 5])
    states = analysis.recursion_states(model, x, t, y, layer=1)
    assert states.shape == (3, 2, 16, 32)  # a^0, a^1, a^2 for T=2; 16 tokens of width 32
    assert not torch.allclose(states[1], states[0])
    decoded = analysis.decode_steps(model, x, t, y, layer=1)
    assert decoded.shape == (2, 2, 3, 8, 8)
    # Stopping after the last step is the model itself.
    with torch.no_grad():
        eps = model(x, t, y)[:, :3]
    expected = GaussianDiffusion().predict_xstart_from_eps(x, t, eps).clamp(-1, 1)
    torch.testing.assert_close(decoded[-1], expected)
    assert not torch.allclose(decoded[0], decoded[-1])


def test_analyze_writes_figures_and_stats(tmp_path):
    full, tokens_only = _tiny(), _tiny(gate_inputs=("tokens",))
    full.save_pretrained(tmp_path / "full")
    tokens_only.save_pretrained(tmp_path / "tokens")
    parser = analyze.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--checkpoint", str(tmp_path / "full"), "--label", "tokens+t+c",
        "--checkpoint", str(tmp_path / "tokens"), "--label", "tokens only",
        "--output-dir", str(tmp_path / "out"), "--dataset", "shapes", "--num-images", "12",
        "--num-timesteps", "4", "--batch-size", "6", "--device", "cpu"])
    assert analyze.run(args) == 0

    out = tmp_path / "out"
    for name in ("expert_usage.png", "expert_positions.png", "trajectories_0.png", "trajectories_1.png",
                 "decoded_steps_0.png", "decoded_steps_1.png"):
        assert (out / name).stat().st_size > 1000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((out / "routing_stats.json").read_text())
    assert set(stats) == {"tokens+t+c", "tokens only"}
    for label, s in stats.items():
        pooled = s["pooled"]
        assert pooled["tokens"] == 12 * 4 * 16 * 2  # images x timesteps x tokens x steps
        assert sum(pooled["usage"]) == pytest.approx(1.0)
        assert 0 < pooled["entropy_bits"] <= math.log2(3) + 1e-9  # routing varies across experts
        for key in ("mi_timestep_bits", "mi_class_bits", "mi_position_bits"):
            assert 0 <= pooled[key] <= pooled["entropy_bits"] + 1e-9
        assert set(s["per_layer_step"]) == {"layer1_step1", "layer1_step2"}
    # With the conditioning in the gate, the timestep shifts routing for every token at once.
    assert stats["tokens+t+c"]["pooled"]["mi_timestep_bits"] > 0


def test_analyze_rejects_bad_arguments(tmp_path):
    _tiny().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="--label"):
        analyze.analyze([str(tmp_path / "m")], tmp_path / "o", labels=["a", "b"], dataset="shapes")
    with pytest.raises(ValueError, match="--layer 0"):
        analyze.analyze([str(tmp_path / "m")], tmp_path / "o", dataset="shapes", num_images=2, num_timesteps=1,
                        layer=0, device="cpu")
