"""Routed LoRA through the public API on the triton backend (interpreted) vs the float64 reference."""

import pytest
import torch

import tp_kernels
from tp_kernels.routed_lora.reference import routed_lora_backward_reference, routed_lora_reference

from kernel_helpers import assert_close, make_inputs  # tests/ is on sys.path


@pytest.fixture(autouse=True)
def triton_backend():
    with tp_kernels.use_backend("triton"):
        assert tp_kernels.resolve_backend(torch.device("cpu")) == "triton"
        yield


def run(x, idx, a, b, gate, scale, grad_y=None, need=("x", "a", "b", "gate")):
    """Forward + backward through tp_kernels.routed_lora -> y, grads {name: tensor}, grad_y."""
    leaves = {"x": x, "a": a, "b": b, "gate": gate}
    leaves = {k: (v.clone().requires_grad_(k in need) if v is not None else None) for k, v in leaves.items()}
    y = tp_kernels.routed_lora(leaves["x"], idx, leaves["a"], leaves["b"], scale=scale, gate=leaves["gate"])
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(grad_y)
    grads = {k: v.grad for k, v in leaves.items() if v is not None and k in need}
    return y.detach(), grads, grad_y


def reference(x, idx, a, b, gate, scale, grad_y):
    """float64 forward and (dx, da, db, dgate), with 3-D weights viewed as S=1."""
    stacked = a.dim() == 4
    a4 = a if stacked else a.unsqueeze(1)
    b4 = b if stacked else b.unsqueeze(1)
    d = torch.float64
    xs, ids = x.reshape(-1, x.shape[-1]).to(d), idx.reshape(-1)
    gs = None if gate is None else gate.reshape(-1).to(d)
    y = routed_lora_reference(xs, ids, a4.to(d), b4.to(d), gs, scale)
    gy = grad_y.reshape(xs.shape[0], grad_y.shape[-1]).to(d)
    dx, da, db, dg = routed_lora_backward_reference(gy, xs, ids, a4.to(d), b4.to(d), gs, scale)
    grads = {"x": dx.reshape(x.shape), "a": da.reshape(a.shape), "b": db.reshape(b.shape)}
    if gate is not None:
        grads["gate"] = dg.reshape(gate.shape)
    return y.reshape(*x.shape[:-1], y.shape[-1]), grads


def check(case, dtype=torch.float32, tol=2e-5, need=("x", "a", "b", "gate")):
    x, idx, a, b, gate, scale = case
    y, grads, grad_y = run(x, idx, a, b, gate, scale, need=need)
    assert y.dtype == x.dtype
    y_ref, grads_ref = reference(x, idx, a, b, gate, scale, grad_y)
    assert_close(y, y_ref, tol, "y")
    for name, g in grads.items():
        assert g.dtype == {"gate": gate.dtype if gate is not None else None}.get(name, x.dtype)
        assert_close(g, grads_ref[name], tol, f"d{name}")
    return y, grads


CASES = {
    # name: (n, d_in, d_out, rank, n_exp, n_slice, gate, scale)
    "base_s2_gate": (50, 40, 24, 8, 3, 2, True, 0.5),
    "unstacked_no_gate": (37, 24, 20, 16, 2, None, False, 1.0),
    "s3_many_empty_experts": (30, 20, 12, 4, 40, 3, True, 2.0),
    "one_expert_rank1_multi_tile": (130, 16, 16, 1, 1, 1, True, 0.25),
    "rank200": (20, 24, 16, 200, 2, 1, True, 1.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    n, d_in, d_out, rank, n_exp, n_slice, gate, scale = CASES[name]
    x, idx, a, b, g = make_inputs(n, d_in, d_out, rank, n_exp, n_slice, gate=gate)
    check((x, idx, a, b, g, scale))


def test_all_tokens_on_one_of_several_experts():
    x, idx, a, b, g = make_inputs(70, 24, 16, 8, 4, 2, idx=torch.full((70,), 2))
    _, grads = check((x, idx, a, b, g, 1.0))
    assert grads["a"][[0, 1, 3]].abs().max() == 0 and grads["b"][[0, 1, 3]].abs().max() == 0


def test_leading_dims_and_int32_index():
    x, idx, a, b, g = make_inputs(24, 16, 16, 4, 3, 3)
    check((x.reshape(2, 12, 16), idx.reshape(2, 12).to(torch.int32), a, b, g.reshape(2, 12), 1.0))


def test_no_tokens():
    x, idx, a, b, g = make_inputs(0, 16, 8, 4, 3, 2)
    y, grads = check((x, idx, a, b, g, 1.0))
    assert y.shape == (0, 16) and grads["a"].abs().sum() == 0 and grads["b"].abs().sum() == 0


@pytest.mark.parametrize("need", [("x",), ("a", "b"), ("gate",)])
def test_partial_grads(need):
    x, idx, a, b, g = make_inputs(40, 24, 16, 8, 3, 2)
    _, grads = check((x, idx, a, b, g, 0.5), need=need)
    assert set(grads) == set(need)


def test_partial_grads_float64_fallback():
    x, idx, a, b, g = make_inputs(20, 16, 8, 4, 3, 2, dtype=torch.float64)
    _, grads = check((x, idx, a, b, g, 0.5), tol=1e-12, need=("x",))
    assert set(grads) == {"x"}


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)])
def test_low_and_high_precision(dtype, tol):
    x, idx, a, b, g = make_inputs(48, 32, 24, 16, 3, 3, dtype=dtype)
    check((x, idx, a, b, g, 0.5), tol=tol)


def test_bit_identical_repeats():
    x, idx, a, b, g = make_inputs(90, 32, 24, 8, 3, 2)
    y1, g1, gy = run(x, idx, a, b, g, 0.5)
    y2, g2, _ = run(x, idx, a, b, g, 0.5, grad_y=gy)
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


# ---- multi-tile shapes, two-stage weight gradients, the forward's grouping, batch invariance


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_multi_tile_rank128_strided_grad(dtype, tol):
    """Several D_in (K) and D_out (N) tiles, several programs per grid axis, rank 128, a non-contiguous dy."""
    x, idx, a, b, g = make_inputs(150, 136, 140, 128, 3, 2, dtype=dtype, seed=3)
    grad_y = torch.randn(150, 2 * 2 * 140, generator=torch.Generator().manual_seed(4)).to(dtype)[:, ::2]
    y, grads, _ = run(x, idx, a, b, g, 0.5, grad_y=grad_y)
    y_ref, grads_ref = reference(x, idx, a, b, g, 0.5, grad_y)
    assert_close(y, y_ref, tol, "y")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], tol, f"d{name}")


def test_weight_gradients_with_routing_collapsed():
    """Routing collapsed onto one expert: each weight-gradient tile sums its rows over several row steps (no
    atomics); the result matches the reference and is bit-identical from run to run."""
    idx = torch.full((230,), 1)
    idx[::17] = 0  # expert 0: a few tokens, one partial row step; expert 2: none
    x, idx, a, b, g = make_inputs(230, 24, 20, 8, 3, 2, idx=idx)
    _, grads = check((x, idx, a, b, g, 0.5))
    _, again = check((x, idx, a, b, g, 0.5))
    assert all(torch.equal(grads[k], again[k]) for k in grads)
    assert grads["a"][2].abs().max() == 0 and grads["b"][2].abs().max() == 0


def test_backward_reuses_the_forward_grouping(monkeypatch):
    from tp_kernels.routed_lora import triton as tk

    calls = []
    group = tk.group_on_device
    monkeypatch.setattr(tk, "group_on_device", lambda *args: calls.append(1) or group(*args))
    x, idx, a, b, g = make_inputs(40, 16, 12, 4, 3, 2)
    y, _, _ = run(x, idx, a, b, g, 0.5)
    assert len(calls) == 1, "the backward grouped the tokens again"


def test_batch_invariance(dot_tol):
    """A token's output and input gradient depend on its own row alone, whatever other tokens share the batch:
    to float32 rounding, as the interpreter's tl.dot is numpy's matmul (see the dot_tol fixture)."""
    x, idx, a, b, g = make_inputs(150, 72, 40, 16, 3, 3, seed=5)
    grad_y = torch.randn(150, 120, generator=torch.Generator().manual_seed(6))
    y, grads, _ = run(x, idx, a, b, g, 0.5, grad_y=grad_y, need=("x",))
    tol = dict(rtol=dot_tol, atol=dot_tol)
    for sub in (torch.arange(3, 150, 7), torch.tensor([17]), torch.arange(150).flip(0)):
        y_sub, grads_sub, _ = run(x[sub], idx[sub], a, b, g[sub], 0.5, grad_y=grad_y[sub], need=("x",))
        torch.testing.assert_close(y_sub, y[sub], **tol)
        torch.testing.assert_close(grads_sub["x"], grads["x"][sub], **tol)


def test_skipped_tokens():
    """expert_idx -1: no tile covers the token; its output and gradients are exactly 0."""
    idx = torch.randint(0, 3, (70,), generator=torch.Generator().manual_seed(2))
    idx[::3] = -1
    x, idx, a, b, g = make_inputs(70, 24, 16, 8, 3, 2, idx=idx)
    y, grads = check((x, idx, a, b, g, 0.5))
    skipped = idx < 0
    assert y[skipped].abs().max() == 0 and grads["x"][skipped].abs().max() == 0
    assert grads["gate"][skipped].abs().max() == 0
