"""Loading models: any checkpoint this package writes, by the class its config.json names, and the base models
to fine-tune from (our checkpoints, diffusers DiT directories, facebookresearch/DiT ``.pt`` files).

Failures are one-line :class:`CheckpointError` messages that name the path. Importing this module registers every
model class (DiT, ThinkingPixelDiT, SD3TextToImage), so :func:`load_model` reads any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._run_dir import CheckpointError, resolve_weights_dir, weights_dir
from .models.dit import DiT
from .models.dit_convert import dit_from_diffusers, load_original_dit
from .models.pretrained import model_class, read_config
from .recursion.dit import ThinkingPixelDiT
from .text_to_image.model import SD3TextToImage

__all__ = ["MODEL_CLASSES", "CheckpointError", "load_base_model", "load_model", "load_model_dir"]

# the classes a checkpoint may name (each registers itself with models.pretrained when defined)
MODEL_CLASSES = (DiT, ThinkingPixelDiT, SD3TextToImage)


def load_model(path, device="cpu"):
    """Load any checkpoint written by save_pretrained (or a training output directory's latest EMA weights),
    dispatching on the class named in its config.json."""
    path = weights_dir(path)
    return model_class(read_config(path)["class"]).from_pretrained(path, device=device)


def load_model_dir(path: str | Path, device="cpu"):
    """Load a model from a save_pretrained directory, turning any failure into a one-line CheckpointError."""
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
    """A diffusers DiT transformer directory (save_pretrained layout) as our DiT (dit_from_diffusers)."""
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
        return dit_from_diffusers(DiTTransformer2DModel.from_pretrained(path))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load a DiT from the diffusers directory {path}: {e}") from None


def load_base_model(path: str | Path, ema: bool = True):
    """The model to fine-tune from ``path``: one of our checkpoints (see resolve_weights_dir; its EMA weights by
    default), a diffusers DiT model directory (save_pretrained layout, with or without a ``transformer/``
    subfolder), or a facebookresearch/DiT ``.pt`` state dict."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        try:
            return load_original_dit(path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    diffusers_dir = _diffusers_model_dir(path) if path.is_dir() else None
    if diffusers_dir is not None:
        return _load_diffusers_dit(diffusers_dir)
    return load_model_dir(resolve_weights_dir(path, ema=ema))
