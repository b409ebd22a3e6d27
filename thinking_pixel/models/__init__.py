"""The base models: DiT (with its size registry and converters from diffusers / facebookresearch checkpoints),
its attention, and the save_pretrained / from_pretrained format every model of this package uses."""

from .attention import Attention, attend
from .dit import DIT_CONFIGS, DiT, DiTConfig, dit_config
from .dit_convert import config_from_original_state_dict, dit_from_diffusers, load_original_dit
from .pretrained import PretrainedMixin, read_config

__all__ = [
    "Attention",
    "DIT_CONFIGS",
    "DiT",
    "DiTConfig",
    "PretrainedMixin",
    "attend",
    "config_from_original_state_dict",
    "dit_config",
    "dit_from_diffusers",
    "load_original_dit",
    "read_config",
]
