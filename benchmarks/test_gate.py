"""gate_top1 against the composed torch gate and bare torch.softmax on the same logits.

The target: ours within 1.3x of a bare softmax. fwd runs under no_grad (inference);
fwd+bwd differentiates the gate (the straight-through path) into the logits.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tp_kernels

from . import flop_model
from .peers import composed_gate_top1
from .shapes import DTYPES, gate_shapes

TAU = 5.0  # the paper's Gumbel-softmax temperature
IMPLS = ("ours", "composed", "softmax")


def pytest_generate_tests(metafunc):
    if "gate_shape" in metafunc.fixturenames:
        shapes = gate_shapes(metafunc.config.getoption("quick"))
        metafunc.parametrize("gate_shape", shapes, ids=[s.key.replace(" ", "-") for s in shapes])


@functools.lru_cache(maxsize=1)
def make_inputs(shape, dtype_name, device, backward):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (2 * torch.randn(shape.tokens, shape.experts, generator=gen, device=device)).to(DTYPES[dtype_name])
    noise = tp_kernels.gumbel_noise(logits.shape, generator=gen, device=device)  # (N, E) fp32
    logits.requires_grad_(backward)
    return logits, noise


def gate_fn(impl, logits, noise):
    """A callable returning the differentiable float output of ``impl``."""
    if impl == "ours":
        return lambda: tp_kernels.gate_top1(logits, tau=TAU, noise=noise)[1]
    if impl == "composed":
        return lambda: composed_gate_top1(logits, noise, TAU)[1]
    return lambda: torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_gate_top1(bench, device, gate_shape, dtype_name, mode, impl):
    backward = mode == "fwd+bwd"
    logits, noise = make_inputs(gate_shape, dtype_name, device, backward)
    if impl == "composed":
        with torch.no_grad():
            ours_idx, ours_gate = tp_kernels.gate_top1(logits, tau=TAU, noise=noise)
            peer_idx, peer_gate = composed_gate_top1(logits, noise, TAU)
        torch.testing.assert_close(peer_idx, ours_idx, rtol=0, atol=0)
        torch.testing.assert_close(peer_gate, ours_gate)

    forward = gate_fn(impl, logits, noise)
    if backward:
        def step():
            out = forward()
            return torch.autograd.grad(out, logits, torch.ones_like(out))
    else:
        def step():
            with torch.no_grad():
                return forward()

    elem = DTYPES[dtype_name].itemsize
    if impl == "softmax":
        cost = flop_model.softmax(gate_shape.tokens, gate_shape.experts, elem)
    else:
        cost = flop_model.gate_top1(gate_shape.tokens, gate_shape.experts, elem)
    if backward:
        cost = cost * 2  # the backward reads what the forward wrote and writes a logits-sized gradient
    bench(step, group=f"gate_top1 {mode} | {gate_shape.key} | {dtype_name}", impl=impl, cost=cost,
          dtype=DTYPES[dtype_name], op="gate_top1", mode=mode, shape=gate_shape.as_dict())
