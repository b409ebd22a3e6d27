"""Is the recursion engaged? Diagnostics of a text-to-image model's recursive blocks (``thinking-pixel analyze``).

With every LoRA B at zero (the init) the intermediate steps' Q/K/V are zero, the last step's Q/K/V are the frozen
projection's, and the block is the base block. A fine-tune that leaves B small leaves the recursion
idle, whatever the scores say. Measured on rendered scenes of the benchmark's prompts, noised to a few levels of
the flow, in eval mode (argmax routing):

- ``state_change``: per recursive block and step t = 1 .. T-1, mean over tokens of ||a^t - a^(t-1)|| / ||a^t||.
  In SD3's joint attention an idle step 1 still moves the state: its zero queries attend uniformly over
  [vision; text] and pick up the text tokens' mean value (the same shift for every token of a sample); from
  step 2 on an idle recursion gives 0. What reaches the block's output is the last step's Q/K/V, so
  ``lora_to_base`` and ``truncation`` are the measures of engagement at T = 2;
- ``lora_to_base``: at the last step, ||LoRA_e(LN(a^(T-1)))|| / ||W^ x~|| of the block's Q/K/V (per sample,
  averaged): how much the experts change what the frozen projection computes;
- ``expert_usage``: per block and step, the fraction of tokens routed to each expert;
- ``truncation``: the flow's velocity MSE with the recursion cut to T' = 1 .. T steps at fixed weights (T' = T
  is the trained model; an idle recursion gives the same loss for every T');
- ``word_mi``: I(E; word) in bits, pooled over tokens, steps and noise levels, for the caption's colour word,
  shape word and relation word ("none" when the caption has none), beside I(E; tag), with the plug-in bias
  (|X| - 1)(M - 1) / (2 n ln 2) for comparison.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from ..analysis.plots import pyplot
from ..analysis.statistics import mutual_information
from ..recursion.layers import LatentRecursion
from ..tasks.compositional import COLOUR_NAMES, RELATIONS, SHAPE_NAMES, TAGS, render
from ..tasks.compositional.grammar import plural

__all__ = ["caption_words", "plot_state_change", "recursion_diagnostics", "recursion_steps", "recursions",
           "set_recursion_steps"]

WORD_KINDS = ("colour", "shape", "relation")


def recursions(model) -> list[tuple[int, object]]:
    """(block index, LatentRecursion) of a text-to-image model's recursive attentions."""
    found = [(int(name.split(".")[1]), m) for name, m in model.transformer.named_modules()
             if isinstance(m, LatentRecursion)]  # transformer_blocks.{i}.attn.processor
    if not found:
        raise ValueError("this text-to-image model has no recursion (trained with --no-recursion or --peft-lora)")
    return found


def set_recursion_steps(model, steps: int | None) -> list[int]:
    """Every recursive block runs ``steps`` <= T latent steps from now on (None: leave them); -> the previous T's."""
    found = recursions(model)
    trained = [m.steps for _, m in found]
    if steps is None:
        return trained
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--recursion-steps must be an int >= 1, got {steps!r}")
    if steps > min(trained):
        raise ValueError(f"--recursion-steps {steps} exceeds the trained T = {min(trained)}: the override truncates")
    for _, m in found:
        m.steps = steps
    return trained


@contextlib.contextmanager
def recursion_steps(model, steps: int | None):
    """Run every recursive block with ``steps`` latent steps (None: as trained); restored on exit."""
    if steps is None:
        yield
        return
    trained = set_recursion_steps(model, steps)
    try:
        yield
    finally:
        for (_, m), t in zip(recursions(model), trained):
            m.steps = t


def caption_words(caption: str) -> dict[str, str]:
    """{colour, shape, relation}: the first of each kind of word in ``caption`` ("none" if absent)."""
    words = caption.split()
    shapes = {s: s for s in SHAPE_NAMES} | {plural(s): s for s in SHAPE_NAMES}
    return {"colour": next((w for w in words if w in COLOUR_NAMES), "none"),
            "shape": next((shapes[w] for w in words if w in shapes), "none"),
            "relation": next((r for r in RELATIONS if f" {r} " in f" {caption} "), "none")}


@contextlib.contextmanager
def _probe(found):
    """Record per block: states a^0 .. a^(T-1) and experts of every step, the last step's LoRA / base ratio."""
    log = {layer: {"states": [], "experts": [], "ratio": []} for layer, _ in found}
    for layer, m in found:
        def refine(a, gate_terms, noise, base, normalize, _m=m, _log=log[layer], **skip):
            qkv, idx = type(_m).refine(_m, a, gate_terms, noise, base, normalize, **skip)
            _log["states"].append(a.float())
            _log["experts"].append(idx)
            if base is not None:  # the last step: qkv = W^ x~ + LoRA
                lora = (qkv - base).float().flatten(1).norm(dim=1)
                _log["ratio"].append(lora / base.float().flatten(1).norm(dim=1).clamp_min(1e-12))  # (N,)
            return qkv, idx
        m.refine = refine
    try:
        yield log
    finally:
        for _, m in found:
            del m.refine


def _mi(joint: np.ndarray) -> tuple[float, float]:
    joint = joint[joint.sum(1) > 0]
    n, m = joint.sum(), joint.shape[1]
    return mutual_information(joint), (len(joint) - 1) * (m - 1) / (2 * n * math.log(2))


@torch.no_grad()
def recursion_diagnostics(model, embeddings, prompts, *, sigmas, image_size: int, batch_size: int = 50,
                          seed: int = 0) -> dict:
    """The diagnostics above on one rendered scene per prompt (see the module doc); -> a JSON-able dict."""
    found = recursions(model)
    device = next(model.parameters()).device
    trained_steps = min(m.steps for _, m in found)
    num_experts = found[0][1].gate.num_experts
    images = torch.stack([torch.from_numpy(np.array(render(p, size=image_size, seed=seed))).permute(2, 0, 1)
                          for p in prompts]).float().div(127.5).sub(1).to(device)  # (N, 3, S, S) in [-1, 1]
    captions = [p.caption for p in prompts]
    words = [caption_words(c) for c in captions]
    values = {k: sorted({w[k] for w in words}) for k in WORD_KINDS}
    values["tag"] = list(TAGS)
    label = {k: torch.tensor([values[k].index(w[k]) for w in words]) for k in WORD_KINDS}
    label["tag"] = torch.tensor([TAGS.index(p.tag) for p in prompts])
    change = {layer: np.zeros(trained_steps - 1) for layer, _ in found}
    ratio = {layer: [] for layer, _ in found}
    usage = {layer: np.zeros((trained_steps, num_experts)) for layer, _ in found}
    joints = {k: np.zeros((len(values[k]), num_experts)) for k in label}
    mse = np.zeros(trained_steps)
    for k, s in enumerate(sigmas):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        noise = torch.randn(images.shape, generator=gen).to(device)
        x_t = (1 - s) * images + s * noise  # (N, C, H, W)
        for i in range(0, len(images), batch_size):
            sl = slice(i, i + batch_size)
            hidden, pooled = embeddings.lookup(captions[sl], device=device)
            t = torch.full((len(hidden),), 1000.0 * s, device=device)
            target = (noise[sl] - images[sl]).float()  # the flow's velocity
            for steps in range(1, trained_steps + 1):
                with recursion_steps(model, steps), _probe(found) as log:
                    v = model(x_t[sl], t, hidden, pooled)
                mse[steps - 1] += (v.float() - target).pow(2).mean().item() * len(hidden)
                if steps < trained_steps:
                    continue
                for layer, rec in log.items():
                    states = rec["states"]  # a^0 .. a^(T-1), each (B, N_tok, D)
                    for st in range(1, len(states)):
                        d = (states[st] - states[st - 1]).norm(dim=-1) / states[st].norm(dim=-1).clamp_min(1e-12)
                        change[layer][st - 1] += d.mean().item() * len(hidden)
                    ratio[layer].append(rec["ratio"][0])
                    for st, idx in enumerate(rec["experts"]):
                        usage[layer][st] += np.bincount(idx.flatten().cpu().numpy(), minlength=num_experts)
                        onehot = torch.nn.functional.one_hot(idx, num_experts).sum(1).cpu().numpy()  # (B, M)
                        for kind, lab in label.items():
                            np.add.at(joints[kind], lab[sl].numpy(), onehot)
    n = len(images) * len(sigmas)
    out = {"trained_steps": trained_steps, "experts": num_experts, "num_images": len(images),
           "sigmas": list(sigmas), "blocks": {}}
    for layer, _ in found:
        r = torch.cat(ratio[layer])
        out["blocks"][str(layer)] = {
            "state_change": (change[layer] / n).tolist(),
            "lora_to_base": {"mean": r.mean().item(), "se": (r.std() / math.sqrt(len(r))).item()},
            "expert_usage": (usage[layer] / usage[layer].sum(1, keepdims=True)).tolist(),
        }
    out["truncation_mse"] = {str(t + 1): mse[t] / n for t in range(trained_steps)}
    out["word_mi"] = {}
    for kind, joint in joints.items():
        mi, bias = _mi(joint)
        out["word_mi"][kind] = {"mi_bits": mi, "mi_bias_bits": bias, "values": values[kind]}
    return out


def plot_state_change(diagnostics: dict, path) -> None:
    """Per label: ||a^t - a^(t-1)|| / ||a^t|| per step and block (left), velocity MSE vs T' (right)."""
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, d in diagnostics.items():
        for layer, b in d["blocks"].items():
            ax0.plot(range(1, len(b["state_change"]) + 1), b["state_change"], "o-", label=f"{label}, block {layer}")
        steps = sorted(d["truncation_mse"], key=int)
        ax1.plot([int(t) for t in steps], [d["truncation_mse"][t] for t in steps], "o-", label=label)
    ax0.set(xlabel="recursion step t", ylabel="||a_t - a_(t-1)|| / ||a_t||", title="state change per step")
    ax0.set_ylim(bottom=0)
    ax1.set(xlabel="recursion steps T' at evaluation", ylabel="velocity MSE", title="truncation at fixed weights")
    most = max(d["trained_steps"] for d in diagnostics.values())
    ax0.set(xticks=range(1, most), xlim=(0.5, most - 0.5))
    ax1.set(xticks=range(1, most + 1))
    for ax in (ax0, ax1):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
