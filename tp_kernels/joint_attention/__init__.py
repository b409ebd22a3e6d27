"""Joint multi-head attention: ``joint_attention`` (functional.py), its reference, and the registered ops."""

from .functional import joint_attention
from .op import joint_attention_bwd, joint_attention_fwd
from .reference import joint_attention_reference

__all__ = ["joint_attention", "joint_attention_reference", "joint_attention_fwd", "joint_attention_bwd"]
