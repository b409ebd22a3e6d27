"""Evaluation: generate class-balanced samples from a checkpoint (resumably) and score them with FID / KID,
or (``--metric accuracy``, shapes models) with the shape and colour a classical-vision detector reads in them.

``thinking-pixel evaluate --checkpoint RUN --num-samples 1000 --output eval.json``
``thinking-pixel evaluate --checkpoint RUN --metric accuracy --output acc.json``

- Samples: sample ``i`` has class ``i % num_classes``. They are generated in chunks of ``--batch-size``; chunk
  ``c`` uses a generator seeded from (seed, c), so the images do not depend on how often the run was
  interrupted. Each finished chunk is written atomically to ``<samples-dir>/chunk_XXXXX.pt`` (uint8 images +
  labels); a rerun with the same settings loads the finished chunks and generates only the missing ones.
  ``settings.json`` in the samples dir records what the samples are; a rerun with different settings is refused.
- Reference: ``--num-reference`` real images of ``--dataset`` / ``--split`` (a fixed seeded subset), preprocessed
  exactly like training data (resized to the model's resolution), rounded to uint8 like the samples. Their
  Inception features and statistics are cached per dataset / split / size / count (see :mod:`.metrics.fid`).
- Metrics: FID and KID via torch-fidelity with the offline InceptionV3; IS is not available offline (no logits in
  the bundled weights) and is reported as null with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import _run_dir as ckpt
from ._arguments import GUIDANCE_INTERVAL
from ._arguments import add_evaluate_arguments as add_arguments
from ._checks import check_positive_ints
from ._runtime import resolve_device, set_threads
from ._samples import atomic_torch_save, check_sample_settings, checkpoint_identity, samples_dir_for
from .checkpoints import load_model_dir
from .datasets import make_dataset, reference_images
from .metrics import IS_UNAVAILABLE_REASON, compute_metrics, to_uint8
from .metrics.accuracy import class_accuracy, main_objects, placement, placement_match
from .sample import apply_halting, generate
from .train_config import TrainConfig

__all__ = ["add_arguments", "evaluate_accuracy", "evaluate_checkpoint", "generate_samples", "run"]
# Sampling settings when none are given: FID's usual ones, and for accuracy those of `thinking-pixel sample`
# (the grid a user looks at).
DEFAULT_SAMPLING = {"fid": {"sampler": "ddim", "num_steps": 50, "cfg_scale": 1.5},
                    "accuracy": {"sampler": "ddpm", "num_steps": 100, "cfg_scale": 4.0,
                                 "cfg_interval": GUIDANCE_INTERVAL}}
# Training images the samples' positions and sizes are compared with: more than a typical sample count, so the
# data's side of the comparison is not the noisy one (their std at 256 images is off by up to 10%).
PLACEMENT_DATA_IMAGES = 2048


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def _generate_chunk(model, labels: torch.Tensor, *, seed: int, sampler: str, num_steps: int,
                    cfg_scale: float, cfg_interval: tuple[int, int] | None = None) -> torch.Tensor:
    """Samples for ``labels`` (n,) -> (n, C, H, W) uint8, with one generator seeded by ``seed``."""
    images = generate(model, labels.tolist(), 1, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale,
                      cfg_interval=cfg_interval, seed=seed, batch_size=len(labels))
    return to_uint8(images.cpu())


def generate_samples(model, samples_dir: str | Path, num_samples: int, *, batch_size: int = 64, seed: int = 0,
                     sampler: str = "ddim", num_steps: int = 50, cfg_scale: float = 1.5,
                     cfg_interval: tuple[int, int] | None = None, settings: dict | None = None,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate (or resume generating) ``num_samples`` class-balanced samples into ``samples_dir``.

    Returns (images (num_samples, C, H, W) uint8, labels (num_samples,) int64). ``settings``: extra facts that
    identify the samples (e.g. the checkpoint path); a rerun whose settings differ from the stored ones fails.
    """
    check_positive_ints(num_samples=num_samples, batch_size=batch_size, num_steps=num_steps)
    samples_dir = Path(samples_dir)
    samples_dir.mkdir(parents=True, exist_ok=True)
    identity = dict(settings or {}, num_samples=num_samples, batch_size=batch_size, seed=seed, sampler=sampler,
                    num_steps=num_steps, cfg_scale=cfg_scale)
    if cfg_interval is not None:  # only when set, so sample dirs written before the option still match
        identity["cfg_interval"] = list(cfg_interval)
    check_sample_settings(samples_dir, identity)

    num_classes = model.config.num_classes
    labels = torch.arange(num_samples) % num_classes  # (num_samples,), balanced classes
    chunks = list(enumerate(labels.split(batch_size)))
    images = []
    with tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress) as bar:
        for c, chunk_labels in chunks:
            path = samples_dir / f"chunk_{c:05d}.pt"
            if path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if not torch.equal(saved["labels"], chunk_labels):
                    raise ValueError(f"{path} does not hold the expected labels; the samples dir is corrupt")
                chunk = saved["images"]
            else:
                chunk = _generate_chunk(model, chunk_labels, seed=_chunk_seed(seed, c), sampler=sampler,
                                        num_steps=num_steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval)
                atomic_torch_save({"images": chunk, "labels": chunk_labels}, path)
            images.append(chunk)
            bar.update(len(chunk_labels))
    return torch.cat(images), labels


def _timed_samples(model, weights: Path, samples_dir: Path, num_samples: int, **options):
    """:func:`generate_samples` for the checkpoint at ``weights``: (images, labels, seconds taken). The weights'
    fingerprint and the halting rule are part of the samples' settings, so chunks made by other weights (also at the
    same path) or under another rule are never reused."""
    recursion = getattr(model, "recursion", None)
    halting = {} if getattr(recursion, "halting", "none") == "none" else {
        "halting": recursion.halting, "halt_threshold": recursion.halt_threshold}
    started = time.time()
    settings = {**checkpoint_identity(weights), **halting}
    images, labels = generate_samples(model, samples_dir, num_samples, settings=settings, **options)
    return images, labels, time.time() - started


def evaluate_checkpoint(checkpoint: str | Path, output: str | Path, *, dataset: str | None = None,
                        data_dir: str | None = None, split: str = "test", num_samples: int = 1000,
                        num_reference: int | None = None, batch_size: int = 64, cfg_scale: float = 1.5,
                        sampler: str = "ddim", num_steps: int = 50, seed: int = 0, samples_dir: str | None = None,
                        use_ema: bool = True, kid: bool = True, prc: bool = True, device: str = "auto",
                        progress: bool = True, halting: dict | None = None) -> dict:
    """Sample from ``checkpoint``, compute FID/KID/precision/recall against real data and write the result JSON to ``output``."""
    output = Path(output)
    num_reference = num_samples if num_reference is None else num_reference
    check_positive_ints(num_samples=num_samples, num_reference=num_reference, batch_size=batch_size)
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    step_dir = ckpt.find_step_dir(weights)
    saved = TrainConfig.load(step_dir) if step_dir is not None else None  # None: weights saved outside a run
    if dataset is None:
        dataset = saved.data.dataset if saved is not None else "fashion_mnist"
        data_dir = data_dir if data_dir is not None or saved is None else saved.data.data_dir
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model_dir(weights, device=device).eval()
    cfg = model.config
    recursive = apply_halting(model, halting, checkpoint)

    # Real data first: a dataset that does not fit the model fails before any sampling time is spent.
    real = reference_images(dataset, num_reference, image_size=cfg.input_size, num_channels=cfg.in_channels,
                            split=split, data_dir=data_dir)
    samples_dir = samples_dir_for(output, samples_dir)
    images, labels, sampling_seconds = _timed_samples(
        model, weights, samples_dir, num_samples, batch_size=batch_size, seed=seed, sampler=sampler,
        num_steps=num_steps, cfg_scale=cfg_scale, progress=progress)

    cache_name = f"{dataset}-{split}-{cfg.input_size}px-{cfg.in_channels}ch-n{num_reference}"
    if data_dir is not None:  # another copy of the data may differ: keep its statistics apart
        cache_name += "-" + hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    started = time.time()
    metrics = compute_metrics(images, real, reference_cache_name=cache_name, kid=kid, prc=prc,
                              verbose=progress)
    metric_seconds = time.time() - started

    step = None
    if step_dir is not None and step_dir.name.startswith("step_"):
        step = int(step_dir.name.split("_")[1])
    result = {
        "checkpoint": str(weights),
        "step": step,
        "model_class": type(model).__name__,
        "recursion": model.recursion.to_dict() if hasattr(model, "recursion") else None,
        "dataset": dataset,
        "split": split,
        "image_size": cfg.input_size,
        "sampler": sampler,
        "num_steps": num_steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "use_ema": use_ema,
        **metrics,
        "isc": None,
        "isc_unavailable": IS_UNAVAILABLE_REASON,
        # over the chunks sampled by this call (None if every chunk was loaded from an earlier run)
        "mean_recursion_steps": model.mean_recursion_steps() if recursive else None,
        "samples_dir": str(samples_dir),
        "sampling_seconds": round(sampling_seconds, 1),
        "metric_seconds": round(metric_seconds, 1),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_accuracy(checkpoint: str | Path, output: str | Path, *, num_samples: int = 1000, batch_size: int = 64,
                      cfg_scale: float = 4.0, cfg_interval: tuple[int, int] | None = GUIDANCE_INTERVAL,
                      sampler: str = "ddpm", num_steps: int = 100, seed: int = 0, samples_dir: str | None = None,
                      use_ema: bool = True, device: str = "auto",
                      progress: bool = True, halting: dict | None = None) -> dict:
    """Class accuracy of a class-conditional ``shapes`` checkpoint and its spread of positions and sizes.

    Samples are class-balanced (as for FID, resumable in ``samples_dir``); the data's spread is measured the same
    way on max(num_samples, PLACEMENT_DATA_IMAGES) training images, and ``placement["match"]`` compares the two
    (metrics.accuracy.placement_match). Writes and returns the result JSON.
    """
    output = Path(output)
    check_positive_ints(num_samples=num_samples, batch_size=batch_size)
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    step_dir = ckpt.find_step_dir(weights)
    saved = TrainConfig.load(step_dir) if step_dir is not None else None  # None: weights saved outside a run
    if saved is not None and saved.data.dataset != "shapes":
        raise ValueError(f"--metric accuracy needs a model trained on the shapes dataset; {checkpoint} was trained "
                         f"on {saved.data.dataset!r}")
    model = load_model_dir(weights, device=resolve_device(device)).eval()
    recursive = apply_halting(model, halting, checkpoint)
    cfg = model.config
    data = make_dataset("shapes", image_size=cfg.input_size, seed=saved.run.seed if saved is not None else 0)
    if cfg.num_classes != data.num_classes or cfg.in_channels != 3:
        raise ValueError(f"the model has {cfg.num_classes} classes and {cfg.in_channels} channels; the shapes "
                         f"dataset has {data.num_classes} classes of RGB images")

    samples_dir = samples_dir_for(output, samples_dir)
    images, labels, sampling_seconds = _timed_samples(
        model, weights, samples_dir, num_samples, batch_size=batch_size, seed=seed, sampler=sampler,
        num_steps=num_steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval, progress=progress)
    parts = [data.label_parts(y) for y in range(data.num_classes)]
    found = main_objects(images)
    real = [data.render(i) for i in range(min(max(num_samples, PLACEMENT_DATA_IMAGES), len(data)))]  # class-balanced
    real_found = main_objects([image for image, _ in real])
    real_accuracy = class_accuracy(real_found, [y for _, y in real], parts, list(data.class_names))
    result = {
        "checkpoint": str(weights),
        "step": int(step_dir.name.split("_")[1]) if step_dir is not None and step_dir.name.startswith("step_") else None,
        "model_class": type(model).__name__,
        "recursion": model.recursion.to_dict() if hasattr(model, "recursion") else None,
        "image_size": cfg.input_size, "num_samples": num_samples, "sampler": sampler, "num_steps": num_steps,
        "cfg_scale": cfg_scale, "cfg_interval": None if cfg_interval is None else list(cfg_interval), "seed": seed,
        "use_ema": use_ema,
        **class_accuracy(found, labels.tolist(), parts, list(data.class_names)),
        "placement": {"samples": placement(found, cfg.input_size), "data": placement(real_found, cfg.input_size),
                      "match": placement_match(found, real_found, cfg.input_size)},
        "data_accuracy": real_accuracy["accuracy"],  # the detector on training images: its own error rate
        # over the chunks sampled by this call (None if every chunk was loaded from an earlier run)
        "mean_recursion_steps": model.mean_recursion_steps() if recursive else None,
        "samples_dir": str(samples_dir),
        "sampling_seconds": round(sampling_seconds, 1),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(args: argparse.Namespace) -> int:
    """The ``thinking-pixel evaluate`` command: prints the headline metrics; the full result goes to --output."""
    if args.output is not None and args.benchmark != "frozenlake":
        print(f"writing {args.output}; samples kept in {samples_dir_for(args.output, args.samples_dir)} (a rerun "
              "resumes from them; --samples-dir puts them elsewhere)", flush=True)
    if args.benchmark == "compositional":
        from .text_to_image.geneval import run as run_compositional

        return run_compositional(args)
    set_threads(args.threads)
    if args.benchmark == "frozenlake":
        from .tasks.frozenlake.cli import run as run_frozenlake

        return run_frozenlake(args)
    if args.output is None:
        raise ValueError(f"--output is required for --benchmark {args.benchmark}")
    sampling = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULT_SAMPLING[args.metric].items()}
    if args.metric == "fid" and args.cfg_interval is not None:
        raise ValueError("--cfg-interval is only available with --metric accuracy")
    halting = {k: v for k, v in (("mode", args.halting), ("threshold", args.halt_threshold)) if v is not None}
    if args.metric == "accuracy":
        result = evaluate_accuracy(
            args.checkpoint, args.output, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
            samples_dir=args.samples_dir, use_ema=args.use_ema, device=args.device, progress=args.progress,
            halting=halting, **sampling)
        keys = ("accuracy", "shape_accuracy", "color_accuracy", "mean_recursion_steps")
    else:
        result = evaluate_checkpoint(
            args.checkpoint, args.output, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
            num_samples=args.num_samples, num_reference=args.num_reference, batch_size=args.batch_size,
            seed=args.seed, samples_dir=args.samples_dir, use_ema=args.use_ema, kid=args.kid, prc=args.prc,
            device=args.device, progress=args.progress, halting=halting, **sampling)
        keys = ("fid", "kid_mean", "kid_std", "precision", "recall", "mean_recursion_steps")
    summary = {k: result[k] for k in keys if result.get(k) is not None}
    print(json.dumps(summary), flush=True)
    return 0
