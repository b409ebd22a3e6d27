"""The Triton path's host side on fake CUDA tensors (no GPU): capture-safe, and its device work per call pinned.

Fake tensors carry shapes and dtypes only, so the ops take their CUDA path (the Triton backend, launches stubbed)
and anything a CUDA graph could not capture raises: a value read on the host (DataDependentOutputException) or
an op whose output shape depends on the data (DynamicOutputShapeException). The counts are device work items
(Triton launches + torch kernels, tp_kernels._work_items), a count, not a timing.
"""

import pytest
import torch

import tp_kernels
from tp_kernels._work_items import count_work_items, fake_cuda, forward_backward

pytest.importorskip("triton", reason="the Triton path needs triton importable")

N_TOK, DIM, RANK, N_EXP, N_SLICE = 256, 128, 16, 5, 3
GRAD = (True, False, True, True, True)  # routed_lora_fwd's x, idx, lora_a, lora_b, gate


@pytest.fixture
def cuda():
    with fake_cuda():
        yield "cuda"


def lora_inputs(device, n_tok=N_TOK, gate=False, skipped=False):
    x = torch.randn(n_tok, DIM, device=device)
    idx = torch.zeros(n_tok, dtype=torch.int64, device=device)
    a = torch.randn(N_EXP, N_SLICE, RANK, DIM, device=device)
    b = torch.randn(N_EXP, N_SLICE, DIM, RANK, device=device)
    return x, idx, a, b, torch.rand(n_tok, device=device) if gate else None


def refine_inputs(device, active=False, base=False):
    x, _, a, b, _ = lora_inputs(device)
    return (x, a, b, torch.randn(N_EXP, DIM, device=device), torch.randn(1, N_EXP, device=device),
            torch.randn(N_TOK, N_EXP, device=device),
            torch.randn(N_TOK, N_SLICE * DIM, device=device) if base else None,
            5.0, 0.5, 1e-6, True, torch.ones(N_TOK, dtype=torch.bool, device=device) if active else None, True)


def lora_fwd_bwd(x, idx, a, b, gate, grad_y):
    return forward_backward("routed_lora_fwd", (x, idx, a, b, gate, 0.5, True), GRAD[:4] + (gate is not None,) +
                            (False, False), (grad_y, None, None, None))


def refine_fwd_bwd(args, grad_qkv, grad_weight):
    needs = (True, True, True, True, True, False, args[6] is not None) + (False,) * 6
    return forward_backward("refine_step_fwd", args, needs, (grad_qkv, grad_weight) + (None,) * 7)


def grads(device):
    """Upstream gradients of qkv / y and of the gate weight."""
    return torch.randn(N_TOK, N_SLICE * DIM, device=device), torch.ones(N_TOK, device=device)


def test_the_path_runs_on_fake_cuda_tensors(cuda):
    assert tp_kernels.resolve_backend(torch.device(cuda)) == "triton"
    assert torch.randn(2, device=cuda).device.type == "cuda"


@pytest.mark.parametrize("gate", [False, True])
def test_routed_lora_reads_nothing_back_and_has_static_shapes(cuda, gate):
    x, idx, a, b, g = lora_inputs(cuda, gate=gate)
    grad_y, _ = grads(cuda)
    with count_work_items(stub=True) as items:
        y = tp_kernels.routed_lora(x.reshape(4, 64, DIM), idx.reshape(4, 64), a, b, scale=0.5,
                                   gate=None if g is None else g.reshape(4, 64))
        (y2, h, perm, offsets), dx = lora_fwd_bwd(x, idx, a, b, g, grad_y)
    assert y.shape == (4, 64, N_SLICE * DIM) and y2.shape == (N_TOK, N_SLICE * DIM)
    assert perm.shape == (N_TOK,) and offsets.shape == (N_EXP + 1,)
    assert dx[0].shape == x.shape and dx[2].shape == a.shape and dx[3].shape == b.shape
    assert (dx[4] is not None) == gate
    assert items.host_reads == []


@pytest.mark.parametrize("active, base", [(False, False), (True, True)])
def test_refine_step_reads_nothing_back_and_has_static_shapes(cuda, active, base):
    args = refine_inputs(cuda, active=active, base=base)
    upstream = grads(cuda)
    with count_work_items(stub=True) as items:
        qkv, idx, weight = tp_kernels.refine_step(args[0].reshape(2, 128, DIM), *args[1:3], token_weight=args[3],
                                                  cond_logits=args[4], noise=args[5].reshape(2, 128, N_EXP), tau=5.0,
                                                  active=None if args[11] is None else args[11].reshape(2, 128))
        outputs, d = refine_fwd_bwd(args, *upstream)
    assert qkv.shape == (2, 128, N_SLICE * DIM) and idx.shape == weight.shape == (2, 128)
    assert d[0].shape == args[0].shape and d[3].shape == args[3].shape and d[4].shape == (1, N_EXP)
    assert items.host_reads == []


def test_gate_reads_nothing_back(cuda):
    with count_work_items(stub=True) as items:
        idx, gate = tp_kernels.gate_top1(torch.randn(3, 7, N_EXP, device=cuda), tau=5.0,
                                         noise=torch.randn(3, 7, N_EXP, device=cuda))
    assert idx.shape == gate.shape == (3, 7) and items.host_reads == []


def test_a_host_read_would_be_caught(cuda):
    """The mechanism can fail: reading a value back raises on fake tensors."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with pytest.raises(DataDependentOutputException):
        bool(torch.zeros(3, device=cuda).any())


# Device work items per call at 256 tokens, D 128, rank 16, 5 experts, 3 slices (the same up to 8192 tokens:
# above that the grouping takes two launches). Pinned: a change that adds a launch or a torch kernel fails here.
LORA_FWD = ["_group_scatter_kernel", "_fwd_kernel", "aten._assert_async.msg"]
WORK_ITEMS = {
    "routed_lora forward": LORA_FWD,
    "routed_lora fwd+bwd": LORA_FWD + ["_bwd_dh_kernel", "_bwd_dx_kernel", "_weight_grad_kernel"],
    # the torch kernels: d cond_logits (a sum of d logits) and d token_weight (the sum of its per-block parts); no
    # LayerNorm recomputed (the forward's statistics are saved) and no cast, in bf16 as in fp32
    "refine_step fwd+bwd": ["_stats_gate_kernel", "_group_scatter_kernel", "_fwd_kernel", "_bwd_dh_kernel",
                            "_bwd_dx_kernel", "_weight_grad_kernel", "_gate_ln_bwd_kernel",
                            "aten.sum.dim_IntList", "aten.sum.dim_IntList"],
}


def work_items(name, device, dtype=torch.float32):
    x, idx, a, b, _ = (t.to(dtype) if t is not None and t.is_floating_point() else t for t in lora_inputs(device))
    args = tuple(t.to(dtype) if i in (0, 1, 2, 3) else t for i, t in enumerate(refine_inputs(device)))
    upstream = tuple(g.to(dtype) for g in grads(device))
    with count_work_items(stub=True) as items, torch.no_grad():
        if name == "routed_lora forward":
            tp_kernels.routed_lora(x, idx, a, b, scale=0.5)
        elif name == "routed_lora fwd+bwd":
            lora_fwd_bwd(x, idx, a, b, None, upstream[0])
        else:
            refine_fwd_bwd(args, *upstream)
    return items


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(WORK_ITEMS))
def test_work_items_per_call_are_pinned(cuda, name, dtype):
    items = work_items(name, cuda, dtype)
    assert sorted(items.triton + items.torch) == sorted(WORK_ITEMS[name])


def test_work_items_within_their_budget(cuda):
    """The budgets per call: routed_lora forward 3, forward + backward 8, refine_step forward + backward 12."""
    for name, budget in (("routed_lora forward", 3), ("routed_lora fwd+bwd", 8), ("refine_step fwd+bwd", 12)):
        assert work_items(name, cuda).total <= budget, name


def test_many_tokens_group_in_two_launches(cuda):
    x, idx, a, b, _ = lora_inputs(cuda, n_tok=20000)
    with count_work_items(stub=True) as items, torch.no_grad():
        tp_kernels.routed_lora(x, idx, a, b, scale=0.5)
    assert items.triton == ["_group_count_kernel", "_group_scatter_kernel", "_fwd_kernel"]


@pytest.mark.parametrize("training", [False, True])
def test_a_recursion_block_reads_nothing_back_and_draws_its_noise_once(cuda, training):
    """RecursiveAttention's forward (T = 3, the Triton path): no host read, three launches per step, the gate's
    Gumbel noise drawn once per call (train mode) and no halting buffer with halting off."""
    from thinking_pixel.models import Attention
    from thinking_pixel.recursion import RecursiveAttention

    with torch.device(cuda):
        block = RecursiveAttention.from_attention(Attention(DIM, 4), experts=N_EXP, steps=3, rank=RANK).train(training)
        x, cond = torch.randn(2, 128, DIM), torch.randn(2, DIM)
    with count_work_items(stub=True) as items, torch.no_grad():
        out = block(x, cond)
    assert out.shape == x.shape and items.host_reads == []
    assert items.triton == ["_stats_gate_kernel", "_group_scatter_kernel", "_fwd_kernel"] * 3
    assert items.torch.count("aten.exponential_.default") == (1 if training else 0)
    assert "aten.zeros.default" not in items.torch
