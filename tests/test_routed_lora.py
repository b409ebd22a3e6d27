"""routed_lora on CPU (every non-Triton backend) against the float64 reference."""

import pytest
import torch

import tp_kernels
from tp_kernels.routed_lora.reference import routed_lora_backward_reference, routed_lora_reference

from kernel_helpers import assert_close, make_inputs  # tests/ is on sys.path


def stacked(a, b):
    return (a, b) if a.dim() == 4 else (a.unsqueeze(1), b.unsqueeze(1))


CASES = [
    # n, d_in, d_out, rank, experts, slices
    (64, 32, 48, 8, 4, None),
    (50, 16, 16, 1, 3, None),
    (33, 24, 40, 200, 2, None),
    (40, 32, 16, 16, 64, None),
    (70, 32, 24, 8, 1, None),
    (45, 32, 32, 16, 5, 3),
    (29, 20, 12, 4, 3, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-din{}-dout{}-r{}-e{}-s{}".format(*c))
@pytest.mark.parametrize("use_gate", [False, True])
def test_forward_backward_fp32(backend, case, use_gate):
    n, d_in, d_out, rank, n_exp, n_slice = case
    x, idx, a, b, g = make_inputs(n, d_in, d_out, rank, n_exp, n_slice, gate=use_gate)
    leaves = [t.requires_grad_() for t in (x, a, b) + ((g,) if use_gate else ())]
    y = tp_kernels.routed_lora(x, idx, a, b, scale=0.7, gate=g)
    sa, sb = stacked(a, b)
    y_ref = routed_lora_reference(x.double(), idx, sa.double(), sb.double(), None if g is None else g.double(), 0.7)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert_close(y, y_ref, torch.float32, "y")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    ref = routed_lora_backward_reference(gy, x, idx, sa, sb, g, 0.7)
    for name, got, want in zip(("dx", "da", "db", "dgate"), grads, ref):
        assert_close(got.reshape(want.shape), want, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    x, idx, a, b, g = make_inputs(96, 64, 64, 16, 5, 3, dtype=dtype)
    for t in (x, a, b, g):
        t.requires_grad_()
    y = tp_kernels.routed_lora(x, idx, a, b, scale=0.5, gate=g)
    assert y.dtype == dtype
    y_ref = routed_lora_reference(x.double(), idx, a.double(), b.double(), g.double(), 0.5)
    assert_close(y, y_ref, dtype, "y")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b, g), gy)
    ref = routed_lora_backward_reference(gy.double(), x.double(), idx, a.double(), b.double(), g.double(), 0.5)
    for name, got, want in zip(("dx", "da", "db", "dgate"), grads, ref):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, name)


def test_routing_extremes(backend):
    """Experts that get no token, and every token on one expert."""
    n_exp = 6
    idx = torch.full((40,), 4)
    x, idx, a, b, g = make_inputs(40, 16, 24, 8, n_exp, idx=idx)
    y = tp_kernels.routed_lora(x, idx, a, b, gate=g)
    assert_close(y, routed_lora_reference(x.double(), idx, *stacked(a.double(), b.double()), g.double()), torch.float32, "y")
    a.requires_grad_()
    b.requires_grad_()
    da, db = torch.autograd.grad(tp_kernels.routed_lora(x, idx, a, b).sum(), (a, b))
    unused = [e for e in range(n_exp) if e != 4]
    assert torch.all(da[unused] == 0) and torch.all(db[unused] == 0)
    assert da[4].abs().sum() > 0


def test_leading_dims_and_non_contiguous(backend):
    x = torch.randn(3, 20, 48)[:, ::2, ::2]  # (3, 10, 24) non-contiguous
    idx = torch.randint(0, 4, (10, 3)).t()  # (3, 10) non-contiguous
    a = torch.randn(4, 24, 8).transpose(1, 2)  # (4, 8, 24) non-contiguous
    b = torch.randn(4, 16, 8)
    y = tp_kernels.routed_lora(x, idx, a, b)
    assert y.shape == (3, 10, 16)
    y_ref = routed_lora_reference(x.reshape(-1, 24).double(), idx.reshape(-1), *stacked(a.double(), b.double()))
    assert_close(y.reshape(-1, 16), y_ref, torch.float32, "y")


def test_empty_tokens(backend):
    x, idx, a, b, _ = make_inputs(0, 8, 8, 4, 3, gate=False)
    assert tp_kernels.routed_lora(x, idx, a, b).shape == (0, 8)


def test_int32_indices(backend):
    x, idx, a, b, _ = make_inputs(30, 8, 8, 4, 3, gate=False)
    torch.testing.assert_close(tp_kernels.routed_lora(x, idx.int(), a, b), tp_kernels.routed_lora(x, idx, a, b))


def test_deterministic(backend):
    x, idx, a, b, g = make_inputs(257, 64, 96, 32, 5, 3)
    outs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (x, a, b, g)]
        y = tp_kernels.routed_lora(leaves[0], idx, leaves[1], leaves[2], gate=leaves[3])
        outs.append((y,) + torch.autograd.grad(y.square().sum(), leaves))
    for first, second in zip(*outs):
        assert torch.equal(first, second)


def test_only_needed_grads(backend):
    """Frozen weights: only dx is computed and returned."""
    x, idx, a, b, _ = make_inputs(30, 8, 8, 4, 3, gate=False)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(tp_kernels.routed_lora(x, idx, a, b).sum(), (x,))
    want = routed_lora_backward_reference(torch.ones(30, 8), x, idx, *stacked(a, b))[0]
    assert_close(dx, want, torch.float32, "dx")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(idx=torch.tensor([0, 1, 3])), IndexError, "expert_idx must lie in"),
        (dict(idx=torch.tensor([0, -2, 2])), IndexError, "expert_idx must lie in"),
        (dict(idx=torch.tensor([0.0, 1.0, 2.0])), TypeError, "expert_idx must have dtype"),
        (dict(idx=torch.tensor([0, 1])), ValueError, "expert_idx must have shape"),
        (dict(x=torch.randn(3, 9)), ValueError, "x's last dim"),
        (dict(x=torch.randn(3, 8, dtype=torch.float64)), TypeError, "lora_a and lora_b must have x's dtype"),
        (dict(x=torch.zeros(3, 8, dtype=torch.int64)), TypeError, "x must have dtype"),
        (dict(b=torch.randn(3, 8, 5)), ValueError, "lora_b"),
        (dict(b=torch.randn(2, 8, 4)), ValueError, "lora_b"),
        (dict(b=torch.randn(3, 1, 8, 4)), ValueError, "lora_a and lora_b must both be"),
        (dict(a=torch.randn(3, 4)), ValueError, "lora_a must have 3 or 4 dims"),
        (dict(gate=torch.ones(4)), ValueError, "gate must have shape"),
        (dict(gate=torch.ones(3, dtype=torch.int64)), TypeError, "gate must have dtype"),
        (dict(scale=torch.tensor(1.0)), TypeError, "scale must be a Python float"),
        (dict(a=torch.randn(3, 4, 8, device="meta")), ValueError, "lora_a is on meta"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(3, 8), idx=torch.tensor([0, 1, 2]), a=torch.randn(3, 4, 8), b=torch.randn(3, 8, 4))
    scale = kwargs.pop("scale", 1.0)
    gate = kwargs.pop("gate", None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        tp_kernels.routed_lora(args["x"], args["idx"], args["a"], args["b"], scale=scale, gate=gate)


def test_reference_backward_is_autograd_of_reference():
    """The written-out backward spec agrees with autograd through the forward spec."""
    x, idx, a, b, g = make_inputs(41, 12, 10, 3, 4, 3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, a, b, g)]
    y = routed_lora_reference(x, idx, a, b, g, 0.3)
    gy = torch.randn_like(y)
    auto = torch.autograd.grad(y, leaves, gy)
    spelled = routed_lora_backward_reference(gy, x, idx, a, b, g, 0.3)
    for got, want in zip(spelled, auto):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_batch_invariance(backend, dtype):
    """A token's output and input gradient are bit-identical whatever other tokens share the batch."""
    x, idx, a, b, g = make_inputs(300, 96, 80, 16, 4, 3, dtype=dtype)
    gy = torch.randn(300, 240).to(dtype)

    def run(rows):
        xs = x[rows].clone().requires_grad_()
        y = tp_kernels.routed_lora(xs, idx[rows], a, b, gate=g[rows], scale=0.5)
        y.backward(gy[rows])
        return y.detach(), xs.grad

    y, dx = run(torch.arange(300))
    for rows in (torch.arange(0, 300, 7), torch.tensor([5]), torch.randperm(300)[:37], torch.arange(300).flip(0)):
        y_sub, dx_sub = run(rows)
        assert torch.equal(y_sub, y[rows]) and torch.equal(dx_sub, dx[rows])


def test_skipped_tokens(backend):
    """expert_idx -1 skips a token: its output row is exactly 0, its gradient 0, and it changes nobody else's."""
    x, idx, a, b, g = make_inputs(90, 24, 20, 8, 3, 2)
    idx[::4] = -1
    live = idx >= 0
    gy = torch.randn(90, 40)

    def run(rows):
        leaves = [t.clone().requires_grad_() for t in (x[rows], a, b, g[rows])]
        y = tp_kernels.routed_lora(leaves[0], idx[rows], leaves[1], leaves[2], scale=0.5, gate=leaves[3])
        y.backward(gy[rows])
        return y.detach(), [leaf.grad for leaf in leaves]

    y, (dx, da, db, dg) = run(torch.arange(90))
    y_live, (dx_live, da_live, db_live, dg_live) = run(live.nonzero()[:, 0])
    assert torch.equal(y[~live], torch.zeros_like(y[~live])) and torch.equal(dx[~live], torch.zeros_like(dx[~live]))
    assert torch.equal(dg[~live], torch.zeros_like(dg[~live]))
    assert torch.equal(y[live], y_live) and torch.equal(dx[live], dx_live) and torch.equal(dg[live], dg_live)
    torch.testing.assert_close(da, da_live)
    torch.testing.assert_close(db, db_live)
    ref = routed_lora_reference(x.double(), idx, stacked(a, b)[0].double(), stacked(a, b)[1].double(), g.double(), 0.5)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
    idx_all_skipped = torch.full((90,), -1)
    assert tp_kernels.routed_lora(x, idx_all_skipped, a, b).abs().sum() == 0
