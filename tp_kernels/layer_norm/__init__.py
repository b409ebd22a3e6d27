"""LayerNorm without affine parameters, fp32 statistics: ``layer_norm`` (functional.py) and its reference."""

from .functional import layer_norm
from .reference import layer_norm_reference

__all__ = ["layer_norm", "layer_norm_reference"]
