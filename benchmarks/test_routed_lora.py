"""routed_lora against its peers: one group per (mode, shape, dtype), all on identical inputs.

Peers (benchmarks/peers.py): every expert then select, a boolean-mask loop, sort +
per-expert GEMM with a host-read count, a per-sample (peft mixed batch) LoRA, and
the unrouted single LoRA that bounds what routing can cost.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tp_kernels

from . import flop_model
from .peers import HOST_SYNCING, ROUTED_PEERS
from .shapes import DTYPES, lora_shapes

IMPLS = ("ours", *ROUTED_PEERS)
# Peers that compute the same function as ours (checked before timing); the others solve easier problems.
SAME_FUNCTION = ("dense_mixture", "mask_loop", "sort_scatter")
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def pytest_generate_tests(metafunc):
    if "lora_shape" in metafunc.fixturenames:
        shapes = lora_shapes(metafunc.config.getoption("quick"))
        metafunc.parametrize("lora_shape", shapes, ids=[s.key.replace(" ", "-") for s in shapes])


@functools.lru_cache(maxsize=1)
def make_inputs(shape, dtype_name, device, backward):
    """x (N, D), idx (N,), A (E, R, D), B (E, D, R), per-sample experts, grad_y (N, D): seeded, so identical per impl."""
    gen = torch.Generator(device=device).manual_seed(0)
    n, d, r, e = shape.tokens, shape.d, shape.rank, shape.experts
    dtype = DTYPES[dtype_name]
    x = torch.randn(n, d, generator=gen, device=device).to(dtype)
    idx = torch.randint(0, e, (n,), generator=gen, device=device)
    lora_a = (torch.randn(e, r, d, generator=gen, device=device) / d**0.5).to(dtype)
    lora_b = (torch.randn(e, d, r, generator=gen, device=device) / r**0.5).to(dtype)
    sample_experts = torch.randint(0, e, (shape.batch,), generator=gen, device=device).tolist()  # host list, like peft
    grad_y = torch.randn(n, d, generator=gen, device=device).to(dtype)
    if backward:
        for t in (x, lora_a, lora_b):
            t.requires_grad_(True)
    return x, idx, lora_a, lora_b, sample_experts, grad_y


def forward_fn(impl, shape, x, idx, lora_a, lora_b, sample_experts):
    if impl == "ours":
        return lambda: tp_kernels.routed_lora(x, idx, lora_a, lora_b)
    if impl == "peft_mixed_batch":
        xb = x.view(shape.batch, shape.seq, shape.d)  # (B, L, D)
        return lambda: ROUTED_PEERS[impl](xb, sample_experts, lora_a, lora_b).view(shape.tokens, -1)
    return functools.partial(ROUTED_PEERS[impl], x, idx, lora_a, lora_b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_routed_lora(bench, device, lora_shape, dtype_name, mode, impl):
    backward = mode == "fwd+bwd"
    x, idx, lora_a, lora_b, sample_experts, grad_y = make_inputs(lora_shape, dtype_name, device, backward)
    forward = forward_fn(impl, lora_shape, x, idx, lora_a, lora_b, sample_experts)
    if impl in SAME_FUNCTION and not backward:
        tol = TOLERANCE[dtype_name]
        with torch.no_grad():
            torch.testing.assert_close(forward().float(), tp_kernels.routed_lora(x, idx, lora_a, lora_b).float(),
                                       rtol=tol, atol=tol)

    if backward:
        def step():
            return torch.autograd.grad(forward(), (x, lora_a, lora_b), grad_y)
    else:
        def step():
            with torch.no_grad():
                return forward()

    dtype = DTYPES[dtype_name]
    cost = flop_model.routed_lora(lora_shape.tokens, lora_shape.d, lora_shape.d, lora_shape.rank,
                                  lora_shape.experts, dtype.itemsize, backward=backward)
    bench(step, group=f"routed_lora {mode} | {lora_shape.key} | {dtype_name}", impl=impl, cost=cost, dtype=dtype,
          graphable=impl not in HOST_SYNCING, op="routed_lora", mode=mode, shape=lora_shape.as_dict())
