"""Adaptive recursion depth on the shapes benchmark: denoising quality against the mean recursion steps taken.

    python experiments/halting/shapes.py --out runs/halting_shapes            # train (resumable) + measure

Two ThinkingPixel DiTs (M=2, T=5, width 64, 16x16 shapes, 1500 steps from scratch, seed 0): ``ponder_M2_T5``
trained with the learned halting head (PonderNet, geometric prior 0.5), ``tp_M2_T5`` trained with the fixed T=5
recursion (the paper). Each is measured in eval mode under every rule: the fixed depths T' = 1..5 (the recursion
truncated for every token: the baseline), the learned rule (ponder only) and the training-free delta rule at
several thresholds. Quality is the held-out denoising error: the eps-prediction MSE on 256 shapes images never
seen in training (dataset seed 1), each noised at 10 fixed timesteps with fixed noise, so every rule sees the same
inputs. Wall-clock: the median time of a forward pass on a 64-image batch, the rules interleaved in one process.
Writes OUT/curve.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import apply_rule, time_rules

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["--dataset", "shapes", "--experts", "2", "--recursion-steps", "5", "--hidden-size", "64", "--batch-size", "32",
         "--max-steps", "1500", "--checkpoint-every", "250", "--threads", "1", "--no-progress", "--no-sample-grid"]
RUNS = {"ponder_M2_T5": ["--halting", "learned"], "tp_M2_T5": []}
DELTA = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
LEARNED = (0.3, 0.5, 0.7, 0.9, 0.99)


def rules(steps: int, learned: bool) -> list[dict]:
    return ([dict(name=f"fixed T'={t}", mode="none", steps=t) for t in range(1, steps + 1)]
            + [dict(name=f"learned {th}", mode="learned", threshold=th) for th in (LEARNED if learned else ())]
            + [dict(name=f"delta {th}", mode="delta", threshold=th) for th in DELTA])


@torch.no_grad()
def measure(model, rule: dict, steps: int, held_out, timesteps, noise, timing_batch) -> dict:
    from thinking_pixel.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion()
    images, labels = held_out
    apply_rule(model, rule, steps)
    model.reset_recursion_stats()
    errors = []
    for i, t in enumerate(timesteps):
        tt = torch.full((len(images),), t, dtype=torch.long)
        x_t = diffusion.q_sample(images, tt, noise[i])
        eps = model(x_t, tt, labels)[:, : images.shape[1]]
        errors.append((eps - noise[i]).square().mean().item())
    return dict(rule=rule, mse=sum(errors) / len(errors), mse_per_timestep=errors,
                mean_steps=model.mean_recursion_steps())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/halting_shapes"))
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args(argv)
    if not args.skip_train:
        for name, extra in RUNS.items():
            cmd = ["nice", "-n", "5", sys.executable, "-m", "thinking_pixel", "train", *TRAIN, *extra, "--output-dir",
                   str(args.out / name)]
            with open(args.out / "commands.sh", "a") as f:
                f.write(" ".join(cmd) + "\n")
            subprocess.run(cmd, cwd=REPO, check=True)

    from thinking_pixel import _run_dir as ckpt
    from thinking_pixel.checkpoints import load_model_dir
    from thinking_pixel.datasets import make_dataset

    torch.set_num_threads(1)
    result = {"note": "forward_seconds_b64: median of 7 interleaved forward passes, batch 64, 1 thread, on a shared "
                      "machine", "runs": {}}
    for name in RUNS:
        torch.manual_seed(0)
        model = load_model_dir(ckpt.resolve_weights_dir(args.out / name, ema=True)).eval()
        steps = model.recursion.steps
        data = make_dataset("shapes", image_size=model.config.input_size, seed=1)  # not the training seed (0)
        items = [data[i] for i in range(256)]
        held_out = (torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items]))
        timesteps = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
        noise = torch.randn(len(timesteps), *held_out[0].shape, generator=torch.Generator().manual_seed(0))
        rule_list = rules(steps, model.recursion.halt_head)
        points = [measure(model, r, steps, held_out, timesteps, noise, None) for r in rule_list]
        tb = (held_out[0][:64], torch.full((64,), 500, dtype=torch.long), held_out[1][:64])
        seconds = time_rules(model, rule_list, steps, tb)
        for point in points:
            point["forward_seconds_b64"] = seconds[point["rule"]["name"]]
            print(f"{name} {point['rule']['name']:>14}: mse {point['mse']:.5f}  steps {point['mean_steps']:.2f}  "
                  f"{point['forward_seconds_b64'] * 1e3:.1f} ms")
        result["runs"][name] = dict(checkpoint=str(args.out / name), points=points)
    (args.out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
