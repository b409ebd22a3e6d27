"""bf16 autocast training at the paper's tau = 5 and rank 128 follows the fp32 loss curve (small model, 30 steps).

The longer run (the default preset, 300 steps) is experiments/mixed_precision.py (RESULTS.md, "bf16 autocast training").
"""

import math

from test_train import losses, tiny
from thinking_pixel.train import train

TOLERANCE = 0.01  # relative gap between 10-step window means of the two loss curves


def test_bf16_follows_fp32_at_tau_5_rank_128(tmp_path):
    curves = {}
    for bf16 in (False, True):
        name = "bf16" if bf16 else "fp32"
        train(tiny(tmp_path, name, rank=128, tau=5.0, max_steps=30, checkpoint_every=100, batch_size=8, bf16=bf16))
        curves[name] = losses(tmp_path / name)
    assert all(math.isfinite(v) for curve in curves.values() for v in curve)
    assert curves["fp32"] != curves["bf16"], "autocast changed nothing: bf16 did not run"
    windows = [(sum(curves["fp32"][i:i + 10]) / 10, sum(curves["bf16"][i:i + 10]) / 10) for i in range(0, 30, 10)]
    assert windows[-1][0] < windows[0][0], "fp32 did not learn"
    gaps = [abs(b - a) / a for a, b in windows]
    assert max(gaps) < TOLERANCE, gaps
