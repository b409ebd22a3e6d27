"""gate_top1 through the public API on the triton backend (interpreted) vs the float64 reference."""

import pytest
import torch

import tp_kernels
from tp_kernels.gate_top1.reference import gate_top1_reference, gumbel_noise


@pytest.fixture(autouse=True)
def triton_backend():
    with tp_kernels.use_backend("triton"):
        assert tp_kernels.resolve_backend(torch.device("cpu")) == "triton"
        yield


def run_and_check(logits, noise, tau, hard, tol=1e-6):
    leaf = logits.clone().requires_grad_()
    idx, gate = tp_kernels.gate_top1(leaf, tau=tau, noise=noise, hard=hard)
    w = torch.randn(gate.shape, generator=torch.Generator().manual_seed(3))
    (gate * w).sum().backward()

    ref_leaf = logits.detach().double().requires_grad_()
    ref_idx, ref_gate = gate_top1_reference(ref_leaf, None if noise is None else noise.double(), tau, hard)
    (ref_gate * w.double()).sum().backward()

    assert idx.dtype == torch.int64 and torch.equal(idx, ref_idx)
    assert gate.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert gate.shape == ref_gate.shape
    if hard:
        assert torch.all(gate == 1)
    torch.testing.assert_close(gate.detach().double(), ref_gate.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=tol, atol=tol)
    return idx, gate


@pytest.mark.parametrize("n,n_exp", [(90, 2), (40, 3), (300, 5), (100, 40), (20, 1), (70, 64)])
@pytest.mark.parametrize("hard", [True, False])
def test_matches_reference(n, n_exp, hard):
    g = torch.Generator().manual_seed(n + n_exp)
    logits = torch.randn(n, n_exp, generator=g) * 3
    noise = gumbel_noise((n, n_exp), generator=g)
    run_and_check(logits, noise, 0.7, hard)


def test_no_noise_leading_dims_fp16_logits():
    logits = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(0)).half()
    idx, gate = run_and_check(logits, None, 1.0, True, tol=1e-3)  # the logits' grad is rounded to fp16
    assert idx.shape == (4, 9) and gate.shape == (4, 9)


def test_ties_go_to_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, -1.0]])
    idx, _ = run_and_check(logits, None, 1.0, True)
    assert idx.tolist() == [1, 0, 0]


def test_float64_logits():
    g = torch.Generator().manual_seed(1)
    run_and_check(torch.randn(40, 7, generator=g, dtype=torch.float64), None, 0.5, False, tol=1e-12)


def test_bit_identical_repeats():
    g = torch.Generator().manual_seed(2)
    logits, noise = torch.randn(200, 12, generator=g), gumbel_noise((200, 12), generator=g)
    with torch.no_grad():
        a = tp_kernels.gate_top1(logits, noise=noise, hard=False)
        b = tp_kernels.gate_top1(logits, noise=noise, hard=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
