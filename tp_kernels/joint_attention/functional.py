"""joint_attention's public wrapper: joint multi-head attention for the recursion's steps, vision queries over
[vision; context] keys.

On CPU (fp32, eager; training and inference) the compiled extension's kernel (cpu.py, csrc/attention.cpp) reads the
heads straight out of the fused qkv projection and the context's rows (no split, concatenation or merge is copied),
works on one (batch, head)'s whole (rows x keys) score block in cache and keeps each row's logsumexp for the backward
(N x H x rows floats, also when nothing needs a gradient: its forward took 0.70-0.89x the time of torch's flash
attention at the recursion's shapes in benchmarks/test_attention.py, 2 threads); elsewhere (GPU, bf16, no
extension, a score block over MAX_SCORES) torch's scaled_dot_product_attention runs on the split heads (torch.py).
Both compute the same function.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._dispatch import resolve
from .._validate import check_joint_attention
from .op import joint_attention_fwd
from .torch import joint_attention_composed

# Largest (rows x keys) score block of one head the kernel takes: each thread's backward holds two of them in fp32
# (2 x 4 MiB here; 256 tokens make 0.25 MiB). Larger attentions (e.g. 64 x 64 latents) run torch's flash attention.
MAX_SCORES = 1 << 20


def _kernel_applies(qkv, context):
    if torch.compiler.is_compiling():
        return False  # compiled graphs keep torch's attention: the extension's loader is not traceable
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or resolve(qkv.device) != "cpu":
        return False
    if _ext.library() is None:
        return False
    t = qkv.shape[1]
    nq = t + (0 if context[0] is None else context[0].shape[1])
    nk = t + (0 if context[1] is None else context[1].shape[1])
    return nq * nk <= MAX_SCORES


def joint_attention(qkv, num_heads, context_q=None, context_k=None, context_v=None):
    """Attention of fused projections qkv (N, T, 3D) (columns [q | k | v], each head-major) -> (N, T [+ L], D).

    context_k, context_v: optional (N, L, D) extra keys and values (e.g. text tokens) the T queries attend to
    jointly with their own. context_q: optional (N, L, D) queries of those tokens (a joint attention whose
    context also needs its output): their rows follow the T vision rows in the output. Scale 1 / sqrt(D / H).
    """
    check_joint_attention("tp_kernels.joint_attention", qkv, context_q, context_k, context_v, num_heads)
    context = (context_q, context_k, context_v)
    if _kernel_applies(qkv, context):
        return joint_attention_fwd(qkv, context_q, context_k, context_v, num_heads, True)[0]  # checked here
    return joint_attention_composed(qkv, num_heads, context_q, context_k, context_v)
