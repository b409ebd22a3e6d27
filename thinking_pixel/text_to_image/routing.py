"""Expert usage of a text-to-image model with the recursion (the paper's Fig. 4 for text conditioning).

``thinking-pixel analyze --checkpoint RUN --output-dir fig`` on a text-to-image checkpoint: rendered scenes of the
compositional world (``--num-images`` prompts drawn evenly from the six GenEval tags, seen compositions, one
rendered image each) are noised to ``--num-timesteps`` evenly spaced noise levels of the rectified flow
(x_t = (1 - s) x_0 + s e, t = 1000 s), and the model is run once per level in eval mode (deterministic argmax
routing) with the prompt's caption, recording every routing decision.

Outputs: ``expert_usage.png`` (fraction of tokens per expert vs timestep and vs the prompt's tag),
``expert_positions.png`` (vs token position) and ``routing_stats.json`` (usage, H(E), I(E; timestep),
I(E; tag), I(E; position) in bits, pooled and per (layer, step)), with the statistics of thinking_pixel.analysis;
under each label's "recursion" key the diagnostics of :mod:`.diagnostics` (is the recursion engaged: per-step
state change, LoRA-to-base ratio at the last step, expert usage per step, the loss with the recursion truncated
to T' = 1 .. T, I(E; caption word)), plotted in ``state_change.png``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ..analysis.plots import plot_expert_positions, plot_expert_usage, pool_counts
from ..analysis.statistics import routing_statistics
from ..recursion.layers import LatentRecursion
from ..tasks.compositional import TAGS, make_prompts, render
from .diagnostics import plot_state_change, recursion_diagnostics
from .sampling import PromptSampler, load_text_model

__all__ = ["analyze_text_models", "collect_text_routing", "record_routing"]


@contextlib.contextmanager
def record_routing(model):
    """Collect (block index, step, expert_idx (N, T)) of every recursive attention while the block runs."""
    entries = []
    recursions = [(name, m) for name, m in model.transformer.named_modules() if isinstance(m, LatentRecursion)]
    if not recursions:
        raise ValueError("this text-to-image model has no recursion to analyse (trained with --no-recursion or "
                         "--peft-lora)")
    for name, module in recursions:
        layer = int(name.split(".")[1])  # transformer_blocks.{i}.attn.processor
        module.recorder = lambda step, idx, state, layer=layer: entries.append((layer, step, idx.detach()))
    try:
        yield entries
    finally:
        for _, module in recursions:
            module.recorder = None


@torch.no_grad()
def collect_text_routing(model, embeddings, images, captions, tag_index, sigmas, *, batch_size=50, seed=0) -> dict:
    """-> {(layer, step): counts (K noise levels, tags, tokens, experts) int64}."""
    num_experts = model.recursion.experts
    num_tags = int(tag_index.max()) + 1
    counts = {}
    for k, s in enumerate(sigmas):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        noise = torch.randn(images.shape, generator=gen).to(images.device)
        x_t = (1 - s) * images + s * noise  # (N, C, H, W)
        for i in range(0, len(images), batch_size):
            hidden, pooled = embeddings.lookup(captions[i:i + batch_size], device=images.device)
            t = torch.full((len(hidden),), 1000.0 * s, device=images.device)
            tags = tag_index[i:i + batch_size]
            with record_routing(model) as entries:
                model(x_t[i:i + batch_size], t, hidden, pooled)
            for layer, step, idx in entries:
                onehot = F.one_hot(idx, num_experts).long()  # (B, T, M)
                per_tag = torch.zeros(num_tags, *onehot.shape[1:], dtype=torch.long, device=onehot.device)
                per_tag.index_add_(0, tags, onehot)  # (tags, T, M)
                if (layer, step) not in counts:
                    counts[(layer, step)] = np.zeros((len(sigmas), *per_tag.shape), dtype=np.int64)
                counts[(layer, step)][k] += per_tag.cpu().numpy()
    return counts


def analyze_text_models(checkpoints: list[str], output_dir: str | Path, *, labels: list[str] | None = None,
                        use_ema: bool = True, num_images: int = 120, num_timesteps: int = 10, batch_size: int = 50,
                        seed: int = 0, device: str = "auto") -> dict:
    """Write expert_usage.png, expert_positions.png and routing_stats.json for text-to-image ``checkpoints``."""
    labels = labels or [Path(c).name for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise ValueError(f"--label must be given once per --checkpoint ({len(checkpoints)}), got {len(labels)}")
    if num_images < len(TAGS):
        raise ValueError(f"--num-images must be >= {len(TAGS)} (one per tag), got {num_images}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sigmas = np.linspace(0.05, 0.95, num_timesteps).round(3).tolist()
    timesteps = [int(round(1000 * s)) for s in sigmas]
    prompts = make_prompts(-(-num_images // len(TAGS)), seed=seed, split="train")
    results, stats_json = [], {}
    for checkpoint, label in zip(checkpoints, labels):
        model = load_text_model(checkpoint, use_ema=use_ema, device=device)
        if model.recursion is None:
            raise ValueError(f"--checkpoint {checkpoint} has no recursion to analyse")
        size = model.image_size
        images = torch.stack([torch.from_numpy(np.array(render(p, size=size, seed=seed))).permute(2, 0, 1)
                              for p in prompts]).float().div(127.5).sub(1).to(device)  # (N, 3, S, S) in [-1, 1]
        tag_index = torch.tensor([TAGS.index(p.tag) for p in prompts], device=device)
        sampler = PromptSampler(model)
        counts = collect_text_routing(model, sampler.embeddings, images, [p.caption for p in prompts], tag_index,
                                      sigmas, batch_size=batch_size, seed=seed)
        pooled = pool_counts(counts)
        stats = {"pooled": routing_statistics(pooled),
                 "per_layer_step": {f"layer{l}_step{s}": routing_statistics(c) for (l, s), c in sorted(counts.items())}}
        for name in ("mi_class_bits", "nmi_class", "mi_bias_bits_class"):  # the "class" axis holds the prompt's tag
            stats["pooled"][name.replace("class", "tag")] = stats["pooled"].pop(name)
        engaged = recursion_diagnostics(model, sampler.embeddings, prompts, sigmas=sigmas, image_size=size,
                                        batch_size=batch_size, seed=seed)
        stats_json[label] = {"checkpoint": str(checkpoint), "recursion": {**model.recursion.to_dict(), **engaged},
                             "tags": list(TAGS), "num_images": len(prompts), "timesteps": timesteps, **stats}
        results.append({"label": label, "counts": counts, "counts_shape": pooled.shape,
                        "stats": {"pooled": {**stats["pooled"], "mi_class_bits": stats["pooled"]["mi_tag_bits"]}}})
    plot_expert_usage(results, timesteps, out / "expert_usage.png", class_names=list(TAGS), class_axis="prompt tag")
    plot_expert_positions(results, out / "expert_positions.png")
    plot_state_change({label: s["recursion"] for label, s in stats_json.items()}, out / "state_change.png")
    (out / "routing_stats.json").write_text(json.dumps(stats_json, indent=2) + "\n")
    return stats_json
