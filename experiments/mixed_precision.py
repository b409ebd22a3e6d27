"""bf16 autocast vs fp32 training at the paper's tau = 5 and rank 128: the same run twice, loss curves compared.

    python experiments/mixed_precision.py --max-steps 300 --out runs/mixed_precision [--threads 1]

Both runs use the same seed, so step s draws the same batch, timesteps, noise and Gumbel noise in both
(train.py seeds every step from (seed, step, rank)); the per-step losses differ only through the precision of
the forward and backward passes. The script trains (or resumes) both with ``thinking-pixel train``, then prints
the loss means over consecutive windows and the largest relative gap between the two curves' window means.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

# the default CPU preset (DiT-N/4 on 16 px shapes, recursion in the middle block) with the paper's rank and tau
ARGS = ["--rank", "128", "--tau", "5", "--no-sample-grid", "--no-progress"]


def window_means(path: Path, window: int) -> list[float]:
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines()]
    if not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"{path}: non-finite loss")
    return [sum(losses[i:i + window]) / len(losses[i:i + window]) for i in range(0, len(losses), window)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--out", default="runs/mixed_precision")
    parser.add_argument("--threads", default="1")
    args = parser.parse_args()
    out = Path(args.out)
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        cmd = [sys.executable, "-m", "thinking_pixel", "train", "--output-dir", str(out / name), "--max-steps",
               str(args.max_steps), "--threads", args.threads, *ARGS, *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    fp32, bf16 = (window_means(out / name / "metrics.jsonl", args.window) for name in ("fp32", "bf16"))
    print(f"steps | fp32 loss | bf16 loss | relative gap (window means of {args.window} steps)")
    for i, (a, b) in enumerate(zip(fp32, bf16)):
        print(f"{i * args.window + 1}-{min((i + 1) * args.window, args.max_steps)} | {a:.4f} | {b:.4f} | "
              f"{abs(b - a) / a:.2%}")
    print(f"largest relative gap: {max(abs(b - a) / a for a, b in zip(fp32, bf16)):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
