"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, in every precision variant a GPU run reaches
(bf16, fp16, fp32 with TF32, fp32 in full precision = 3xTF32): no GPU needed, ptxas ships with triton."""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be compiled")

from tp_kernels import _aot  # noqa: E402

# Largest shared memory one block may use (opt-in dynamic limit), in bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DOT_ROLES = {"routed_lora.fwd", "routed_lora.bwd_dh", "routed_lora.bwd_dx", "routed_lora.bwd_dA", "routed_lora.bwd_dB",
             "refine.fwd"}
ROLES = DOT_ROLES | {"routed_lora.bwd_dA_sum", "routed_lora.bwd_dB_sum", "gate.fwd", "refine.stats_gate",
                     "refine.bwd_gate_ln"}
# One unstacked projection at a small rank: the fp32 forward once spilled here on sm_80 with 4 warps.
SMALL_RANK = _aot.Shape("one slice, rank 16", d_in=1152, d_out=1152, rank=16, n_exp=8, n_slice=1, n_tok=2048)
SHAPES = (_aot.DIT_XL, _aot.DIT_S, SMALL_RANK)
PRECISION = {"bfloat16": {"native"}, "float16": {"native"}, "float32": {"tf32", "tf32x3"}}
# Every variant at DiT-XL (the most registers); the smaller shapes in bf16 and full-precision fp32 only, to keep
# the compile time down (benchmarks/test_gpu_readiness.py compiles every shape in every variant).
SMALL_VARIANTS = ((torch.bfloat16, False), (torch.float32, False))


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def records(request):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process: kernels are interpreted, not compiled")
    return request.param, (_aot.compile_kernels(request.param, shapes=SHAPES[:1])
                           + _aot.compile_kernels(request.param, variants=SMALL_VARIANTS, shapes=SHAPES[1:]))


def test_every_kernel_builds_in_every_variant(records):
    cc, recs = records
    by_config = {}
    for r in recs:
        if r.uses_dot:
            assert r.precision in PRECISION[r.dtype], r
        by_config.setdefault((r.shape, r.dtype, r.precision if r.uses_dot else "-"), set()).add(r.kernel)
    variants = {(SHAPES[0].name, d, p) for d, ps in PRECISION.items() for p in ps}
    variants |= {(s.name, d, p) for s in SHAPES[1:] for d, p in (("bfloat16", "native"), ("float32", "tf32x3"))}
    assert {k for k in by_config if k[2] != "-"} == variants
    for (shape, dtype, precision), kernels in by_config.items():
        assert kernels == (DOT_ROLES if precision != "-" else ROLES - DOT_ROLES), (shape, dtype, precision)


def test_matmuls_use_tensor_cores(records):
    cc, recs = records
    dots = [r for r in recs if r.uses_dot]
    assert {r.kernel for r in dots} == DOT_ROLES
    for r in dots:
        assert r.mma_sync + r.wgmma > 0, f"{r.kernel} {r.shape} {r.dtype} on {r.arch}: no tensor-core instruction"
        if cc == 80:
            assert r.wgmma == 0
    if cc == 90:  # wgmma needs >= 64 rows per warpgroup: the (64, R) DiT-XL tiles get it, except 3xTF32's
        # 32-row tiles (its head/tail operand split doubles the registers) in the kernels that keep R whole
        assert all(r.wgmma > 0 for r in dots if r.shape == _aot.DIT_XL.name and r.precision != "tf32x3"), \
            _aot.format_table(dots)


def test_no_spills_and_shared_memory_fits(records):
    cc, recs = records
    print("\n" + _aot.format_table(recs))
    for r in recs:
        assert r.spills == 0, f"{r.kernel} {r.shape} {r.dtype} {r.precision} on {r.arch} spills {r.spills} bytes"
        assert 0 < r.registers <= 255
        assert r.shared_bytes <= SMEM_LIMIT[cc], f"{r.kernel} {r.shape} {r.dtype}: {r.shared_bytes} B shared"
