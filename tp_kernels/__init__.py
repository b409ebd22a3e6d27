"""tp_kernels: fused routed-expert ops for recursive sparse reasoning in diffusion latents.

Nothing here knows what a diffusion model is. Every op is a ``torch.library``
custom op with a CPU path, a Triton path for CUDA tensors and a plain-PyTorch
reference beside it; :func:`use_backend` / ``TP_KERNELS_BACKEND`` pick one.
:func:`layer_norm` (refine_step's LayerNorm on CPU) is a plain autograd.Function
over the CPU extension, with torch's LayerNorm elsewhere.

One folder per op, named after it, each with the same files: ``functional.py`` (the public wrapper),
``reference.py``, one module per backend (``torch.py``, ``cpu.py``, ``triton.py``; the backend names of
``_dispatch.BACKENDS``) and ``op.py`` (the custom-op registration and autograd). Arguments are checked once per call,
in ``_validate.py``; the Triton helpers the ops share are in ``_triton.py``.
"""

from ._dispatch import BACKENDS, requested_backend, resolve as resolve_backend, use_backend
from .gate_top1 import gate_top1, gate_top1_reference, gumbel_noise
from .joint_attention import joint_attention, joint_attention_reference
from .layer_norm import layer_norm, layer_norm_reference
from .refine_step import refine_step, refine_step_reference
from .routed_lora import reuse_packed_weights, routed_lora, routed_lora_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "gate_top1",
    "gate_top1_reference",
    "gumbel_noise",
    "joint_attention",
    "joint_attention_reference",
    "layer_norm",
    "layer_norm_reference",
    "refine_step",
    "refine_step_reference",
    "requested_backend",
    "resolve_backend",
    "routed_lora",
    "routed_lora_reference",
    "reuse_packed_weights",
    "use_backend",
]
