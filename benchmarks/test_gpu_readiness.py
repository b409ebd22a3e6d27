"""GPU readiness without a GPU: compile every Triton kernel ahead of time for sm_80 and sm_90 (tp_kernels._aot).

The benchmark is the AOT compile itself (one round); its extra_info carries one record per kernel:
registers, shared memory, spills, tensor-core instructions, plus the kernel's FLOPs and bytes at that
shape and its H100 roofline time, for the report's GPU-readiness table.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from . import flop_model
from .shapes import lora_shapes

_aot = pytest.importorskip("tp_kernels._aot")

CAPABILITIES = (80, 90)


def aot_shapes(quick: bool):
    """The op benchmarks' shapes (one slice) and, in a full run, the models' fused-qkv shapes (three slices)."""
    if quick:
        return [_aot.DIT_S]
    ops = [_aot.Shape(f"op {s.key}", s.d, s.d, s.rank, s.experts, 1, s.tokens) for s in lora_shapes(False)]
    return ops + [_aot.DIT_XL, _aot.DIT_S]


def test_aot_compile(benchmark, quick):
    shapes = aot_shapes(quick)
    variants = ((torch.bfloat16, False),) if quick else _aot.VARIANTS  # full: bf16, fp16, fp32 TF32 and 3xTF32
    by_name = {s.name: s for s in shapes}
    benchmark.group = "triton AOT compile (no GPU)"

    def compile_all():
        return [r for cc in CAPABILITIES for r in _aot.compile_kernels(cc, variants=variants, shapes=shapes)]

    records = benchmark.pedantic(compile_all, rounds=1, iterations=1)
    kernels = []
    for r in records:
        s = by_name[r.shape]
        elem = getattr(torch, r.dtype).itemsize
        cost = flop_model.triton_kernel_cost(r.kernel, s.n_tok, s.d_in, s.d_out, s.rank, s.n_exp, s.n_slice, elem)
        kernels.append({**dataclasses.asdict(r), "spills": r.spills, "tensor_core_ops": r.tensor_core_ops,
                        "tokens": s.n_tok, "flops": cost.flops, "bytes": cost.bytes,
                        "h100_roofline_s": flop_model.h100_roofline_seconds(cost, r.precision)})
    assert kernels, "tp_kernels._aot compiled no kernels"
    benchmark.extra_info.update(op="aot", impl="triton AOT", kernels=kernels)
