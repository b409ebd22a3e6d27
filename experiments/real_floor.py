"""The FID / KID of real images against the evaluation reference: the floor that a perfect model would reach
with the same number of samples (FID on few samples is biased upwards, so this floor is far from 0).

    python experiments/real_floor.py --num-samples 64 --num-reference 256 --image-size 16 --output eval/real_train.json

The "samples" are a seeded subset of the training split, preprocessed and rounded exactly like generated samples;
the reference is the same test-split subset ``thinking-pixel evaluate`` uses (and shares its feature cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from thinking_pixel.datasets import reference_images
from thinking_pixel.metrics import IS_UNAVAILABLE_REASON, compute_metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--num-channels", type=int, default=1)
    parser.add_argument("--num-samples", type=int, required=True, help="real training images standing in for samples")
    parser.add_argument("--num-reference", type=int, required=True, help="test images (as in thinking-pixel evaluate)")
    parser.add_argument("--seed", type=int, default=1, help="subset seed of the training images (default: 1)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    common = dict(image_size=args.image_size, num_channels=args.num_channels)
    samples = reference_images(args.dataset, args.num_samples, split="train", seed=args.seed, **common)
    real = reference_images(args.dataset, args.num_reference, split="test", **common)
    cache_name = f"{args.dataset}-test-{args.image_size}px-{args.num_channels}ch-n{args.num_reference}"
    metrics = compute_metrics(samples, real, reference_cache_name=cache_name, prc=True)
    result = {"checkpoint": None, "model_class": "real data (train split)", "dataset": args.dataset,
              "split": "test", "samples_split": "train", "image_size": args.image_size, "seed": args.seed,
              **metrics, "isc": None, "isc_unavailable": IS_UNAVAILABLE_REASON}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
