"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90 (no GPU needed: ptxas ships with triton)."""

import os

import pytest

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be compiled")

from tp_kernels import _aot  # noqa: E402

# Largest shared memory one block may use (opt-in dynamic limit), in bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ROLES = {"routed_lora.fwd", "routed_lora.bwd_dh", "routed_lora.bwd_dx", "routed_lora.bwd_dA", "routed_lora.bwd_dB",
         "gate.fwd", "refine.stats_gate", "refine.fwd", "refine.bwd_gate_ln"}
# One unstacked projection at a small rank: the fp32 forward once spilled here on sm_80 with 4 warps.
SMALL_RANK = _aot.Shape("one slice, rank 16", d_in=1152, d_out=1152, rank=16, n_exp=8, n_slice=1, n_tok=2048)
SHAPES = (_aot.DIT_XL, _aot.DIT_S, SMALL_RANK)


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def records(request):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process: kernels are interpreted, not compiled")
    return request.param, _aot.compile_kernels(request.param, shapes=SHAPES)


def test_every_kernel_builds(records):
    cc, recs = records
    by_config = {}
    for r in recs:
        by_config.setdefault((r.shape, r.dtype), set()).add(r.kernel)
    assert set(by_config) == {(s.name, d) for s in SHAPES for d in ("bfloat16", "float32")}
    assert all(kernels == ROLES for kernels in by_config.values()), by_config


def test_matmuls_use_tensor_cores(records):
    cc, recs = records
    dots = [r for r in recs if r.uses_dot]
    assert {r.kernel for r in dots} == ROLES - {"gate.fwd", "refine.stats_gate", "refine.bwd_gate_ln"}
    for r in dots:
        assert r.mma_sync + r.wgmma > 0, f"{r.kernel} {r.shape} {r.dtype} on {r.arch}: no tensor-core instruction"
        if cc == 80:
            assert r.wgmma == 0
    if cc == 90:  # wgmma needs >= 64 rows per warpgroup; the (64, R) DiT-XL tiles get it
        assert all(r.wgmma > 0 for r in dots if r.shape == _aot.DIT_XL.name), _aot.format_table(dots)


def test_no_spills_and_shared_memory_fits(records):
    cc, recs = records
    print("\n" + _aot.format_table(recs))
    for r in recs:
        assert r.spills == 0, f"{r.kernel} {r.shape} {r.dtype} on {r.arch} spills {r.spills} bytes"
        assert 0 < r.registers <= 255
        assert r.shared_bytes <= SMEM_LIMIT[cc], f"{r.kernel} {r.shape} {r.dtype}: {r.shared_bytes} B shared"
