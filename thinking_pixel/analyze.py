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
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import _checkpoint as ckpt
from ._arguments import add_analyze_arguments as add_arguments
from .diffusion import GaussianDiffusion
from .train_config import TrainConfig

__all__ = ["add_arguments", "analyze", "collect_routing", "decode_steps", "mutual_information", "recursion_states",
           "routing_statistics", "run"]


# ----------------------------------------------------------------------------------------------------------------
# Routing statistics
# ----------------------------------------------------------------------------------------------------------------

def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.0" for a single outcome


def mutual_information(joint: np.ndarray) -> float:
    """I(X; E) in bits from a joint count (or probability) table (|X|, |E|)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if joint.ndim != 2 or total <= 0:
        raise ValueError(f"joint must be a non-empty 2-D table of counts, got shape {joint.shape}, sum {total}")
    p = joint / total
    return max(0.0, _entropy(p.sum(0)) + _entropy(p.sum(1)) - _entropy(p.ravel()))


def routing_statistics(counts: np.ndarray) -> dict:
    """Usage, entropy and mutual information from counts (timesteps K, classes C, positions N, experts M)."""
    if counts.ndim != 4:
        raise ValueError(f"counts must have shape (timesteps, classes, positions, experts), got {counts.shape}")
    n = counts.sum()
    num_experts = counts.shape[-1]
    usage = counts.sum((0, 1, 2)) / n  # (M,)
    h = _entropy(usage)
    out = {"tokens": int(n), "usage": usage.tolist(), "entropy_bits": h,
           "max_entropy_bits": math.log2(num_experts)}
    for name, axis in (("timestep", 0), ("class", 1), ("position", 2)):
        joint = np.moveaxis(counts, axis, 0).reshape(counts.shape[axis], -1, num_experts).sum(1)  # (|X|, M)
        joint = joint[joint.sum(1) > 0]  # values of X never seen (e.g. a class absent from the subset)
        mi = mutual_information(joint)
        out[f"mi_{name}_bits"] = mi
        out[f"nmi_{name}"] = mi / h if h > 0 else 0.0
        out[f"mi_bias_bits_{name}"] = (len(joint) - 1) * (num_experts - 1) / (2 * n * math.log(2))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model probes
# ----------------------------------------------------------------------------------------------------------------

def _timestep_grid(num_timesteps: int, diffusion: GaussianDiffusion) -> list[int]:
    if num_timesteps < 1:
        raise ValueError(f"--num-timesteps must be >= 1, got {num_timesteps}")
    return sorted(set(np.linspace(0, diffusion.num_timesteps - 1, num_timesteps).round().astype(int).tolist()))


def _noised(images, t: int, diffusion, seed: int):
    """x_t for all ``images`` at timestep ``t`` with noise seeded by (seed, t)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, t]).generate_state(1)[0]))
    noise = torch.randn(images.shape, generator=gen).to(images.device)
    tt = torch.full((len(images),), t, dtype=torch.long, device=images.device)
    return diffusion.q_sample(images, tt, noise), tt


@torch.no_grad()
def collect_routing(model, images, labels, timesteps, *, diffusion=None, batch_size=50, seed=0) -> dict:
    """Route ``images`` noised to each of ``timesteps``; -> {(layer, step): counts (K, C, N, M) int64 ndarray}."""
    diffusion = diffusion or GaussianDiffusion()
    num_classes, num_experts = model.config.num_classes, model.recursion.experts
    counts = {}
    for k, t in enumerate(timesteps):
        x_t, tt = _noised(images, t, diffusion, seed)
        for xb, tb, yb in zip(x_t.split(batch_size), tt.split(batch_size), labels.split(batch_size)):
            with model.record_routing() as record:
                model(xb, tb, yb)
            for entry in record.entries:
                key = (entry["layer"], entry["step"])
                onehot = F.one_hot(entry["expert_idx"], num_experts).long()  # (B, N, M)
                per_class = torch.zeros(num_classes, *onehot.shape[1:], dtype=torch.long, device=onehot.device)
                per_class.index_add_(0, entry["condition"], onehot)  # (C, N, M)
                if key not in counts:
                    counts[key] = np.zeros((len(timesteps), *per_class.shape), dtype=np.int64)
                counts[key][k] += per_class.cpu().numpy()
    return counts


@torch.no_grad()
def recursion_states(model, x_t, t, y, layer: int, **model_kwargs) -> torch.Tensor:
    """The states a^0 .. a^T of recursive block ``layer`` -> (T + 1, B, N, D); a^T = out_T + x~.
    model_kwargs go to the model (e.g. cond_image)."""
    attn = dict(model.recursive_attentions())[layer]
    final = {}
    hook = attn.proj.register_forward_pre_hook(lambda m, inputs: final.update(out=inputs[0]))
    try:
        with model.record_routing(states=True) as record:
            model(x_t, t, y, **model_kwargs)
    finally:
        hook.remove()
    states = [e["state"] for e in record.entries if e["layer"] == layer]  # a^0 .. a^{T-1}, each (B, N, D)
    return torch.stack(states + [final["out"] + states[0]])


@torch.no_grad()
def decode_steps(model, x_t, t, y, layer: int, diffusion=None, **model_kwargs) -> torch.Tensor:
    """x^_0 predicted when block ``layer``'s recursion stops after each step -> (T, B, C, H, W); see module doc."""
    diffusion = diffusion or GaussianDiffusion()
    states = recursion_states(model, x_t, t, y, layer, **model_kwargs)  # (T + 1, B, N, D)
    attn = dict(model.recursive_attentions())[layer]
    decoded = []
    for s in range(1, len(states)):
        out_s = states[s] - states[0]  # step s's attention output (B, N, D)
        hook = attn.proj.register_forward_pre_hook(lambda m, inputs, out_s=out_s: (out_s,))
        try:
            eps = model(x_t, t, y, **model_kwargs)[:, : x_t.shape[1]]  # (B, C, H, W)
        finally:
            hook.remove()
        decoded.append(diffusion.predict_xstart_from_eps(x_t, t, eps).clamp(-1, 1))
    return torch.stack(decoded)


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pooled(counts: dict) -> np.ndarray:
    return sum(counts.values())


def plot_expert_usage(results: list[dict], timesteps: list[int], path: Path, class_names: list[str] | None = None,
                      class_axis: str = "class") -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(4.8 * len(results) + 1, 7.5), squeeze=False,
                             layout="constrained")
    for col, res in enumerate(results):
        pooled, stats = _pooled(res["counts"]), res["stats"]["pooled"]
        by_t = pooled.sum((1, 2))  # (K, M)
        by_c = pooled.sum((0, 2))  # (C, M)
        for row, (table, xlabel, ticks, mi) in enumerate((
                (by_t, "diffusion timestep", timesteps, stats["mi_timestep_bits"]),
                (by_c, class_axis, class_names or list(range(by_c.shape[0])), stats["mi_class_bits"]))):
            frac = table / np.maximum(table.sum(1, keepdims=True), 1)  # (|X|, M): expert share per value
            ax = axes[row, col]
            im = ax.imshow(frac.T, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(ticks)), [str(v) for v in ticks], rotation=90 if len(ticks) > 10 or class_names else 0,
                          fontsize=7)
            ax.set_yticks(range(frac.shape[1]))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("expert")
            ax.set_title(f"{res['label']}\nI(E; {xlabel.split()[-1]}) = {mi:.3f} bits, H(E) = "
                         f"{stats['entropy_bits']:.2f}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of tokens")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_positions(results: list[dict], path: Path) -> None:
    plt = _pyplot()
    num_experts = max(r["counts_shape"][-1] for r in results)
    fig, axes = plt.subplots(len(results), num_experts, figsize=(2.4 * num_experts, 2.6 * len(results)),
                             squeeze=False, layout="constrained")
    for row, res in enumerate(results):
        by_pos = _pooled(res["counts"]).sum((0, 1))  # (N, M)
        side = int(round(math.sqrt(by_pos.shape[0])))
        frac = by_pos / np.maximum(by_pos.sum(1, keepdims=True), 1)
        for e in range(num_experts):
            ax = axes[row, e]
            ax.axis("off")
            if e < frac.shape[1]:
                im = ax.imshow(frac[:, e].reshape(side, side), vmin=0, vmax=1, cmap="viridis")
                ax.set_title(f"{res['label']}: expert {e}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of tokens")
    fig.suptitle("fraction of tokens routed to each expert, by patch position", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trajectories(trajs: dict, path: Path, title: str) -> None:
    """trajs: {timestep: states (S, N, D)} for one image."""
    from sklearn.decomposition import PCA

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(trajs), figsize=(4 * len(trajs), 4), squeeze=False)
    for ax, (t, states) in zip(axes[0], sorted(trajs.items(), reverse=True)):
        s, n, d = states.shape
        pts = PCA(n_components=2).fit_transform(states.reshape(s * n, d).double().cpu().numpy()).reshape(s, n, 2)
        colours = plt.get_cmap("viridis")(np.linspace(0, 1, n))
        for i in range(n):
            ax.plot(pts[:, i, 0], pts[:, i, 1], "-", color=colours[i], lw=0.8, alpha=0.8)
        ax.scatter(pts[0, :, 0], pts[0, :, 1], c=colours, s=8, marker="o", label="a^0 (block input)")
        ax.scatter(pts[-1, :, 0], pts[-1, :, 1], c=colours, s=22, marker="*", label=f"a^{s - 1} (final)")
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(title + " (colour: token index, row-major)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decoded(rows: list[tuple], path: Path, title: str) -> None:
    """rows: (timestep, x_t (C, H, W), decoded (T, C, H, W), clean x_0 (C, H, W)) in [-1, 1]."""
    plt = _pyplot()
    steps = rows[0][2].shape[0]
    cols = steps + 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)

    def show(ax, img, label):
        img = ((img.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=7)

    for r, (t, x_t, decoded, x0) in enumerate(rows):
        show(axes[r, 0], x_t, f"x_t, t={t}")
        for s in range(steps):
            show(axes[r, s + 1], decoded[s], f"stop after step {s + 1}")
        show(axes[r, -1], x0, "clean x_0")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def _load(checkpoint: str, use_ema: bool, device: str):
    from .models import ThinkingPixelDiT

    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    model = ckpt.load_model_dir(weights, device=device).eval()
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
    from .evaluate import real_subset

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
    timesteps = _timestep_grid(num_timesteps, diffusion)

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
        stats = {"pooled": routing_statistics(_pooled(counts)),
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
            x_t, tt = _noised(images[:2], t, diffusion, seed)
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
    from .models import read_config

    return read_config(ckpt.resolve_weights_dir(checkpoint))["class"] == "SD3TextToImage"


def run(args: argparse.Namespace) -> int:
    """The ``thinking-pixel analyze`` command."""
    from .evaluate import set_threads

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
