"""The plan forming inside the recursion (the paper's Figs. 6-7 for FrozenLake): for a few frames, the next frame
predicted when the recursion stops after each of its T steps, at a few sampling timesteps.

    python -m thinking_pixel.tasks.frozenlake.figures --checkpoint RUN --eval EVAL.json --output steps.png

Frames are the start frames of rollouts that succeeded and, for failed rollouts (invalid move, hole, timeout),
the frame before the failing move (replayed from the evaluation's recorded actions). Each panel is x^_0, the
model's clean-image prediction, at sampling timestep t with the recursive block stopped after step s
(thinking_pixel.analysis.probes.decode_steps; intermediate steps read out through the output projection without the
frozen base). Its caption is what the frame reads as against the current frame: the move, or why none.
The frames are sampled anew (seeded), so a failure need not repeat exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ... import _run_dir as ckpt
from ...analysis.probes import decode_steps
from ...checkpoints import load_model_dir
from ...diffusion import GaussianDiffusion, sample
from .data import CELL, frame_tensor
from .maps import find, step
from .planner import frames_to_images
from .render import decode_action, invalid_reason, render

__all__ = ["describe_move", "failure_frames", "plot_recursion_steps", "recursion_step_predictions"]

ACTION_NAMES = {0: "left", 1: "down", 2: "right", 3: "up"}


def describe_move(frame_a, frame_b) -> str:
    """A short caption: the action, or why frame_b is not one legal move from frame_a."""
    action = decode_action(frame_a, frame_b, cell=CELL)
    return ACTION_NAMES[action] if action is not None else invalid_reason(frame_a, frame_b, cell=CELL)


def failure_frames(evaluation: dict, size: str, count: int, canvas: int) -> list[tuple]:
    """Up to ``count`` (caption, frame) pairs from an evaluate_checkpoint result: failures at their failing frame
    first (one per outcome kind where possible), then successes at their start frame."""
    episodes = evaluation["sizes"][size]["episodes"]
    chosen, kinds = [], {}
    for e in episodes:
        if e["outcome"] != "success":
            kinds.setdefault(e["outcome"], []).append(e)
    failures = [e for group in zip(*kinds.values()) for e in group] if kinds else []
    failures += [e for group in kinds.values() for e in group if e not in failures]
    successes = [e for e in episodes if e["outcome"] == "success"]
    for e in (failures[: (count + 1) // 2] + successes)[:count]:
        lake = tuple(e["map"])
        pos = find(lake, "S")
        actions = e["actions"] if e["outcome"] in ("invalid", "timeout") else e["actions"][:-1]
        for action in actions:
            pos = step(lake, pos, action)[0]
        chosen.append((f"{e['outcome']} ({len(lake)}x{len(lake)}, move {len(actions) + 1})",
                       render(lake, pos, cell=CELL, canvas=canvas)))
    return chosen


@torch.no_grad()
def recursion_step_predictions(model, frames, *, num_steps: int = 20, seed: int = 0, probe_steps=(0, 10, 19),
                               layer: int | None = None) -> dict:
    """Sample the next frame of each frame (DDIM, ``num_steps``) and decode the recursion at the sampling steps
    ``probe_steps`` (indices into the schedule). -> dict(timesteps [t], decoded (P, T, B, 3, H, W), samples
    (B, 3, H, W)), all in [-1, 1]."""
    diffusion = GaussianDiffusion()
    layer = model.recursive_layers[0] if layer is None else layer
    cond = torch.stack([frame_tensor(f) for f in frames])  # (B, 3, H, W)
    labels = torch.zeros(len(frames), dtype=torch.long)
    seen = []
    samples = sample(lambda x, t, y: model(x, t, y, cond_image=cond), labels, tuple(cond.shape[1:]), sampler="ddim",
                     num_steps=num_steps, generator=torch.Generator().manual_seed(seed),
                     callback=lambda t, x: seen.append((t, x.clone())))
    probes = [seen[i] for i in probe_steps if i < len(seen)]
    decoded = [decode_steps(model, x, torch.full_like(labels, t), labels, layer, diffusion, cond_image=cond)
               for t, x in probes]
    return dict(timesteps=[t for t, _ in probes], decoded=torch.stack(decoded), samples=samples)


def plot_recursion_steps(captions, frames, predictions: dict, path, title: str) -> None:
    """Rows: frames; columns: the current frame, x^_0 after each recursion step at each probed timestep, the
    sampled next frame. Each prediction is captioned with the move it reads as."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoded, samples = predictions["decoded"], predictions["samples"]  # (P, T, B, ...), (B, ...)
    n_probe, n_steps = decoded.shape[:2]
    cols = 2 + n_probe * n_steps
    fig, axes = plt.subplots(len(frames), cols, figsize=(1.25 * cols, 1.55 * len(frames)), squeeze=False)
    for r, (caption, frame) in enumerate(zip(captions, frames)):
        panels = [(frame, caption.replace(" (", "\n("))]
        for p, t in enumerate(predictions["timesteps"]):
            for s, image in enumerate(frames_to_images(decoded[p, :, r])):
                panels.append((image, f"t={t} s={s + 1}\n{describe_move(frame, image)}"))
        image = frames_to_images(samples[r : r + 1])[0]
        panels.append((image, f"sampled\n{describe_move(frame, image)}"))
        for ax, (image, label) in zip(axes[r], panels):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(label, fontsize=6)
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--eval", required=True, help="the checkpoint's 'evaluate --benchmark frozenlake' JSON")
    p.add_argument("--output", required=True, help="PNG path")
    p.add_argument("--size", default=None, help="map size to take episodes from (default: the largest evaluated)")
    p.add_argument("--count", type=int, default=6, help="frames (rows)")
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model_dir(ckpt.resolve_weights_dir(args.checkpoint, ema=True)).eval()
    if not hasattr(model, "recursive_layers"):
        raise SystemExit("the checkpoint holds no recursion to decode (a plain DiT)")
    evaluation = json.loads(Path(args.eval).read_text())
    size = args.size or max(evaluation["sizes"], key=int)
    chosen = failure_frames(evaluation, size, args.count, model.config.input_size // CELL)
    captions, frames = zip(*chosen)
    predictions = recursion_step_predictions(model, list(frames), num_steps=args.num_steps, seed=args.seed,
                                             probe_steps=(0, args.num_steps // 2, args.num_steps - 1))
    rec = model.recursion
    plot_recursion_steps(captions, frames, predictions, args.output,
                         f"{Path(args.checkpoint).name}: M={rec.experts}, T={rec.steps}; x^0 with the recursion "
                         f"stopped after step s, at sampling timestep t")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
