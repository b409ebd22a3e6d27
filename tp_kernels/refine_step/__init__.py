"""One fused recursive refinement step: ``refine_step`` (functional.py), its reference, the registered ops, and the
deferred weight gradients of a recursion's steps (deferred.py)."""

from .deferred import defer_weight_grads
from .functional import refine_step
from .op import refine_step_bwd, refine_step_fwd
from .reference import refine_step_reference

__all__ = ["defer_weight_grads", "refine_step", "refine_step_reference", "refine_step_fwd", "refine_step_bwd"]
