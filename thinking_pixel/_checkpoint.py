"""Training checkpoints: layout, atomic writes, the ``latest`` pointer, and finding the weights to load.

A training output directory looks like::

    out/
      latest                      text file: "checkpoints/step_0001000"  (replaced atomically)
      metrics.jsonl
      checkpoints/step_0001000/
        model/  config.json + model.safetensors      (save_pretrained of the trained model)
        ema/    config.json + model.safetensors      (the EMA copy)
        training_state.pt                             optimizer, EMA bookkeeping, RNG states, data order
        train_config.json                             the TrainConfig of the run

A step directory is assembled under a temporary name in ``checkpoints/`` and renamed into place only when
complete, then ``latest`` is re-pointed; a crash at any moment leaves either the previous checkpoint or the
new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "LATEST",
    "find_step_dir",
    "load_base_model",
    "load_model_dir",
    "load_train_config",
    "read_latest",
    "resolve_weights_dir",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
]

LATEST = "latest"
CHECKPOINTS = "checkpoints"
TRAINING_STATE = "training_state.pt"
TRAIN_CONFIG = "train_config.json"


class CheckpointError(ValueError):
    """A checkpoint path that is missing, incomplete, unreadable or incompatible."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
                     keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and keep only the newest ``keep`` (0: all)."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    try:
        model.save_pretrained(tmp / "model")
        ema.save_pretrained(tmp / "ema")
        torch.save(training_state, tmp / TRAINING_STATE)
        (tmp / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=2) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # left by a run that died before re-pointing `latest`: superseded
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _atomic_write_text(output_dir / LATEST, f"{CHECKPOINTS}/{name}\n")
    if keep > 0:
        steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_model_dir(path: str | Path, device="cpu"):
    """Load a model from a save_pretrained directory, turning any failure into a one-line CheckpointError."""
    from .models import load_model

    try:
        return load_model(path, device=device)
    except (FileNotFoundError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot load a model from {path}: {e}") from None


def _diffusers_model_dir(path: Path) -> Path | None:
    """The diffusers model directory at ``path`` (itself, or its ``transformer/`` subfolder), if it is one."""
    for candidate in (path / "transformer", path):
        config = candidate / "config.json"
        if config.is_file():
            try:
                if "_class_name" in json.loads(config.read_text()):
                    return candidate
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                return None  # not diffusers' config: our own loaders report what is wrong with it
    return None


def _load_diffusers_dit(path: Path):
    """A diffusers DiT transformer directory (save_pretrained layout) as our DiT (DiT.from_diffusers)."""
    from .models import DiT

    config = json.loads((path / "config.json").read_text())
    name = config["_class_name"]
    # "Transformer2DModel" with ada-norm-zero is the name older DiT checkpoints (facebook/DiT-XL-2-256) carry.
    if name != "DiTTransformer2DModel" and not (name == "Transformer2DModel"
                                                and config.get("norm_type") == "ada_norm_zero"):
        raise CheckpointError(f"{path} holds a diffusers {name}; fine-tuning here takes a class-conditional DiT "
                              "(DiTTransformer2DModel). An SD3Transformer2DModel needs text conditioning: use "
                              "thinking_pixel.apply_recursion on it in your own loop")
    from diffusers import DiTTransformer2DModel

    try:
        return DiT.from_diffusers(DiTTransformer2DModel.from_pretrained(path))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load a DiT from the diffusers directory {path}: {e}") from None


def load_base_model(path: str | Path, ema: bool = True):
    """The model to fine-tune from ``path``: one of our checkpoints (see resolve_weights_dir; its EMA weights by
    default), a diffusers DiT model directory (save_pretrained layout, with or without a ``transformer/``
    subfolder), or a facebookresearch/DiT ``.pt`` state dict."""
    from .models import DiT

    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        try:
            return DiT.from_original_checkpoint(path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    diffusers_dir = _diffusers_model_dir(path) if path.is_dir() else None
    if diffusers_dir is not None:
        return _load_diffusers_dit(diffusers_dir)
    return load_model_dir(resolve_weights_dir(path, ema=ema))


def rng_state() -> dict:
    """Every RNG the training loop draws from: torch (CPU and CUDA), numpy, python."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
