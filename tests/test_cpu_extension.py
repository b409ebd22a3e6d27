"""The compiled CPU extension (csrc/) against the float64 references, and its determinism.

Build it first: ``python setup.py build_ext --inplace``. Tests that need it are skipped when it is not
built; the TP_KERNELS_NO_EXT tests run either way.
"""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_kernels
from tp_kernels import _ext
from tp_kernels._grouping import group_by_expert
from tp_kernels.gate_top1 import cpu as gate_cpu
from tp_kernels.gate_top1.reference import gate_top1_reference
from tp_kernels.routed_lora import cpu as lora_cpu
from tp_kernels.routed_lora import torch as lora_torch
from tp_kernels.routed_lora.reference import routed_lora_backward_reference, routed_lora_reference

from kernel_helpers import assert_close, make_inputs  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(
    _ext.library() is None,
    reason="CPU extension not built (run `python setup.py build_ext --inplace`) or TP_KERNELS_NO_EXT=1",
)


@pytest.fixture
def cpu_backend(monkeypatch):
    """The "cpu" backend, with every float32/bfloat16 forward in the extension (no rank cut-over)."""
    monkeypatch.setattr(lora_cpu, "BF16_EXT_MAX_RANK", 1 << 30)
    with tp_kernels.use_backend("cpu"):
        yield


def run_public(x, idx, a, b, g, scale, grad_y):
    """Forward and backward through tp_kernels.routed_lora (3-D weights when there is one slice)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, a, b, g)]
    xl, al, bl, gl = leaves
    if a.shape[1] == 1:
        y = tp_kernels.routed_lora(xl, idx, al[:, 0], bl[:, 0], scale=scale, gate=gl)
    else:
        y = tp_kernels.routed_lora(xl, idx, al, bl, scale=scale, gate=gl)
    y.backward(grad_y)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_reference(x, idx, a, b, g, scale=0.75):
    dtype = x.dtype
    gy = torch.randn(x.shape[0], a.shape[1] * b.shape[2]).to(dtype)
    y, grads = run_public(x, idx, a, b, g, scale, gy)
    d = [t.double() if t is not None else None for t in (x, a, b, g)]
    y_ref = routed_lora_reference(d[0], idx, d[1], d[2], d[3], scale)
    ref = routed_lora_backward_reference(gy.double(), d[0], idx, d[1], d[2], d[3], scale)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "da", "db", "dgate"), grads, ref):
        if want is not None:
            assert got.dtype == dtype and got.shape == want.shape, name
            assert_close(got, want, dtype, name)
    return y, grads


@needs_ext
def test_cpu_backend_uses_the_extension():
    assert _ext.routed_lora_cpu() is lora_cpu
    assert _ext.gate_cpu() is gate_cpu
    assert _ext.isa() in ("avx512_bf16", "avx512", "avx2", "baseline")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [1, 16, 128, 256])
@pytest.mark.parametrize("n_exp", [1, 5, 64])
def test_matches_reference(cpu_backend, dtype, rank, n_exp):
    # odd sizes: no dimension is a multiple of a vector or a panel
    for n_slice, use_gate in ((1, True), (3, False)):
        check_against_reference(*make_inputs(37, 29, 19, rank, n_exp, n_slice, dtype, gate=use_gate))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multiple_tiles_chunks_and_column_blocks(cpu_backend, dtype):
    # > 96 tokens per tile, > 256 tokens per weight-gradient chunk, > 128 columns per block
    idx = torch.cat([torch.zeros(300, dtype=torch.int64), torch.randint(0, 3, (310,))])[torch.randperm(610)]
    check_against_reference(*make_inputs(610, 150, 140, 20, 3, 2, dtype, idx=idx))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_experts_get_zero_weight_grads(cpu_backend, dtype):
    idx = torch.tensor([0, 3, 3, 0, 5, 0] * 5)
    x, _, a, b, g = make_inputs(30, 24, 20, 8, 7, 1, dtype)
    _, (_, da, db, _) = check_against_reference(x, idx, a, b, g)
    for e in (1, 2, 4, 6):
        assert not da[e].any() and not db[e].any()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skipped_tokens_inside_the_extension(cpu_backend, dtype):
    """expert_idx -1 (a halted token) is skipped in the kernel itself: several tiles and weight-gradient chunks
    with holes, against the reference (which gives skipped rows zero output and gradient); odd counts for bf16."""
    idx = torch.randint(0, 3, (611,))
    idx[torch.randperm(611)[:250]] = -1
    _, (dx, _, _, dg) = check_against_reference(*make_inputs(611, 150, 140, 20, 3, 2, dtype, idx=idx))
    assert not dx[idx < 0].any() and not dg[idx < 0].any()
    x, _, a, b, g = make_inputs(50, 24, 20, 8, 3, 1, dtype)
    y, (dx, da, db, _) = run_public(x, torch.full((50,), -1), a, b, g, 1.0, torch.randn(50, 20).to(dtype))
    assert not y.any() and not dx.any() and not da.any() and not db.any()


@needs_ext
@pytest.mark.parametrize("n_slice", [1, 3])
def test_all_tokens_on_one_expert(cpu_backend, n_slice):
    idx = torch.full((200,), 2, dtype=torch.int64)
    check_against_reference(*make_inputs(200, 40, 36, 16, 4, n_slice, torch.float32, idx=idx))


@needs_ext
def test_non_contiguous_inputs(cpu_backend):
    x, idx, a, b, g = make_inputs(48, 20, 18, 6, 3, 1, torch.float32)
    xs = x.t().contiguous().t()  # (N, D_in) with column-major strides
    idx_s = torch.stack([idx, idx], 1)[:, 1]
    a_s = a[:, 0].transpose(1, 2).contiguous().transpose(1, 2)  # (E, R, D_in) non-contiguous
    b_s = b[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    g_s = torch.stack([g, g], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (xs, idx_s, a_s, b_s, g_s))
    y = tp_kernels.routed_lora(xs, idx_s, a_s, b_s, scale=0.5, gate=g_s)
    assert_close(y, routed_lora_reference(x.double(), idx, a.double(), b.double(), g.double(), 0.5), torch.float32, "y")
    # leading dims (B, T, D) and a noncontiguous grad: the op flattens and makes them contiguous
    y3 = tp_kernels.routed_lora(xs.reshape(6, 8, 20), idx_s.reshape(6, 8), a_s, b_s, scale=0.5, gate=g_s.reshape(6, 8))
    torch.testing.assert_close(y3.reshape(48, 18), y, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_identical_repeats_and_thread_counts(cpu_backend, dtype):
    inputs = make_inputs(700, 96, 80, 24, 4, 2, dtype)
    gy = torch.randn(700, 160).to(dtype)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            y, grads = run_public(*inputs, 0.5, gy)
            results.append([y] + grads)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_weights_are_reused_in_a_scope_and_match_packing_per_call(cpu_backend, dtype):
    idx = torch.randint(0, 3, (300,))
    idx[::7] = -1  # skipped tokens, and expert 3 gets none: packed anyway, never used
    inputs = make_inputs(300, 96, 80, 24, 4, 3, dtype, idx=idx)
    gy = torch.randn(300, 240).to(dtype)
    x, a, b, g = (t.detach().clone().requires_grad_(True) for t in (inputs[0], *inputs[2:]))

    def step():  # the same weight tensors every call, as the T steps of a recursion use them
        y = tp_kernels.routed_lora(x, idx, a, b, scale=0.5, gate=g)
        return [y.detach(), *torch.autograd.grad(y, (x, a, b, g), gy)]

    with tp_kernels.reuse_packed_weights():
        cached = [step() for _ in range(3)]
        assert len(lora_cpu.PACKED) == 2  # one forward and one backward packing for the three calls
        assert lora_cpu.PACKED.get(a, b, backward=False) is lora_cpu.PACKED.get(a, b, backward=False)
        with tp_kernels.reuse_packed_weights():  # nested: the same copies
            assert len(lora_cpu.PACKED) == 2
        assert len(lora_cpu.PACKED) == 2
    assert len(lora_cpu.PACKED) == 0 and lora_cpu.PACKED.get(a, b, backward=False) is None
    per_call = step()  # outside a scope: every call packs its experts in use itself
    for outputs in cached:
        for got, want in zip(outputs, per_call):
            assert torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["routed_lora", "refine_step"])
def test_backward_of_a_scope_packs_once_after_the_scope_ended(cpu_backend, monkeypatch, dtype, op):
    """A recursion's T calls run in a scope; autograd runs their backward after it: the calls' backward share one
    packing, and only that one outlives the scope."""
    packs = []
    real = lora_cpu.pack
    monkeypatch.setattr(lora_cpu, "pack", lambda a, b, backward: packs.append(backward) or real(a, b, backward))
    x, idx, a, b, _ = make_inputs(90, 48, 40, 8, 3, 3, dtype)
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    token_weight = torch.randn(3, 48).to(dtype)

    def call(inp):
        if op == "routed_lora":
            return tp_kernels.routed_lora(inp, idx, a, b, scale=0.5)
        return tp_kernels.refine_step(inp, a, b, token_weight=token_weight, scale=0.5)[0]

    with tp_kernels.reuse_packed_weights():
        ys = [call(x * (t + 1)) for t in range(3)]
    assert packs == [False] and len(lora_cpu.PACKED) == 0
    got = torch.autograd.grad(sum(y.float().square().sum() for y in ys), (x, a, b))
    assert packs == [False, True]
    packs.clear()
    ys = [call(x * (t + 1)) for t in range(3)]  # outside a scope: every call packs for itself
    want = torch.autograd.grad(sum(y.float().square().sum() for y in ys), (x, a, b))
    assert packs == []  # ... inside the extension, not through the shared packing
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_ext
@pytest.mark.parametrize("update", ["fused AdamW", ".data write", "in-place op"])
def test_weight_updates_between_calls_are_seen_whatever_their_version_counter(cpu_backend, update):
    """torch's fused AdamW and writes through .data change the weights without bumping their version counter: no
    packed copy may outlive the call (or scope) it was made for."""
    x, idx, a, b, _ = make_inputs(64, 32, 32, 8, 3, 3, torch.float32)
    a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
    before = lora_cpu.forward(x, idx, a, b, None, 1.0)[0]
    if update == "fused AdamW":
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        torch.optim.AdamW([a, b], lr=0.1, fused=True).step()
    elif update == ".data write":
        a.data.mul_(2.0)
        b.data.add_(0.5)
    else:
        with torch.no_grad():
            a.mul_(2.0)
            b.add_(0.5)
    after = lora_cpu.forward(x, idx, a, b, None, 1.0)[0]
    want = routed_lora_reference(x.double(), idx, a.detach().double(), b.detach().double(), None, 1.0).float()
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before)


@needs_ext
def test_packed_weights_scope_works_in_inference_mode(cpu_backend):
    x, idx, a, b, _ = make_inputs(64, 32, 32, 8, 3, 3, torch.float32)
    want = lora_cpu.forward(x, idx, a, b, None, 1.0)[0]
    with torch.inference_mode(), tp_kernels.reuse_packed_weights():  # no version counters there
        xi, ai, bi = x.clone(), a.clone(), b.clone()
        assert torch.equal(lora_cpu.forward(xi, idx, ai, bi, None, 1.0)[0], want)
        assert len(lora_cpu.PACKED) == 1


@needs_ext
def test_bf16_rank_cutover_applies_only_without_bf16_dot_products(monkeypatch):
    x, idx, a, b, g = make_inputs(40, 24, 20, lora_cpu.BF16_EXT_MAX_RANK + 1, 3, 1, torch.bfloat16)
    h = torch.randn(40, a.shape[2])
    calls = []
    monkeypatch.setattr(lora_torch, "forward", lambda *args: calls.append("forward"))
    monkeypatch.setattr(lora_torch, "backward", lambda *args: calls.append("backward"))
    lora_cpu.forward(x, idx, a, b, g, 0.5)
    lora_cpu.backward(torch.randn(40, 20).to(torch.bfloat16), x, idx, a, b, g, h, *group_by_expert(idx, 3), 0.5, True,
                      True, True)
    # with bf16 dot products the extension's GEMMs are the fast ones at any rank: no cut-over
    assert calls == ([] if _ext.bf16_dot() else ["forward", "backward"])


@needs_ext
def test_bf16_above_the_rank_cutover_matches_reference():
    with tp_kernels.use_backend("cpu"):
        check_against_reference(*make_inputs(40, 24, 20, lora_cpu.BF16_EXT_MAX_RANK + 1, 3, 1, torch.bfloat16), 0.5)


@needs_ext
@pytest.mark.parametrize("n_slice", [1, 2])
def test_bf16_weight_gradient_chunks_with_odd_token_counts(cpu_backend, n_slice):
    # wide rows -> short weight-gradient chunks: many chunks per expert, odd tokens per expert and per last chunk
    idx = torch.cat([torch.zeros(301, dtype=torch.int64), torch.full((77,), 2), torch.full((1,), 3)])[torch.randperm(379)]
    check_against_reference(*make_inputs(379, 1101, 1033, 7, 5, n_slice, torch.bfloat16, idx=idx))


@needs_ext
def test_out_of_range_index_raises_in_the_backend():
    x, idx, a, b, _ = make_inputs(8, 4, 4, 2, 3, 1, torch.float32)
    idx[5] = 3
    with pytest.raises(IndexError, match=r"expert_idx must lie in \[0, 3\) or be -1"):
        lora_cpu.forward(x, idx, a, b, None, 1.0)
    idx[5] = -2
    with pytest.raises(IndexError, match=r"expert_idx must lie in \[0, 3\) or be -1"):
        lora_cpu.forward(x, idx, a, b, None, 1.0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes_fall_back_to_the_torch_path(dtype):
    x, idx, a, b, g = make_inputs(20, 8, 6, 4, 3, 1, dtype)
    y, h, _, _ = lora_cpu.forward(x, idx, a, b, g, 1.0)
    expected = routed_lora_reference(x.double(), idx, a.double(), b.double(), g.double(), 1.0)
    torch.testing.assert_close(y.double(), expected, rtol=5e-3, atol=5e-3)


@needs_ext
def test_empty_batch(cpu_backend):
    x, idx, a, b, g = make_inputs(0, 8, 6, 4, 3, 1, torch.float32)
    y, grads = run_public(x, idx, a, b, g, 1.0, torch.zeros(0, 6))
    assert y.shape == (0, 6)
    assert not grads[1].any() and not grads[2].any()


# ---- top-1 gate ----


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_exp", [1, 5, 64, 700])
@pytest.mark.parametrize("with_noise", [False, True], ids=["plain", "noise"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_gate_matches_reference(cpu_backend, dtype, n_exp, with_noise, tau):
    logits = (torch.randn(333, n_exp) * 3).to(dtype)
    noise = tp_kernels.gumbel_noise(logits.shape) if with_noise else None
    z = logits.float() + (0 if noise is None else noise)
    idx, probs = gate_top1_reference(logits, noise, tau, hard=False)
    got_idx, got_probs, _ = gate_cpu.forward(logits, noise, tau, False)
    # argmax may differ only where z has an exact tie with another entry
    assert torch.equal(got_idx, idx) or torch.equal(z.gather(1, got_idx[:, None]), z.gather(1, idx[:, None]))
    torch.testing.assert_close(got_probs, probs, rtol=1e-5, atol=1e-7)
    h_idx, weight, h_probs = gate_cpu.forward(logits, noise, tau, True)
    assert torch.equal(h_idx, got_idx) and torch.equal(h_probs, got_probs)
    assert weight.dtype == torch.float32 and bool((weight == 1).all())


@needs_ext
def test_gate_ties_go_to_the_lowest_index_and_extremes():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-float("inf"), 0.0, -float("inf"), 0.0],
                           [1e30, -1e30, 0.0, 1e30], [0.0, 0.0, 0.0, 100.0]])
    idx, _, probs = gate_cpu.forward(logits, None, 1.0, True)
    assert idx.tolist() == [1, 0, 1, 0, 3]
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=2e-6, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("hard", [True, False])
def test_gate_gradients_match_reference(cpu_backend, hard):
    logits = torch.randn(40, 6, requires_grad=True)
    noise = tp_kernels.gumbel_noise(logits.shape)
    idx, gate = tp_kernels.gate_top1(logits, tau=0.7, noise=noise, hard=hard)
    weights = torch.randn(gate.shape)
    (gate * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_idx, ref_gate = gate_top1_reference(ref_logits, noise.double(), 0.7, hard)
    (ref_gate * weights.double()).sum().backward()
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)


@needs_ext
def test_gate_thread_counts_agree():
    logits = torch.randn(20000, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gate_cpu.forward(logits, None, 0.5, True)
        torch.set_num_threads(2)
        two = gate_cpu.forward(logits, None, 0.5, True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(one, two))


# ---- the gate's token term: logits = h W^T and dh += d logits W ----


def check_gate_token_term(n, d, e, dtype, seed=0):
    """The extension's logits and their input gradient against float64 on the same (dtype-rounded) values."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g, dtype=torch.float64) + 1).to(dtype)
    w = torch.randn(e, d, generator=g, dtype=torch.float64).to(dtype)
    dl = torch.randn(n, e, generator=g, dtype=torch.float64).float()
    dh = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    logits = gate_cpu.logits(h, w)
    assert logits.dtype == torch.float32 and logits.shape == (n, e)
    exact = h.double() @ w.double().t()
    if dtype == torch.bfloat16:  # rounded to bf16, as a bf16 Linear's output
        assert torch.equal(logits, logits.to(dtype).float())
        torch.testing.assert_close(logits.double(), exact, rtol=8e-3, atol=1e-5 * d ** 0.5)
    else:
        torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5 * d ** 0.5)
    want = dh.double() + dl.double() @ w.double()
    gate_cpu.add_logits_grad(dh, dl, w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)  # one bf16 rounding
    torch.testing.assert_close(dh.double(), want, **tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d, e", [(5, 1), (37, 5), (384, 5), (130, 9)])
def test_gate_token_term_matches_float64(dtype, d, e):
    check_gate_token_term(203, d, e, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_token_term_rows_are_batch_and_thread_invariant(dtype):
    h = torch.randn(700, 96).to(dtype)
    w = torch.randn(5, 96).to(dtype)
    dl = torch.randn(700, 5)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            dh = torch.ones(700, 96, dtype=dtype)
            gate_cpu.add_logits_grad(dh, dl, w)
            results.append((gate_cpu.logits(h, w), dh))
        finally:
            torch.set_num_threads(2)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    alone = gate_cpu.logits(h[13:14].contiguous(), w)
    assert torch.equal(alone[0], results[0][0][13])


def test_gate_token_term_falls_back_to_torch_for_other_inputs():
    h = torch.randn(20, 8, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    assert gate_cpu.logits(h, w).dtype == torch.float64
    wide = torch.randn(20, 16)[:, :8]  # not contiguous
    torch.testing.assert_close(gate_cpu.logits(wide, w.float()), wide @ w.float().t())


# ---- without the extension ----


def test_no_ext_env_disables_it_and_ops_still_match(monkeypatch, cpu_backend):
    monkeypatch.setenv("TP_KERNELS_NO_EXT", "1")
    assert _ext.library() is None and _ext.routed_lora_cpu() is None and _ext.gate_cpu() is None
    check_against_reference(*make_inputs(40, 16, 12, 4, 3, 1, torch.float32))
    logits = torch.randn(30, 4)
    idx, gate = tp_kernels.gate_top1(logits)
    assert torch.equal(idx, logits.argmax(-1)) and bool((gate == 1).all())


_ISA_SCRIPT = """
import torch, tp_kernels
from tp_kernels import _ext
from tp_kernels.gate_top1 import cpu as gate_cpu
import sys; sys.path.append({tests!r})
from kernel_helpers import make_inputs
from test_cpu_extension import check_against_reference
assert _ext.isa() == {isa!r}, _ext.isa()
assert not _ext.bf16_dot()
with tp_kernels.use_backend("cpu"):
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(*make_inputs(130, 37, 150, 20, 3, 2, dtype))
        check_against_reference(*make_inputs(50, 40, 20, 3, 2, 1, dtype))
logits = torch.randn(300, 7)
torch.testing.assert_close(gate_cpu.forward(logits, None, 1.0, True)[2], torch.softmax(logits, -1))
# the attention kernel at a head dim of 2-vector panels and a remainder (72), keys not a whole number of vectors
qkv = torch.randn(2, 33, 3 * 2 * 72, dtype=torch.float64)
grad_out = torch.randn(2, 33, 2 * 72, dtype=torch.float64)
got, want = qkv.float().requires_grad_(), qkv.clone().requires_grad_()
out = tp_kernels.joint_attention(got, 2)
out.backward(grad_out.float())
ref = tp_kernels.joint_attention_reference(want, 2)
ref.backward(grad_out)
torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=2e-6)
# the gate's token term
from test_cpu_extension import check_gate_token_term
for dtype in (torch.float32, torch.bfloat16):
    check_gate_token_term(70, 37, 5, dtype)
# the LayerNorm kernel over rows with a tail past whole vectors
from tp_kernels.layer_norm import cpu as norm_cpu
x = torch.randn(70, 37, dtype=torch.float64) * 2 + 5
grad = torch.randn(70, 37, dtype=torch.float64)
for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
    xd, gd = x.to(dtype), grad.to(dtype)
    y, mean, rstd = norm_cpu.forward(xd, 1e-6)
    dx = norm_cpu.backward(gd, xd, mean, rstd)
    want = xd.double().requires_grad_()
    ref = tp_kernels.layer_norm_reference(want, 1e-6)
    ref.backward(gd.double())
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), want.grad, rtol=tol, atol=tol)
"""


LEVELS = ("avx512_bf16", "avx512", "avx2", "baseline")  # csrc/dispatch.cpp, widest first


@needs_ext
def test_bf16_dot_products_come_with_their_level():
    assert _ext.bf16_dot() == (_ext.isa() == "avx512_bf16")


@needs_ext
@pytest.mark.parametrize("isa", LEVELS[1:])
def test_narrower_instruction_sets(isa, tmp_path):
    if LEVELS.index(isa) < LEVELS.index(_ext.isa()):
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, TP_KERNELS_ISA=isa)
    # cwd outside the checkout, so the subprocess imports the installed package (with its built library)
    script = _ISA_SCRIPT.format(isa=isa, tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def reload_ext():
    """_ext._load() run afresh under the test's monkeypatching, and once more afterwards with the real values."""
    _ext._load.cache_clear()
    yield
    _ext._load.cache_clear()


@needs_ext
@pytest.mark.parametrize("stale", ["version", "symbol"])
def test_mismatched_extension_falls_back_with_a_warning(monkeypatch, cpu_backend, reload_ext, stale):
    """A library from other sources (another interface version, or a function missing) is never called."""
    if stale == "version":
        monkeypatch.setattr(_ext, "ABI_VERSION", _ext.ABI_VERSION + 1)
    else:
        monkeypatch.setitem(_ext._SIGNATURES, "tp_function_of_a_newer_build", (ctypes.c_int, []))
    with pytest.warns(UserWarning, match="rebuild it"):
        assert _ext.library() is None
    assert _ext.routed_lora_cpu() is None and _ext.gate_cpu() is None
    check_against_reference(*make_inputs(40, 16, 12, 4, 3, 1, torch.float32))


@needs_ext
def test_extension_reports_this_interface_version():
    assert _ext.library().tp_abi_version() == _ext.ABI_VERSION
