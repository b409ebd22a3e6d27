"""Analysis of routing and recursion (the paper's Figs. 3, 4 and 6) for ThinkingPixelDiT checkpoints.

``thinking-pixel analyze --checkpoint FULL --label "tokens+t+c" --checkpoint TOKENS --label "tokens only" --output-dir fig``

Inputs: a fixed seeded subset of real images of ``--dataset`` (preprocessed like training data) is noised to
``--num-timesteps`` evenly spaced diffusion timesteps with ``q_sample``, and the model is run once per timestep in
eval mode (deterministic argmax routing) with the images' true labels, recording every routing decision.

Outputs (in ``--output-dir``):

- ``expert_usage.png`` (Fig. 4): per checkpoint (one column each, e.g. the gate-input ablation side by side), the
  fraction of tokens routed to each expert vs diffusion timestep and vs class, pooled over recursive layers and
  steps; ``expert_positions.png``: the same vs token position (one map per expert).
- ``routing_stats.json``: per checkpoint, pooled and per (layer, step): expert usage, the entropy H(E) of the
  chosen expert and the mutual information I(E; timestep), I(E; class), I(E; position), in bits, with
  I / H(E) as the normalised value. MI is computed from the empirical joint counts (a plug-in estimate; its
  bias is about (|X| - 1)(M - 1) / (2 n ln 2) bits, listed as ``mi_bias_bits`` for comparison).
- ``trajectories.png`` (Fig. 3): the vision-token states a^0 = x~, a^1, ..., a^T of the first recursive layer
  (--layer) for one image at a few timesteps, projected on their first two principal components (fitted per
  timestep on all tokens and steps); a^T = out_T + x~ puts the final step in the same residual form as the others.
- ``decoded_steps.png`` (Fig. 6): the recursion stopped after step s. The block's attention output is replaced by
  the output projection of step s's attention output (a^s - x~ for s < T; the real output for s = T), the rest
  of the network runs unchanged, and the predicted clean image x^_0 = (x_t - sqrt(1 - abar) eps^) / sqrt(abar) is
  shown. Intermediate steps use the LoRA-only projection (no frozen base), as in the method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import _run_dir as ckpt
from ._arguments import add_analyze_arguments as add_arguments
from ._runtime import set_threads
from .analysis.plots import plot_decoded, plot_expert_positions, plot_expert_usage, plot_trajectories, pool_counts
from .analysis.probes import collect_routing, decode_steps, noised, recursion_states, timestep_grid
from .analysis.statistics import routing_statistics
from .checkpoints import load_model_dir
from .datasets import real_subset
from .diffusion import GaussianDiffusion
from .models import read_config
from .recursion import ThinkingPixelDiT
from .train_config import TrainConfig

__all__ = ["add_arguments", "analyze", "run"]


def _load(checkpoint: str, use_ema: bool, device: str):
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    model = load_model_dir(weights, device=device).eval()
    if not isinstance(model, ThinkingPixelDiT):
        raise ValueError(f"--checkpoint {checkpoint} holds a {type(model).__name__}; routing analysis needs a "
                         "ThinkingPixelDiT")
    step_dir = ckpt.find_step_dir(weights)
    return model, (TrainConfig.load(step_dir) if step_dir is not None else None)  # None: saved outside a run


def analyze(checkpoints: list[str], output_dir: str | Path, *, labels: list[str] | None = None,
            use_ema: bool = True, dataset: str | None = None, data_dir: str | None = None, split: str = "test",
            num_images: int = 100, num_timesteps: int = 10, layer: int | None = None, batch_size: int = 50,
            seed: int = 0, device: str = "auto") -> dict:
    """Write the figures and routing_stats.json for ``checkpoints`` into ``output_dir``; returns the stats."""
    if labels is None:
        labels = [Path(c).name for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise ValueError(f"--label must be given once per --checkpoint ({len(checkpoints)}), got {len(labels)}")
    for name, value in (("--num-images", num_images), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    diffusion = GaussianDiffusion()
    timesteps = timestep_grid(num_timesteps, diffusion)

    results, stats_json = [], {}
    for i, (checkpoint, label) in enumerate(zip(checkpoints, labels)):
        model, saved = _load(checkpoint, use_ema, device)
        cfg = model.config
        name = dataset or (saved.data.dataset if saved is not None else "fashion_mnist")
        root = data_dir if (dataset or data_dir or saved is None) else saved.data.data_dir
        images, ys = real_subset(name, num_images, image_size=cfg.input_size, num_channels=cfg.in_channels,
                                 split=split, data_dir=root, seed=seed)
        if int(ys.max()) >= cfg.num_classes:
            raise ValueError(f"{name} has labels up to {int(ys.max())} but the model has {cfg.num_classes} classes")
        images, ys = images.to(device), ys.to(device)
        counts = collect_routing(model, images, ys, timesteps, diffusion=diffusion, batch_size=batch_size, seed=seed)
        stats = {"pooled": routing_statistics(pool_counts(counts)),
                 "per_layer_step": {f"layer{l}_step{s}": routing_statistics(c) for (l, s), c in sorted(counts.items())}}
        stats_json[label] = {"checkpoint": str(checkpoint), "recursion": model.recursion.to_dict(),
                             "dataset": name, "split": split, "num_images": num_images, "timesteps": timesteps,
                             **stats}
        results.append({"label": label, "counts": counts, "counts_shape": next(iter(counts.values())).shape,
                        "stats": stats})

        layer_i = model.recursive_layers[0] if layer is None else layer
        if layer_i not in model.recursive_layers:
            raise ValueError(f"--layer {layer_i} is not a recursive layer of {checkpoint} "
                             f"(recursive layers: {list(model.recursive_layers)})")
        probe_t = [timesteps[-1], timesteps[len(timesteps) // 2], timesteps[0]] if len(timesteps) >= 3 else timesteps
        trajs, rows = {}, []
        for t in sorted(set(probe_t), reverse=True):
            x_t, tt = noised(images[:2], t, diffusion, seed)
            trajs[t] = recursion_states(model, x_t[:1], tt[:1], ys[:1], layer_i)[:, 0]  # (T + 1, N, D)
            decoded = decode_steps(model, x_t, tt, ys[:2], layer_i, diffusion)  # (T, 2, C, H, W)
            rows += [(t, x_t[b], decoded[:, b], images[b]) for b in range(2)]
        suffix = "" if len(checkpoints) == 1 else f"_{i}"
        title = f"{label}: layer {layer_i}, M={model.recursion.experts}, T={model.recursion.steps}"
        plot_trajectories(trajs, out / f"trajectories{suffix}.png", title)
        plot_decoded(rows, out / f"decoded_steps{suffix}.png", title)

    plot_expert_usage(results, timesteps, out / "expert_usage.png")
    plot_expert_positions(results, out / "expert_positions.png")
    (out / "routing_stats.json").write_text(json.dumps(stats_json, indent=2) + "\n")
    return stats_json


def _is_text_model(checkpoint: str) -> bool:
    return read_config(ckpt.resolve_weights_dir(checkpoint))["class"] == "SD3TextToImage"


def run(args: argparse.Namespace) -> int:
    """The ``thinking-pixel analyze`` command."""
    set_threads(args.threads)
    if _is_text_model(args.checkpoint[0]):
        from .text_to_image.routing import analyze_text_models

        stats = analyze_text_models(args.checkpoint, args.output_dir, labels=args.label, use_ema=args.use_ema,
                                    num_images=args.num_images, num_timesteps=args.num_timesteps,
                                    batch_size=args.batch_size, seed=args.seed, device=args.device)
        _print_summary(stats, "tag", args.output_dir)
        return 0
    stats = analyze(args.checkpoint, args.output_dir, labels=args.label, use_ema=args.use_ema, dataset=args.dataset,
                    data_dir=args.data_dir, split=args.split, num_images=args.num_images,
                    num_timesteps=args.num_timesteps, layer=args.layer, batch_size=args.batch_size, seed=args.seed,
                    device=args.device)
    _print_summary(stats, "class", args.output_dir)
    return 0


def _print_summary(stats: dict, condition: str, output_dir) -> None:
    for label, s in stats.items():
        p = s["pooled"]
        print(f"{label}: H(E) = {p['entropy_bits']:.3f} bits, I(E;t) = {p['mi_timestep_bits']:.4f}, "
              f"I(E;{condition}) = {p[f'mi_{condition}_bits']:.4f}, I(E;position) = {p['mi_position_bits']:.4f}",
              flush=True)
    print(f"wrote figures and routing_stats.json to {output_dir}", flush=True)
