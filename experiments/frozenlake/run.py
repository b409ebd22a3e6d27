"""The FrozenLake case study and the adaptive-depth (halting) measurements, end to end, resumably.

    python experiments/frozenlake/run.py --out runs/frozenlake --jobs 4        # everything
    python experiments/frozenlake/run.py --out runs/frozenlake --stages train,eval

The paper's fine-tuning protocol (as experiments/run.py), sized for a busy 2-core CPU:
  train    base: an image-conditioned DiT (4 blocks, width 64, patch 4: one token per tile) trained from scratch
           (seed 0, ``--base-steps`` steps of batch 32 at lr 4e-3, the shapes recipe of RESULTS.md: v prediction,
           Min-SNR-5, cosine lr) on 4x4 lakes in a 5x5-tile canvas (20 px).
           Then, from its EMA weights, for every seed in ``--seeds`` (ponder: ``--ponder-seeds``), ``--ft-steps``:
             dit_continued  the plain DiT trained further (all weights)
             tp_M2_T2       ThinkingPixel (base frozen): M=2 experts, T=2 latent steps in the middle block
             tp_M2_T5       M=2, T=5
             ponder_M2_T5   M=2, T=5 with a learned halting head (PonderNet, geometric prior 0.5)
  eval     rollouts on ``--num-maps`` held-out 4x4 maps and 5x5 maps (larger than in training), DDIM 20 steps
  halting  the T=5 runs of the first seed re-evaluated with per-token halting: the delta rule at several thresholds, and the
           learned rule at several thresholds (ponder only)
  figures  per-recursion-step decoded predictions for a few maps, failures included (first seed; 5x5 and 4x4 lakes)
Every command is appended to OUT/commands.sh; experiments/frozenlake/make_table.py summarises OUT.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# EMA 0.995: a horizon of ~200 steps, right for runs of about a thousand steps (the default 0.999 would still
# average in the first few hundred steps at the end).
MODEL = ["--dataset", "frozenlake", "--image-size", "20", "--hidden-size", "64", "--batch-size", "32",
         "--ema-decay", "0.995", "--checkpoint-every", "200", "--threads", "1", "--no-progress"]
# Learning rates pinned here, not taken from `thinking-pixel train`'s defaults, so that the protocol stays fixed:
# the base at 4e-3 (at 1e-3, runs of 4000-12000 steps never made a valid move: RESULTS.md), the fine-tuning at 1e-3.
BASE_LR = ["--lr", "4e-3"]
FINETUNE_LR = ["--lr", "1e-3"]
BASE = "base_s0"
VARIANTS = {
    "dit_continued": ["--no-recursion"],
    "tp_M2_T2": ["--experts", "2", "--recursion-steps", "2"],
    "tp_M2_T5": ["--experts", "2", "--recursion-steps", "5"],
    "ponder_M2_T5": ["--experts", "2", "--recursion-steps", "5", "--halting", "learned"],
}
DELTA_THRESHOLDS = ("0.05", "0.1", "0.2", "0.4")
LEARNED_THRESHOLDS = ("0.3", "0.5", "0.7", "0.9")


class Runner:
    def __init__(self, out: Path):
        self.log = out / "commands.sh"

    def __call__(self, cmd: list[str]) -> None:
        line = shlex.join(cmd)
        with open(self.log, "a") as f:
            f.write(line + "\n")
        print("+", line, flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)


def _python(*args) -> list[str]:
    return ["nice", "-n", "5", sys.executable, *args]


def _evaluate(run: Path, output: Path, num_maps: int, *extra) -> list[str]:
    return _python("-m", "thinking_pixel", "evaluate", "--benchmark", "frozenlake", "--checkpoint", str(run),
                   "--num-maps", str(num_maps), "--num-steps", "20", "--threads", "1", "--output", str(output), *extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/frozenlake"))
    p.add_argument("--base-steps", type=int, default=8000, help="training steps of the base DiT")
    p.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps per variant")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ponder-seeds", default="0", help="seeds of the ponder_* variants (the halting curve)")
    p.add_argument("--num-maps", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--stages", default="train,eval,halting,figures")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    stages = args.stages.split(",")
    ponder_seeds = [int(s) for s in args.ponder_seeds.split(",")]
    runs = {f"{v}_s{s}": (v, s) for s in seeds for v in variants if not v.startswith("ponder") or s in ponder_seeds}

    def parallel(cmds):
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, cmds))

    if "train" in stages:
        base_cmd = _python("-m", "thinking_pixel", "train", *MODEL, *BASE_LR, "--no-recursion", "--seed", "0",
                           "--max-steps", str(args.base_steps), "--output-dir", str(out / "runs" / BASE))
        run(base_cmd)
        parallel([_python("-m", "thinking_pixel", "train", *MODEL, *FINETUNE_LR, *VARIANTS[v], "--finetune-from",
                          str(out / "runs" / BASE), "--seed", str(s), "--max-steps", str(args.ft_steps),
                          "--output-dir", str(out / "runs" / name))
                  for name, (v, s) in runs.items()])
    runs = {BASE: ("base", 0), **runs}
    if "eval" in stages:
        parallel([_evaluate(out / "runs" / name, out / "eval" / f"{name}.json", args.num_maps)
                  for name in runs if not (out / "eval" / f"{name}.json").exists()])
    if "halting" in stages:
        cmds = []
        for name, (v, s) in runs.items():
            if not v.endswith("_T5") or s != seeds[0]:
                continue
            rules = [("delta", th) for th in DELTA_THRESHOLDS]
            if v.startswith("ponder"):
                rules += [("learned", th) for th in LEARNED_THRESHOLDS]
            for mode, th in rules:
                path = out / "halting" / f"{name}_{mode}_{th}.json"
                if not path.exists():
                    cmds.append(_evaluate(out / "runs" / name, path, args.num_maps, "--halting", mode,
                                          "--halt-threshold", th))
        parallel(cmds)
    if "figures" in stages:
        cmds = []
        for name, (v, s) in runs.items():
            # the larger lakes (failures only so far) and the training size (successes and failures)
            for size, suffix in ((None, ""), ("4", "_4x4")):
                path = out / "figures" / f"recursion_steps_{name}{suffix}.png"
                if v.startswith(("tp", "ponder")) and s == seeds[0] and not path.exists():
                    cmds.append(_python("-m", "thinking_pixel.tasks.frozenlake.figures", "--checkpoint",
                                        str(out / "runs" / name), "--eval", str(out / "eval" / f"{name}.json"),
                                        "--output", str(path), *(["--size", size] if size else [])))
        parallel(cmds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
