"""Sample directories: chunks of generated samples kept beside a result file, the settings that made them
(a rerun with other settings or other weights is refused, never mixed in), and atomic chunk writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ._fileio import file_digest

__all__ = ["SETTINGS", "atomic_torch_save", "check_sample_settings", "checkpoint_identity", "samples_dir_for",
           "weights_fingerprint"]

SETTINGS = "settings.json"


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file in the same directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def samples_dir_for(output: Path, samples_dir: str | Path | None = None) -> Path:
    """Where the sample chunks behind result file ``output`` are kept: ``samples_dir``, or beside ``output`` as
    ``<output without .json>_samples``."""
    return Path(samples_dir) if samples_dir is not None else Path(output).with_name(Path(output).stem + "_samples")


def check_sample_settings(samples_dir: Path, identity: dict) -> None:
    """Record what the samples in ``samples_dir`` are, or refuse if it holds samples made otherwise."""
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


def weights_fingerprint(weights: Path) -> str:
    """sha256 over the files of a model directory (relative names and contents): which weights made a set of
    samples, whatever path they sit at (a run retrained into the same directory has new weights at the old path)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(weights).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(weights)}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def checkpoint_identity(weights: Path) -> dict:
    """What identifies a checkpoint's samples: its path and its weights' fingerprint."""
    return {"checkpoint": str(Path(weights).resolve()), "weights_sha256": weights_fingerprint(weights)}
