"""The default shapes run's recipe search (RESULTS.md, appendix "The training recipe of the default shapes run"):
train, then class accuracy.

    python experiments/shapes_recipe.py --out runs/shapes_recipe --jobs 2            # every setting below
    python experiments/shapes_recipe.py --out runs/shapes_recipe --only lr4 lr8      # some of them

Each setting is ``thinking-pixel train`` with the default recipe plus the setting's options (1 thread per job, so
``--jobs 2`` fills two cores), then ``thinking-pixel evaluate --metric accuracy`` on its EMA weights (the sample
command's sampler: DDPM 100 steps, CFG 4, seed 0). Resumable: a finished setting (its JSON exists) is skipped and
an interrupted run resumes from its last checkpoint. Train times are wall-clock with ``--jobs`` runs side by side,
so they compare settings within one invocation only; the default run's idle time is measured on its own.
One line per setting goes to OUT/summary.jsonl; the evaluation JSONs are OUT/eval/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name: (training steps, options on top of `thinking-pixel train`'s defaults)
SETTINGS = {
    "lr1e-3_1000": (1000, ["--lr", "1e-3"]),
    "lr2e-3_1000": (1000, ["--lr", "2e-3"]),
    "lr4e-3_1000": (1000, ["--lr", "4e-3"]),
    "lr8e-3_1000": (1000, ["--lr", "8e-3"]),
    "lr2e-3_norecursion_1000": (1000, ["--lr", "2e-3", "--no-recursion"]),
    "lr2e-3_x0_1000": (1000, ["--lr", "2e-3", "--prediction", "x0"]),
    "lr1e-3_uniform_1000": (1000, ["--lr", "1e-3", "--min-snr-gamma", "0"]),
    "lr1e-3_batch128_1000": (1000, ["--lr", "1e-3", "--batch-size", "128"]),
    "lr1e-3_width256_1000": (1000, ["--lr", "1e-3", "--hidden-size", "256", "--num-heads", "4"]),
    "lr1e-3_depth8_1000": (1000, ["--lr", "1e-3", "--depth", "8"]),
    "lr1e-3_patch2_1000": (1000, ["--lr", "1e-3", "--patch-size", "2"]),
    "lr2e-3_3000": (3000, ["--lr", "2e-3"]),
    "lr4e-3_3000": (3000, ["--lr", "4e-3"]),
    "lr8e-3_3000": (3000, ["--lr", "8e-3"]),
    "lr4e-3_5000": (5000, ["--lr", "4e-3"]),
}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "thinking_pixel", *args]


def run_setting(out: Path, name: str, num_samples: int) -> dict:
    steps, options = SETTINGS[name]
    run_dir, result = out / "runs" / name, out / "eval" / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(_cli("train", "--output-dir", str(run_dir), "--max-steps", str(steps), "--threads", "1",
                        "--no-progress", "--no-sample-grid", *options), check=True)
    train_seconds = time.perf_counter() - start
    subprocess.run(_cli("evaluate", "--checkpoint", str(run_dir), "--metric", "accuracy", "--num-samples",
                        str(num_samples), "--threads", "1", "--output", str(result)), check=True)
    record = json.loads(result.read_text())
    line = {"name": name, "steps": steps, "options": options, "train_seconds": round(train_seconds),
            **{k: record[k] for k in ("accuracy", "shape_accuracy", "color_accuracy")},
            "x_std": record["placement"]["samples"]["x_std"], "size": record["placement"]["samples"]["size_mean"]}
    with open(out / "summary.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/shapes_recipe"))
    p.add_argument("--jobs", type=int, default=2, help="settings trained side by side (default 2)")
    p.add_argument("--num-samples", type=int, default=128, help="samples per accuracy evaluation (default 128)")
    p.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=None, help="run only these settings")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    names = args.only or list(SETTINGS)
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, record in zip(names, pool.map(lambda n: run_setting(args.out, n, args.num_samples), names)):
            print(f"{name:<28} accuracy {record['accuracy']:.3f}  shape {record['shape_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
