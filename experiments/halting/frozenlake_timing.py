"""Wall-clock of the halting rules on the FrozenLake planner: one denoising forward pass per rule.

    python experiments/halting/frozenlake_timing.py runs/frozenlake/runs/tp_M2_T5_s0 runs/frozenlake/runs/ponder_M2_T5_s0 \
        --output runs/frozenlake/halting_timing.json

Inputs: 64 frames (start frames of held-out 4x4 maps) as the condition, the next frame noised at t = 500.
Rules: the fixed depths T' = 1..T (baseline), the delta rule at the thresholds of experiments/frozenlake/run.py,
and the learned rule where the model has a halting head. Median of 7 interleaved passes, 1 thread, on a shared
machine: compare the rules with each other, not with other runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import time_rules


def main(argv=None) -> int:
    from thinking_pixel import _run_dir as ckpt
    from thinking_pixel.checkpoints import load_model_dir
    from thinking_pixel.tasks import frozenlake as fl
    from thinking_pixel.tasks.frozenlake.data import CELL, frame_tensor
    from thinking_pixel.diffusion import GaussianDiffusion
    from thinking_pixel.tasks.frozenlake.planner import evaluation_maps

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {}
    for run in args.checkpoints:
        weights = ckpt.resolve_weights_dir(run, ema=True)
        model = load_model_dir(weights).eval()
        canvas = model.config.input_size // CELL
        train_config = ckpt.load_train_config(ckpt.find_step_dir(weights))
        maps = evaluation_maps(train_config, canvas, 64, sizes=[4])[4]
        cond = torch.stack([frame_tensor(fl.render(m, (0, 0), cell=CELL, canvas=canvas)) for m in maps])
        target = torch.stack([frame_tensor(fl.oracle_planner(fl.render(m, (0, 0), cell=CELL, canvas=canvas),
                                                             cell=CELL)) for m in maps])
        t = torch.full((64,), 500, dtype=torch.long)
        x_t = GaussianDiffusion().q_sample(target, t, torch.randn(target.shape, generator=torch.Generator().manual_seed(0)))
        steps = model.recursion.steps
        rules = [dict(name=f"fixed T'={k}", mode="none", steps=k) for k in range(1, steps + 1)]
        rules += [dict(name=f"delta {th}", mode="delta", threshold=float(th)) for th in ("0.02", "0.05", "0.1", "0.2", "0.4")]
        if model.recursion.halt_head:
            rules += [dict(name=f"learned {th}", mode="learned", threshold=float(th))
                      for th in ("0.3", "0.5", "0.7", "0.9", "0.99")]
        seconds = time_rules(model, rules, steps, (x_t, t, torch.zeros(64, dtype=torch.long)), cond_image=cond)
        result[Path(run).name] = seconds
        for name, s in seconds.items():
            print(f"{Path(run).name:>16} {name:>14}: {s * 1e3:.1f} ms")
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
