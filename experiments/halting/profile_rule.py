"""Where a halting rule's forward time goes on the FrozenLake planner: torch.profiler self time per op, a fixed-depth
run against a halting rule, the ops that grow or shrink (RESULTS.md, claim 5, "Wall-clock").

    python experiments/halting/profile_rule.py runs/frozenlake/runs/tp_M2_T5_s0 --rule delta --threshold 0.1

Inputs as frozenlake_timing.py: 64 start frames of held-out 4x4 maps as the condition; here a random noisy frame at
t = 500 (the op mix does not depend on it). 5 profiled forwards per rule, 1 thread.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import apply_rule


def self_times(model, rule, steps, args, kwargs, reps=5) -> dict:
    """{op name: (self ms per forward, calls per forward)}."""
    apply_rule(model, rule, steps)
    with torch.no_grad():
        for _ in range(3):
            model(*args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                model(*args, **kwargs)
    return {e.key: (e.self_cpu_time_total / reps / 1e3, e.count // reps) for e in prof.key_averages()}


def main(argv=None) -> int:
    from thinking_pixel import _run_dir as ckpt
    from thinking_pixel.checkpoints import load_model_dir
    from thinking_pixel.tasks import frozenlake as fl
    from thinking_pixel.tasks.frozenlake.data import CELL, frame_tensor
    from thinking_pixel.tasks.frozenlake.planner import evaluation_maps

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--rule", choices=("delta", "learned"), default="delta")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--top", type=int, default=6, help="ops listed at each end (default 6)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    weights = ckpt.resolve_weights_dir(args.checkpoint, ema=True)
    model = load_model_dir(weights).eval()
    canvas = model.config.input_size // CELL
    maps = evaluation_maps(ckpt.load_train_config(ckpt.find_step_dir(weights)), canvas, 64, sizes=[4])[4]
    cond = torch.stack([frame_tensor(fl.render(m, (0, 0), cell=CELL, canvas=canvas)) for m in maps])
    x = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
    inputs = (x, torch.full((64,), 500), torch.zeros(64, dtype=torch.long))
    steps = model.recursion.steps
    fixed = self_times(model, dict(mode="none", steps=steps), steps, inputs, dict(cond_image=cond))
    halting = self_times(model, dict(mode=args.rule, threshold=args.threshold), steps, inputs, dict(cond_image=cond))
    print(f"self time per forward: fixed T={steps} {sum(t for t, _ in fixed.values()):.1f} ms, "
          f"{args.rule} {args.threshold} {sum(t for t, _ in halting.values()):.1f} ms")
    rows = sorted(((halting.get(k, (0, 0))[0] - fixed.get(k, (0, 0))[0], k) for k in set(fixed) | set(halting)),
                  reverse=True)
    for delta, name in rows[: args.top] + rows[-args.top:]:
        print(f"{delta:+7.2f} ms  {name[:60]:<60} calls {fixed.get(name, (0, 0))[1]} -> {halting.get(name, (0, 0))[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
