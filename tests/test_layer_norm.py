"""tp_kernels.layer_norm: the CPU kernel (csrc/layer_norm.cpp) and the composed torch path against the float64
reference, fp32 statistics for bf16 inputs, thread-count and grad-mode determinism, compile, and bad input."""

import pytest
import torch

from tp_kernels import _ext, layer_norm, layer_norm_reference
from tp_kernels.layer_norm import cpu as norm_cpu

from call_counter import counted_calls  # tests/ is on sys.path

needs_ext = pytest.mark.skipif(_ext.library() is None, reason="CPU extension not built or TP_KERNELS_NO_EXT=1")


WIDTHS = [1, 5, 16, 37, 384, 1152]  # below, at and past one vector; a tail after whole vectors
EPS = 1e-6


def _inputs(rows, d, dtype, offset=0.0, seed=0):
    """x (rows, d) in dtype and a gradient; offset shifts every row's mean far from its spread."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
    return x, torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)


def _run(fn, x, grad):
    leaf = x.detach().clone().requires_grad_()
    y = fn(leaf)
    y.backward(grad.to(y.dtype))
    return y, leaf.grad


def _reference(x, grad):
    """The float64 reference on exactly the values the kernel sees (x, grad rounded to their dtype)."""
    return _run(lambda t: layer_norm_reference(t, EPS), x.double(), grad.double())


@needs_ext
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "mean>>std"])
def test_kernel_matches_the_float64_reference(d, dtype, offset):
    x, grad = _inputs(67, d, dtype, offset)
    with counted_calls(norm_cpu, "forward") as calls:
        got, got_grad = _run(lambda t: layer_norm(t, EPS), x, grad)
    assert calls, "the kernel did not run"
    want, want_grad = _reference(x, grad)
    assert got.dtype == dtype and got_grad.dtype == dtype
    if dtype == torch.float32 and offset:
        # a row whose mean is 100x its spread: x's own rounding, amplified by the centring, bounds any fp32
        # LayerNorm; the kernel is held to torch's fp32 LayerNorm on the same rows
        torch_y, torch_grad = _run(lambda t: torch.nn.functional.layer_norm(t, (d,), eps=EPS), x, grad)
        for mine, theirs, exact in ((got, torch_y, want), (got_grad, torch_grad, want_grad)):
            assert (mine.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 2e-6
        return
    # fp32: the reference's digits; bf16: one rounding of the output (2^-8 relative), statistics exact to fp32
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    if d > 1:  # d = 1: the gradient is exactly 0 either way
        torch.testing.assert_close(got_grad.double(), want_grad, **tol)


@needs_ext
def test_bf16_gradient_of_short_rows_far_from_zero():
    """What fp32 statistics are for. torch's bf16 LayerNorm keeps mean and rstd in bf16: on these rows its input
    gradient is 6.7% off (torch 2.14), the kernel's 0.16% (the gradient's own bf16 rounding)."""
    x, grad = _inputs(64, 16, torch.bfloat16, offset=50.0)
    x = (x.double() - 50) / 6 + 50  # spread 0.5 around 50: 2 bf16 steps per unit of spread
    x = x.to(torch.bfloat16)
    _, got = _run(lambda t: layer_norm(t, EPS), x, grad)
    _, want = _reference(x, grad)
    assert (got.double() - want).norm() / want.norm() < 4e-3


def test_every_backend_matches_the_reference(backend):
    """Every CPU backend (conftest's ``backend``): the kernel on "cpu" where built, the composed path otherwise."""
    x, grad = _inputs(20, 37, torch.float32, offset=5.0)
    got, got_grad = _run(lambda t: layer_norm(t, EPS), x, grad)
    want, want_grad = _reference(x, grad)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=2e-6)


@needs_ext
def test_leading_dims_and_strided_input():
    x, grad = _inputs(6 * 7, 48, torch.float32)
    wide = torch.cat([x, torch.randn(42, 5)], dim=-1)[:, :48].view(6, 7, 48)  # row stride 53
    got, got_grad = _run(lambda t: layer_norm(t, EPS), wide, grad.view(6, 7, 48))
    want, want_grad = _reference(x, grad)
    assert got.shape == (6, 7, 48)
    torch.testing.assert_close(got.reshape(42, 48).double(), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got_grad.reshape(42, 48).double(), want_grad, rtol=1e-5, atol=2e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_row_is_bit_identical_whatever_shares_its_tensor_and_with_or_without_a_gradient(dtype):
    x, _ = _inputs(50, 40, dtype)
    alone = [layer_norm(x[i:i + 1], EPS) for i in range(0, 50, 7)]
    with torch.no_grad():
        together = layer_norm(x, EPS)
    trained = layer_norm(x.clone().requires_grad_(), EPS)
    assert all(torch.equal(a[0], together[i]) for a, i in zip(alone, range(0, 50, 7)))
    assert torch.equal(trained, together)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_is_bit_identical_across_thread_counts(dtype):
    x, grad = _inputs(1000, 96, dtype)  # enough elements for the threaded path
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            y, mean, rstd = norm_cpu.forward(x, EPS)
            results.append((y, mean, rstd, norm_cpu.backward(grad, x, mean, rstd)))
        finally:
            torch.set_num_threads(2)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_no_graph_break_under_compile():
    def f(x):
        return layer_norm(x * 2, EPS).sum()

    explanation = torch._dynamo.explain(f)(torch.randn(4, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("call, error, match", [
    (lambda: layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: layer_norm(torch.zeros(3, 4, dtype=torch.int64)), TypeError, "x must have dtype"),
    (lambda: layer_norm(torch.zeros(3, 0)), ValueError, "x must have a non-empty last dim"),
    (lambda: layer_norm(torch.zeros(3, 4), 0.0), ValueError, "eps must be"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
