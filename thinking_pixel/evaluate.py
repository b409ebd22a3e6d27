"""Evaluation: generate class-balanced samples from a checkpoint (resumably) and score them with FID / KID.

``thinking-pixel evaluate --checkpoint RUN --num-samples 1000 --output eval.json``

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
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import _checkpoint as ckpt
from .diffusion import SAMPLERS
from .metrics import IS_UNAVAILABLE_REASON, compute_metrics, to_uint8

__all__ = ["add_arguments", "evaluate_checkpoint", "generate_samples", "real_subset", "reference_images", "run"]

SETTINGS = "settings.json"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--benchmark", choices=("fid", "frozenlake"), default="fid",
                        help="fid: FID/KID/precision/recall of class samples (default); frozenlake: planner rollouts "
                             "on held-out maps (thinking_pixel.tasks.frozenlake.cli)")
    parser.add_argument("--checkpoint", required=True,
                        help="training output dir, step dir, or save_pretrained dir (config.json + model.safetensors)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--dataset", default=None,
                        help="real data to compare with (default: the checkpoint's training dataset, else fashion_mnist)")
    parser.add_argument("--data-dir", default=None, help="dataset location (default: the dataset's own default)")
    parser.add_argument("--split", default="test", help="dataset split for the reference images (default: test)")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated samples (default: 1000)")
    parser.add_argument("--num-reference", type=int, default=None,
                        help="real reference images (default: same as --num-samples)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per generation chunk (default: 64)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (default: 1.5)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler (default: ddim)")
    parser.add_argument("--num-steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--samples-dir", default=None,
                        help="where sample chunks are kept (default: <output without .json>_samples)")
    parser.add_argument("--output", default=None, help="metrics JSON file to write (required for fid)")
    parser.add_argument("--no-kid", dest="kid", action="store_false", help="skip KID")
    parser.add_argument("--no-prc", dest="prc", action="store_false", help="skip precision / recall")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is often faster on a busy machine")
    parser.add_argument("--halting", choices=("none", "learned", "delta"), default=None,
                        help="per-token halting of a ThinkingPixelDiT's recursion (default: the checkpoint's)")
    parser.add_argument("--halt-threshold", type=float, default=None,
                        help="halting threshold (learned: cumulative halting probability; delta: relative change)")
    from .tasks.frozenlake.cli import add_arguments as add_frozenlake_arguments

    add_frozenlake_arguments(parser.add_argument_group("frozenlake benchmark"))
    return parser


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def _generate_chunk(model, labels: torch.Tensor, *, seed: int, sampler: str, num_steps: int,
                    cfg_scale: float) -> torch.Tensor:
    """Samples for ``labels`` (n,) -> (n, C, H, W) uint8, with one generator seeded by ``seed``."""
    from .sample import generate

    images = generate(model, labels.tolist(), 1, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale,
                      seed=seed, batch_size=len(labels))
    return to_uint8(images.cpu())


def generate_samples(model, samples_dir: str | Path, num_samples: int, *, batch_size: int = 64, seed: int = 0,
                     sampler: str = "ddim", num_steps: int = 50, cfg_scale: float = 1.5,
                     settings: dict | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate (or resume generating) ``num_samples`` class-balanced samples into ``samples_dir``.

    Returns (images (num_samples, C, H, W) uint8, labels (num_samples,) int64). ``settings``: extra facts that
    identify the samples (e.g. the checkpoint path); a rerun whose settings differ from the stored ones fails.
    """
    _check_positive(num_samples=num_samples, batch_size=batch_size, num_steps=num_steps)
    samples_dir = Path(samples_dir)
    samples_dir.mkdir(parents=True, exist_ok=True)
    identity = dict(settings or {}, num_samples=num_samples, batch_size=batch_size, seed=seed, sampler=sampler,
                    num_steps=num_steps, cfg_scale=cfg_scale)
    settings_path = samples_dir / SETTINGS
    if settings_path.is_file():
        stored = json.loads(settings_path.read_text())
        if stored != identity:
            diff = {k: (stored.get(k), identity.get(k)) for k in set(stored) | set(identity)
                    if stored.get(k) != identity.get(k)}
            raise ValueError(f"{samples_dir} holds samples made with other settings ({diff}, as stored vs now); "
                             "use another --samples-dir or delete it")
    else:
        settings_path.write_text(json.dumps(identity, indent=2) + "\n")

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
                                        num_steps=num_steps, cfg_scale=cfg_scale)
                _atomic_torch_save({"images": chunk, "labels": chunk_labels}, path)
            images.append(chunk)
            bar.update(len(chunk_labels))
    return torch.cat(images), labels


def _dataset_options(name: str, **wanted) -> dict:
    """The subset of ``wanted`` constructor options that dataset ``name`` accepts."""
    from .data import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    accepted = set(inspect.signature(DATASETS[name].__init__).parameters)
    return {k: v for k, v in wanted.items() if k in accepted}


def real_subset(dataset: str, num_images: int, *, image_size: int, num_channels: int, split: str = "test",
                data_dir: str | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed seeded subset of ``num_images`` real images, preprocessed like training data.

    Returns (images (N, C, S, S) float in [-1, 1], labels (N,) int64).
    """
    from .data import make_dataset

    _check_positive(num_images=num_images)
    options = _dataset_options(dataset, split=split, num_channels=num_channels)
    if split != "test" and "split" not in options:
        raise ValueError(f"dataset {dataset!r} has no splits; --split {split!r} cannot be used")
    ds = make_dataset(dataset, root=data_dir, image_size=image_size, **options)
    if ds.is_latent:
        raise ValueError(f"dataset {dataset!r} holds VAE latents; only pixel datasets are supported here")
    if num_images > len(ds):
        raise ValueError(f"{num_images} images requested but {dataset}/{split} has only {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num_images]
    items = [ds[i] for i in order.tolist()]
    images = torch.stack([image for image, _ in items])  # (N, C, S, S)
    if images.shape[1:] != (num_channels, image_size, image_size):
        raise ValueError(f"{dataset} gives images of shape {tuple(images.shape[1:])}, the model works on "
                         f"{(num_channels, image_size, image_size)}")
    return images, torch.tensor([label for _, label in items], dtype=torch.long)


def reference_images(dataset: str, num_images: int, **kwargs) -> torch.Tensor:
    """:func:`real_subset`'s images rounded to uint8 like generated samples: (N, C, S, S)."""
    return to_uint8(real_subset(dataset, num_images, **kwargs)[0])


def evaluate_checkpoint(checkpoint: str | Path, output: str | Path, *, dataset: str | None = None,
                        data_dir: str | None = None, split: str = "test", num_samples: int = 1000,
                        num_reference: int | None = None, batch_size: int = 64, cfg_scale: float = 1.5,
                        sampler: str = "ddim", num_steps: int = 50, seed: int = 0, samples_dir: str | None = None,
                        use_ema: bool = True, kid: bool = True, prc: bool = True, device: str = "auto",
                        progress: bool = True, halting: dict | None = None) -> dict:
    """Sample from ``checkpoint``, compute FID/KID/precision/recall against real data and write the result JSON to ``output``."""
    output = Path(output)
    num_reference = num_samples if num_reference is None else num_reference
    _check_positive(num_samples=num_samples, num_reference=num_reference, batch_size=batch_size)
    weights = ckpt.resolve_weights_dir(checkpoint, ema=use_ema)
    step_dir = ckpt.find_step_dir(weights)
    train_config = ckpt.load_train_config(step_dir) if step_dir is not None else {}
    if dataset is None:
        dataset = train_config.get("dataset", "fashion_mnist")
        data_dir = data_dir if data_dir is not None else train_config.get("data_dir")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ckpt.load_model_dir(weights, device=device).eval()
    cfg = model.config
    recursive = hasattr(model, "set_halting")
    if halting:
        if not recursive:
            raise ValueError(f"halting settings need a ThinkingPixelDiT, {checkpoint} holds a {type(model).__name__}")
        model.set_halting(**halting)

    # Real data first: a dataset that does not fit the model fails before any sampling time is spent.
    real = reference_images(dataset, num_reference, image_size=cfg.input_size, num_channels=cfg.in_channels,
                            split=split, data_dir=data_dir)
    samples_dir = Path(samples_dir) if samples_dir is not None else output.with_name(output.stem + "_samples")
    started = time.time()
    images, labels = generate_samples(
        model, samples_dir, num_samples, batch_size=batch_size, seed=seed, sampler=sampler, num_steps=num_steps,
        cfg_scale=cfg_scale, settings={"checkpoint": str(weights.resolve()),
                                       **({"halting": model.recursion.halting,
                                           "halt_threshold": model.recursion.halt_threshold} if halting else {})},
        progress=progress)
    sampling_seconds = time.time() - started

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


def set_threads(threads: int | None) -> None:
    """Apply a --threads option (None: keep torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """The ``thinking-pixel evaluate`` command: prints the headline metrics; the full result goes to --output."""
    set_threads(args.threads)
    if args.benchmark == "frozenlake":
        from .tasks.frozenlake.cli import run as run_frozenlake

        return run_frozenlake(args)
    if args.output is None:
        raise ValueError("--output is required for --benchmark fid")
    result = evaluate_checkpoint(
        args.checkpoint, args.output, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
        num_samples=args.num_samples, num_reference=args.num_reference, batch_size=args.batch_size,
        cfg_scale=args.cfg_scale, sampler=args.sampler, num_steps=args.num_steps, seed=args.seed,
        samples_dir=args.samples_dir, use_ema=args.use_ema, kid=args.kid, prc=args.prc, device=args.device,
        progress=args.progress,
        halting={k: v for k, v in (("mode", args.halting), ("threshold", args.halt_threshold)) if v is not None})
    summary = {k: result[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "mean_recursion_steps")
               if k in result}
    print(json.dumps(summary), flush=True)
    return 0
