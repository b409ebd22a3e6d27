"""gate_top1 on CPU against its float64 reference."""

import pytest
import torch

import tp_kernels
from tp_kernels.gate_top1.reference import gate_top1_reference




@pytest.mark.parametrize("n_exp", [1, 2, 5, 64])
@pytest.mark.parametrize("tau", [0.5, 5.0])
def test_hard_forward_backward(backend, n_exp, tau):
    logits = torch.randn(3, 7, n_exp, dtype=torch.float32, requires_grad=True)
    noise = tp_kernels.gumbel_noise(logits.shape, generator=torch.Generator().manual_seed(1))
    idx, gate = tp_kernels.gate_top1(logits, tau=tau, noise=noise)
    ref_logits = logits.detach().double().requires_grad_()
    ref_idx, ref_gate = gate_top1_reference(ref_logits, noise.double(), tau)
    assert idx.shape == (3, 7) and idx.dtype == torch.int64 and torch.equal(idx, ref_idx)
    assert gate.shape == (3, 7) and torch.all(gate == 1.0)
    gw = torch.randn(3, 7)
    (grad,) = torch.autograd.grad(gate, logits, gw)
    (ref_grad,) = torch.autograd.grad(ref_gate, ref_logits, gw.double())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_soft(backend):
    logits = torch.randn(20, 5, requires_grad=True)
    idx, weights = tp_kernels.gate_top1(logits, tau=5.0, hard=False)
    ref_logits = logits.detach().double().requires_grad_()
    ref_idx, ref_w = gate_top1_reference(ref_logits, None, 5.0, hard=False)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights.double(), ref_w, rtol=1e-6, atol=1e-7)
    gw = torch.randn(20, 5)
    (grad,) = torch.autograd.grad(weights, logits, gw)
    (ref_grad,) = torch.autograd.grad(ref_w, ref_logits, gw.double())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    logits = torch.randn(64, 5).to(dtype)
    idx, gate = tp_kernels.gate_top1(logits, tau=5.0)
    assert torch.equal(idx, gate_top1_reference(logits.double(), None, 5.0)[0])
    assert gate.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_ties_go_to_lowest_index(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    idx, _ = tp_kernels.gate_top1(logits)
    assert idx.tolist() == [1, 0, 3]


def test_noise_sources(backend):
    logits = torch.zeros(1000, 5)
    idx_plain, _ = tp_kernels.gate_top1(logits)
    assert torch.all(idx_plain == 0)  # no noise unless asked for
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    idx_a, _ = tp_kernels.gate_top1(logits, tau=5.0, generator=gen())
    idx_b, _ = tp_kernels.gate_top1(logits, tau=5.0, generator=gen())
    assert torch.equal(idx_a, idx_b)
    counts = torch.bincount(idx_a, minlength=5)
    assert counts.min() > 120, f"Gumbel-max over equal logits must be near uniform, got {counts.tolist()}"
    torch.manual_seed(3)
    idx_c, _ = tp_kernels.gate_top1(logits, gumbel=True)
    assert len(torch.unique(idx_c)) == 5


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tau=0.0), ValueError, "tau must be a finite positive float"),
        (dict(tau=-1.0), ValueError, "tau must be a finite positive float"),
        (dict(tau=float("inf")), ValueError, "tau must be a finite positive float"),
        (dict(tau=float("nan")), ValueError, "tau must be a finite positive float"),
        (dict(noise=torch.zeros(4, 4)), ValueError, "noise must have logits' shape"),
        (dict(logits=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "logits must have dtype"),
        (dict(logits=torch.zeros(4, 0)), ValueError, "logits must have shape"),
        (dict(noise=torch.zeros(4, 3, device="meta")), ValueError, "noise is on meta"),
    ],
)
def test_bad_input(kwargs, exc, match):
    logits = kwargs.pop("logits", torch.zeros(4, 3))
    with pytest.raises(exc, match=match):
        tp_kernels.gate_top1(logits, **kwargs)
