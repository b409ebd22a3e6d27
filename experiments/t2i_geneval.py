"""Text-to-image on the compositional shapes world: the paper's GenEval comparison at a size this machine trains.

    python experiments/t2i_geneval.py --scale small --jobs 2            # resumable; rerun to continue
    TP_FT_STEPS=400 python experiments/t2i_geneval.py --scale small     # override any knob (TP_<KEY>)
    python experiments/t2i_geneval.py --scale small --stages table      # only rebuild the table

Protocol (the paper's fine-tuning setting):
  1. base: SD3-T (diffusers SD3Transformer2DModel, MiniLM text) trained from scratch on --dataset compositional
     (held-out compositions never shown), one run, seed 0; at --scale recipe the named recipe's two stages
     (OUT/base_stage1, then its cool-down in OUT/base). Every variant starts from its EMA weights.
  2. variants, ``ft_steps`` steps each from the same base, for every seed in ``seeds``:
       sd3_continued   plain SD3-T, all weights trained further (continued training)
       lora_peft       base frozen, a plain peft LoRA on to_q/to_k/to_v of the middle block (M=1, T=1, no gate)
       tp_M2_T2_one    ThinkingPixel M=2, T=2 in the middle block (base frozen)
       tp_M2_T2_multi  ThinkingPixel M=2, T=2 in blocks ``multi_layers`` (base frozen)
       tp_M5_T5        ThinkingPixel M=5, T=5 in the middle block (base frozen)
       tp_M2_T2_multi_lr4x  tp_M2_T2_multi with 4x the fine-tuning lr (a try at engaging the recursion more)
       tp_M2_T2_multi_binit tp_M2_T2_multi with the experts' B from N(0, 0.1^2) and a zero-initialised final-step
                            gain (--lora-b-std 0.1: the model is the base at init, the intermediate steps are not)
  3. evaluate: ``thinking-pixel evaluate --benchmark compositional`` (GenEval's protocol: prompts per tag, 4 images
     per prompt, seeded), seen and held-out compositions apart; the base too.
  4. analyze: expert usage vs timestep and prompt tag for tp_M2_T2_multi and tp_M5_T5 (seed 0).
  5. grids: OUT/grids/NAME.png, the first 12 seen prompts x 4 images of each seed-0 evaluation (no new sampling).
  6. table: OUT/results.md (mean ± sample std over seeds), from the result JSONs only.
  7. curve: the variants in ``curve_variants`` fine-tuned ``curve_steps`` steps (seed 0, a checkpoint kept every
     ``curve_every`` steps), every checkpoint evaluated as in 3: score vs fine-tuning step, and longer fine-tuning
     as a try at engaging the recursion (OUT/long/NAME_s0, OUT/eval_curve/NAME_s0_stepN.json).
  8. scratch: the recursion trained from scratch with the base's recipe (M=2, T=2 in blocks ``multi_layers``), for
     every seed in ``scratch_seeds``: OUT/scratch/tp_M2_T2_multi_scratch_sS, evaluated into OUT/eval; and the base
     itself by the same command without the recursion for every seed in ``scratch_base_seeds`` (OUT/scratch/base_sS;
     seed 0 is OUT/base), so that both sides of that comparison have several seeds.

Every command is printed and appended to OUT/commands.sh; finished evaluations are skipped, training resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import finished, prepare  # noqa: E402  (experiments/run.py: the DiT study's runner)

SCALES = {
    # ~1.5 h on a busy 2-core CPU: 32 px scenes, SD3-T/4 (4 blocks of width 128, 64 tokens), short fine-tuning,
    # 4 prompts per tag and split (160 images per checkpoint).
    "small": dict(image_size=32, preset="SD3-T/4", base_steps=1000, base_batch=32, base_lr=1e-3, ft_steps=150,
                  ft_batch=32, ft_lr=1e-3, rank=16, multi_layers="1,2,3", seeds="0,1,2", prompts_per_tag=4,
                  eval_steps=20, cfg_scale=4.0, analyze_images=60, threads=1),
    # Many CPU hours: longer base and fine-tuning, 25 prompts per tag and split.
    "medium": dict(image_size=32, preset="SD3-T/4", base_steps=8000, base_batch=64, base_lr=1e-3, ft_steps=1000,
                   ft_batch=64, ft_lr=1e-3, rank=32, multi_layers="1,2,3", seeds="0,1,2", prompts_per_tag=25,
                   eval_steps=28, cfg_scale=4.0, analyze_images=120, threads=1),
    # The base of the recipe search (adaLN-Zero init, lr 4e-3 after 200 warm-up steps, 16000 x 32, ~1 h at
    # 4.5 it/s on one core), 1000 fine-tuning steps per variant and seed, 25 prompts per tag and split.
    "adaln": dict(image_size=32, preset="SD3-T/4", base_steps=16000, base_batch=32, base_lr=4e-3,
                  base_init="adaln-zero", base_warmup=200, ft_steps=1000, ft_batch=32, ft_lr=1e-3, rank=16,
                  multi_layers="1,2,3", seeds="0,1,2", prompts_per_tag=25, eval_steps=20, cfg_scale=4.0,
                  analyze_images=60, threads=1, curve_variants="tp_M2_T2_multi_lr4x,sd3_continued", curve_steps=4000,
                  curve_every=1000, scratch_seeds="0,1,2", scratch_base_seeds="1,2"),
    # The same comparison on the recipe's base: `--recipe t2i-compositional` (24000 steps, ~1.6 h on one core),
    # then its 2000-step cool-down stage (`--recipe t2i-compositional-cooldown`), RESULTS.md's 58.3 base.
    "recipe": dict(image_size=32, preset="SD3-T/4", base_recipe="t2i-compositional", base_steps=2000, ft_steps=1000,
                   ft_batch=32, ft_lr=1e-3, rank=16, multi_layers="1,2,3", seeds="0,1,2", prompts_per_tag=25,
                   eval_steps=20, cfg_scale=4.0, analyze_images=60, threads=1),
}


def variants(s: dict) -> dict:
    return {
        "sd3_continued": ["--no-recursion"],
        "lora_peft": ["--peft-lora", "--recursion-layers", "2"],
        "tp_M2_T2_one": ["--experts", "2", "--recursion-steps", "2", "--recursion-layers", "2"],
        "tp_M2_T2_multi": ["--experts", "2", "--recursion-steps", "2", "--recursion-layers", s["multi_layers"]],
        "tp_M5_T5": ["--experts", "5", "--recursion-steps", "5", "--recursion-layers", "2"],
        # the experts at 4x the fine-tuning lr (the last --lr given wins): a try at engaging the recursion more
        "tp_M2_T2_multi_lr4x": ["--experts", "2", "--recursion-steps", "2", "--recursion-layers", s["multi_layers"],
                                "--lr", str(4 * s["ft_lr"])],
        # B away from zero, the final step's LoRA behind a zero-initialised gain: intermediate steps engaged at init
        "tp_M2_T2_multi_binit": ["--experts", "2", "--recursion-steps", "2", "--recursion-layers", s["multi_layers"],
                                 "--lora-b-std", "0.1"],
    }


LABELS = {"base": "base SD3-T (no fine-tuning)", "sd3_continued": "SD3-T, continued training (all weights)",
          "lora_peft": "plain LoRA via peft (M=1, T=1, block 2)", "tp_M2_T2_one": "ThinkingPixel M=2, T=2, block 2",
          "tp_M2_T2_multi": "ThinkingPixel M=2, T=2, blocks 1,2,3", "tp_M5_T5": "ThinkingPixel M=5, T=5, block 2",
          "tp_M2_T2_multi_lr4x": "ThinkingPixel M=2, T=2, blocks 1,2,3, 4x lr",
          "tp_M2_T2_multi_binit": "ThinkingPixel M=2, T=2, blocks 1,2,3, B ~ N(0, 0.1²)",
          "tp_M2_T2_multi_scratch": "ThinkingPixel M=2, T=2, blocks 1,2,3, trained from scratch"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def train_cmd(s: dict, out_dir: Path, steps: int, lr: float, seed: int, batch: int, extra: list[str],
              every: int = 250) -> list[str]:
    return [sys.executable, "-m", "thinking_pixel", "train", "--output-dir", str(out_dir), "--dataset",
            "compositional", "--image-size", str(s["image_size"]), "--preset", s["preset"], "--rank", str(s["rank"]),
            "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(lr), "--seed", str(seed),
            "--checkpoint-every", str(min(steps, every)), "--lr-schedule", "constant", "--threads", str(s["threads"]),
            "--no-sample-grid", "--no-progress", *extra]


def recipe_cmd(s: dict, recipe: str, out_dir: Path, seed: int, every: int, extra: list[str]) -> list[str]:
    """`thinking-pixel train --recipe RECIPE` into ``out_dir``: the recipe's own options, ``extra`` on top."""
    return [sys.executable, "-m", "thinking_pixel", "train", "--recipe", recipe, "--output-dir", str(out_dir), *extra,
            "--seed", str(seed), "--checkpoint-every", str(every), "--threads", str(s["threads"]), "--no-sample-grid",
            "--no-progress"]


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(out: Path, s: dict) -> str:
    """The GenEval-style tables (seen and held-out compositions) from OUT/eval/*.json."""
    evals = {}
    for path in sorted((out / "eval").glob("*.json")):
        name, _, seed = path.stem.rpartition("_s")
        name, seed = (name, int(seed)) if name else (path.stem, None)
        evals.setdefault(name, {})[seed] = json.loads(path.read_text())
    lines = []
    for split, title in (("seen", "compositions seen in training"), ("heldout", "held-out compositions")):
        lines += [f"**{title}** (GenEval-style score × 100, mean ± std over seeds; n = seeds)", "",
                  "| variant | n | " + " | ".join(TAGS) + " | overall |", "|---|---|" + "---|" * (len(TAGS) + 1)]
        for name in ["base", *variants(s), "tp_M2_T2_multi_scratch"]:
            runs = evals.get(name, {})
            scores = [r if split == "seen" else r.get("heldout") or {} for r in runs.values()]
            cells = [_cell([x[k] for x in scores if k in x]) for k in (*TAGS, "overall")]
            lines.append(f"| {LABELS[name]} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def grids(out: Path, name: str, rows: int = 12) -> None:
    """OUT/grids/NAME.png from the evaluation's stored samples: the first ``rows`` seen prompts, 4 images each
    (captions in OUT/grids/NAME.txt, one per row)."""
    import torch

    from thinking_pixel.sample import save_grid

    result = out / "eval" / f"{name}.json"
    if not result.is_file():
        return
    chunks = sorted((out / "eval_samples" / name).glob("chunk_*.pt"))
    images = torch.cat([torch.load(c, weights_only=True)["images"] for c in chunks])
    details = [json.loads(line) for line in Path(json.loads(result.read_text())["details"]).read_text().splitlines()]
    per = json.loads(result.read_text())["images_per_prompt"]
    grid = images[: rows * per].float() / 127.5 - 1
    (out / "grids").mkdir(exist_ok=True)
    save_grid(grid, out / "grids" / f"{name}.png", ncol=per, scale=2)
    (out / "grids" / f"{name}.txt").write_text("".join(d["caption"] + "\n" for d in details[: rows * per: per]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--out", default=None, help="output root (default: runs/t2i_<scale>)")
    parser.add_argument("--stages", default="base,finetune,evaluate,analyze,grids,table")
    parser.add_argument("--jobs", type=int, default=1, help="runs / evaluations in parallel (default 1)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated fine-tuning variants to train and evaluate (default: all), e.g. the "
                             "claims' tp_M2_T2_multi,lora_peft,sd3_continued first")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    s, out, run = prepare(args.scale, SCALES, args.out, "t2i", args.dry_run)
    base = out / "base"
    seeds = [int(v) for v in s["seeds"].split(",")]
    chosen = variants(s)
    if args.variants is not None:
        unknown = set(args.variants.split(",")) - set(chosen)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; expected some of {sorted(chosen)}")
        chosen = {name: extra for name, extra in chosen.items() if name in args.variants.split(",")}
    runs = {f"{name}_s{seed}": extra for seed in seeds for name, extra in chosen.items()}

    if "base" in stages and "base_recipe" in s:  # the named recipe's two stages; OUT/base is the second
        first = out / "base_stage1"
        run(recipe_cmd(s, s["base_recipe"], first, 0, 1000, ["--no-recursion"]))
        run(recipe_cmd(s, f"{s['base_recipe']}-cooldown", base, 0, 500,
                       ["--no-recursion", "--finetune-from", str(first)]))
    elif "base" in stages:
        init = ["--init", s["base_init"], "--warmup-steps", str(s["base_warmup"])] if "base_init" in s else []
        run(train_cmd(s, base, s["base_steps"], s["base_lr"], 0, s["base_batch"], ["--no-recursion", *init]))
    if "finetune" in stages:
        commands = [train_cmd(s, out / "runs" / name, s["ft_steps"], s["ft_lr"], int(name.rsplit("_s", 1)[1]),
                              s["ft_batch"], [*extra, "--finetune-from", str(base)]) for name, extra in runs.items()]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, commands))
    def evaluate(name: str, checkpoint: Path, result: Path, trained: bool) -> list[str] | None:
        if result.is_file() or not trained:
            print(f"= {name}: {'done' if result.is_file() else 'not trained yet'}, skipped", flush=True)
            return None
        return [sys.executable, "-m", "thinking_pixel", "evaluate", "--checkpoint", str(checkpoint),
                "--benchmark", "compositional", "--prompts-per-tag", str(s["prompts_per_tag"]),
                "--images-per-prompt", "4", "--num-steps", str(s["eval_steps"]), "--cfg-scale", str(s["cfg_scale"]),
                "--batch-size", "80", "--seed", "0", "--output", str(result), "--samples-dir",
                str(result.parent.parent / f"{result.parent.name}_samples" / result.stem), "--no-progress"]

    if "evaluate" in stages:
        commands = [evaluate(name, path, out / "eval" / f"{name}.json",
                             finished(path, s["base_steps"] if name == "base" else s["ft_steps"]))
                    for name, path in [("base", base), *((n, out / "runs" / n) for n in runs)]]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, [c for c in commands if c]))
    if "curve" in stages:
        for name in s["curve_variants"].split(","):
            name = f"{name}_s{seeds[0]}"
            path = out / "long" / name
            run(train_cmd(s, path, s["curve_steps"], s["ft_lr"], seeds[0], s["ft_batch"],
                          [*runs[name], "--finetune-from", str(base), "--keep-checkpoints", "0"], s["curve_every"]))
            commands = [evaluate(f"{name} step {step}", path / "checkpoints" / f"step_{step:07d}",
                                 out / "eval_curve" / f"{name}_step{step}.json",
                                 (path / "checkpoints" / f"step_{step:07d}").is_dir())
                        for step in range(s["curve_every"], s["curve_steps"] + 1, s["curve_every"])]
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(run, [c for c in commands if c]))
    if "scratch" in stages:
        recursion = ["--experts", "2", "--recursion-steps", "2", "--recursion-layers", s["multi_layers"], "--rank",
                     str(s["rank"])]
        jobs = [(f"base_s{v}", ["--no-recursion"], int(v)) for v in s.get("scratch_base_seeds", "").split(",") if v]
        jobs += [(f"tp_M2_T2_multi_scratch_s{v}", recursion, int(v)) for v in s.get("scratch_seeds", "").split(",")
                 if v]
        for name, extra, seed in jobs:
            path = out / "scratch" / name
            run(recipe_cmd(s, "t2i-compositional", path, seed, 500, ["--max-steps", str(s["base_steps"]), *extra]))
            command = evaluate(name, path, out / "eval" / f"{name}.json", finished(path, s["base_steps"]))
            if command:
                run(command)
    if "analyze" in stages:
        items = [(f"tp_M2_T2_multi_s{seeds[0]}", "M=2, T=2, blocks " + s["multi_layers"]),
                 (f"tp_M5_T5_s{seeds[0]}", "M=5, T=5, block 2"),
                 (f"tp_M2_T2_multi_lr4x_s{seeds[0]}", "M=2, T=2, blocks " + s["multi_layers"] + ", 4x lr"),
                 (f"tp_M2_T2_multi_binit_s{seeds[0]}", "M=2, T=2, blocks " + s["multi_layers"] + ", B init 0.1")]
        if all(finished(out / "runs" / n, s["ft_steps"]) for n, _ in items) and not (out / "analysis").is_dir():
            cmd = [sys.executable, "-m", "thinking_pixel", "analyze", "--output-dir", str(out / "analysis"),
                   "--num-images", str(s["analyze_images"]), "--num-timesteps", "10"]
            for n, label in items:
                cmd += ["--checkpoint", str(out / "runs" / n), "--label", label]
            run(cmd)
    if "grids" in stages:
        for name in ("base", *(f"{v}_s{seeds[0]}" for v in variants(s))):
            grids(out, name)
    if "table" in stages:
        text = table(out, s)
        (out / "results.md").write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
