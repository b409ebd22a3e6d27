"""``thinking-pixel evaluate --benchmark frozenlake``: its run (argument handling only; the options are in
thinking_pixel._arguments, which the parser imports without torch)."""

from __future__ import annotations

import argparse
import json

from ..._arguments import FROZENLAKE_SAMPLING

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from .planner import evaluate_checkpoint

    if args.num_maps < 1:
        raise ValueError(f"--num-maps must be >= 1, got {args.num_maps}")
    halting = {k: v for k, v in (("mode", args.halting), ("threshold", args.halt_threshold)) if v is not None}
    sampling = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in FROZENLAKE_SAMPLING.items()}
    result = evaluate_checkpoint(
        args.checkpoint, args.output, num_maps=args.num_maps, sizes=args.map_sizes, max_steps=args.max_steps,
        **sampling, seed=args.seed, use_ema=args.use_ema, device=args.device,
        halting=halting or None)
    summary = {size: {k: r[k] for k in ("success_rate", "invalid_rate", "hole_rate", "timeout_rate", "path_ratio",
                                        "cell_accuracy", "mean_recursion_steps")}
               for size, r in result["sizes"].items()}
    print(json.dumps(summary), flush=True)
    return 0
