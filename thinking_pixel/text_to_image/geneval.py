"""GenEval's protocol on the compositional shapes world: ``thinking-pixel evaluate --checkpoint RUN --benchmark
compositional --output res.json``.

- Prompts: ``--prompts-per-tag`` prompts of each of the six tags (``make_prompts``, seeded by ``--prompt-seed``)
  from the compositions seen in training (split "train"), and as many from the held-out compositions (split
  "test": shape pairs and colour-shape bindings never shown together in training; tags without held-out prompts,
  single_object and counting, have none).
- Images: ``--images-per-prompt`` (GenEval: 4) per prompt; image j of prompt i (in the list seen + held-out) has
  noise seeded by (seed, i, j), so the images do not depend on batching or on interruptions.
- Resumable: prompts are generated in chunks of ``--batch-size`` images; each finished chunk is written atomically
  to ``<samples-dir>/chunk_XXXXX.pt`` (uint8); a rerun with the same settings generates only the missing chunks.
- ``--recursion-steps T'``: the recursive blocks run T' <= T latent steps (truncation at fixed weights; the
  samples dir keeps the value, so runs with different T' never share samples).
- Scores: ``thinking_pixel.tasks.compositional.score`` (GenEval's rules: an image is correct iff every include rule
  holds and no exclude rule is violated; a tag's score is the mean over its images; overall is the unweighted
  mean of the tags). The JSON holds the seen-composition scores at the top level and the held-out ones under
  "heldout"; per-image verdicts go to ``<output stem>_details.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import _run_dir as ckpt
from .._arguments import COMPOSITIONAL_SAMPLING
from .._runtime import set_threads
from .._samples import atomic_torch_save, check_sample_settings, checkpoint_identity, samples_dir_for
from ..metrics import to_uint8
from ..tasks.compositional import make_prompts, score
from .diagnostics import set_recursion_steps
from .sampling import PromptSampler, load_text_model

__all__ = ["benchmark_prompts", "evaluate_compositional", "run"]

DEFAULT_CFG_SCALE, DEFAULT_NUM_STEPS = COMPOSITIONAL_SAMPLING["cfg_scale"], COMPOSITIONAL_SAMPLING["num_steps"]

def benchmark_prompts(prompts_per_tag: int, seed: int = 0) -> tuple[list, list]:
    """(seen-composition prompts, held-out-composition prompts) of the benchmark."""
    return (make_prompts(prompts_per_tag, seed=seed, split="train"),
            make_prompts(prompts_per_tag, seed=seed, split="test"))


def evaluate_compositional(checkpoint: str | Path, output: str | Path, *, prompts_per_tag: int = 25,
                           images_per_prompt: int = 4, prompt_seed: int = 0, seed: int = 0,
                           cfg_scale: float = DEFAULT_CFG_SCALE, num_steps: int = DEFAULT_NUM_STEPS,
                           batch_size: int = 64, samples_dir: str | Path | None = None,
                           use_ema: bool = True, device: str = "auto", progress: bool = True,
                           recursion_steps: int | None = None) -> dict:
    """Run the benchmark on a text-to-image checkpoint and write the result JSON to ``output``; returns it."""
    for name, value in (("prompts_per_tag", prompts_per_tag), ("images_per_prompt", images_per_prompt),
                        ("batch_size", batch_size), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
    output = Path(output)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    model = load_text_model(checkpoint, use_ema=use_ema, device=device)
    if recursion_steps is not None:
        set_recursion_steps(model, recursion_steps)
    seen, heldout = benchmark_prompts(prompts_per_tag, prompt_seed)
    prompts = seen + heldout
    rows = [(i, j) for i in range(len(prompts)) for j in range(images_per_prompt)]  # (prompt index, image index)

    samples_dir = samples_dir_for(output, samples_dir)
    samples_dir.mkdir(parents=True, exist_ok=True)
    check_sample_settings(samples_dir, {**checkpoint_identity(weights), "prompts_per_tag": prompts_per_tag,
                                  "images_per_prompt": images_per_prompt, "prompt_seed": prompt_seed, "seed": seed,
                                  "cfg_scale": cfg_scale, "num_steps": num_steps, "batch_size": batch_size,
                                  **({} if recursion_steps is None else {"recursion_steps": recursion_steps})})
    sampler = None
    images = []
    started = time.time()
    with tqdm(total=len(rows), desc="compositional", unit="img", disable=not progress) as bar:
        for c in range(0, len(rows), batch_size):
            path = samples_dir / f"chunk_{c // batch_size:05d}.pt"
            chunk = rows[c:c + batch_size]
            if path.is_file():
                images.append(torch.load(path, map_location="cpu", weights_only=True)["images"])
            else:
                sampler = sampler or PromptSampler(model)
                generated = sampler.generate([prompts[i].caption for i, _ in chunk], chunk, cfg_scale=cfg_scale,
                                             num_steps=num_steps, seed=seed, batch_size=batch_size)
                images.append(to_uint8(generated.cpu()))
                atomic_torch_save({"images": images[-1], "rows": torch.tensor(chunk)}, path)
            bar.update(len(chunk))
    sampling_seconds = time.time() - started
    images = torch.cat(images)  # (len(rows), C, H, W) uint8
    n_seen = len(seen) * images_per_prompt
    row_prompts = [prompts[i] for i, _ in rows]
    seen_scores = score(images[:n_seen], row_prompts[:n_seen], details=True)
    heldout_scores = score(images[n_seen:], row_prompts[n_seen:], details=True) if heldout else None

    output.parent.mkdir(parents=True, exist_ok=True)
    details = output.with_name(output.stem + "_details.jsonl")
    with open(details, "w") as f:
        for split, scores in (("seen", seen_scores), ("heldout", heldout_scores)):
            for r in (scores or {}).get("results", []):
                f.write(json.dumps({"split": split, **r}) + "\n")
    step_dir = ckpt.find_step_dir(weights)
    result = {
        "checkpoint": str(weights),
        "step": (int(step_dir.name.split("_")[1])
                 if step_dir is not None and step_dir.name.startswith("step_") else None),
        "recursion": None if model.recursion is None else model.recursion.to_dict(),
        "peft_lora": model.peft_lora,
        "benchmark": "compositional",
        **{k: v for k, v in seen_scores.items() if k != "results"},
        "heldout": None if heldout_scores is None else {k: v for k, v in heldout_scores.items() if k != "results"},
        "prompts_per_tag": prompts_per_tag, "images_per_prompt": images_per_prompt, "prompt_seed": prompt_seed,
        "seed": seed, "cfg_scale": cfg_scale, "num_steps": num_steps, "use_ema": use_ema,
        "recursion_steps": recursion_steps,
        "samples_dir": str(samples_dir), "details": str(details), "sampling_seconds": round(sampling_seconds, 1),
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    result = evaluate_compositional(
        args.checkpoint, args.output, prompts_per_tag=args.prompts_per_tag, images_per_prompt=args.images_per_prompt,
        prompt_seed=args.prompt_seed, seed=args.seed,
        cfg_scale=DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale,
        num_steps=DEFAULT_NUM_STEPS if args.num_steps is None else args.num_steps,
        batch_size=args.batch_size, samples_dir=args.samples_dir, use_ema=args.use_ema, device=args.device,
        progress=args.progress, recursion_steps=args.recursion_steps)
    summary = {"overall": result["overall"], "heldout_overall": (result["heldout"] or {}).get("overall")}
    print(json.dumps(summary), flush=True)
    return 0
