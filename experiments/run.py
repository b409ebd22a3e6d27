"""The fine-tuning experiments (FID, M x T ablation, gate inputs, routing) end to end on Fashion-MNIST, at a
configurable scale.

    python experiments/run.py --scale smoke            # minutes-to-an-hour on a 2-core CPU
    python experiments/run.py --scale medium --jobs 2   # a few CPU-hours: a base worth fine-tuning
    python experiments/run.py --scale full             # the same protocol at a size worth reading (many CPU hours)
    TP_FT_STEPS=300 python experiments/run.py --scale smoke --out runs/exp_smoke300   # override any knob

Protocol (fine-tuning setting, the paper's):
  1. base: a plain DiT trained from scratch on Fashion-MNIST (one run, seed 0). Every variant starts from its
     EMA weights.
  2. variants, each ``ft_steps`` steps from the same base, for every seed in ``seeds``:
       dit_continued  plain DiT, all weights trained further (continued training)
       lora_M1_T1     base frozen, one LoRA expert on the qkv of the middle block, no recursion (plain LoRA)
       tp_M2_T2       ThinkingPixel M=2 experts, T=2 latent steps (base frozen)
       tp_M5_T5       ThinkingPixel M=5, T=5 (base frozen)
     ablations (seeds ``ablation_seeds``): every other M in {1, 2, 5} x T in {1, 2, 5}, and the gate-input
     ablation gate_tokens_M2_T2 (the gate sees the tokens only, not timestep + class).
  3. evaluate: FID / KID of every run (and the base) against the Fashion-MNIST test split.
  4. analyze: routing specialisation (expert use vs timestep / class, entropy and MI), trajectories and decoded
     steps, tokens+t+c vs tokens-only gate side by side; also M=5, T=5.
  5. table: experiments/make_table.py turns the outputs into OUT/results.md.

Every command is printed and appended to OUT/commands.sh. Rerunning continues where it stopped: training resumes
from its latest checkpoint, sample generation from its last finished chunk, finished evaluations are skipped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCALES = {
    # About an hour on a busy 2-core CPU: a tiny DiT (16 tokens), short runs, 64-sample FID. Exercises every stage;
    # far too small to rank the methods.
    "smoke": dict(image_size=16, preset="DiT-T/4", depth=4, hidden_size=128, num_heads=4, base_steps=800,
                  base_batch=32, ft_steps=150, ft_batch=32, rank=8, base_lr=3e-4, ft_lr=1e-3,
                  seeds="0,1,2", ablation_seeds="0", eval_samples=64, eval_reference=256, eval_steps=20,
                  cfg_scale=1.5, analyze_images=40, analyze_timesteps=10, threads=1),
    # A few CPU-hours: the same tiny DiT trained to a usable base (6000 steps at lr 1e-3), 1000 fine-tuning
    # steps per variant, FID/KID on 500 samples. Big enough to see whether fine-tuning moves anything.
    "medium": dict(image_size=16, preset="DiT-N/4", depth=4, hidden_size=128, num_heads=4, base_steps=6000,
                   base_batch=64, ft_steps=1000, ft_batch=64, rank=16, base_lr=1e-3, ft_lr=1e-3,
                   seeds="0,1,2", ablation_seeds="0", eval_samples=500, eval_reference=2000, eval_steps=25,
                   cfg_scale=1.5, analyze_images=100, analyze_timesteps=10, threads=1),
    # Hours to days on this CPU: DiT-T/2 (64 tokens) on 16x16 Fashion-MNIST, 5k-sample FID against 10k test images.
    "full": dict(image_size=16, preset="DiT-T/2", depth=6, hidden_size=192, num_heads=3, base_steps=30000,
                 base_batch=64, ft_steps=3000, ft_batch=64, rank=16, base_lr=1e-4, ft_lr=1e-3,
                 seeds="0,1,2", ablation_seeds="0,1,2", eval_samples=5000, eval_reference=10000, eval_steps=50,
                 cfg_scale=1.5, analyze_images=200, analyze_timesteps=20, threads=2),
}

MAIN_VARIANTS = {
    "dit_continued": ["--no-recursion"],
    "lora_M1_T1": ["--experts", "1", "--recursion-steps", "1"],
    "tp_M2_T2": ["--experts", "2", "--recursion-steps", "2"],
    "tp_M5_T5": ["--experts", "5", "--recursion-steps", "5"],
}


def ablation_variants() -> dict:
    grid = {f"tp_M{m}_T{t}": ["--experts", str(m), "--recursion-steps", str(t)] for m in (1, 2, 5) for t in (1, 2, 5)}
    for name in ("tp_M2_T2", "tp_M5_T5"):
        grid.pop(name)
    grid["lora_M1_T1"] = grid.pop("tp_M1_T1")  # the same model as the main plain-LoRA variant
    grid["gate_tokens_M2_T2"] = ["--experts", "2", "--recursion-steps", "2", "--gate-inputs", "tokens"]
    return grid


def settings(scale: str, scales: dict = SCALES) -> dict:
    """The scale's preset with TP_<KEY> environment overrides (e.g. TP_FT_STEPS=300)."""
    s = dict(scales[scale])
    for key, default in s.items():
        env = os.environ.get(f"TP_{key.upper()}")
        if env is not None:
            s[key] = type(default)(env)
    return s


class Runner:
    """Runs (and logs) commands with OMP_NUM_THREADS=threads: on a shared 2-core machine one thread per process
    is several times faster than two busy-waiting OpenMP threads."""

    def __init__(self, out: Path, dry_run: bool, threads: int):
        self.out, self.dry_run, self.threads = out, dry_run, threads
        self.log = out / "commands.sh"

    def __call__(self, cmd: list[str]) -> None:
        line = f"OMP_NUM_THREADS={self.threads} {shlex.join(cmd)}"
        print(f"+ {line}", flush=True)
        if self.dry_run:
            return
        with open(self.log, "a") as f:
            f.write(line + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, cwd=REPO, env=env)


def train_cmd(s: dict, out_dir: Path, steps: int, batch: int, lr: float, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "thinking_pixel", "train", "--output-dir", str(out_dir),
            "--dataset", "fashion_mnist", "--image-size", str(s["image_size"]), "--preset", s["preset"],
            "--depth", str(s["depth"]), "--hidden-size", str(s["hidden_size"]), "--num-heads", str(s["num_heads"]),
            "--rank", str(s["rank"]), "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(lr),
            "--seed", str(seed), "--checkpoint-every", str(min(steps, 500)), "--threads", str(s["threads"]),
            "--no-sample-grid", "--no-progress",
            # the recipe of the medium-scale results (the CLI's default recipe is v prediction, Min-SNR-5, cosine lr)
            "--prediction", "eps", "--min-snr-gamma", "0", "--lr-schedule", "constant", *extra]


def prepare(scale: str, scales: dict, out: str | None, prefix: str, dry_run: bool) -> tuple[dict, Path, "Runner"]:
    """A study's settings at ``scale``, its output root (default runs/<prefix>_<scale>, with settings.txt written)
    and its command runner."""
    s = settings(scale, scales)
    out = Path(out or REPO / "runs" / f"{prefix}_{scale}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.txt").write_text("".join(f"{k}={v}\n" for k, v in sorted(s.items())) + f"scale={scale}\n")
    return s, out, Runner(out, dry_run, s["threads"])


def finished(run_dir: Path, steps: int) -> bool:
    """Whether the training run in ``run_dir`` has a checkpoint at ``steps``."""
    latest = run_dir / "latest"
    return latest.is_file() and latest.read_text().strip().endswith(f"step_{steps:07d}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--out", default=None, help="output root (default: runs/exp_<scale>)")
    parser.add_argument("--stages", default="base,finetune,evaluate,analyze,table",
                        help="comma-separated subset of base,finetune,evaluate,analyze,table")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false",
                        help="main variants only (skip the M x T grid and the gate-input ablation)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fine-tuning runs and evaluations run in parallel (default: 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    unknown = stages - {"base", "finetune", "evaluate", "analyze", "table"}
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}")

    s, out, run = prepare(args.scale, SCALES, args.out, "exp", args.dry_run)
    base = out / "base"
    seeds = [int(v) for v in s["seeds"].split(",")]
    ablation_seeds = [int(v) for v in s["ablation_seeds"].split(",")]

    runs = {f"{name}_s{seed}": extra for name, extra in MAIN_VARIANTS.items() for seed in seeds}
    if args.ablations:
        for name, extra in ablation_variants().items():
            for seed in ablation_seeds:
                runs.setdefault(f"{name}_s{seed}", extra)

    if "base" in stages:
        run(train_cmd(s, base, s["base_steps"], s["base_batch"], s["base_lr"], 0, ["--no-recursion"]))
    if "finetune" in stages:
        commands = []
        for name, extra in runs.items():
            seed = int(name.rsplit("_s", 1)[1])
            lr = s["base_lr"] if "--no-recursion" in extra else s["ft_lr"]
            commands.append(train_cmd(s, out / "runs" / name, s["ft_steps"], s["ft_batch"], lr, seed,
                                      [*extra, "--finetune-from", str(base)]))
        with ThreadPoolExecutor(args.jobs) as pool:  # the runs are independent
            list(pool.map(run, commands))
    if "evaluate" in stages:
        commands = []
        for name, path in [("base", base), *((n, out / "runs" / n) for n in runs)]:
            result = out / "eval" / f"{name}.json"
            if result.is_file():
                print(f"= {result} exists, skipped", flush=True)
                continue
            if not finished(path, s["base_steps"] if name == "base" else s["ft_steps"]):
                print(f"= {path} has not finished training, not evaluated", flush=True)
                continue
            commands.append([sys.executable, "-m", "thinking_pixel", "evaluate", "--checkpoint", str(path),
                             "--dataset", "fashion_mnist", "--split", "test",
                             "--num-samples", str(s["eval_samples"]), "--num-reference", str(s["eval_reference"]),
                             "--batch-size", "50", "--num-steps", str(s["eval_steps"]),
                             "--cfg-scale", str(s["cfg_scale"]), "--seed", "0", "--output", str(result),
                             "--no-progress"])
        floor = out / "eval" / "real_train.json"
        if not floor.is_file():
            commands.append([sys.executable, "experiments/real_floor.py", "--image-size", str(s["image_size"]),
                             "--num-samples", str(s["eval_samples"]), "--num-reference", str(s["eval_reference"]),
                             "--output", str(floor)])
        with ThreadPoolExecutor(args.jobs) as pool:  # evaluations are independent
            list(pool.map(run, commands))
    if "analyze" in stages:
        seed0 = ablation_seeds[0]
        pairs = [("analysis_gate_ablation", [(f"tp_M2_T2_s{seed0}", "tokens+timestep+class"),
                                             (f"gate_tokens_M2_T2_s{seed0}", "tokens only")]),
                 ("analysis_M5_T5", [(f"tp_M5_T5_s{seeds[0]}", "M=5, T=5")])]
        for folder, items in pairs:
            items = [(n, label) for n, label in items if n in runs]
            if not items:
                continue
            cmd = [sys.executable, "-m", "thinking_pixel", "analyze", "--output-dir", str(out / folder),
                   "--dataset", "fashion_mnist", "--num-images", str(s["analyze_images"]),
                   "--num-timesteps", str(s["analyze_timesteps"])]
            for n, label in items:
                cmd += ["--checkpoint", str(out / "runs" / n), "--label", label]
            run(cmd)
    if "table" in stages:
        run([sys.executable, "experiments/make_table.py", str(out), "--output", str(out / "results.md")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
