"""Checkpoints: a directory with ``config.json`` (class name + configs) and ``model.safetensors``.

``config.json`` is ``{"format": 1, "class": "DiT" | "ThinkingPixelDiT", "dit": {...}, "recursion": {...}}``
(``recursion`` only for ThinkingPixelDiT). Both files are written atomically (temp file in the same directory,
then ``os.replace``), the weights first, so a ``config.json`` never describes weights that were not written.
Loading builds the model on the meta device and assigns the stored tensors, so nothing is initialised twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._fileio import atomic_write
from .._run_dir import weights_dir

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PretrainedMixin", "config_from_dict", "model_class", "read_config",
           "read_json", "state_mismatches"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

# class name -> class, filled by PretrainedMixin.__init_subclass__ (so checkpoints.load_model can dispatch).
_MODEL_CLASSES: dict[str, type] = {}


def model_class(name: str) -> type:
    """The model class a checkpoint's config.json names (read_config checks that it is known)."""
    return _MODEL_CLASSES[name]


def config_from_dict(cls, d):
    """Build dataclass ``cls`` from a dict, naming unknown or mistyped fields in the error."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)


def read_json(path: Path, missing: str):
    """The parsed JSON file ``path``; FileNotFoundError(missing) if absent, ValueError if not JSON."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_config(path) -> dict:
    """The parsed ``config.json`` of checkpoint directory ``path``, with its class name checked."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_path = path / CONFIG_NAME
    config = read_json(config_path, f"no {CONFIG_NAME} in checkpoint directory {path}")
    if not isinstance(config, dict) or not isinstance(config.get("class"), str):
        raise ValueError(f"{config_path} must be a JSON object with a string 'class' field")
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported checkpoint format {config.get('format')!r}, "
                         f"expected {FORMAT_VERSION}")
    if config["class"] not in _MODEL_CLASSES:
        raise ValueError(f"{config_path}: unknown model class {config['class']!r}, "
                         f"expected one of {sorted(_MODEL_CLASSES)}")
    return config


def _build(cls, config: dict, path: Path):
    """Instantiate ``cls`` from a checkpoint config on the meta device (no weight init work)."""
    try:
        with torch.device("meta"):
            return cls._from_config_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_NAME}: invalid {cls.__name__} config: {e}") from None


def _load_weights(model, path: Path, device) -> None:
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in checkpoint directory {path}")
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise ValueError(f"{weights_path} does not match {path / CONFIG_NAME}: " + "; ".join(problems))
    non_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if non_finite:  # a diverged run or a corrupted file: refuse it here rather than sample black images later
        raise ValueError(f"{weights_path} holds NaN or Inf in {len(non_finite)} tensor(s): "
                         f"{non_finite[:3]}{' ...' if len(non_finite) > 3 else ''}")
    model.load_state_dict(state, assign=True)
    # the buffers a checkpoint does not hold (non-persistent: the halting step counters) were built on the meta
    # device with the model; they start at zero
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module.register_buffer(name, torch.zeros_like(buffer, device=device), persistent=False)


def state_mismatches(expected: dict, state: dict) -> list[str]:
    """Why ``state`` (name -> tensor) cannot load where ``expected`` is: missing and unexpected names, and names
    whose shapes differ (with both shapes); empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return problems + [f"wrong shape {k}: {tuple(state[k].shape)} where the model has {tuple(expected[k].shape)}"
                       for k in wrong[:3]]


def _is_sharding_wrapper(cls) -> bool:
    """FSDP2's fully_shard swaps a module's class for a dynamic ``FSDP<Name>`` subclass of FSDPModule."""
    return any(base.__name__ == "FSDPModule" for base in cls.__mro__)


class PretrainedMixin:
    """save_pretrained / from_pretrained for models that implement _config_dict / _from_config_dict."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not _is_sharding_wrapper(cls):
            _MODEL_CLASSES[cls.__name__] = cls

    @classmethod
    def _model_class_name(cls) -> str:
        """The name config.json records: the model's own class, also once FSDP2 has sharded it."""
        return next(c for c in cls.__mro__ if not _is_sharding_wrapper(c)).__name__

    def _config_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from_config_dict(cls, d: dict):
        raise NotImplementedError

    def save_pretrained(self, path, state_dict: dict | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (created if needed).

        ``state_dict``: the weights to write instead of this module's own (e.g. gathered from a sharded copy).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous() for k, v in state_dict.items()}
        config = {"format": FORMAT_VERSION, "class": self._model_class_name(), **self._config_dict()}
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        return path

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        """Load a checkpoint written by save_pretrained of this class, onto ``device``.

        ``path`` may also be a training output directory (``runs/default``): its latest EMA weights load.
        """
        path = weights_dir(path)
        config = read_config(path)
        if config["class"] != cls.__name__:
            raise ValueError(f"{path} holds a {config['class']} checkpoint, not a {cls.__name__}; "
                             f"use {config['class']}.from_pretrained or thinking_pixel.load_model")
        model = _build(cls, config, path)
        _load_weights(model, path, device)
        return model.eval()
