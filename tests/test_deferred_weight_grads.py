"""tp_kernels.refine_step.defer_weight_grads: the T steps' expert weight gradients reduced in one pass after the last
step's backward equal the per-step reductions autograd would add, and the deferral applies only where it can."""

import pytest
import torch

import tp_kernels
from tp_kernels import _ext
from tp_kernels.refine_step import deferred
from tp_kernels.routed_lora import cpu as lora_cpu
from thinking_pixel.models.attention import Attention
from thinking_pixel.recursion import layers as recursive_attention
from thinking_pixel.recursion.layers import RecursiveAttention

needs_ext = pytest.mark.skipif(_ext.library() is None, reason="CPU extension not built or TP_KERNELS_NO_EXT=1")


@needs_ext
def test_one_reduction_over_calls_equals_the_sum_of_per_call_gradients():
    g = torch.Generator().manual_seed(0)
    n_exp, n_slice, rank, d_in, d_out = 4, 3, 8, 40, 24
    a = torch.randn(n_exp, n_slice, rank, d_in, generator=g)
    b = torch.randn(n_exp, n_slice, d_out, rank, generator=g)
    rows, want_a, want_b = [], 0, 0
    for n, idx in ((50, None), (33, torch.full((33,), 2)), (0, None), (41, "skip")):  # one expert only; empty; halted
        x = torch.randn(n, d_in, generator=g)
        if idx is None:
            idx = torch.randint(0, n_exp, (n,), generator=g)
        elif isinstance(idx, str):
            idx = torch.randint(-1, n_exp - 1, (n,), generator=g)  # -1: skipped tokens, and no token for expert 3
        y, h, perm, offsets = lora_cpu.forward(x, idx, a, b, None, 0.5)
        grad_y = torch.randn(y.shape, generator=g)
        dx, da, db, _ = lora_cpu.backward(grad_y, x, idx, a, b, None, h, perm, offsets, 0.5, True, True, False)
        dx_rows, _, kept = lora_cpu.backward_rows(grad_y, x, idx, a, b, None, h, 0.5, True, False)
        assert torch.equal(dx_rows, dx)  # the input gradient is the same computation
        rows.append(kept)
        want_a, want_b = want_a + da, want_b + db
    da, db = lora_cpu.weight_grads(rows, a, b)
    torch.testing.assert_close(da, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, want_b, rtol=1e-5, atol=1e-5)


def _recursion(halting="none"):
    torch.manual_seed(0)
    attn = RecursiveAttention.from_attention(Attention(48, 4), cond_dim=16, experts=3, steps=3, rank=8,
                                             halting=halting, halt_threshold=0.2 if halting == "delta" else None)
    with torch.no_grad():
        attn.lora.lora_b.normal_(0, 0.05)
    return attn.train()


def _grads(attn, x, cond):
    torch.manual_seed(5)  # the same Gumbel noise in both runs
    out = attn(x, cond)
    params = [p for p in attn.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.square().sum(), [x, *params])


@needs_ext
@pytest.mark.parametrize("halting", ["none", "delta"])
def test_recursion_gradients_match_per_step_reduction(monkeypatch, halting):
    attn = _recursion(halting)
    if halting == "delta":
        attn.eval()  # the delta rule halts tokens at inference: steps with inactive (-1) tokens
    x, cond = torch.randn(2, 12, 48, requires_grad=True), torch.randn(2, 16)
    calls = []
    real = lora_cpu.weight_grads
    monkeypatch.setattr(lora_cpu, "weight_grads", lambda *a: calls.append(1) or real(*a))
    out, got = _grads(attn, x, cond)
    assert len(calls) == 1  # one reduction for the three steps
    monkeypatch.setattr(recursive_attention, "defer_weight_grads", lambda a, b: (a, b))
    out_ref, want = _grads(attn, x, cond)
    assert len(calls) == 1
    assert torch.equal(out, out_ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_ext
def test_deferral_applies_only_where_it_can():
    a = torch.randn(2, 3, 4, 8, requires_grad=True)
    b = torch.randn(2, 3, 8, 4, requires_grad=True)
    aliases = deferred.defer_weight_grads(a, b)
    assert aliases[0] is not a and deferred.collector_for(aliases[0]) is not None
    with torch.no_grad():
        assert deferred.defer_weight_grads(a, b) == (a, b)
    assert deferred.collector_for(deferred.defer_weight_grads(a.detach(), b.detach())[0]) is None
    bf = a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    assert deferred.defer_weight_grads(*bf) == bf
    with tp_kernels.use_backend("torch"):
        assert deferred.defer_weight_grads(a, b) == (a, b)


@needs_ext
def test_unused_steps_give_zero_weight_gradients():
    a = torch.randn(2, 3, 4, 8, requires_grad=True)
    b = torch.randn(2, 3, 8, 4, requires_grad=True)
    a_alias, b_alias = deferred.defer_weight_grads(a, b)
    (a_alias.sum() * 0 + b_alias.sum() * 0).backward()  # used, but by no refine step: nothing kept
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
