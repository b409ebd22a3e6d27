"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, in every precision variant a GPU run reaches
(bf16, fp16, fp32 with TF32, fp32 in full precision = 3xTF32): no GPU needed, ptxas ships with triton.

Run under the installed Triton and, in .ci/run, under the oldest and newest supported ones (README "Supported
versions"): what Triton makes of a kernel changes between versions, and a kernel can be right under one and
miscompiled under another."""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be compiled")

from tp_kernels import _aot, _dispatch  # noqa: E402

# Largest shared memory one block may use (opt-in dynamic limit), in bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# tl.dot calls per kernel (the rest have none): each is one tt.dot in the Triton IR, and nothing else may become one.
DOT_CALLS = {"routed_lora.fwd": 2, "routed_lora.bwd_dh": 1, "routed_lora.bwd_dx": 1, "routed_lora.bwd_dW": 2,
             "refine_step.fwd": 2, "refine_step.bwd_dW": 2}
DOT_ROLES = set(DOT_CALLS)
# The kernels with a (tokens, experts) tile, whose expert axis is padded to BLOCK_E = next power of two >= 2.
EXPERT_ROLES = {"gate_top1.fwd", "refine_step.stats_gate", "refine_step.bwd_gate_ln"}
ROLES = DOT_ROLES | EXPERT_ROLES | {"routed_lora.group", "routed_lora.group_count", "routed_lora.group_scatter"}
# One unstacked projection at a small rank: the fp32 forward once spilled here on sm_80 with 4 warps.
SMALL_RANK = _aot.Shape("one slice, rank 16", d_in=1152, d_out=1152, rank=16, n_exp=8, n_slice=1, n_tok=2048)
SHAPES = (_aot.DIT_XL, _aot.DIT_S, SMALL_RANK)
# 2 and 3 experts (BLOCK_E 2 and 4; the shapes above have 5 and 8, BLOCK_E 8): the expert kernels only.
FEW_EXPERTS = tuple(_aot.Shape(f"{e} experts", d_in=384, d_out=384, rank=32, n_exp=e, n_slice=3, n_tok=2048)
                    for e in (2, 3))
PRECISION = {"bfloat16": {"native"}, "float16": {"native"}, "float32": {"tf32", "tf32x3"}}
# Every variant at DiT-XL (the most registers); the smaller shapes in bf16 and full-precision fp32 only, to keep
# the compile time down (benchmarks/test_gpu_readiness.py compiles every shape in every variant).
SMALL_VARIANTS = ((torch.bfloat16, False), (torch.float32, False))


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def records(request):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process: kernels are interpreted, not compiled")
    cc = request.param
    return cc, (_aot.compile_kernels(cc, shapes=SHAPES[:1])
                + _aot.compile_kernels(cc, variants=SMALL_VARIANTS, shapes=SHAPES[1:])
                + _aot.compile_kernels(cc, variants=SMALL_VARIANTS, shapes=FEW_EXPERTS, roles=EXPERT_ROLES))


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
    few = {s.name for s in FEW_EXPERTS}
    for (shape, dtype, precision), kernels in by_config.items():
        expected = EXPERT_ROLES if shape in few else DOT_ROLES if precision != "-" else ROLES - DOT_ROLES
        assert kernels == expected, (shape, dtype, precision)
    assert {(s, d) for s, d, _ in by_config if s in few} == {(s, d) for s in few for d in ("bfloat16", "float32")}


def test_dots_are_the_sources_and_only_they_use_tensor_cores(records):
    """Triton before 3.8 turns ``tl.sum(a[:, :, None] * b[None, :, :], 1)`` into a TF32 tt.dot, and with fewer
    than 8 experts on its inner axis the padded tensor-core product counted the gate's token term twice: every
    tt.dot must be a tl.dot of the source, and a kernel without one must not touch the tensor cores."""
    cc, recs = records
    for r in recs:
        where = f"{r.kernel} ({r.function}) {r.shape} {r.dtype} on {r.arch}"
        assert r.dot_calls == DOT_CALLS.get(r.kernel, 0), f"{where}: {r.dot_calls} tl.dot calls in the source"
        assert r.tt_dots == r.dot_calls, f"{where}: {r.tt_dots} tt.dot in the Triton IR for {r.dot_calls} tl.dot"
        if not r.uses_dot:
            assert r.mma_sync == r.wgmma == 0, f"{where}: tensor-core instructions without a tl.dot"


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


def test_registers_and_shared_memory_fit(records):
    cc, recs = records
    print("\n" + _aot.format_table(recs))
    for r in recs:
        assert 0 < r.registers <= 255
        assert r.shared_bytes <= SMEM_LIMIT[cc], f"{r.kernel} {r.shape} {r.dtype}: {r.shared_bytes} B shared"


def test_no_spills(records):
    """The tiles (routed_lora.triton._tiles) are sized to compile without spills under the newest tested Triton.
    Older releases allocate registers differently and spill a few bytes in some fp32 kernels (3.2.0 and 3.6.0):
    that costs speed, not correctness, so under them the spills are reported, not failed."""
    cc, recs = records
    spills = [f"{r.kernel} {r.shape} {r.dtype} {r.precision} on {r.arch}: {r.spills} B" for r in recs if r.spills]
    if spills and _dispatch.triton_release() != _dispatch.TESTED_TRITON[1]:
        pytest.skip(f"Triton {triton.__version__} spills in " + "; ".join(spills))
    assert not spills, spills
