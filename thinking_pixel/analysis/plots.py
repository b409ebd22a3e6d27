"""Figures of routing analysis: expert usage vs timestep / condition / position, state trajectories, decoded
recursion steps. matplotlib is imported when a figure is drawn (its Agg backend: files only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["plot_decoded", "plot_expert_positions", "plot_expert_usage", "plot_trajectories", "pool_counts", "pyplot"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pool_counts(counts: dict) -> np.ndarray:
    """Routing counts summed over every (layer, step) entry."""
    return sum(counts.values())


def plot_expert_usage(results: list[dict], timesteps: list[int], path: Path, class_names: list[str] | None = None,
                      class_axis: str = "class") -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(4.8 * len(results) + 1, 7.5), squeeze=False,
                             layout="constrained")
    for col, res in enumerate(results):
        pooled, stats = pool_counts(res["counts"]), res["stats"]["pooled"]
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
    plt = pyplot()
    num_experts = max(r["counts_shape"][-1] for r in results)
    fig, axes = plt.subplots(len(results), num_experts, figsize=(2.4 * num_experts, 2.6 * len(results)),
                             squeeze=False, layout="constrained")
    for row, res in enumerate(results):
        by_pos = pool_counts(res["counts"]).sum((0, 1))  # (N, M)
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

    plt = pyplot()
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
    plt = pyplot()
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
