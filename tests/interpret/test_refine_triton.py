"""refine_step through the public API on the triton backend (interpreted) vs the float64 reference.

The cases and the comparison are tests/test_refine.py's (tests/ is on sys.path through its conftest).
"""

import pytest
import torch

import tp_kernels
from test_refine import (  # noqa: E402
    CASES, PARTIAL, check, check_active_mask, check_batch_invariance, check_no_tokens, check_op_normalize_modes, check_recursive_training,
    make_case,
)


@pytest.fixture(autouse=True)
def triton_backend():
    with tp_kernels.use_backend("triton"):
        assert tp_kernels.resolve_backend(torch.device("cpu")) == "triton"
        yield


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    check(make_case(name))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype):
    check(make_case("full", dtype))


@pytest.mark.parametrize("need", PARTIAL, ids="+".join)
def test_partial_grads(need):
    _, _, leaves = check(make_case("full"), need=need)
    assert all(v.grad is None for k, v in leaves.items() if v is not None and k not in need)


@pytest.mark.parametrize("name", ["full", "odd_unstacked"])
def test_strided_upstream_grads(name):
    """A loss on the gate weight gives a stride-0 gradient: the kernels must not read past its one element."""
    check(make_case(name), strided_grads=True)


def test_no_tokens():
    check_no_tokens()


def test_op_normalize_modes_agree():
    check_op_normalize_modes(torch.float32)  # float32: the kernels (float64 takes the reference fallback)


def test_large_mean_state():
    """|mean| >> std: the shifted statistics and the centred shrink keep full precision."""
    check(make_case("full", mean=300.0), tol=1e-4)


def test_bit_identical_repeats_and_zero_b():
    inputs = make_case("odd_unstacked")
    a, b = check(inputs), check(inputs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    inputs["lora_b"] = torch.zeros_like(inputs["lora_b"])
    with torch.no_grad():
        qkv, _, _ = tp_kernels.refine_step(inputs["state"], inputs["lora_a"], inputs["lora_b"], tau=5.0,
                                           **{k: inputs[k] for k in ("token_weight", "cond_logits", "noise", "base")})
    assert torch.equal(qkv, inputs["base"])


def test_multi_tile_experts():
    """More tokens than one BLOCK_M tile per expert, and several stats blocks."""
    check(make_case(((3, 70), 24, 16, 4, 2, 3, True, "sample", True, True)))


def test_recursive_attention_trains_like_the_unfused_modules():
    """float32 here, so the fused kernels run (float64 would take the reference fallback)."""
    check_recursive_training({}, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_tile_rank128_loss_on_gate_weight(dtype):
    """Several K and N tiles and programs per axis at rank 128, with strided upstream grads (weight.sum())."""
    check(make_case(((2, 40), 136, 72, 128, 3, 3, True, "sample", True, True), dtype), strided_grads=True)


def test_batch_invariance(dot_tol):
    """A token's routing is bit-identical whatever other tokens share the batch; its qkv and state gradient agree
    to float32 rounding only, as the interpreter's tl.dot is numpy's matmul (see the dot_tol fixture)."""
    check_batch_invariance(dot_tol=dot_tol)


def test_active_mask():
    """Inactive tokens: no tile, weight 0, qkv = base, no gradient but the base's."""
    check_active_mask()
