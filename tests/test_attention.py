"""tp_kernels.joint_attention: the CPU kernel (csrc/attention.cpp) and the composed torch path against the float64
reference, when each runs, its thread-count determinism, opcheck, and bad input."""

import pytest
import torch

import tp_kernels
from tp_kernels import _ext
from tp_kernels import joint_attention, joint_attention_reference
from tp_kernels.joint_attention import cpu as attention_cpu
from tp_kernels.joint_attention import functional as attention_functional
from tp_kernels.joint_attention.op import joint_attention_bwd, joint_attention_fwd

from call_counter import counted_calls  # tests/ is on sys.path

needs_ext = pytest.mark.skipif(_ext.library() is None, reason="CPU extension not built or TP_KERNELS_NO_EXT=1")

# (batch, vision tokens, heads, head dim, context tokens, context queries too)
SHAPES = [(2, 7, 3, 20, 0, False), (3, 5, 2, 8, 3, True), (2, 33, 2, 72, 9, False), (1, 40, 4, 16, 17, True),
          (2, 1, 1, 4, 0, False)]


def _inputs(batch, tokens, heads, head_dim, ctx, ctx_q, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * dim, generator=g, dtype=dtype)
    context = [None, None, None]
    if ctx:
        context = [torch.randn(batch, ctx, dim, generator=g, dtype=dtype) if ctx_q else None,
                   torch.randn(batch, ctx, dim, generator=g, dtype=dtype),
                   torch.randn(batch, ctx, dim, generator=g, dtype=dtype)]
    return qkv, context


def _run(fn, qkv, context, heads, grad_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (qkv, *context)]
    out = fn(leaves[0], heads, *leaves[1:])
    out.backward(grad_out.to(out.dtype))
    return out, [None if t is None else t.grad for t in leaves]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_the_float64_reference(shape):
    heads = shape[2]
    qkv, context = _inputs(*shape)
    grad_out = torch.randn(*qkv.shape[:2], qkv.shape[2] // 3, dtype=qkv.dtype)
    if shape[5]:  # the context's query rows follow
        grad_out = torch.randn(qkv.shape[0], qkv.shape[1] + shape[4], qkv.shape[2] // 3, dtype=qkv.dtype)
    want, want_grads = _run(joint_attention_reference, qkv, context, heads, grad_out)
    with counted_calls(attention_cpu, "forward") as calls:
        got, got_grads = _run(joint_attention, qkv.float(), [None if c is None else c.float() for c in context],
                              heads, grad_out)
    assert calls, "the kernel did not run"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
    for name, g, w in zip(("qkv", "context_q", "context_k", "context_v"), got_grads, want_grads):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_every_backend_matches_the_reference(backend, shape):
    """Every CPU backend (conftest's ``backend``): the kernel on "cpu" where built, torch's attention otherwise."""
    heads = shape[2]
    qkv, context = _inputs(*shape)
    got = joint_attention(qkv.float(), heads, *[None if c is None else c.float() for c in context])
    torch.testing.assert_close(got.double(), joint_attention_reference(qkv, heads, *context), rtol=1e-5, atol=2e-6)


@needs_ext
def test_kernel_runs_in_training_and_inference_within_the_budget(monkeypatch):
    qkv, _ = _inputs(2, 6, 2, 8, 0, False, dtype=torch.float32)
    with counted_calls(attention_cpu, "forward") as calls:
        joint_attention(qkv, 2)  # no input needs a gradient
        with torch.no_grad():
            joint_attention(qkv.clone().requires_grad_(), 2)
        with torch.inference_mode():
            joint_attention(qkv, 2)
        assert len(calls) == 3
        joint_attention(qkv.clone().requires_grad_(), 2).sum().backward()
        assert len(calls) == 4
        monkeypatch.setattr(attention_functional, "MAX_SCORES", 6 * 6 - 1)  # one score short
        joint_attention(qkv, 2)
        assert len(calls) == 4
        monkeypatch.setattr(attention_functional, "MAX_SCORES", 6 * 6)
        with tp_kernels.use_backend("torch"):
            joint_attention(qkv, 2)
        joint_attention(qkv.double(), 2)  # the kernel is fp32
        assert len(calls) == 4


@needs_ext
def test_kernel_is_bit_identical_across_thread_counts():
    qkv, context = _inputs(3, 37, 4, 24, 11, True, dtype=torch.float32)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            out, lse = attention_cpu.forward(qkv, *context, 4)
            grads = attention_cpu.backward(torch.ones_like(out), qkv, *context, out, lse, 4)
        finally:
            torch.set_num_threads(2)
        results.append((out, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_ext
def test_strided_inputs():
    qkv, context = _inputs(2, 9, 3, 8, 4, False, dtype=torch.float32)
    wide = torch.cat([qkv, torch.randn(2, 9, 5)], dim=-1)[..., :qkv.shape[-1]].requires_grad_()  # row stride 3D + 5
    got = joint_attention(wide, 3, *context)
    torch.testing.assert_close(got.double(), joint_attention_reference(qkv.double(), 3, *[
        None if c is None else c.double() for c in context]), rtol=1e-5, atol=2e-6)


@needs_ext
@pytest.mark.parametrize("with_q", [False, True])
def test_opcheck(with_q):
    qkv, context = _inputs(2, 5, 2, 4, 3, with_q, dtype=torch.float32)
    qkv.requires_grad_()
    torch.library.opcheck(joint_attention_fwd, (qkv, *context, 2))
    out, lse = joint_attention_fwd(qkv.detach(), *context, 2)
    torch.library.opcheck(joint_attention_bwd, (torch.randn_like(out), qkv.detach(), *context, out, lse, 2))


@pytest.mark.parametrize("bad, match", [
    (dict(qkv=torch.zeros(2, 5, 10)), "qkv must be"),
    (dict(num_heads=4), "num_heads must be"),
    (dict(context_k=torch.zeros(2, 3, 6)), "context_k and context_v come together"),
    (dict(context_k=torch.zeros(2, 3, 6), context_v=torch.zeros(2, 4, 6)), "context_v must be"),
    (dict(context_k=torch.zeros(3, 3, 6), context_v=torch.zeros(3, 3, 6)), "context_k must be"),
    (dict(context_k=torch.zeros(2, 3, 6), context_v=torch.zeros(2, 3, 6, dtype=torch.float64)), "context_v must be"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(qkv=torch.zeros(2, 5, 18, requires_grad=True), num_heads=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        joint_attention(**args)
