"""A training output directory: its layout, atomic checkpoint writes, the ``latest`` pointer, and finding the
weights to load (loading them is :mod:`thinking_pixel.checkpoints`).

A training output directory looks like::

    out/
      latest                      text file: "checkpoints/step_0001000"  (replaced atomically)
      metrics.jsonl
      checkpoints/step_0001000/
        model/  config.json + model.safetensors      (save_pretrained of the trained model)
        ema/    config.json + model.safetensors      (the EMA copy)
        training_state.pt                             optimizer, EMA bookkeeping, RNG states, data order
        train_config.json                             the TrainConfig of the run

A step directory is assembled under a temporary name in ``checkpoints/``, fsynced (every file, then every
directory), renamed into place, and only then is ``latest`` re-pointed (itself written to a temporary file,
fsynced and renamed): a crash or ``kill -9`` at any moment leaves either the previous checkpoint or the new one,
never a half-written one. A failed write (full disk, read-only filesystem) removes its temporary directory and
raises a :class:`CheckpointError` that says the previous checkpoint is intact. Files and directories get the
permissions of the process's umask, like any other output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from ._fileio import atomic_write, fsync_dir, fsync_tree, make_temp_dir

__all__ = [
    "CheckpointError",
    "LATEST",
    "default_samples_path",
    "find_step_dir",
    "load_train_config",
    "prepare_output_dir",
    "read_latest",
    "remove_stale_temporaries",
    "resolve_weights_dir",
    "weights_dir",
    "write_checkpoint",
]

LATEST = "latest"
CHECKPOINTS = "checkpoints"
TRAINING_STATE = "training_state.pt"
TRAIN_CONFIG = "train_config.json"


class CheckpointError(ValueError):
    """A checkpoint path that is missing, incomplete, unreadable or incompatible."""


def read_latest(output_dir: str | Path) -> Path | None:
    """The step directory ``output_dir/latest`` points to, or None for a fresh output directory."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if not pointer.is_file():
        return None
    step_dir = output_dir / pointer.read_text().strip()
    if not (step_dir / TRAINING_STATE).is_file():
        raise CheckpointError(f"{pointer} points to {step_dir}, which is not a complete checkpoint")
    return step_dir


def write_checkpoint(output_dir: Path, step: int, model, ema, training_state: dict, train_config: dict,
                     keep: int = 2, model_state: dict | None = None, ema_state: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and keep only the newest ``keep`` (0: all).

    ``model_state`` / ``ema_state``: weights to save instead of the modules' own (gathered from shards).
    """
    root = output_dir / CHECKPOINTS
    name = f"step_{step:07d}"
    final = root / name
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(root, f".tmp-{name}-")
        model.save_pretrained(tmp / "model", state_dict=model_state)
        ema.save_pretrained(tmp / "ema", state_dict=ema_state)
        torch.save(training_state, tmp / TRAINING_STATE)
        (tmp / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=2) + "\n")
        fsync_tree(tmp)
        if final.exists():  # left by a run that died before re-pointing `latest`: superseded
            shutil.rmtree(final)
        os.replace(tmp, final)
        tmp = None
        fsync_dir(root)
        atomic_write(output_dir / LATEST, lambda path: Path(path).write_text(f"{CHECKPOINTS}/{name}\n"))
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors (ENOSPC...) as SafetensorError
        previous = _latest_name(output_dir)
        raise CheckpointError(
            f"cannot write checkpoint {final}: {getattr(e, 'strerror', None) or e}; "
            + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_name(output_dir: Path) -> str | None:
    try:
        return str(output_dir / (output_dir / LATEST).read_text().strip())
    except OSError:
        return None


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` if needed, check that it is writable (a one-line CheckpointError otherwise), and
    remove what a killed run left half-written there."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as e:
        raise CheckpointError(f"output directory {output_dir} is not writable: {e.strerror or e}") from None
    remove_stale_temporaries(output_dir)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Remove what a killed run left half-written: temporary step directories and temporary files."""
    root = output_dir / CHECKPOINTS
    stale = list(root.glob(".tmp-step_*")) if root.is_dir() else []
    stale += [p for p in output_dir.glob(".*.tmp") if p.is_file()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def load_training_state(step_dir: Path) -> dict:
    try:
        return torch.load(step_dir / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: report it as a checkpoint problem
        raise CheckpointError(f"cannot read {step_dir / TRAINING_STATE}: {e}") from None


def load_train_config(step_dir: Path) -> dict:
    path = step_dir / TRAIN_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def find_step_dir(path: str | Path) -> Path | None:
    """The training step directory for ``path`` (an output dir, a step dir, or its model/ or ema/), if any."""
    path = Path(path)
    if (path / LATEST).is_file():
        return read_latest(path)
    for candidate in (path, path.parent):
        if (candidate / TRAINING_STATE).is_file():
            return candidate
    return None


def default_samples_path(path: str | Path) -> Path:
    """Where a sample grid of checkpoint ``path`` goes unless told: ``OUTPUT_DIR/samples/step_NNNNNNN.png`` for a
    training run's checkpoint (named after the step sampled; an output dir samples its latest), ``DIR/samples.png``
    for a model directory."""
    step_dir = find_step_dir(path)
    if step_dir is None:
        return Path(path) / "samples.png"
    return step_dir.parent.parent / "samples" / f"{step_dir.name}.png"


def resolve_weights_dir(path: str | Path, ema: bool = True) -> Path:
    """The save_pretrained directory to load for ``path``.

    ``path`` may be a training output dir (follows ``latest``), a step dir (its ``ema/`` or ``model/``),
    or a save_pretrained directory itself (config.json + model.safetensors).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "config.json").is_file():
        return path
    step_dir = find_step_dir(path)
    if step_dir is None:
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a training output dir (with '{LATEST}'), a step dir "
            "(with model/ and ema/), or a directory with config.json + model.safetensors"
        )
    weights = step_dir / ("ema" if ema else "model")
    if not (weights / "config.json").is_file():
        raise CheckpointError(f"incomplete checkpoint: {weights / 'config.json'} is missing")
    return weights


def weights_dir(path) -> Path:
    """``path`` itself when it is a save_pretrained directory; for a training output directory (or one of its
    step directories), the EMA weights of its latest checkpoint, as ``thinking-pixel sample`` loads them."""
    path = Path(path)
    if (path / "config.json").is_file() or not path.is_dir():
        return path
    return path if find_step_dir(path) is None else resolve_weights_dir(path, ema=True)
