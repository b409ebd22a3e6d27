"""``thinking-pixel evaluate --benchmark frozenlake``: its options and its run (argument handling only)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def _sizes(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated map sizes like 4,5,6, got {text!r}") from None


def add_arguments(group) -> None:
    """The frozenlake options (--sampler, --num-steps, --seed, --checkpoint, --output, --no-ema, --device,
    --halting, --halt-threshold are the evaluate command's own)."""
    group.add_argument("--num-maps", type=int, default=100, help="held-out maps per size (default 100)")
    group.add_argument("--map-sizes", type=_sizes, default=None,
                       help="map sizes to roll out on (default: the training size up to the model's canvas)")
    group.add_argument("--max-steps", type=int, default=None, help="moves per rollout (default: the map's tiles)")


def run(args: argparse.Namespace) -> int:
    from .planner import evaluate_checkpoint

    if args.num_maps < 1:
        raise ValueError(f"--num-maps must be >= 1, got {args.num_maps}")
    halting = {k: v for k, v in (("mode", args.halting), ("threshold", args.halt_threshold)) if v is not None}
    result = evaluate_checkpoint(
        args.checkpoint, args.output, num_maps=args.num_maps, sizes=args.map_sizes, max_steps=args.max_steps,
        sampler=args.sampler, num_steps=args.num_steps, seed=args.seed, use_ema=args.use_ema, device=args.device,
        halting=halting or None)
    summary = {size: {k: r[k] for k in ("success_rate", "invalid_rate", "hole_rate", "timeout_rate", "path_ratio",
                                        "cell_accuracy", "mean_recursion_steps")}
               for size, r in result["sizes"].items()}
    print(json.dumps(summary), flush=True)
    return 0
