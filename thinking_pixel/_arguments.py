"""Argument definitions that must stay cheap to import: ``thinking-pixel --help`` and argument errors never
import torch, diffusers or the evaluation code (the commands import them once the arguments are valid).

Names that registries in heavy modules own (datasets, samplers) are plain constants here; tests check that
they match :data:`thinking_pixel.datasets.DATASETS` and :data:`thinking_pixel.diffusion.SAMPLERS`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["DATA_DIR_REQUIRED", "DATASET_NAMES", "IMAGE_EXTENSIONS", "SAMPLER_NAMES", "add_analyze_arguments",
           "add_compositional_arguments", "add_evaluate_arguments",
           "add_frozenlake_arguments", "add_halting_arguments", "GUIDANCE_INTERVAL",
           "check_image_output", "timestep_interval"]

DATASET_NAMES = ("captions", "compositional", "digits", "fashion_mnist", "folder", "frozenlake", "latents", "shapes")
DATA_DIR_REQUIRED = ("captions", "folder", "latents")  # datasets whose files have no default location
SAMPLER_NAMES = ("ddpm", "ddim", "dpm")
METRIC_NAMES = ("fid", "accuracy")
BENCHMARK_NAMES = ("fid", "compositional", "frozenlake")
# the compositional benchmark's sampling when none is given (flow-matching Euler)
COMPOSITIONAL_SAMPLING = {"cfg_scale": 4.0, "num_steps": 28}
FROZENLAKE_SAMPLING = {"sampler": "ddim", "num_steps": 20}
# class-conditional sampling guides only the low-noise timesteps 0..300 by default: guiding the high-noise ones,
# where the layout is decided, makes objects larger and more central than the data's (RESULTS.md, "Where the
# objects sit"); the class is still read right (shapes default run: accuracy 0.97 vs 0.99 guiding every step)
GUIDANCE_INTERVAL = (0, 300)
HALTING_MODES = ("none", "learned", "delta")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def check_image_output(path, argument: str = "--output") -> Path:
    """``path`` if an image can be written there; otherwise a ValueError naming ``argument`` and the problem.

    Checked before any work: the parent directory must exist (it is not created, a typo should not make
    directories) and be a directory, and the extension must name an image format.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{argument} {str(path)!r}: unknown image extension {path.suffix or '(none)'!r}; "
                         f"expected one of {', '.join(IMAGE_EXTENSIONS)}")
    if path.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is a directory; expected an image file path")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"{argument} {str(path)!r}: directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"{argument} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    return path


def timestep_interval(text: str) -> tuple:
    """argparse type of --cfg-interval: "LO,HI" -> (LO, HI)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or not 0 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI timesteps with 0 <= LO <= HI, got {text!r}")
    return values


def _add_weights_and_data_arguments(parser: argparse.ArgumentParser, data_use: str, split_use: str) -> None:
    """--no-ema, --dataset, --data-dir, --split: which weights of a checkpoint, and which real data, ``data_use``."""
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--dataset", default=None,
                        help=f"{data_use} (default: the checkpoint's training dataset, else fashion_mnist)")
    parser.add_argument("--data-dir", default=None, help="dataset location (default: the dataset's own default)")
    parser.add_argument("--split", default="test", help=f"dataset split{' ' + split_use if split_use else ''} (default: test)")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", required=True,
                        help="training output dir, step dir, or save_pretrained dir (config.json + model.safetensors)")
    _add_weights_and_data_arguments(parser, "real data to compare with", "for the reference images")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated samples (default: 1000)")
    parser.add_argument("--num-reference", type=int, default=None,
                        help="real reference images (default: same as --num-samples)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per generation chunk (default: 64)")
    parser.add_argument("--metric", choices=METRIC_NAMES, default="fid",
                        help="fid: FID/KID/precision/recall against real data; accuracy: shape and colour of "
                             "class-conditional shapes samples, read by a classical-vision detector (default: fid)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: 1.5 for fid, the sample command's for accuracy)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                        help="sampler (default: ddim for fid, the sample command's for accuracy)")
    parser.add_argument("--cfg-interval", type=timestep_interval, default=None,
                        help="with --metric accuracy: guide only at timesteps LO..HI, 0,999 for every step (default: "
                             "the sample command's, 0,300)")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="sampling steps (default: 50 for fid, the sample command's for accuracy)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--samples-dir", default=None,
                        help="where sample chunks are kept (default: <output without .json>_samples)")
    parser.add_argument("--output", default=None,
                        help="metrics JSON file to write (required, except for --benchmark frozenlake)")
    parser.add_argument("--no-kid", dest="kid", action="store_false", help="skip KID")
    parser.add_argument("--no-prc", dest="prc", action="store_false", help="skip precision / recall")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is often faster on a busy machine")
    parser.add_argument("--benchmark", choices=BENCHMARK_NAMES, default="fid",
                        help="fid: the --metric above on a class-conditional model; compositional: GenEval's "
                             "protocol on the shapes world (text-to-image models); frozenlake: planner rollouts on "
                             "held-out maps")
    add_halting_arguments(parser)
    add_compositional_arguments(parser)
    add_frozenlake_arguments(parser)
    return parser


def add_halting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--halting", choices=HALTING_MODES, default=None,
                        help="per-token halting of a ThinkingPixelDiT's recursion (default: the checkpoint's)")
    parser.add_argument("--halt-threshold", type=float, default=None,
                        help="halting threshold (learned: cumulative halting probability; delta: relative change; "
                             "default: the mode's)")


def _map_sizes(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated map sizes like 4,5,6, got {text!r}") from None


def add_frozenlake_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("--benchmark frozenlake", "image-conditioned planners; --sampler defaults to "
                                  f"{FROZENLAKE_SAMPLING['sampler']}, --num-steps to {FROZENLAKE_SAMPLING['num_steps']}")
    g.add_argument("--num-maps", type=int, default=100, help="held-out maps per size (default 100)")
    g.add_argument("--map-sizes", type=_map_sizes, default=None,
                   help="map sizes to roll out on (default: the training size up to the model's canvas)")
    g.add_argument("--max-steps", type=int, default=None, help="moves per rollout (default: the map's tiles)")


def add_compositional_arguments(parser: argparse.ArgumentParser) -> None:
    cfg_scale, num_steps = COMPOSITIONAL_SAMPLING["cfg_scale"], COMPOSITIONAL_SAMPLING["num_steps"]
    g = parser.add_argument_group("--benchmark compositional", "text-to-image checkpoints; --cfg-scale defaults to "
                                  f"{cfg_scale}, --num-steps to {num_steps} (flow-matching Euler)")
    g.add_argument("--prompts-per-tag", type=int, default=25, help="prompts per GenEval tag and split (default 25)")
    g.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4, as GenEval)")
    g.add_argument("--prompt-seed", type=int, default=0, help="which prompts are drawn (default 0)")
    g.add_argument("--recursion-steps", type=int, default=None,
                   help="run the recursion with T' <= T latent steps (truncation at fixed weights; default: T)")


def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a ThinkingPixelDiT checkpoint; repeat to compare (e.g. the gate-input ablation)")
    parser.add_argument("--label", action="append", default=None,
                        help="a name per --checkpoint for the figures (default: the directory names)")
    parser.add_argument("--output-dir", required=True, help="directory for the PNGs and routing_stats.json")
    _add_weights_and_data_arguments(parser, "real images to noise", "")
    parser.add_argument("--num-images", type=int, default=100, help="real images per timestep (default: 100)")
    parser.add_argument("--num-timesteps", type=int, default=10,
                        help="evenly spaced diffusion timesteps in [0, 999] (default: 10)")
    parser.add_argument("--layer", type=int, default=None,
                        help="recursive block for the trajectory / decode figures (default: the first)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="image subset and noise seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is often faster on a busy machine")
    return parser
